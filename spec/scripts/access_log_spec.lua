-- access_log.lua: the access-log record of one exchange (from a fake request completed with
-- req:complete{...}), field selection from the config, and the line written through
-- req:access_log (the test kit's request hands it to core.access_log, captured here by
-- replacing it in the sp.core module table for the duration of a test). The runtime's own
-- writer of that line is checked against the real binary in spec/integration/platform_spec.lua.
local testkit = require "sp.testkit"
local core = require "sp.core"
local cjson = require "cjson"

local ALL = { "time", "request_id", "client", "method", "path", "query", "status", "bytes_in",
    "bytes_out", "duration", "upstream_connect", "upstream_first_byte", "user", "sandbox",
    "upstream", "trace_id", "ratelimit", "error", "worker" }

local lines
local real_access_log = core.access_log

-- Loads a fresh access_log.lua with the given `access_log` config section; lines go to `lines`.
local function load_log(section)
    core.access_log = function(line)
        assert.is_string(line)
        lines[#lines + 1] = line
    end
    return testkit.load("access_log", "access_log", section)
end

local function keys(t)
    local out = {}
    for k in pairs(t) do
        out[#out + 1] = k
    end
    table.sort(out)
    return out
end

local function sorted(list)
    local c = { unpack(list) }
    table.sort(c)
    return c
end

-- A proxied exchange: GET /alice/sb/files?x=1 routed to 10.0.0.7:8888, allowed by ratelimit.
local function proxied(opts)
    opts = opts or {}
    local req = testkit.request{ method = opts.method or "GET",
        target = opts.target or "/alice/sb/files?x=1", client = "192.0.2.10", id = "req-1" }
    req.ctx.route = { user = "alice", name = "sb", address = "10.0.0.7", port = 8888 }
    req.ctx.ratelimit = "allowed"
    req:forward("10.0.0.7", 8888, "/files?x=1")
    req:complete{ status = 200, bytes_in = 123, bytes_out = 4567, duration = 0.25,
        upstream_connect = 0.001, upstream_first_byte = 0.02 }
    return req
end

describe("access_log.lua", function()
    before_each(function()
        lines = {}
    end)

    after_each(function()
        core.access_log = real_access_log
    end)

    describe("record", function()
        it("has every field of a proxied exchange, with the values of the exchange", function()
            local log = load_log(nil)
            local rec = log.record(proxied())
            assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", rec.time)
            rec.time = nil
            assert.are.same({
                request_id = "req-1", client = "192.0.2.10", method = "GET",
                path = "/alice/sb/files", status = 200, bytes_in = 123, bytes_out = 4567,
                duration = 0.25, upstream_connect = 0.001, upstream_first_byte = 0.02,
                user = "alice", sandbox = "sb", upstream = "10.0.0.7:8888", ratelimit = "allowed",
                worker = 0,
            }, rec)
        end)

        it("leaves out what does not apply (no route, no upstream, no error, no query)", function()
            local log = load_log(nil)
            local req = testkit.request{ target = "/health", id = "h" }
            req:respond(200, { status = "ok" })
            req:complete{ bytes_in = 40, bytes_out = 100, duration = 0.001 }
            local rec = log.record(req)
            assert.are.same({ "bytes_in", "bytes_out", "client", "duration", "method", "path",
                "request_id", "status", "time", "worker" }, keys(rec))
            assert.are.equal(200, rec.status)
            assert.are.equal("/health", rec.path)
        end)

        it("carries the error and the upstream of a failed exchange", function()
            local log = load_log(nil)
            local req = proxied()
            req:complete{ status = 502, error = "upstream connect failed", upstream = "10.0.0.7:8888" }
            local rec = log.record(req)
            assert.are.equal(502, rec.status)
            assert.are.equal("upstream connect failed", rec.error)
            assert.are.equal("10.0.0.7:8888", rec.upstream)
        end)

        it("carries the rate limit decision", function()
            local log = load_log(nil)
            local req = testkit.request{ target = "/alice/sb/x" }
            req.ctx.ratelimit = "limited"
            req:respond(429, { error = "rate limited" })
            req:complete{}
            local rec = log.record(req)
            assert.are.equal("limited", rec.ratelimit)
            assert.are.equal(429, rec.status)
            assert.is_nil(rec.user)
        end)

        it("works on a request whose ctx was never touched", function()
            local log = load_log(nil)
            local req = testkit.request{ target = "/x" }
            req:respond(404, { error = "not found" })
            req:complete{}
            assert.is_nil(rawget(req, "ctx"))
            local rec = log.record(req)
            assert.is_nil(rec.ratelimit)
            assert.is_nil(rec.user)
            assert.is_nil(rawget(req, "ctx")) -- recording does not create one
        end)

        it("writes the query only when configured, and only when there is one", function()
            local log = load_log(nil)
            assert.is_nil(log.record(proxied()).query)
            log = load_log({ query = true })
            assert.are.equal("x=1", log.record(proxied()).query)
            assert.is_nil(log.record(proxied{ target = "/alice/sb/files" }).query)
        end)

        it("writes only the configured fields", function()
            local log = load_log({ fields = { "status", "path" } })
            assert.are.same({ status = 200, path = "/alice/sb/files" }, log.record(proxied()))
            log = load_log({ fields = { "user", "sandbox", "ratelimit", "worker" } })
            assert.are.same({ user = "alice", sandbox = "sb", ratelimit = "allowed", worker = 0 },
                log.record(proxied()))
            log = load_log({ fields = {} })
            assert.are.same({}, log.record(proxied()))
        end)

        it("by default knows exactly the documented fields", function()
            local log = load_log({ query = true })
            local documented = {}
            for _, f in ipairs(ALL) do
                documented[#documented + 1] = f
            end
            assert.are.same(sorted(documented), keys(log.fields))
            -- without query = true, "query" is not written
            log = load_log(nil)
            assert.is_nil(log.fields.query)
        end)
    end)

    describe("write", function()
        it("hands one JSON line (no newline) per exchange to core.access_log", function()
            local log = load_log(nil)
            log.write(proxied())
            assert.are.equal(1, #lines)
            local line = lines[1]
            assert.is_nil(line:find("\n", 1, true))
            assert.are.equal("{", line:sub(1, 1))
            assert.are.equal("}", line:sub(-1))
            local rec = cjson.decode(line)
            assert.are.equal(200, rec.status)
            assert.are.equal("/alice/sb/files", rec.path)
            assert.are.equal("alice", rec.user)
            log.write(proxied())
            assert.are.equal(2, #lines)
        end)

        it("does not escape slashes", function()
            local log = load_log(nil)
            log.write(proxied())
            assert.is_nil(lines[1]:find("\\/", 1, true))
            assert.truthy(lines[1]:find('"path":"/alice/sb/files"', 1, true))
            assert.truthy(lines[1]:find('"upstream":"10.0.0.7:8888"', 1, true))
        end)

        it("keeps odd bytes in the path valid JSON", function()
            local log = load_log({ fields = { "path" } })
            local req = testkit.request{ target = '/a/b/"quoted"\\back' }
            req:respond(200, "x")
            req:complete{}
            log.write(req)
            assert.are.same({ path = '/a/b/"quoted"\\back' }, cjson.decode(lines[1]))
        end)

        it("writes exactly the configured fields", function()
            local log = load_log({ fields = { "status", "path" } })
            log.write(proxied())
            assert.are.same({ status = 200, path = "/alice/sb/files" }, cjson.decode(lines[1]))
        end)

        it("writes nothing when disabled", function()
            local log = load_log({ enabled = false })
            log.write(proxied())
            assert.are.equal(0, #lines)
        end)
    end)
end)
