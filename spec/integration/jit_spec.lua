-- The routing path compiles under the JIT: the real binary with the default scripts, wrapped
-- by an init.lua that records LuaJIT's trace events (jit.attach), serves a stream of routed
-- requests; then no trace that starts or aborts in a module on the per-request path may have
-- aborted, and the request hook itself must have been compiled. Trace aborts are what turn
-- compiled Lua back into the interpreter (NYI bytecodes such as closures made per request,
-- loops left after one pass, tail calls of builtins from a trace's first frame, ...).
local H = require "spec.helpers.proxy"
local cjson = require "cjson"
local process = require "spec.helpers.process"

-- Modules that run for every routed request (and its access-log line).
local REQUEST_PATH = { "init.lua", "ratelimit.lua", "router.lua", "sandbox_path.lua",
    "auth.lua", "access_log.lua", "wake.lua", "sp.request", "sp.ip" }

local function on_request_path(where)
    for _, m in ipairs(REQUEST_PATH) do
        if where:find(m, 1, true) then
            return true
        end
    end
    return false
end

local WRAPPER = [[
-- test wrapper: records JIT trace events, then behaves exactly as the built-in init.lua
local jit = require "jit"
local util = require "jit.util"
local ok_vmdef, vmdef = pcall(require, "jit.vmdef")
local started, compiled, aborts = {}, {}, {}
-- Only events from the first request on count: a loop that runs once at module load (such as
-- access_log.lua building its field set) can still be recorded, because LuaJIT's hot counters
-- are shared by hashed bytecode address, and its "leaving loop in root trace" abort says
-- nothing about the per-request path.
local serving = false

local function where(func, pc)
    local info = util.funcinfo(func, pc)
    return tostring(info.source or info.loc or "?") .. ":" .. tostring(info.currentline or "?")
end

jit.attach(function(what, tr, func, pc, otr, oex)
    if not serving then
        return
    end
    if what == "start" then
        started[tr] = where(func, pc)
    elseif what == "stop" then
        compiled[#compiled + 1] = started[tr] or "?"
    elseif what == "abort" then
        local reason = tostring(otr)
        if ok_vmdef and type(otr) == "number" and vmdef.traceerr[otr] then
            reason = vmdef.traceerr[otr]
            if oex ~= nil and reason:find("%%d") then
                reason = reason:format(oex)
            elseif oex ~= nil and reason:find("%%s") then
                local arg = type(oex) == "number" and vmdef.ffnames and vmdef.ffnames[oex] or oex
                reason = reason:format(tostring(arg))
            end
        end
        aborts[#aborts + 1] = { start = started[tr] or "?", at = where(func, pc),
            reason = reason }
    end
end, "trace")

local settings = require("sp.core").settings()
local builtin = dofile(settings.builtin_dir .. "/init.lua")
local M = setmetatable({}, { __index = builtin })
function M.on_request(req)
    serving = true
    if req:path() == "/__jit" then
        return req:respond(200, { compiled = compiled, aborts = aborts })
    end
    return builtin.on_request(req)
end
return M
]]

describe("the JIT on the routing path", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "jit" }
        local dir = H.tmpdir() -- a fresh directory: the override scripts
        assert(process.write_file(dir .. "/init.lua", WRAPPER))
        local sandboxes = {}
        for i = 1, 20 do
            sandboxes[#sandboxes + 1] = H.sandbox("u" .. (i % 4), "sb" .. i, up.port)
        end
        -- script_time_budget = 0: the budget's count hook fires every 10,000 interpreted
        -- instructions and aborts whatever trace is being recorded at that moment ("hook
        -- called during recording"); the trace is simply recorded again later. That random
        -- abort says nothing about the scripts, so the check runs without the hook.
        px = H.start{ workers = 1, sandboxes = sandboxes, scripts = dir,
            set = { access_log_flush = 0.05, script_time_budget = 0 } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("compiles the request hook and aborts no trace in the per-request modules", function()
        local c = assert(px:connect())
        for n = 1, 1500 do
            local i = n % 20 + 1
            local r = assert(c:request{ path = "/u" .. (i % 4) .. "/sb" .. i .. "/echo?n=" .. n })
            assert.are.equal(200, r.status)
        end
        local r = assert(c:request{ path = "/__jit" })
        c:close()
        assert.are.equal(200, r.status)
        local report = cjson.decode(r.body)
        local bad = {}
        for _, a in ipairs(report.aborts) do
            if on_request_path(a.start) or on_request_path(a.at) then
                bad[#bad + 1] = ("%s (aborted at %s): %s"):format(a.start, a.at, a.reason)
            end
        end
        assert.are.same({}, bad)
        local hook_compiled = false
        for _, start in ipairs(report.compiled) do
            if start:find("init.lua", 1, true) then
                hook_compiled = true
            end
        end
        assert.is_true(hook_compiled, "no trace starts in init.lua (on_request): "
            .. table.concat(report.compiled, ", "))
    end)
end)
