-- sandbox_headers.lua: the agent-sandbox router's header contract, built into the default
-- chain. router.lua calls handle(req) first: a request that carries X-Sandbox-ID is routed by
-- its headers (this file); any other request by its path (/{user}/{sandbox}/...). One listener
-- serves both, so the proxy replaces the official sandbox-router as it is.
--
-- Request contract (what the agent-sandbox SDKs send):
--   X-Sandbox-ID         required when routing by header; a DNS-1123 label (a-z, 0-9, '-';
--                        starts and ends with a letter or digit; at most 63). Empty: 400.
--   X-Sandbox-Namespace  default "default"; a DNS-1123 label.
--   X-Sandbox-Port       default `default_port` (8888); an integer 1..65535. Any port of the
--                        caller's own sandbox unless `allowed_ports` lists the allowed ones (403).
--   X-Sandbox-Timeout    float seconds (what Python's float() reads, finite, > 0), capped at
--                        `max_timeout`; applied as this request's first-byte and idle timeouts.
--                        Unparsable, zero, negative or infinite: ignored (the runtime's
--                        first_byte_timeout / upstream_idle_timeout hold), as the official
--                        router falls back to its default.
--   X-Sandbox-Pod-IP     never chooses the address. The address is always the watched
--                        Sandbox's own (status.podIPs[0] when Ready, from the route table), so a
--                        client can never make the proxy dial an address it names. A value that
--                        is not an IP address: 400 "Invalid target IP address format." (as the
--                        official router). A valid one that differs from the Sandbox's pod IP
--                        (the SDK caches the IP it read from the API; after a restart it is
--                        stale) is ignored: the request goes to the current pod, and
--                        req.ctx.pod_ip_mismatch is set (the access log shows nothing else).
-- Every X-Sandbox-* request header (the five above, X-Sandbox-UID, any other) is removed before
-- forwarding. The path and query go to the sandbox exactly as received.
--
-- Path and headers disagree: X-Sandbox-ID wins. A request with X-Sandbox-ID whose path also
-- looks like /{user}/{sandbox}/... goes to the sandbox the headers name, and its path is
-- forwarded untouched (not stripped of /{user}/{sandbox}), as the official router does.
--
-- Answers (JSON {"detail": "..."}, the official router's error shape and codes):
--   GET|HEAD /healthz             -> 200 {"status":"ok"} (init.lua: open, like /live)
--   missing/invalid X-Sandbox-*   -> 400
--   port not in allowed_ports     -> 403
--   unknown sandbox               -> 404; with auth on also a sandbox the caller may not reach
--                                    (another user's, or an unowned one for a non-admin), so
--                                    names in other namespaces cannot be probed
--   route index refreshing        -> 503 + Retry-After 1 (see "Lookup")
--   not ready                     -> held and woken when wake.lua is enabled (like path routing);
--                                    else 503 + Retry-After
--   ready, no address             -> 503 + Retry-After
--   upstream failures (runtime)   -> 502 "Could not connect to the backend sandbox: ID" (after
--                                    the connect retries), 504 "Timed out waiting for the
--                                    backend sandbox: ID", 502 "Lost the connection to the
--                                    backend sandbox: ID"; each body also says "delivered":
--                                    false (nothing reached the sandbox: a retry cannot run the
--                                    request twice) or true (it may have run; its answer was
--                                    lost), and the access log line has the same field
--   401 (auth.lua) carries "detail" too for requests with X-Sandbox-ID.
--
-- Lookup: routes are keyed "{user}/{name}" (discovery.lua); clients name a sandbox by namespace
-- and name. A per-worker index "namespace/name" -> key answers in O(1):
--   * a hit is checked against the live route (routes.get): a stale entry is a miss;
--   * a miss first tries "{u}/{name}" for u in `guess_users` (default: discovery's default
--     user, the key of every sandbox without a user label, i.e. what the SDK creates);
--   * then, if routes.generation() moved since the index was built, it is rebuilt from
--     routes.list() (O(n)) and looked up again; rebuilds are spaced by at least
--     max(index_min_interval, index_cost_factor x the last rebuild's duration) per worker, and
--     a miss inside that window while the table changed answers 503 "refreshing" rather than a
--     404 that may be wrong. Without route changes a miss is a plain 404 and costs nothing.
--
-- Config (section `sandbox_headers`; defaults shown):
--   sandbox_headers = {
--       enabled = true,             -- false: X-Sandbox-* headers are ignored (path routing only)
--       max_timeout = 180,          -- cap on X-Sandbox-Timeout, seconds
--       default_port = 8888,        -- without X-Sandbox-Port; "route": the route's port
--       allowed_ports = nil,        -- list of ports clients may name (nil: any 1..65535)
--       retry_after = 2,            -- Retry-After of the 503 answers, seconds
--       index_min_interval = 0.25, index_cost_factor = 10,
--       guess_users = nil,          -- default { discovery.default_user or "default" }
--   }
local routes = require "sp.routes"
local config = require "sp.config"
local core = require "sp.core"
local ip = require "sp.ip"

local type = type
local tostring = tostring
local tonumber = tonumber
local ipairs = ipairs
local pairs = pairs
local find = string.find
local sub = string.sub
local huge = math.huge

local cfg = config.sandbox_headers or {}
local M = {}

-- ------------------------------------------------------------------ configuration

M.enabled = cfg.enabled ~= false

local MAX_TIMEOUT = cfg.max_timeout == nil and 180 or cfg.max_timeout
assert(type(MAX_TIMEOUT) == "number" and MAX_TIMEOUT > 0 and MAX_TIMEOUT < huge,
    "sandbox_headers.max_timeout must be a positive number of seconds")

local DEFAULT_PORT = cfg.default_port == nil and 8888 or cfg.default_port
assert(DEFAULT_PORT == "route" or (type(DEFAULT_PORT) == "number" and DEFAULT_PORT >= 1
    and DEFAULT_PORT <= 65535 and DEFAULT_PORT % 1 == 0),
    "sandbox_headers.default_port must be a port number or \"route\"")

local ALLOWED_PORTS
if cfg.allowed_ports ~= nil then
    assert(type(cfg.allowed_ports) == "table",
        "sandbox_headers.allowed_ports must be a list of ports")
    ALLOWED_PORTS = {}
    for _, p in ipairs(cfg.allowed_ports) do
        assert(type(p) == "number" and p >= 1 and p <= 65535 and p % 1 == 0,
            "sandbox_headers.allowed_ports: " .. tostring(p) .. " is not a port")
        ALLOWED_PORTS[p] = true
    end
end

local RETRY_AFTER = tostring(cfg.retry_after or 2)

local MIN_INTERVAL = cfg.index_min_interval == nil and 0.25 or cfg.index_min_interval
assert(type(MIN_INTERVAL) == "number" and MIN_INTERVAL >= 0,
    "sandbox_headers.index_min_interval must be a number >= 0")
local COST_FACTOR = cfg.index_cost_factor == nil and 10 or cfg.index_cost_factor
assert(type(COST_FACTOR) == "number" and COST_FACTOR >= 0,
    "sandbox_headers.index_cost_factor must be a number >= 0")

local GUESS_USERS = cfg.guess_users
if GUESS_USERS == nil then
    GUESS_USERS = { (config.discovery or {}).default_user or "default" }
end
assert(type(GUESS_USERS) == "table", "sandbox_headers.guess_users must be a list")

M.config = {
    enabled = M.enabled, max_timeout = MAX_TIMEOUT, default_port = DEFAULT_PORT,
    retry_after = RETRY_AFTER, index_min_interval = MIN_INTERVAL, index_cost_factor = COST_FACTOR,
}

-- ------------------------------------------------------------------ validation

-- True if s is a DNS-1123 label (at most 63 characters).
local function is_dns_label(s)
    local n = #s
    if n == 0 or n > 63 then
        return false
    end
    if n == 1 then
        return find(s, "^[a-z0-9]$") ~= nil
    end
    return find(s, "^[a-z0-9][a-z0-9%-]*[a-z0-9]$") ~= nil
end
M.is_dns_label = is_dns_label

-- The port named by the header value (what Python's int() reads: decimal digits, an optional
-- '+', surrounding blanks; 1..65535), or nil.
local function parse_port(s)
    local digits = s:match("^%s*%+?(%d+)%s*$")
    if not digits or #digits > 10 then
        return nil
    end
    local p = tonumber(digits)
    if p < 1 or p > 65535 then
        return nil
    end
    return p
end
M.parse_port = parse_port

-- The timeout named by the header value, capped at max_timeout; nil when it is not a finite
-- positive number (then ignored). Accepts what the SDK writes (str() of an int or a float:
-- "30", "2.5", "1e-05").
local function parse_timeout(s)
    s = s:match("^%s*(.-)%s*$")
    if not find(s, "^[+]?%d*%.?%d*[eE]?[+-]?%d*$") or not find(s, "%d") then
        return nil
    end
    local t = tonumber(s)
    if not t or t ~= t or t <= 0 or t == huge then
        return nil
    end
    if t > MAX_TIMEOUT then
        t = MAX_TIMEOUT
    end
    return t
end
M.parse_timeout = parse_timeout

-- ------------------------------------------------------------------ the index

local index = {}          -- "namespace/name" -> route key
local index_gen = -1      -- routes.generation() the index was built at
local index_size = 0
local built_at = -huge    -- core.monotonic() of the last rebuild
local wait = 0            -- seconds the next rebuild must wait after built_at
local stats = { rebuilds = 0, guesses = 0, last_cost = 0 }

local function rebuild()
    -- the generation first: a change during list() leaves index_gen behind, so the next miss
    -- rebuilds again (never the other way round)
    local gen = routes.generation()
    local started = core.monotonic()
    local idx, n = {}, 0
    for _, r in ipairs(routes.list()) do
        local name = r.name
        if name then
            local id = (r.namespace or "default") .. "/" .. name
            if idx[id] == nil then
                idx[id] = r.key
                n = n + 1
            end
        end
    end
    index, index_gen, index_size = idx, gen, n
    built_at = core.monotonic()
    local cost = built_at - started
    wait = COST_FACTOR * cost
    if wait < MIN_INTERVAL then
        wait = MIN_INTERVAL
    end
    stats.rebuilds = stats.rebuilds + 1
    stats.last_cost = cost
end

-- The live route of key if it is the sandbox namespace/name, else nil.
local function route_if(key, namespace, name)
    local r = routes.get(key)
    if r and r.name == name and (r.namespace or "default") == namespace then
        return r
    end
    return nil
end

-- The route of sandbox `name` in `namespace`: route, or nil and "not found" | "refreshing".
function M.lookup(namespace, name)
    -- first the shared name index discovery keeps (any worker, O(1)): Sandboxes by name and
    -- SandboxClaims bound to one by the claim's name (X-Sandbox-ID: {claim})
    local shared = routes.lookup(namespace, name)
    if shared and (shared.namespace or "default") == namespace then
        return shared
    end
    local id = namespace .. "/" .. name
    local key = index[id]
    local r = key and route_if(key, namespace, name)
    if r then
        return r
    end
    for i = 1, #GUESS_USERS do
        local g = route_if(GUESS_USERS[i] .. "/" .. name, namespace, name)
        if g then
            stats.guesses = stats.guesses + 1
            index[id] = g.key
            return g
        end
    end
    if routes.generation() == index_gen then
        return nil, "not found"
    end
    if core.monotonic() - built_at < wait then
        return nil, "refreshing"
    end
    rebuild()
    key = index[id]
    r = key and route_if(key, namespace, name)
    if r then
        return r
    end
    return nil, "not found"
end

-- Index state (tests, debugging): rebuilds, guesses, size, generation, last_cost, wait.
function M.index_stats()
    return { rebuilds = stats.rebuilds, guesses = stats.guesses, size = index_size,
        generation = index_gen, last_cost = stats.last_cost, wait = wait }
end

-- Forgets the index (tests).
function M.reset_index()
    index, index_gen, index_size, built_at, wait = {}, -1, 0, -huge, 0
    stats.rebuilds, stats.guesses, stats.last_cost = 0, 0, 0
end

-- ------------------------------------------------------------------ handling

local HEALTHY = { status = "ok" }

-- GET|HEAD /healthz (init.lua serves it as an open endpoint, like /live).
function M.healthz(req)
    local m = req:method()
    if m ~= "GET" and m ~= "HEAD" then
        return req:respond(405, { detail = "Method Not Allowed" }, { Allow = "GET, HEAD" })
    end
    return req:respond(200, HEALTHY)
end

local function detail(req, status, text, headers)
    return req:respond(status, { detail = text }, headers)
end

-- Sends a header-routed request to its sandbox (also wake.lua's callback once a held request's
-- sandbox is ready: the address comes from the route as it is then).
local function forward(req, route)
    local ctx = req.ctx
    ctx.route = route
    local port = ctx.sandbox_port
    if port == "route" then
        port = route.port
    end
    local address = route.address
    if not address or address == "" or not port or port == 0 then
        return detail(req, 503, "Sandbox '" .. ctx.sandbox_id .. "' has no address yet.",
            { ["Retry-After"] = RETRY_AFTER })
    end
    local pod_ip = ctx.sandbox_pod_ip
    if pod_ip and pod_ip ~= ip.parse(address) then
        ctx.pod_ip_mismatch = true -- stale or foreign: never dialled
    end
    -- every X-Sandbox-* header stays with the proxy
    for name in pairs(req:headers()) do
        if sub(name, 1, 10) == "x-sandbox-" then
            req:remove_header(name)
        end
    end
    req:set_error_detail(ctx.sandbox_id)
    local wake = M.wake
    if wake then
        wake.activity(req, route)
    end
    return req:forward(address, port, req:target())
end

-- Routes req by its X-Sandbox-* headers. Returns false when header routing does not apply (no
-- X-Sandbox-ID, or disabled): the caller routes by path. Else answers or forwards, returns true.
function M.handle(req)
    if not M.enabled then
        return false
    end
    local id = req:header("x-sandbox-id")
    if id == nil then
        return false
    end
    if id == "" then
        detail(req, 400, "X-Sandbox-ID header is required.")
        return true
    end
    if not is_dns_label(id) then
        detail(req, 400, "Invalid sandbox ID format.")
        return true
    end
    local namespace = req:header("x-sandbox-namespace") or "default"
    if not is_dns_label(namespace) then
        detail(req, 400, "Invalid namespace format.")
        return true
    end
    local port = DEFAULT_PORT
    local port_h = req:header("x-sandbox-port")
    if port_h ~= nil then
        port = parse_port(port_h)
        if not port then
            detail(req, 400, "Invalid port format.")
            return true
        end
        if ALLOWED_PORTS and not ALLOWED_PORTS[port] then
            detail(req, 403, "Port " .. port .. " is not allowed.")
            return true
        end
    end
    local pod_ip
    local pod_ip_h = req:header("x-sandbox-pod-ip")
    if pod_ip_h ~= nil and pod_ip_h ~= "" then
        pod_ip = ip.parse(pod_ip_h)
        if not pod_ip then
            detail(req, 400, "Invalid target IP address format.")
            return true
        end
    end

    local ctx = req.ctx
    ctx.sandbox_id, ctx.sandbox_namespace, ctx.sandbox_port = id, namespace, port
    ctx.sandbox_pod_ip = pod_ip

    local r, why = M.lookup(namespace, id)
    local a = M.auth
    if r and a and a.enabled and not a.can_see(ctx.identity, r) then
        r, why = nil, "not yours"
    end
    if not r then
        if why == "refreshing" then
            detail(req, 503, "Sandbox '" .. id .. "' in namespace '" .. namespace
                .. "' is not known yet; retry shortly.", { ["Retry-After"] = "1" })
            return true
        end
        detail(req, 404, "Sandbox '" .. id .. "' not found in namespace '" .. namespace .. "'"
            .. ((a and a.enabled) and " (or not yours)." or "."))
        return true
    end

    local timeout_h = req:header("x-sandbox-timeout")
    if timeout_h ~= nil then
        local t = parse_timeout(timeout_h)
        if t then
            req:set_timeouts{ first_byte = t, idle = t }
            ctx.sandbox_timeout = t
        end
    end

    if not r.ready then
        ctx.route = r
        local wake = M.wake
        if wake and wake.handle(req, r, forward) then
            return true
        end
        detail(req, 503, "Sandbox '" .. id .. "' is not ready ("
            .. tostring(r.reason or "Unknown") .. ").", { ["Retry-After"] = RETRY_AFTER })
        return true
    end
    forward(req, r)
    return true
end

-- auth.lua and wake.lua, when the scripts have them (replaceable in tests).
local function optional(name)
    local ok, mod = pcall(require, name)
    if ok then
        return type(mod) == "table" and mod or nil
    end
    if not find(tostring(mod), "module '" .. name .. "' not found", 1, true) then
        error(mod, 0)
    end
    return nil
end
M.auth = optional("auth")
M.wake = optional("wake")

return M
