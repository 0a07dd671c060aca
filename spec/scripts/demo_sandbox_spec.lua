-- demo_sandbox.lua: the stand-in sandbox served on the "demo" listener. It must answer the
-- runtime API's shape and never execute anything.
local testkit = require "sp.testkit"
local demo = require "demo_sandbox"

local function call(method, target, body)
    local req = testkit.request{ method = method, target = target, body = body,
        listener = "demo" }
    demo.handle(req)
    return req
end

describe("demo sandbox", function()
    it("answers GET / like the runtime", function()
        local req = call("GET", "/")
        assert.are.equal(200, req.response.status)
        assert.are.equal("application/json", req.response.headers["Content-Type"])
        assert.are.same({ status = "ok", message = "Sandbox Runtime is active." }, req.response.json)
        assert.is_nil(req.forwarded)
    end)

    it("answers HEAD / and GET /?query", function()
        assert.are.equal(200, call("HEAD", "/").response.status)
        local req = call("GET", "/?x=1")
        assert.are.equal(200, req.response.status)
        assert.are.same({ status = "ok", message = "Sandbox Runtime is active." }, req.response.json)
    end)

    it("reports the length of the POST /execute body, not its content", function()
        local body = '{"command": "echo hi"}'
        local req = call("POST", "/execute", body)
        assert.are.equal(200, req.response.status)
        assert.are.equal("application/json", req.response.headers["Content-Type"])
        assert.are.same({
            stdout = "demo sandbox: commands are not executed; received " .. #body .. " bytes\n",
            stderr = "",
            exit_code = 0,
        }, req.response.json)
    end)

    it("reports 0 bytes for an empty POST /execute", function()
        local req = call("POST", "/execute", nil)
        assert.are.equal(200, req.response.status)
        assert.are.equal("demo sandbox: commands are not executed; received 0 bytes\n",
            req.response.json.stdout)
    end)

    it("never runs the command", function()
        local marker = os.tmpname()
        os.remove(marker)
        local body = '{"command": "touch ' .. marker .. '; echo pwned"}'
        local real_execute, real_popen = os.execute, io.popen
        local ran = false
        os.execute = function() ran = true end
        io.popen = function() ran = true end
        local ok, req = pcall(call, "POST", "/execute", body)
        os.execute, io.popen = real_execute, real_popen
        assert.is_true(ok)
        assert.is_false(ran)
        assert.is_nil(io.open(marker, "r"))
        assert.are.equal(0, req.response.json.exit_code)
        assert.are.equal("", req.response.json.stderr)
        assert.is_nil(req.response.json.stdout:match("^pwned"))
        assert.matches("^demo sandbox: commands are not executed", req.response.json.stdout)
    end)

    it("answers 413 for a body over 64 KiB", function()
        local req = call("POST", "/execute", string.rep("a", 70000))
        assert.are.equal(413, req.response.status)
        assert.matches("E2BIG", req.response.json.message)
    end)

    it("lists nothing under /list/", function()
        local req = call("GET", "/list/tmp")
        assert.are.equal(200, req.response.status)
        assert.are.equal('{"files":[]}', req.response.body)
        assert.are.equal("application/json", req.response.headers["Content-Type"])
        assert.are.equal(200, call("GET", "/list/").response.status)
    end)

    it("answers 404 Not found for everything else", function()
        for _, c in ipairs({
            { "GET", "/execute" }, { "PUT", "/execute" }, { "POST", "/" }, { "DELETE", "/" },
            { "GET", "/upload" }, { "POST", "/upload" }, { "GET", "/download/x" },
            { "POST", "/list/x" }, { "GET", "/list" }, { "GET", "/execute/" },
            { "GET", "/exists/x" }, { "GET", "//" },
        }) do
            local req = call(c[1], c[2], c[1] ~= "GET" and "x" or nil)
            assert.are.equal(404, req.response.status, c[1] .. " " .. c[2])
            assert.are.same({ message = "Not found" }, req.response.json, c[1] .. " " .. c[2])
            assert.is_nil(req.forwarded)
        end
    end)
end)
