-- init.lua: the entry point the runtime loads. It chains the policy scripts in a declared
-- order and owns nothing else:
--   on_start()     per worker; worker 0 starts the sandbox source (discovery)
--   on_request(r)  the demo listener -> demo_sandbox; the proxy's own endpoints (health,
--                  sandboxes) by exact path; everything else -> router
--   on_log(r)      after each exchange (nothing by default)
--   check()        for --check: problems found in the configuration and sources
-- Replace it (put your own init.lua in the --scripts directory) to change the chain itself;
-- replace any one of the modules it requires to change one policy.
local core = require "sp.core"
local discovery = require "discovery"
local health = require "health"
local sandboxes = require "sandboxes"
local router = require "router"
local demo_sandbox = require "demo_sandbox"

local M = {}

-- Exact paths answered by the proxy itself (single-segment paths are never sandboxes).
local endpoints = {}
for path, handler in pairs(health.endpoints) do
    endpoints[path] = handler
end
for path, handler in pairs(sandboxes.endpoints) do
    endpoints[path] = handler
end
M.endpoints = endpoints

function M.on_start()
    if core.worker_id() == 0 then
        discovery.start()
    end
end

function M.on_request(req)
    local listener = req:listener()
    if listener == "demo" then
        return demo_sandbox.handle(req)
    end
    local handler = endpoints[req:path()]
    if handler then
        return handler(req)
    end
    return router.handle(req)
end

function M.check()
    return discovery.check()
end

return M
