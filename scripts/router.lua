-- router.lua: maps {METHOD} /{user}/{sandbox}/{rest} to the sandbox's route and forwards
-- /{rest} with the query string exactly as received.
--   unknown sandbox          -> 404 {"error":"sandbox not found","path":"user/sandbox"}
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
-- The path is read by sandbox_path.lua (percent-decoded user and sandbox; unsafe segments are
-- refused, so encoded tricks cannot reach another prefix).
-- Config (config file section `router`): retry_after (seconds, default 2).
local routes = require "sp.routes"
local config = require "sp.config"

local sandbox_path = require "sandbox_path"
local sandbox_headers = require "sandbox_headers"
local auth = require "auth"
local wake = require "wake"

local cfg = config.router or {}
local RETRY_AFTER = tostring(cfg.retry_after or 2)

local M = {}

local BAD_PATH = {
    error = "bad request path",
    expected = "/{user}/{sandbox}/{path}",
}

-- Sends req to the route's sandbox (a plain function, not a closure per request: the routing
-- path stays compiled). The rest of the path is in req.ctx.target_rest (sandbox_path.of).
local function forward(req, route)
    local ctx = req.ctx
    ctx.route = route
    wake.activity(req, route)
    req:forward(route.address, route.port, ctx.target_rest)
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
