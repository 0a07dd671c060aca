-- init.lua: the entry point the runtime loads. It chains the policy scripts in a declared
-- order and owns nothing else:
--   on_start()     per worker: auth watches its keys file; worker 0 starts the sandbox source
--   on_request(r)  1. the demo listener -> demo_sandbox; the metrics listener -> metrics
--                  2. the probes (/health, /ready, /live): open, never limited
--                  3. auth.identify_request (answers nothing: the caller's identity, if
--                     any, for the limits), then ratelimit (may answer 429 / 503): callers
--                     auth did not identify are limited per client address (so floods of bad
--                     credentials are limited too), identified callers per user
--                  4. /sandboxes (authenticated; lists what the caller may see) and /metrics
--                     (admin only when auth is on)
--                  5. auth.authenticate (401), then router (403 when the path's user is not
--                     the caller's, 404 / 503, or forward to the sandbox)
--   on_log(r)      after each exchange: the access log (log.lua)
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
local access_log = require "log"
local demo_sandbox = require "demo_sandbox"
local wake = require "wake"

local M = {}

local settings = core.settings()
local metrics_own_listener = settings.metrics_listen ~= nil

-- The probes: exact paths, no credentials, no limits.
local open_endpoints = {}
for path, handler in pairs(health.endpoints) do
    open_endpoints[path] = handler
end

local function list_sandboxes(req)
    if not auth.authenticate(req) then
        return
    end
    local id = req.ctx.identity
    return sandboxes.handle(req, auth.enabled and function(r) return auth.can_see(id, r) end or nil)
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
    local open = open_endpoints[path]
    if open then
        return open(req)
    end
    if auth.enabled then
        auth.identify_request(req)
    end
    if not ratelimit.check(req) then
        return
    end
    local handler = endpoints[path]
    if handler then
        return handler(req)
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
