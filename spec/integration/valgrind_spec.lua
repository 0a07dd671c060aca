-- A leak check of a whole start / serve / stop cycle under valgrind (memcheck): the proxy
-- serves proxied requests (GET, an upload, a WebSocket exchange), local answers (404, 405,
-- /metrics), an upstream failure (502), then drains on SIGTERM; valgrind must report no
-- definitely or indirectly lost memory. (LuaJIT is not built for valgrind, so undefined-value
-- reports, which it produces by design, are not counted.)
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local ws = require "spec.helpers.ws"

describe("valgrind", function()
    teardown(function()
        H.stop_all()
    end)

    it("finds no leak in a start/serve/stop cycle", function()
        local have, why = H.need_tool("valgrind", "the leak check of a start/serve/stop cycle")
        if not have then
            pending(why)
            return
        end
        local up = H.upstream{ name = "vg" }
        local dead = assert(H.net.free_port())
        local dir = H.tmpdir()
        local sfile = dir .. "/sandboxes.json"
        H.write_sandboxes(sfile, { H.sandbox("a", "b", up.port), H.sandbox("a", "dead", dead) })
        local port = assert(H.net.free_port())
        local p = assert(process.spawn{ cmd = { "valgrind", "--leak-check=full",
            "--undef-value-errors=no", "--errors-for-leak-kinds=definite,indirect",
            "--error-exitcode=99", "--log-file=" .. dir .. "/valgrind.log", H.BIN,
            "--listen", "127.0.0.1:" .. port, "--workers", "1", "--sandboxes-file", sfile,
            "--set", "allow_loopback_sandboxes=true" },
            stdout = dir .. "/out", stderr = dir .. "/err" })
        H.net.wait_until(function()
            local r = H.http.request{ port = port, path = "/health", timeout = 2 }
            return r and r.status == 200
        end, 120, 0.2)
        local function get(path, opts)
            opts = opts or {}
            opts.port = port
            opts.path = path
            opts.timeout = 30
            return assert(H.http.request(opts))
        end
        assert.are.equal(200, get("/a/b/echo").status)
        assert.are.equal(200, get("/a/b/sink", { method = "POST", body = string.rep("x", 200000) }).status)
        assert.are.equal(404, get("/a/none/x").status)
        assert.are.equal(405, get("/health", { method = "POST" }).status)
        assert.are.equal(200, get("/metrics").status)
        assert.are.equal(502, get("/a/dead/x").status)
        local c = assert(ws.connect{ host = "127.0.0.1", port = port, path = "/a/b/ws", timeout = 30 })
        assert(c:send_text("hi"))
        assert.are.equal("text", (c:receive(30)))
        c:close()
        assert(p:signal("TERM"))
        local code = p:wait(120)
        local log = process.read_file(dir .. "/valgrind.log") or ""
        assert.are.equal(0, code, log)
        if not log:find("All heap blocks were freed", 1, true) then
            assert.matches("definitely lost: 0 bytes", log, 1, true)
            assert.matches("indirectly lost: 0 bytes", log, 1, true)
        end
    end)
end)
