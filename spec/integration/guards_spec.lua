-- Guarded scripts and drains under load: a script that blows the Lua memory cap or its time
-- budget gets a 500 for that request and the worker keeps serving; --check warns about loops
-- the budget cannot stop once compiled; a SIGTERM drain under load fails no accepted request.
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local socket = require "socket"
local cjson = require "cjson"

local ROUTER = [[
local routes = require "sp.routes"
local M = {}
local builtin
function M.handle(req)
    local p = req:path()
    if p == "/guard/mem/x" then
        local t = {}
        for i = 1, 1e9 do
            t[i] = string.rep("x", 1024) .. i -- grows until the state's memory cap
        end
    elseif p == "/guard/interp/x" then
        local n = 0
        for _ = 1, 1e12 do -- creating closures is not compiled: the interpreter's hook fires
            local f = function() return n end
            n = n + (f() > -1 and 1 or 0)
        end
    elseif p == "/guard/api/x" then
        for _ = 1, 1e12 do -- a runtime API call checks the budget
            routes.get("nobody/none")
        end
    end
    builtin = builtin or dofile(require("sp.core").settings().builtin_dir .. "/router.lua")
    return builtin.handle(req)
end
return M
]]

describe("guarded scripts", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "g" }
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/router.lua", ROUTER))
        px = H.start{ scripts = dir, sandboxes = { H.sandbox("a", "b", up.port) },
            set = { lua_memory_limit_mb = 64, script_time_budget = 0.3 } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("answers 500 when a request exhausts the Lua memory cap, then keeps serving", function()
        local r = assert(px:request{ path = "/guard/mem/x", timeout = 30 })
        assert.are.equal(500, r.status)
        px:wait_log(function(l)
            return l.msg == "script error" and tostring(l.error):find("not enough memory", 1, true)
        end)
        for _ = 1, 5 do
            assert.are.equal(200, assert(px:get("/a/b/echo")).status)
        end
        -- the memory came back
        local m = H.net.wait_until(function()
            local mr = px:get("/metrics")
            local v = mr and tonumber(mr.body:match("sandbox_proxy_lua_memory_bytes (%d+)"))
            return v and v < 48 * 1024 * 1024 and v
        end, 10)
        assert.is_true(m < 48 * 1024 * 1024)
    end)

    it("answers 500 when interpreted code runs past script_time_budget", function()
        local t0 = socket.gettime()
        local r = assert(px:request{ path = "/guard/interp/x", timeout = 30 })
        assert.are.equal(500, r.status)
        assert.is_true(socket.gettime() - t0 < 5)
        px:wait_log(function(l)
            return l.msg == "script error" and tostring(l.error):find("time budget", 1, true)
        end)
        assert.are.equal(200, assert(px:get("/a/b/echo")).status)
    end)

    it("stops a loop of runtime API calls at the budget too", function()
        local r = assert(px:request{ path = "/guard/api/x", timeout = 30 })
        assert.are.equal(500, r.status)
        assert.are.equal(200, assert(px:get("/a/b/echo")).status)
    end)

    it("--check warns about loops the budget cannot stop once compiled", function()
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/router.lua",
            "local M = {}\nfunction M.handle(req)\n  while true do end\nend\nreturn M\n"))
        local p = assert(process.spawn{ cmd = { H.BIN, "--check", "--demo", "--scripts", dir },
            stdout = dir .. "/out", stderr = dir .. "/err" })
        assert.are.equal(0, p:wait(20))
        assert.matches("router.lua:3: `while true do`", p:read_stderr())
    end)
end)

