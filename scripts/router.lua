-- router.lua: maps {METHOD} /{user}/{sandbox}/{rest} (or a sandbox host, see sandbox_path.lua)
-- to the sandbox's route and forwards.
--   unknown sandbox          -> 404 {"error":"sandbox not found","path":"user/sandbox"}
--   a port not allowed       -> 403 {"error":"port not allowed","path":..,"port":N,"allowed":[..]}
--                               (never dialled; checked before readiness and wake)
--   known, not ready         -> 503 {"error":"sandbox not ready","path":..,"reason":..} + Retry-After
--   ready, no address        -> 503 {"error":"sandbox has no address","path":..,"reason":..}
--                               + Retry-After (reason: e.g. a podIPs entry that is not an IP)
--   a refused address        -> 503 {"error":"sandbox address refused: loopback address",..}
--                               from the core (unspecified, loopback unless
--                               allow_loopback_sandboxes, link-local, multicast, broadcast)
--   no user/sandbox in path  -> 400 with the expected form
--   suspended or starting    -> held while wake.lua wakes it / waits for it, then forwarded
--   another user's sandbox   -> 403 when auth.lua is on (the sandbox's owner must be the
--                               caller, unless the caller is an admin; an unowned sandbox is
--                               for admins and auth.unowned_owner only)
-- A request with an X-Sandbox-ID header is routed by its headers instead (sandbox_headers.lua,
-- the agent-sandbox router's contract): headers win over the path, which then goes to the
-- sandbox untouched.
-- The target is read by sandbox_path.lua (percent-decoded user and sandbox; unsafe segments are
-- refused, so encoded tricks cannot reach another prefix).
--
-- Ports: /{user}/{sandbox}:{port}/... (or a host with {port}) reaches another port of the
-- sandbox's address. Allowed: the route's own port (discovery: annotation sandbox-proxy.dev/port,
-- else discovery.port 8888), the route's `ports` (annotation sandbox-proxy.dev/ports:
-- "3000,5173"), and `ports` here (every sandbox).
--
-- Prefix modes (path routing; per sandbox the annotation sandbox-proxy.dev/prefix, else
-- `prefix` here):
--   "strip" (default): the sandbox gets /{rest} and `X-Forwarded-Prefix: /{user}/{sandbox}`
--            (or /{user}/{sandbox}:{port}, exactly as the client wrote it); with
--            rewrite_response_headers (default true) the runtime puts a Location and a
--            Set-Cookie Path of the response back under that prefix (req:set_response_prefix;
--            headers only, never a body)
--   "keep":  the sandbox gets the whole target, for apps told their base URL (Jupyter
--            base_url=/{user}/{sandbox}/); no X-Forwarded-Prefix, nothing rewritten
-- Host routing forwards the target untouched, no prefix. A client's own X-Forwarded-Prefix
-- never reaches the sandbox.
-- Config (section `router`; defaults shown):
--   retry_after = 2, ports = {}, prefix = "strip", rewrite_response_headers = true
local routes = require "sp.routes"
local config = require "sp.config"

local sandbox_path = require "sandbox_path"
local sandbox_headers = require "sandbox_headers"
local auth = require "auth"
local wake = require "wake"

local cfg = config.router or {}
local RETRY_AFTER = tostring(cfg.retry_after or 2)

local type = type
local tonumber = tonumber
local gmatch = string.gmatch

local PREFIX = cfg.prefix or "strip"
assert(PREFIX == "strip" or PREFIX == "keep", "router.prefix must be \"strip\" or \"keep\"")
local REWRITE = cfg.rewrite_response_headers ~= false

local PORTS = {}
assert(cfg.ports == nil or type(cfg.ports) == "table", "router.ports must be a list of ports")
for _, p in ipairs(cfg.ports or {}) do
    assert(type(p) == "number" and p >= 1 and p <= 65535 and p % 1 == 0,
        "router.ports: " .. tostring(p) .. " is not a port")
    PORTS[p] = true
end

local M = {}
M.config = { prefix = PREFIX, rewrite_response_headers = REWRITE, ports = PORTS }

-- The ports of a route's `ports` field ("3000,5173"), cached per route table (routes.get hands
-- out the same table while the route is unchanged).
local route_ports = setmetatable({}, { __mode = "k" })
local function ports_of(route)
    local set = route_ports[route]
    if not set then
        set = {}
        for d in gmatch(route.ports or "", "%d+") do
            set[tonumber(d)] = true
        end
        route_ports[route] = set
    end
    return set
end

-- May a client reach `port` of route's sandbox?
function M.port_allowed(route, port)
    return port == route.port or PORTS[port] == true or ports_of(route)[port] == true
end

-- The sorted list of the ports a route allows (for the 403's body).
function M.allowed_ports(route)
    local seen, list = { [route.port] = true }, { route.port }
    for p in pairs(PORTS) do
        if not seen[p] then seen[p] = true; list[#list + 1] = p end
    end
    for p in pairs(ports_of(route)) do
        if not seen[p] then seen[p] = true; list[#list + 1] = p end
    end
    table.sort(list)
    return list
end

local BAD_PATH = {
    error = "bad request path",
    expected = "/{user}/{sandbox}/{path} or /{user}/{sandbox}:{port}/{path}",
}

-- Sends req to the route's sandbox (a plain function, not a closure per request: the routing
-- path stays compiled). The rest of the path is in req.ctx.target_rest (sandbox_path.of).
local function forward(req, route)
    local ctx = req.ctx
    ctx.route = route
    wake.activity(req, route)
    local path = ctx.target_rest
    local prefix = ctx.target_prefix
    local mode = route.prefix
    if mode == nil or mode == "" then
        mode = PREFIX
    end
    if prefix and mode == "strip" then
        -- added, or replacing the client's (a replacing edit makes the runtime check every
        -- header of the request against it: only when the client sent one)
        if req:header("x-forwarded-prefix") then
            req:set_header("X-Forwarded-Prefix", prefix)
        else
            req:add_header("X-Forwarded-Prefix", prefix)
        end
        if REWRITE then
            req:set_response_prefix(prefix)
        end
    else
        if prefix then
            path = req:target() -- keep: the whole target
        end
        if req:header("x-forwarded-prefix") then
            req:remove_header("X-Forwarded-Prefix")
        end
    end
    req:forward(route.address, ctx.target_port or route.port, path)
end

function M.handle(req)
    if sandbox_headers.handle(req) then
        return
    end
    local user, name, _, key = sandbox_path.of(req)
    if not user then
        return req:respond(400, BAD_PATH)
    end
    local r = routes.get(key)
    if not auth.may_access(req, user, name, r or false) then
        return -- 403 before the sandbox's existence or state is revealed
    end
    if not r then
        return req:respond(404, { error = "sandbox not found", path = key })
    end
    local port = req.ctx.target_port
    if port and port ~= r.port and not M.port_allowed(r, port) then
        return req:respond(403, { error = "port not allowed", path = key, port = port,
            allowed = M.allowed_ports(r) })
    end
    if not r.ready then
        -- a suspended sandbox is woken, a starting one waited for (wake.lua)
        if wake.handle(req, r, forward) then
            return
        end
        return req:respond(503, { error = "sandbox not ready", path = key, reason = r.reason },
            { ["Retry-After"] = RETRY_AFTER })
    end
    local address = r.address
    if not address or address == "" or r.port == 0 then
        return req:respond(503,
            { error = "sandbox has no address", path = key, reason = r.reason },
            { ["Retry-After"] = RETRY_AFTER })
    end
    forward(req, r)
end

return M
