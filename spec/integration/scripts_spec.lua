-- Scripts in the real binary: one protected-call policy (a script error answers 500 with the
-- request id, logs a traceback, and the process keeps serving), override directories that win
-- file by file, strict globals, the opt-in body read, sleeping in a hook, and the log hook.
local H = require "spec.helpers.proxy"
local cjson = require "cjson"
local process = require "spec.helpers.process"

describe("scripts", function()
    local up, px, dir

    setup(function()
        up = H.upstream{ name = "s" }
        dir = H.tmpdir()
        -- An override router: a few test paths, then the built-in behaviour.
        assert(process.write_file(dir .. "/router.lua", [[
local timer = require "sp.timer"
local M = {}
local builtin
local function load_builtin()
    -- the built-in router, loaded from the built-in directory by path
    local settings = require("sp.core").settings()
    builtin = builtin or dofile(settings.builtin_dir .. "/router.lua")
    return builtin
end
function M.handle(req)
    local p = req:path()
    if p == "/boom/now/x" then
        local t = nil
        return t.field -- a runtime error
    elseif p == "/boom/later/x" then
        timer.sleep(0.05)
        error("failed after a sleep")
    elseif p == "/boom/global/x" then
        accidental_global = 1
    elseif p == "/boom/nodecision/x" then
        return
    elseif p == "/slow/ok/x" then
        timer.sleep(0.2)
        return req:respond(200, { slept = true })
    elseif p == "/body/echo/x" then
        local body, err = req:read_body(100)
        if not body then
            return req:respond(413, { error = err })
        end
        return req:respond(200, { got = body, n = #body })
    elseif p == "/body/forward/x" then
        local body = assert(req:read_body(1000))
        req:set_header("X-Body-Seen", #body)
        return req:forward("127.0.0.1", ]] .. up.port .. [[, "/echo")
    elseif p == "/hdr/num/x" then
        req:add_response_header("X-Zero", 0)
        req:add_response_header("X-Int", 42)
        req:add_response_header("X-Big", 1e13)
        req:add_response_header("X-Frac", 2.5)
        req:add_response_header("X-Neg", -3)
        req:add_response_header("X-Huge", 1e15)
        req:add_response_header("X-Text", "7")
        return req:forward("127.0.0.1", ]] .. up.port .. [[, "/echo")
    elseif p == "/hdr/edit/x" then
        req:set_header("X-Replaced", "new")
        req:add_header("X-Added", "a")
        req:remove_header("X-Remove-Me")
        return req:forward("127.0.0.1", ]] .. up.port .. [[, "/echo")
    end
    return load_builtin().handle(req)
end
return M
]]))
        px = H.start{ scripts = dir, sandboxes = { H.sandbox("alice", "sb", up.port) } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("answers 500 with the request id for a script error, logs a traceback, keeps serving", function()
        local r = assert(px:get("/boom/now/x"))
        assert.are.equal(500, r.status)
        local b = cjson.decode(r.body)
        assert.are.equal("internal error", b.error)
        assert.are.equal(r.headers["x-request-id"], b.request_id)
        local line = px:wait_log(function(l)
            return l.msg == "script error" and l.request_id == b.request_id
        end)
        assert.matches("attempt to index", line.error)
        assert.matches("stack traceback", line.error)
        assert.matches("router.lua", line.error)
        r = assert(px:get("/alice/sb/echo"))
        assert.are.equal(200, r.status)
    end)

    it("answers 500 for an error after the hook yielded", function()
        local r = assert(px:get("/boom/later/x"))
        assert.are.equal(500, r.status)
        assert.are.equal(200, assert(px:get("/alice/sb/echo")).status)
    end)

    it("refuses accidental globals", function()
        local r = assert(px:get("/boom/global/x"))
        assert.are.equal(500, r.status)
        px:wait_log(function(l)
            return l.msg == "script error" and tostring(l.error):find("accidental_global", 1, true)
        end)
    end)

    it("answers 500 when the hook decides nothing", function()
        local r = assert(px:get("/boom/nodecision/x"))
        assert.are.equal(500, r.status)
    end)

    it("lets a hook sleep without blocking other requests", function()
        local c = assert(px:connect())
        assert(c:send_raw("GET /slow/ok/x HTTP/1.1\r\nHost: x\r\n\r\n"))
        local t0 = require("socket").gettime()
        local r = assert(px:get("/alice/sb/echo"))
        assert.are.equal(200, r.status)
        assert.is_true(require("socket").gettime() - t0 < 0.2)
        r = assert(c:read_response{})
        assert.are.equal(200, r.status)
        assert.is_true(cjson.decode(r.body).slept)
        c:close()
    end)

    it("reads a request body on demand, with a limit", function()
        local r = assert(px:request{ method = "POST", path = "/body/echo/x", body = "hello" })
        assert.are.equal(200, r.status)
        assert.are.same({ got = "hello", n = 5 }, cjson.decode(r.body))
        -- chunked
        local parts = { "he", "llo", " world" }
        local i = 0
        r = assert(px:request{ method = "POST", path = "/body/echo/x",
            body_source = function() i = i + 1 return parts[i] end })
        assert.are.equal("hello world", cjson.decode(r.body).got)
        -- too large
        r = assert(px:request{ method = "POST", path = "/body/echo/x", body = string.rep("x", 500) })
        assert.are.equal(413, r.status)
        assert.matches("E2BIG", cjson.decode(r.body).error)
    end)

    it("forwards a body the script has read", function()
        local r = assert(px:request{ method = "POST", path = "/body/forward/x", body = "payload!" })
        assert.are.equal(200, r.status)
        local e = cjson.decode(r.body)
        assert.are.equal("payload!", e.body)
        local seen
        for _, h in ipairs(e.headers) do
            if h[1]:lower() == "x-body-seen" then
                seen = h[2]
            end
        end
        assert.are.equal("8", seen)
    end)

    it("writes number values of response headers as tostring would", function()
        local r = assert(px:request{ path = "/hdr/num/x" })
        assert.are.equal(200, r.status)
        assert.are.equal("0", r.headers["x-zero"])
        assert.are.equal("42", r.headers["x-int"])
        assert.are.equal(tostring(1e13), r.headers["x-big"])
        assert.are.equal("10000000000000", r.headers["x-big"])
        assert.are.equal("2.5", r.headers["x-frac"])
        assert.are.equal("-3", r.headers["x-neg"])
        assert.are.equal(tostring(1e15), r.headers["x-huge"])
        assert.are.equal("7", r.headers["x-text"])
    end)

    it("applies header edits to the upstream request", function()
        local r = assert(px:request{ path = "/hdr/edit/x", headers = {
            { "X-Replaced", "old" }, { "X-Remove-Me", "secret" }, { "X-Added", "client" } } })
        local e = cjson.decode(r.body)
        local got = {}
        for _, h in ipairs(e.headers) do
            local n = h[1]:lower()
            got[n] = got[n] and (got[n] .. "," .. h[2]) or h[2]
        end
        assert.are.equal("new", got["x-replaced"])
        assert.is_nil(got["x-remove-me"])
        assert.are.equal("client,a", got["x-added"])
    end)

    it("uses the built-in scripts for what the override directory does not replace", function()
        local h = px:json("/health")
        assert.are.equal("ok", h.status)
    end)
end)

describe("a broken script", function()
    teardown(function()
        H.stop_all()
    end)

    it("is reported by --check with exit code 1", function()
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/router.lua", "local M = {}\nfunction M.handle(req)\n"))
        local p = assert(process.spawn{ cmd = { H.BIN, "--check", "--scripts", dir,
            "--sandboxes-file", H.SOURCE_DIR .. "/scripts/demo/sandboxes.json" },
            stderr = dir .. "/err", stdout = dir .. "/out" })
        local code = p:wait(20)
        assert.are.equal(1, code)
        assert.matches("router.lua", p:read_stderr())
    end)

    it("stops start-up with a clear error", function()
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/router.lua", "return 42 +"))
        local port = assert(H.net.free_port())
        local p = assert(process.spawn{ cmd = { H.BIN, "--listen", "127.0.0.1:" .. port,
            "--workers", "1", "--scripts", dir, "--sandboxes-file",
            H.SOURCE_DIR .. "/scripts/demo/sandboxes.json" }, stderr = dir .. "/err" })
        local code = p:wait(20)
        assert.are.equal(1, code)
        assert.matches("worker failed to start", p:read_stderr())
        assert.matches("router.lua", p:read_stderr())
    end)
end)

-- The access log is access_log.lua; before 0.2 it was log.lua. A user's override file still
-- named log.lua must keep replacing the access log (a silent fall back to the built-in one
-- would drop the user's policy), and the start must say to rename it.
describe("an access-log override under its old name log.lua", function()
    teardown(function()
        H.stop_all()
    end)

    it("is loaded in place of access_log.lua, with a warning", function()
        local up = H.upstream{ name = "old" }
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/log.lua", [[
local M = {}
function M.write(req)
    io.stdout:write('{"legacy_log":true,"path":"' .. req:path() .. '"}\n')
    io.stdout:flush()
end
return M
]]))
        local px = H.start{ scripts = dir, workers = 1,
            sandboxes = { H.sandbox("alice", "sb", up.port) } }
        px:wait_log(function(l)
            return l.level == "warn" and tostring(l.msg):find("rename it to access_log.lua", 1, true)
        end)
        local r = assert(px:get("/alice/sb/echo"))
        assert.are.equal(200, r.status)
        px:wait_log(function(l) return l.legacy_log and l.path == "/alice/sb/echo" end, 10,
            "stdout")
        -- the built-in access log did not write its line as well
        for _, l in ipairs(px:log_lines("stdout")) do
            assert.is_true(l.legacy_log, "a line not from the override: " .. cjson.encode(l))
        end
    end)

    it("still starts an init.lua written for 0.1 that requires \"log\", with a warning", function()
        local up = H.upstream{ name = "old-init" }
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/init.lua", [[
local core = require "sp.core"
local builtin = dofile(core.settings().builtin_dir .. "/init.lua")
local old_log = require "log"
local M = {}
for k, v in pairs(builtin) do M[k] = v end
function M.on_log(req) old_log.write(req) end
return M
]]))
        local px = H.start{ scripts = dir, workers = 1,
            sandboxes = { H.sandbox("alice", "sb", up.port) } }
        px:wait_log(function(l)
            return l.level == "warn" and tostring(l.msg):find('require "access_log"', 1, true)
        end)
        local r = assert(px:get("/alice/sb/echo"))
        assert.are.equal(200, r.status)
        px:wait_log(function(l) return l.path == "/alice/sb/echo" and l.status == 200 end, 10,
            "stdout")
    end)
end)
