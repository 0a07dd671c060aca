-- examples/sdk_router.lua: header routing compatible with the agent-sandbox SDKs' official
-- router (sandbox_router.py), as a drop-in replacement for the built-in router.lua.
--
-- USE: mount this file as `router.lua` in the --scripts override directory (for example the
-- ConfigMap in k8s/scripts-configmap.yaml, key `router.lua`). init.lua then calls its
-- handle(req) where it would call the built-in router. Nothing else changes.
--
-- Request contract (what the SDK clients send):
--   X-Sandbox-ID         required; a DNS-1123 label (a-z, 0-9, '-'; starts and ends with a
--                        letter or digit; at most 63 characters)
--   X-Sandbox-Namespace  default "default"; a DNS-1123 label too
--   X-Sandbox-Port       default `default_port` (8888); an integer 1..65535. Any port is
--                        accepted unless `allowed_ports` is set (see "Ports" below).
--   X-Sandbox-Timeout    seconds (decimal, > 0); capped at `max_timeout` (180) and applied as
--                        req:set_timeouts{ first_byte = t, idle = t }. An unparsable, zero or
--                        negative value is ignored, as the official router ignores it.
--                        Without the header the runtime's (or another script's) timeouts hold.
--   X-Sandbox-Pod-IP     IGNORED for addressing. The address always comes from the route
--                        table (sp.routes, filled by discovery from the Sandbox's status), so a
--                        client can never make the proxy connect to an IP of its choosing.
-- The request path and query are forwarded exactly as received (the SDK sends the sandbox's
-- own path, e.g. `/execute`); the X-Sandbox-* headers above are removed from the upstream
-- request.
--
-- Answers (JSON `{"detail": "..."}`, the official router's error shape):
--   GET|HEAD /healthz            -> 200 {"status":"ok"} (whatever the headers say)
--   missing/invalid X-Sandbox-*  -> 400 (empty X-Sandbox-ID counts as missing)
--   port not in allowed_ports    -> 403
--   no such sandbox              -> 404
--   known, not ready / no address-> 503 + Retry-After
--   route index refreshing       -> 503 + Retry-After (see "Lookup" below)
--   another user's sandbox       -> 404, when auth.lua is enabled (see "Auth" below); also an
--                                   unowned sandbox for a caller who is not an admin
--   Upstream failures are answered by the runtime, not by this script: 502 (connect refused,
--   sandbox closed the connection, bad response) and 504 (connect/first-byte/idle timeout).
--   Those bodies are the runtime's own {"error": "...", "request_id": "..."}, NOT {"detail":..}.
--   401 for missing or wrong credentials comes from auth.authenticate (init.lua) before this
--   router runs, as {"error":..}.
--
-- Lookup: routes are keyed "{user}/{name}" (discovery.lua), but clients name a sandbox by
-- namespace and name. Scanning routes.list() per request is O(n), so this script keeps a
-- per-worker index "namespace/name" -> key:
--   * a hit is checked against the live route (routes.get(key), O(1)): a stale entry (route
--     deleted, moved to another key, or its namespace changed) is treated as a miss;
--   * on a miss it first tries the keys "{u}/{name}" for u in `guess_users` (default: the
--     discovery default user, "default" -- the key of every sandbox without a user label,
--     i.e. everything the SDK creates), which needs no index;
--   * then, if routes.generation() moved since the index was built, it rebuilds the index
--     from routes.list() (O(n), sorted copies of every route) and looks again;
--   * rebuilds are spaced by at least max(index_min_interval, index_cost_factor x the
--     duration of the last rebuild) seconds per worker (0.25 s; 10 x), so rebuilding takes
--     at most about a tenth of a worker however the routes churn. A miss inside that window
--     while the table has changed answers 503 + Retry-After ("refreshing") rather than a 404
--     that might be wrong. With no route changes a miss is a plain 404 and costs no rebuild,
--     so a flood of unknown IDs cannot force rebuilds on its own.
--   Trade-off: memory of one string pair per route per worker, and an O(n) rebuild after
--   route changes that coincide with a miss. routes.list() is the only way to enumerate the
--   table and copies and sorts every route: measured 0.3-0.9 s per call for 100,000 routes
--   (about 8 ms for 1,000), during which the worker serves nothing. At that scale a sandbox
--   that is neither in the index nor under a guess user may get "refreshing" 503s for some
--   seconds after it appears. Two keys claiming the same namespace/name
--   (impossible for one Kubernetes object; possible with hand-written routes) resolve to the
--   first key in sorted order.
--
-- Auth: init.lua runs auth.authenticate (credentials only, 401) before calling this handler;
-- the ownership check of path routing lives in the built-in router (auth.may_access), which
-- this file replaces. So this script does the ownership check itself: after the lookup,
-- auth.can_see(req.ctx.identity, route) must hold (the caller owns the route, or is an
-- admin), else the answer is the same 404 as for an unknown sandbox (no way to probe other
-- users' sandbox names). The path plays no part in it: a header-routed
-- `GET /download/tmp%2Fout.txt` is checked against the sandbox named by X-Sandbox-ID, not
-- against "download". Sandboxes the SDK creates have no user label, so they are UNOWNED
-- (auth.lua): with auth on only admins reach them, or the user named by
-- `auth.unowned_owner`; label them (`user: <name>`) to give them to a user. With auth
-- enabled and no identity in req.ctx (a custom init.lua that skipped auth.authenticate),
-- every header-routed request gets that 404: it fails closed. Without auth.lua (or with it
-- disabled) there is no check.
--
-- Ports: by default X-Sandbox-Port may name any port 1..65535, as the official router allows
-- (SDK clients name the port their sandbox serves on). This is not a way out of the
-- sandbox: the address is always the sandbox's own (from the route table), and with auth
-- on only its owner or an admin gets that far (the port is checked before the lookup, the
-- owner after it, and a refused owner check answers 404 whatever the port). A port only
-- picks a listener inside the caller's own sandbox, which the sandbox's code can reach on
-- localhost anyway. Set `allowed_ports` when the sandbox pods run listeners their users
-- must not reach through the proxy (sidecars, debug ports): other ports then get 403.
--
-- Without X-Sandbox-ID the request goes to the built-in path router (/{user}/{sandbox}/...)
-- when `fallback` is true, so both styles work behind one proxy; else 400.
--
-- Config (config file section `sdk_router`; defaults shown):
--   sdk_router = {
--       fallback = true,            -- no X-Sandbox-ID: built-in path routing (false: 400)
--       max_timeout = 180,          -- cap on X-Sandbox-Timeout (seconds)
--       default_port = 8888,        -- port when X-Sandbox-Port is absent; "route": the
--                                   -- route's port (annotation sandbox-proxy.dev/port)
--       allowed_ports = nil,        -- list of ports clients may name (nil: any 1..65535,
--                                   -- only on the caller's own sandbox; see "Ports")
--       retry_after = 2,            -- Retry-After of the 503 answers (seconds)
--       index_min_interval = 0.25,  -- seconds between index rebuilds (per worker)
--       index_cost_factor = 10,     -- ... and at least this many times the last rebuild
--       guess_users = nil,          -- users tried before the index (default: {discovery
--                                   -- default_user or "default"}); {} to disable
--   }
--
-- Interactions with the built-in chain (init.lua), which this file cannot change:
--   * init.lua answers /health, /ready, /live, /sandboxes and /metrics itself before any
--     router runs, so a header-routed request for a sandbox's own path of one of those
--     names gets the proxy's endpoint, not the sandbox's.
--   * ratelimit.lua keys its "sandbox"/"user" limits and its per-sandbox concurrency limit
--     on the PATH (/{user}/{sandbox}/...), so header-routed requests are limited per client
--     only (or, for a path like /list/tmp, per a meaningless "list/tmp" key).
--   * /healthz is not one of init.lua's open endpoints: it passes the rate limiter and, with
--     auth enabled, auth.authenticate (401 without a credential) before reaching this router.
--     Use /live or /ready for probes, or add /healthz to init.lua's open endpoints.
local routes = require "sp.routes"
local config = require "sp.config"
local core = require "sp.core"

local type = type
local tostring = tostring
local tonumber = tonumber
local ipairs = ipairs
local find = string.find
local huge = math.huge

local cfg = config.sdk_router or {}
local M = {}

-- ------------------------------------------------------------------ configuration

local FALLBACK = cfg.fallback ~= false

local MAX_TIMEOUT = cfg.max_timeout == nil and 180 or cfg.max_timeout
assert(type(MAX_TIMEOUT) == "number" and MAX_TIMEOUT > 0 and MAX_TIMEOUT < huge,
    "sdk_router.max_timeout must be a positive number of seconds")

local DEFAULT_PORT = cfg.default_port == nil and 8888 or cfg.default_port
assert(DEFAULT_PORT == "route" or (type(DEFAULT_PORT) == "number" and DEFAULT_PORT >= 1
    and DEFAULT_PORT <= 65535 and DEFAULT_PORT % 1 == 0),
    "sdk_router.default_port must be a port number or \"route\"")

local ALLOWED_PORTS
if cfg.allowed_ports ~= nil then
    assert(type(cfg.allowed_ports) == "table", "sdk_router.allowed_ports must be a list of ports")
    ALLOWED_PORTS = {}
    for _, p in ipairs(cfg.allowed_ports) do
        assert(type(p) == "number" and p >= 1 and p <= 65535 and p % 1 == 0,
            "sdk_router.allowed_ports: " .. tostring(p) .. " is not a port")
        ALLOWED_PORTS[p] = true
    end
end

local RETRY_AFTER = tostring(cfg.retry_after or 2)

local MIN_INTERVAL = cfg.index_min_interval == nil and 0.25 or cfg.index_min_interval
assert(type(MIN_INTERVAL) == "number" and MIN_INTERVAL >= 0,
    "sdk_router.index_min_interval must be a number >= 0")
local COST_FACTOR = cfg.index_cost_factor == nil and 10 or cfg.index_cost_factor
assert(type(COST_FACTOR) == "number" and COST_FACTOR >= 0,
    "sdk_router.index_cost_factor must be a number >= 0")

local GUESS_USERS = cfg.guess_users
if GUESS_USERS == nil then
    GUESS_USERS = { (config.discovery or {}).default_user or "default" }
end
assert(type(GUESS_USERS) == "table", "sdk_router.guess_users must be a list")

-- auth.lua, if the scripts have one (its `enabled` and can_see decide; replaceable in
-- tests). A missing module means no auth; an auth.lua that fails to load is an error.
local has_auth, auth = pcall(require, "auth")
if not has_auth and not find(tostring(auth), "module 'auth' not found", 1, true) then
    error(auth, 0)
end
M.auth = has_auth and type(auth) == "table" and auth or nil

-- The built-in path router, for requests without X-Sandbox-ID. Loaded by path from the
-- built-in directory: `require "router"` would return this file when it is mounted as
-- router.lua.
local builtin
if FALLBACK then
    local dir = core.settings().builtin_dir
    assert(dir, "sdk_router.fallback needs the built-in scripts directory (not found)")
    builtin = dofile(dir .. "/router.lua")
end
M.builtin = builtin

M.config = {
    fallback = FALLBACK, max_timeout = MAX_TIMEOUT, default_port = DEFAULT_PORT,
    retry_after = RETRY_AFTER, index_min_interval = MIN_INTERVAL, index_cost_factor = COST_FACTOR,
}

-- ------------------------------------------------------------------ validation

-- True if s is a DNS-1123 label.
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

-- The port named by the header value, or nil when invalid.
local function parse_port(s)
    if #s > 5 or not find(s, "^%d+$") then
        return nil
    end
    local p = tonumber(s)
    if p < 1 or p > 65535 then
        return nil
    end
    return p
end

-- The timeout named by the header value (capped at max_timeout), or nil when it is not a
-- positive decimal number (then ignored, as the official router does).
local function parse_timeout(s)
    if not find(s, "^%d*%.?%d*$") or not find(s, "%d") then
        return nil
    end
    local t = tonumber(s)
    if not t or t <= 0 then
        return nil
    end
    if t > MAX_TIMEOUT then
        t = MAX_TIMEOUT
    end
    return t
end

-- ------------------------------------------------------------------ the index

local index = {}          -- "namespace/name" -> route key
local index_gen = -1      -- routes.generation() the index was built at
local index_size = 0
local built_at = -huge    -- core.monotonic() of the last rebuild
local wait = 0            -- seconds the next rebuild must wait after built_at
local stats = { rebuilds = 0, guesses = 0, last_cost = 0 }

local function rebuild()
    -- read the generation first: a change during list() leaves index_gen behind, so the
    -- next miss rebuilds again (never the other way round)
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

-- Finds the route of sandbox `name` in `namespace`. Returns route, or nil and
-- "not found" | "refreshing".
function M.lookup(namespace, name)
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

-- Index state, for tests and debugging: { rebuilds, guesses, size, generation, last_cost
-- (seconds the last rebuild took), wait (seconds the next must wait after the last) }.
function M.index_stats()
    return { rebuilds = stats.rebuilds, guesses = stats.guesses, size = index_size,
        generation = index_gen, last_cost = stats.last_cost, wait = wait }
end


-- ------------------------------------------------------------------ handling

local HEALTHY = { status = "ok" }
local STRIP = { "X-Sandbox-ID", "X-Sandbox-Namespace", "X-Sandbox-Port", "X-Sandbox-Timeout",
    "X-Sandbox-Pod-IP" }

local function detail(req, status, text, headers)
    return req:respond(status, { detail = text }, headers)
end

function M.handle(req)
    if req:path() == "/healthz" then
        local m = req:method()
        if m == "GET" or m == "HEAD" then
            return req:respond(200, HEALTHY)
        end
    end

    local id = req:header("x-sandbox-id")
    if id == nil then
        if builtin then
            return builtin.handle(req)
        end
        return detail(req, 400, "X-Sandbox-ID header is required.")
    end
    if id == "" then
        return detail(req, 400, "X-Sandbox-ID header is required.")
    end
    if not is_dns_label(id) then
        return detail(req, 400, "Invalid sandbox ID format.")
    end

    local namespace = req:header("x-sandbox-namespace") or "default"
    if not is_dns_label(namespace) then
        return detail(req, 400, "Invalid namespace format.")
    end

    local port
    local port_h = req:header("x-sandbox-port")
    if port_h ~= nil then
        port = parse_port(port_h)
        if not port then
            return detail(req, 400, "Invalid port format.")
        end
        if ALLOWED_PORTS and not ALLOWED_PORTS[port] then
            return detail(req, 403, "Port " .. port .. " is not allowed.")
        end
    end

    local r, why = M.lookup(namespace, id)
    local a = M.auth
    if r and a and a.enabled and not a.can_see(req.ctx.identity, r) then
        r, why = nil, "not found"
    end
    if not r then
        if why == "refreshing" then
            return detail(req, 503, "Sandbox '" .. id .. "' in namespace '" .. namespace
                .. "' is not known yet; retry shortly.", { ["Retry-After"] = "1" })
        end
        return detail(req, 404, "Sandbox '" .. id .. "' not found in namespace '" .. namespace
            .. "'.")
    end
    if not r.ready then
        return detail(req, 503, "Sandbox '" .. id .. "' is not ready ("
            .. tostring(r.reason or "Unknown") .. ").", { ["Retry-After"] = RETRY_AFTER })
    end
    local address = r.address
    if port == nil then
        port = DEFAULT_PORT == "route" and r.port or DEFAULT_PORT
    end
    if not address or address == "" or not port or port == 0 then
        return detail(req, 503, "Sandbox '" .. id .. "' has no address yet.",
            { ["Retry-After"] = RETRY_AFTER })
    end

    local timeout_h = req:header("x-sandbox-timeout")
    if timeout_h ~= nil then
        local t = parse_timeout(timeout_h)
        if t then
            req:set_timeouts{ first_byte = t, idle = t }
            req.ctx.sandbox_timeout = t
        end
    end

    -- the routing headers stay with the proxy (only those present: each removal is an edit
    -- the runtime applies while writing the upstream head)
    for i = 1, #STRIP do
        local h = STRIP[i]
        if req:header(h) ~= nil then
            req:remove_header(h)
        end
    end
    req.ctx.route = r
    return req:forward(address, port, req:target())
end

return M
