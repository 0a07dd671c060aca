-- health.lua: the proxy's health endpoints.
--   GET /health -> 200 {"status":"ok","sandboxes":N,"ready":N,"timestamp":"<ISO 8601 UTC>",
--                       "source":{...the sandbox source's sync state...}}
--   GET /ready  -> 200 {"ready":true} once the sandbox source has synced (the first full list
--                  applied) and the process is not draining; else 503 {"ready":false,...}.
--                  Used by the Kubernetes readiness probe.
--   GET /live   -> 200 {"live":true} while the process serves (liveness probe); 503
--                  {"live":false,"reason":"worker stuck","stuck_workers":[ids]} while the
--                  watchdog reports a worker whose loop has made no progress for
--                  worker_stall_timeout (e.g. an endless loop the JIT compiled in a script).
-- The source state is published by discovery.lua in the shared dict "sp" (key "source").
local core = require "sp.core"
local routes = require "sp.routes"
local shared = require "sp.shared"
local cjson = require "cjson.safe"

local sp_dict = assert(shared.dict("sp"))

local M = {}

local METHOD_NOT_ALLOWED = { error = "method not allowed" }

local function source_state()
    local s = sp_dict:get("source")
    return s and cjson.decode(s) or { synced = false, type = "none" }
end
M.source_state = source_state

local function get_only(req)
    local m = req:method()
    if m ~= "GET" and m ~= "HEAD" then
        req:respond(405, METHOD_NOT_ALLOWED, { Allow = "GET, HEAD" })
        return false
    end
    return true
end

local function health(req)
    if not get_only(req) then
        return
    end
    req:respond(200, {
        status = "ok",
        sandboxes = routes.count(),
        ready = routes.count_ready(),
        timestamp = core.iso8601(),
        source = source_state(),
        draining = core.draining(),
        version = core.version,
    })
end

local function ready(req)
    if not get_only(req) then
        return
    end
    local src = source_state()
    if core.draining() then
        return req:respond(503, { ready = false, reason = "draining" })
    end
    if not src.synced then
        return req:respond(503, { ready = false, reason = "sandbox source not synced yet" })
    end
    req:respond(200, { ready = true })
end

local LIVE = { live = true }

local function live(req)
    if not get_only(req) then
        return
    end
    local stuck = core.stuck_workers()
    if #stuck > 0 then
        return req:respond(503, { live = false, reason = "worker stuck", stuck_workers = stuck })
    end
    req:respond(200, LIVE)
end

M.endpoints = {
    ["/health"] = health,
    ["/ready"] = ready,
    ["/live"] = live,
}

return M