describe("a drain under load", function()
    teardown(function()
        H.stop_all()
    end)

    it("fails no accepted request", function()
        local up = H.upstream{ name = "drain" }
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) }, workers = 2,
            set = { drain_timeout = 20 } }
        -- keep-alive clients, each always with a request in flight (a slow one: 100-200 ms)
        local clients = {}
        for i = 1, 12 do
            local c = assert(px:connect{ timeout = 10 })
            c.n = i
            clients[i] = c
        end
        local function send(c)
            assert(c:send_raw(("GET /a/b/delay?ms=%d HTTP/1.1\r\nHost: x\r\n\r\n"):format(100 + c.n * 8)))
        end
        for _, c in ipairs(clients) do
            send(c)
        end
        local ok, failed, done = 0, {}, 0
        local term_at = socket.gettime() + 0.5
        local termed = false
        local deadline = socket.gettime() + 30
        while done < #clients and socket.gettime() < deadline do
            if not termed and socket.gettime() >= term_at then
                assert(px.proc:signal("TERM"))
                termed = true
            end
            for _, c in ipairs(clients) do
                if not c.finished then
                    local r, err = c:read_response{ timeout = 10 }
                    if not r then
                        failed[#failed + 1] = tostring(err)
                        c.finished = true
                        done = done + 1
                    elseif r.status ~= 200 then
                        failed[#failed + 1] = "status " .. r.status
                        c.finished = true
                        done = done + 1
                    else
                        ok = ok + 1
                        if r.closed or r.headers["connection"] == "close" then
                            c.finished = true -- the proxy asked us to stop using it
                            done = done + 1
                        else
                            send(c)
                        end
                    end
                end
            end
        end
        assert.is_true(termed)
        assert.are.same({}, failed)
        assert.is_true(ok >= #clients * 2)
        local code = px.proc:wait(30)
        assert.are.equal(0, code)
        -- connecting now is refused: the listeners are gone
        assert.is_nil(H.http.request{ port = px.port, path = "/health", timeout = 1 })
    end)
end)

local SPIN_ROUTER = [[
local M = {}
local builtin
local x = 0
function M.handle(req)
    if req:path() == "/guard/spin/x" then
        require("sp.log").info("spinning", { worker = require("sp.core").worker_id() })
        while true do x = x + 1 end -- compiled by the JIT: no count hook fires in it
    end
    builtin = builtin or dofile(require("sp.core").settings().builtin_dir .. "/router.lua")
    return builtin.handle(req)
end
return M
]]

-- Starts 2 workers with SPIN_ROUTER and sends the spinning request (never answered).
local function start_spinning(set)
    local dir = H.tmpdir()
    assert(process.write_file(dir .. "/router.lua", SPIN_ROUTER))
    local up = H.upstream{ name = "spin" }
    local px = H.start{ scripts = dir, workers = 2, sandboxes = { H.sandbox("a", "b", up.port) },
        set = set }
    local spinning = assert(px:connect{ timeout = 1 })
    assert(spinning:send_raw("GET /guard/spin/x HTTP/1.1\r\nHost: x\r\n\r\n"))
    local l = px:wait_log(function(line) return line.msg == "spinning" and line end)
    return px, spinning, l.worker
end

-- A keep-alive connection served by a worker that is not stuck (the kernel spreads new
-- connections over the workers' listeners: one that landed on the stuck worker never answers).
local function healthy_connection(px)
    return H.net.wait_until(function()
        local c = px:connect{ timeout = 1 }
        if not c then
            return nil
        end
        local r = c:request{ path = "/a/b/echo", timeout = 0.5 }
        if r and r.status == 200 then
            return c
        end
        c:close()
    end, 20, 0, "a connection on the healthy worker")
end

describe("a worker stuck in a JIT-compiled endless loop", function()
    teardown(function()
        H.stop_all()
    end)

    it("fails /live, is named in a log line, and two SIGTERMs still exit 0", function()
        local px, spinning, worker = start_spinning{ worker_stall_timeout = 1,
            script_time_budget = 0.3 }
        -- /live fails (answered by the other worker; a connection the kernel hands to the stuck
        -- worker's listener times out, hence the short timeout and the retries)
        local body = H.net.wait_until(function()
            local r = H.http.request{ port = px.port, path = "/live", timeout = 0.5 }
            return r and r.status == 503 and cjson.decode(r.body)
        end, 20, 0.05, "/live 503")
        assert.is_false(body.live)
        assert.are.equal("worker stuck", body.reason)
        assert.are.same({ worker }, body.stuck_workers)
        local l = px:wait_log(function(line)
            return line.msg:find("^worker stuck") and line
        end)
        assert.are.equal("error", l.level)
        assert.are.equal(worker, l.worker)
        assert.matches("^request hook: GET /guard/spin/x %(request_id ", l.running)
        -- a request in flight on the healthy worker keeps the drain going
        local busy = healthy_connection(px)
        assert(busy:send_raw("GET /a/b/delay?ms=30000 HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert(px.proc:signal("TERM"))
        px:wait_log(function(line) return line.msg == "draining" end)
        assert.is_true(px.proc:alive())
        -- the second SIGTERM stops the healthy worker; the stuck one cannot stop, the process can
        assert(px.proc:signal("TERM"))
        local code, how = px.proc:wait(20)
        assert.are.equal("exited", how)
        assert.are.equal(0, code)
        assert.truthy(px:wait_log(function(line)
            return line.msg:find("^stopped without the stuck workers") and line.workers == tostring(worker)
        end))
        busy:close()
        spinning:close()
    end)

    it("exits 0 at the drain deadline, before the watchdog has even reported it", function()
        -- the other worker drains at once; at drain_timeout the stop command goes to every worker
        -- (once it aborted the process: a command sent to a worker that had already exited)
        local px, spinning = start_spinning{ worker_stall_timeout = 3, drain_timeout = 0.5,
            script_time_budget = 0.3 }
        assert(px.proc:signal("TERM"))
        px:wait_log(function(line) return line.msg == "drain timeout: closing remaining connections" end)
        local code, how = px.proc:wait(20)
        assert.are.equal("exited", how)
        assert.are.equal(0, code)
        px:wait_log(function(line) return line.msg:find("^stopped without the stuck workers") end)
        spinning:close()
    end)
end)
