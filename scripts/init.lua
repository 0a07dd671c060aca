-- init.lua: the entry point the runtime loads. It chains the policy scripts in a declared
-- order and owns nothing else:
--   on_start()     per worker; worker 0 starts the sandbox source (discovery)
--   on_request(r)  1. the demo listener -> demo_sandbox; the metrics listener -> metrics
--                  2. the proxy's own endpoints by exact path (health, ready, live,
--                     sandboxes, metrics): never rate limited, so probes always answer
--                  3. ratelimit (may answer 429 / 503)
--                  4. router (404 / 503 / forward to the sandbox)
--   on_log(r)      after each exchange: the access log (log.lua)
--   check()        for --check: problems found in the configuration and sources
-- Replace it (put your own init.lua in the --scripts directory) to change the chain itself;
-- replace any one of the modules it requires to change one policy.
local core = require "sp.core"
local discovery = require "discovery"
local health = require "health"
local sandboxes = require "sandboxes"
local metrics = require "metrics"
local ratelimit = require "ratelimit"
local router = require "router"
local access_log = require "log"
local demo_sandbox = require "demo_sandbox"

local M = {}

local settings = core.settings()
local metrics_own_listener = settings.metrics_listen ~= nil

-- Exact paths answered by the proxy itself (single-segment paths are never sandboxes).
local endpoints = {}
local function add(list)
    for path, handler in pairs(list) do
        endpoints[path] = handler
    end
end
add(health.endpoints)
add(sandboxes.endpoints)
if not metrics_own_listener then
    add(metrics.endpoints)
end
M.endpoints = endpoints

local NOT_FOUND = { error = "not found" }

function M.on_start()
    if core.worker_id() == 0 then
        discovery.start()
    end
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
    local handler = endpoints[req:path()]
    if handler then
        return handler(req)
    end
    if not ratelimit.check(req) then
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
