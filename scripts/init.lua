-- init.lua: the entry point the runtime loads. It chains the policy scripts in a declared
-- order and owns nothing else:
--   on_start()     per worker: auth watches its keys file; worker 0 starts the sandbox source
--   on_request(r)  1. the demo listener -> demo_sandbox; the metrics listener -> metrics
--                  2. the probes (/health, /ready, /live, /healthz): open, never limited
--                  3. auth.identify_request (answers nothing: the caller's identity, if
--                     any, for the limits), then ratelimit (may answer 429 / 503): callers
--                     auth did not identify are limited per client address (so floods of bad
--                     credentials are limited too), identified callers per user
--                  4. /sandboxes (authenticated; lists what the caller may see) and /metrics
--                     (admin only when auth is on)
--                  (a request whose Host names a sandbox, sandbox_path.lua's host routing,
--                  skips 2. and 4.: every path of it belongs to the sandbox)
--                  5. browser.login (a credential in the query string -> cookie + 302), then
--                     auth.authenticate (401; a cookie's Origin check, 403), then router (X-Sandbox-* header routing, else
--                     path routing: 403 when the path's user is not the caller's, 404 / 503,
--                     or forward to the sandbox)
--   on_log(r)      after each exchange: the access log (access_log.lua)
--   check()        for --check: problems found in the configuration and sources
-- Replace it (put your own init.lua in the --scripts directory) to change the chain itself;
-- replace any one of the modules it requires to change one policy.
local core = require "sp.core"
local log = require "sp.log"
local discovery = require "discovery"
local health = require "health"
local sandboxes = require "sandboxes"
local metrics = require "metrics"
local ratelimit = require "ratelimit"
local auth = require "auth"
local router = require "router"
local demo_sandbox = require "demo_sandbox"
local wake = require "wake"
local sandbox_headers = require "sandbox_headers"
local sandbox_path = require "sandbox_path"
local browser = require "browser"

local M = {}

local settings = core.settings()
local metrics_own_listener = settings.metrics_listen ~= nil
local host_routing = sandbox_path.host_routing

-- The access log was named log.lua before 0.2. An override of that name in the --scripts
-- directory still applies (in place of access_log.lua), with a warning each time the scripts load.
local access_log
local old_name = settings.scripts_dir and package.searchpath
    and package.searchpath("log", settings.scripts_dir .. "/?.lua")
if old_name then
    if core.worker_id() <= 0 then
        log.warn("scripts: " .. old_name .. " overrides the access log by its old name; "
            .. "rename it to access_log.lua (log.lua will stop being loaded)")
    end
    access_log = require "log"
else
    access_log = require "access_log"
end

-- The probes: exact paths, no credentials, no limits.
local open_endpoints = {}
for path, handler in pairs(health.endpoints) do
    open_endpoints[path] = handler
end
-- the agent-sandbox router's probe path (its Deployment and Service probe it)
open_endpoints["/healthz"] = sandbox_headers.healthz

local function list_sandboxes(req)
    if not auth.authenticate(req) then
        return
    end
    local id = req.ctx.identity
    if not auth.enabled then
        return sandboxes.handle(req)
    end
    -- a non-admin walks only the key range of their own paths ("user/..."): the cost of their
    -- listing follows what they may see, not the table's size; can_see still filters it. The
    -- user named in auth.unowned_owner also sees the unowned sandboxes, which live under other
    -- keys: that one user's listing walks the whole table.
    local prefix = nil
    if not (id and id.admin) and not (id and id.user ~= nil and id.user == auth.unowned_owner) then
        prefix = (id and id.user or "") .. "/"
    end
    return sandboxes.handle(req, function(r) return auth.can_see(id, r) end, prefix)
end

local function serve_metrics(req)
    if not auth.check_admin(req) then
        return
    end
    return metrics.handle(req)
end

-- Exact paths answered by the proxy itself (single-segment paths are never sandboxes).
local endpoints = {}
for path, handler in pairs(open_endpoints) do
    endpoints[path] = handler
end
endpoints["/sandboxes"] = list_sandboxes
if not metrics_own_listener then
    endpoints["/metrics"] = serve_metrics
end
M.endpoints = endpoints

local NOT_FOUND = { error = "not found" }

function M.on_start()
    auth.start()
    if core.worker_id() == 0 then
        if not auth.enabled and settings.source ~= "demo" and settings.source ~= "none" then
            log.warn("authentication is OFF: anyone who can reach this port can reach every "
                .. "sandbox (configure auth.keys_file or auth.jwt; set auth_required=true)")
        end
        discovery.on_route_change = wake.route_changed
        discovery.start()
    end
    wake.start()
    ratelimit.start()
end

function M.on_request(req)
    local listener = req:listener()
    if listener ~= "main" then
        if listener == "demo" then
            return demo_sandbox.handle(req)
        elseif listener == "metrics" then
            local h = metrics.endpoints[req:path()]
            if h then
                return h(req)
            end
            return req:respond(404, NOT_FOUND)
        end
    end
    local path = req:path()
    -- a sandbox's own host (host routing) reaches the sandbox only, never the proxy's endpoints
    local hosted = host_routing and sandbox_path.of(req) and req.ctx.target_host
    local open = not hosted and open_endpoints[path]
    if open then
        return open(req)
    end
    if auth.enabled then
        auth.identify_request(req)
    end
    if not ratelimit.admit(req) then
        return
    end
    local handler = not hosted and endpoints[path]
    if handler then
        return handler(req)
    end
    if auth.enabled and browser.login(req) then
        return
    end
    if not auth.authenticate(req) then
        return
    end
    return router.handle(req)
end

function M.on_log(req)
    access_log.write(req)
end

function M.check()
    return discovery.check()
end

return M
