-- Cluster-wide rate limits (ratelimit.redis) with a real Redis: a redis-server (Debian's, no
-- persistence) started by this spec on a free loopback port, and three proxy processes (the
-- replicas, two workers each) sharing it. Accuracy across the replicas (an exact burst, and a
-- sustained rate within 10 % of the configured one over a measured window), then the fallbacks
-- when Redis is frozen (SIGSTOP: the per-command timeout) and when it is stopped, each
-- replica configured with another fallback ("local", "closed", "open"), and recovery when it
-- comes back: one "down" and one "up" log line per replica, whatever the traffic. Also sp.redis
-- itself (replies as Lua values, error replies, misuse), AUTH, and a stop while a replaced
-- state's request still waits on Redis.
-- Requests go to /<user>/sb/x for users no route has: the limit (key "user") decides before
-- routing, so an admitted request gets the router's 404 and a refused one 429 (or 503).
local H = require "spec.helpers.proxy"
local prom = require "spec.helpers.prometheus"
local socket = require "socket"

local process = H.process
local net = H.net
local now = socket.gettime

local SLOW = 0.001 -- tokens per second: no refill during a test
-- Redis' timeout where the spec does not test it: generous, so that a loaded machine (or a
-- sanitizer build) never turns a slow reply into a fallback decision
local PATIENT = 2000

local redis_port, redis_proc, redis_dir

local function start_redis()
    -- also on ::1 where the machine has it ("-": optional), for a "localhost" that resolves
    -- to ::1 first
    redis_proc = assert(process.spawn{ cmd = { "redis-server", "--port", tostring(redis_port),
        "--bind", "127.0.0.1 -::1", "--save", "", "--appendonly", "no", "--dir", redis_dir },
        stdout = redis_dir .. "/redis.log", stderr = redis_dir .. "/redis.log" })
    assert(net.wait_port("127.0.0.1", redis_port, 10, redis_proc))
end

-- A replica: a proxy whose limit "u" (key "user") lives in the shared Redis; returned once it
-- has logged "redis store up" (every worker connected, its PING answered).
local function replica(limit, redis, set)
    redis.enabled = true
    redis.port = redis_port
    local fields = {}
    for k, v in pairs(redis) do
        fields[#fields + 1] = ("%s = %s"):format(k, type(v) == "string" and ("%q"):format(v)
            or tostring(v))
    end
    local px = H.start{ workers = 2, set = set, config = ([[
return {
    ratelimit = {
        limits = { { name = "u", key = "user", rate = %s, burst = %s } },
        concurrency = { per_sandbox = 0 },
        redis = { %s },
    },
}]]):format(limit.rate, limit.burst, table.concat(fields, ", ")) }
    px:wait_log(function(l)
        return l.msg == "redis store up"
    end)
    return px
end

-- n requests for user over keep-alive connections, one per proxy, round robin; returns the
-- statuses counted by status and per proxy the admitted ones.
local function drive(proxies, user, n, deadline)
    local conns, by_status, admitted = {}, {}, {}
    for i, px in ipairs(proxies) do
        conns[i] = assert(px:connect{ timeout = 10 })
        admitted[i] = 0
    end
    local sent = 0
    while sent < n and not (deadline and now() >= deadline) do
        local i = sent % #proxies + 1
        local r = assert(conns[i]:request{ path = "/" .. user .. "/sb/x" })
        by_status[r.status] = (by_status[r.status] or 0) + 1
        if r.status ~= 429 then
            admitted[i] = admitted[i] + 1
        end
        sent = sent + 1
    end
    for _, c in ipairs(conns) do
        c:close()
    end
    return by_status, admitted, sent
end

local function lines(px, msg)
    local out = {}
    for _, l in ipairs(px:log_lines()) do
        if l.msg == msg then
            out[#out + 1] = l
        end
    end
    return out
end

local function redis_cli(...)
    local args = { "redis-cli", "-p", tostring(redis_port) }
    for _, a in ipairs({ ... }) do
        args[#args + 1] = "'" .. a .. "'"
    end
    local p = assert(io.popen(table.concat(args, " ") .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    return (out:gsub("%s+$", ""))
end

describe("cluster-wide rate limits on a real Redis", function()
    local ok, why = H.need_tool("redis-server", "Debian redis-server: the shared store of "
        .. "spec/integration/ratelimit_redis_spec.lua")

    setup(function()
        if not ok then
            return
        end
        redis_dir = H.tmpdir()
        redis_port = assert(net.free_port())
        start_redis()
    end)

    teardown(function()
        H.stop_all()
    end)

    it("sp.redis: replies as Lua values, error replies and misuse", function()
        if not ok then
            pending(why)
            return
        end
        local dir = H.tmpdir()
        -- an init.lua of its own: one endpoint that runs commands and answers what it got
        assert(process.write_file(dir .. "/init.lua", ([[
local redis = require "sp.redis"
local c = assert(redis.client({ port = %d, timeout_ms = 2000, name = "api" }))
local outside = select(2, pcall(c.command, c, "PING")) -- at load: not in a task
local M = {}
local function call(...)
    local r, err = c:command(...)
    return { r = r, err = err, type = type(r) }
end
function M.on_request(req) -- also answers the readiness polls of H.start
    c:command("DEL", "sp:test:n")
    return req:respond(200, {
        outside = outside,
        status = c:status(),
        set = call("SET", "sp:test:k", "v"),
        get = call("GET", "sp:test:k"),
        missing = call("GET", "sp:test:missing"),
        incr = call("INCRBY", "sp:test:n", 5),
        arr = call("MGET", "sp:test:k", "sp:test:missing"),
        bad = call("NOSUCHCOMMAND", "x"),
        badarg = select(2, pcall(c.command, c, "GET", {})),
        noargs = select(2, pcall(c.command, c)),
    })
end
return M
]]):format(redis_port)))
        local px = H.start{ scripts = dir, workers = 1 }
        px:wait_log(function(l)
            return l.msg == "redis store up" and l.client == "api"
        end)
        local r = assert(px:get("/x"))
        assert.are.equal(200, r.status)
        local got = require("cjson").decode(r.body)
        assert.matches("only possible in a hook's or timer's own coroutine", got.outside, 1, true)
        assert.are.equal("up", got.status)
        assert.are.same({ r = "OK", type = "string" }, got.set)
        assert.are.same({ r = "v", type = "string" }, got.get)
        assert.are.same({ r = false, type = "boolean" }, got.missing)
        assert.are.same({ r = 5, type = "number" }, got.incr)
        assert.are.same({ r = { "v", false }, type = "table" }, got.arr)
        assert.are.equal("nil", got.bad.type)
        assert.matches("^EREDIS: ERR unknown command", got.bad.err)
        assert.matches("string or number expected", got.badarg, 1, true)
        assert.matches("needs a command name", got.noargs, 1, true)
        assert.are.equal("v", redis_cli("GET", "sp:test:k"))
        px:stop()
    end)

    it("authenticates with password, and a wrong one keeps the store down", function()
        if not ok then
            pending(why)
            return
        end
        local port = assert(net.free_port())
        local dir = H.tmpdir()
        local p = assert(process.spawn{ cmd = { "redis-server", "--port", tostring(port),
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir,
            "--requirepass", "s3cret" }, stdout = dir .. "/redis.log", stderr = dir .. "/redis.log" })
        assert(net.wait_port("127.0.0.1", port, 10, p))
        local function proxy(password)
            return H.start{ workers = 1, config = ([[
return { ratelimit = { limits = { { name = "u", key = "user", rate = 0.001, burst = 1 } },
    redis = { enabled = true, port = %d, password = %q, fallback = "closed" } } }]]):format(port,
                password) }
        end
        local good = proxy("s3cret")
        good:wait_log(function(l)
            return l.msg == "redis store up"
        end)
        assert.are.equal(404, assert(good:get("/pw/sb/x")).status)
        assert.are.equal(429, assert(good:get("/pw/sb/x")).status)
        local bad = proxy("wrong")
        local down = bad:wait_log(function(l)
            return l.msg == "redis store down"
        end)
        assert.matches("WRONGPASS", down.error, 1, true)
        assert.are.equal(503, assert(bad:get("/pw2/sb/x")).status)
        good:stop()
        bad:stop()
        p:stop()
    end)

    it("stops cleanly with a replaced state still waiting on Redis: reload, then stop", function()
        if not ok then
            pending(why)
            return
        end
        local px = replica({ rate = SLOW, burst = 5 }, { timeout_ms = 60000 },
            { drain_timeout = 1 })
        -- a request that waits on the frozen Redis (and would wait a minute)
        assert(redis_proc:signal("STOP"))
        local c = assert(px:connect{ timeout = 5 })
        assert(c:send_raw("GET /stuck/sb/x HTTP/1.1\r\nHost: t\r\n\r\n"))
        -- a reload replaces the state; the old one keeps its task and its Redis client
        assert(px.proc:signal("HUP"))
        px:wait_log(function(l)
            return l.msg == "scripts reloaded"
        end)
        -- the stop destroys the replaced state with its task still waiting: its client closes
        -- (the wait dropped without calling Lua; the sanitizer build checks), exit status 0
        local code = px:stop(20)
        assert(redis_proc:signal("CONT"))
        c:close()
        assert.are.equal(0, code)
    end)

    it("admits exactly the burst across 3 replicas", function()
        if not ok then
            pending(why)
            return
        end
        local limit = { rate = SLOW, burst = 30 }
        -- the third replica names the store by a host name (resolved off the loop), not an
        -- address ("localhost": Redis listens on 127.0.0.1 and, where there is one, ::1)
        local proxies = { replica(limit, { timeout_ms = PATIENT }), replica(limit, { timeout_ms = PATIENT }),
            replica(limit, { timeout_ms = PATIENT, host = "localhost" }) }
        local by_status, admitted = drive(proxies, "burst", 150)
        -- one bucket for all: 30 (per replica it would be 90)
        assert.are.equal(30, by_status[404], "admitted")
        assert.are.equal(120, by_status[429], "refused")
        for i = 1, 3 do
            assert.is_true(admitted[i] > 0, "replica " .. i .. " admitted none")
        end
        assert.is_truthy(tonumber(redis_cli("GET", "sp:rl:u:burst")))
        for _, px in ipairs(proxies) do
            px:stop()
        end
    end)

    it("holds the configured rate within 10 % across 3 replicas", function()
        if not ok then
            pending(why)
            return
        end
        local limit = { rate = 100, burst = 10 }
        local proxies = { replica(limit, { timeout_ms = PATIENT }), replica(limit, { timeout_ms = PATIENT }),
            replica(limit, { timeout_ms = PATIENT }) }
        -- about 3 s of requests as fast as one client sends them (well above 100/s: checked)
        local t0 = now()
        local by_status, admitted, sent = drive(proxies, "rate", 100000, t0 + 3)
        local elapsed = now() - t0
        local n = by_status[404] or 0
        local expected = limit.burst + limit.rate * elapsed
        local msg = ("admitted %d in %.2f s (expected %.0f; sent %d: %s)"):format(n, elapsed,
            expected, sent, require("cjson").encode({ admitted = n, refused = by_status[429] }))
        io.stderr:write("\n3 replicas, 100/s: " .. msg .. "\n")
        assert.is_true(sent > 3 * expected, "the load did not exceed the rate: " .. msg)
        assert.is_true(math.abs(n - expected) <= 0.10 * limit.rate * elapsed, msg)
        for i = 1, 3 do
            assert.is_true(admitted[i] > 0, "replica " .. i .. " admitted none: " .. msg)
        end
        for _, px in ipairs(proxies) do
            px:stop()
        end
    end)

    it("falls back as configured when Redis freezes or stops, and recovers", function()
        if not ok then
            pending(why)
            return
        end
        local limit = { rate = SLOW, burst = 2 }
        -- the timeout under test is C's (frozen Redis): short, but not so short that a slow
        -- reply on a loaded machine looks like a frozen Redis
        local L = replica(limit, { fallback = "local", timeout_ms = PATIENT })
        local C = replica(limit, { fallback = "closed", timeout_ms = 300 })
        local O = replica(limit, { fallback = "open", timeout_ms = PATIENT })
        local all = { L, C, O }
        local function status(px, user)
            return assert(px:get("/" .. user .. "/sb/x")).status
        end
        -- up: the store decides (one bucket across replicas)
        assert.are.equal(404, status(L, "s1"))
        assert.are.equal(404, status(C, "s1"))
        assert.are.equal(429, status(O, "s1"))

        -- frozen: no reply within timeout_ms; every request is still answered, by the fallback
        assert(redis_proc:signal("STOP"))
        local c_ups = #lines(C, "redis store up")
        -- a client that goes away while its request waits for the frozen Redis: the wait ends
        -- at once, nothing is answered, the request is logged (the reply, if any, is dropped)
        local c = assert(C:connect{ timeout = 5 })
        assert(c:send_raw("GET /gone/sb/x HTTP/1.1\r\nHost: t\r\n\r\n"))
        c:close()
        local gone = C:wait_log(function(l)
            return l.path == "/gone/sb/x"
        end, 10, "stdout")
        assert.is_nil(gone.ratelimit)
        assert.are.equal(503, status(C, "f1")) -- the first waits timeout_ms, then falls back
        local r = assert(C:get("/f1/sb/x"))
        assert.are.equal(503, r.status)
        assert.are.equal('{"error":"rate limit store unavailable"}', r.body)
        assert.are.equal("1", r.headers["retry-after"])
        C:wait_log(function(l) -- one of the two requests' timeouts dropped the connection
            return l.msg == "redis store down" and l.error == "no reply within 300 ms"
        end)
        assert(redis_proc:signal("CONT"))
        C:wait_log(function()
            return #lines(C, "redis store up") > c_ups
        end)
        for _, user in ipairs({ "f2", "f3", "f4" }) do -- both workers on the store again
            assert.are.equal(404, status(C, user))
        end

        -- stopped: every worker sees its connection closed; one line per replica
        local downs, ups = {}, {}
        for i, px in ipairs(all) do
            downs[i], ups[i] = #lines(px, "redis store down"), #lines(px, "redis store up")
        end
        assert(redis_proc:stop(10))
        for i, px in ipairs(all) do
            px:wait_log(function()
                return #lines(px, "redis store down") > downs[i]
            end)
        end
        -- local: this replica's own bucket (burst 2), per worker-shared dict
        assert.are.equal(404, status(L, "d1"))
        assert.are.equal(404, status(L, "d1"))
        r = assert(L:get("/d1/sb/x"))
        assert.are.equal(429, r.status)
        assert.are.equal("2", r.headers["ratelimit-limit"])
        -- closed: 503
        for _ = 1, 5 do
            assert.are.equal(503, status(C, "d1"))
        end
        -- open: no limit at all
        for _ = 1, 5 do
            r = assert(O:get("/d1/sb/x"))
            assert.are.equal(404, r.status)
            assert.is_nil(r.headers["ratelimit-limit"])
        end
        for _, px in ipairs(all) do
            local exp = prom.assert_parse(assert(px:get("/metrics")).body)
            assert.is_true(prom.value(exp, "sandbox_proxy_ratelimit_store_fallbacks_total") >= 3)
        end
        assert.is_true(prom.value(prom.assert_parse(assert(C:get("/metrics")).body),
            "sandbox_proxy_ratelimited_total", { kind = "store" }) >= 5)

        -- back: each replica logs "up" once more (when all its workers are connected again, each
        -- connection proven by a PING) and decides in the store again (the new server has no
        -- scripts: NOSCRIPT, then EVAL)
        start_redis()
        for i, px in ipairs(all) do
            px:wait_log(function()
                return #lines(px, "redis store up") > ups[i]
            end)
        end
        -- one bucket across the replicas again (burst 2 for all three)
        assert.are.equal(404, status(L, "b1"))
        assert.are.equal(404, status(C, "b1"))
        assert.are.equal(429, status(O, "b1"))
        assert.are.equal(429, status(L, "b1"))
        assert.is_truthy(tonumber(redis_cli("GET", "sp:rl:u:b1")))

        -- one line for the stop and one for the return per replica, not per request or worker
        for i, px in ipairs(all) do
            assert.are.equal(downs[i] + 1, #lines(px, "redis store down"), px:stderr())
            assert.are.equal(ups[i] + 1, #lines(px, "redis store up"), px:stderr())
        end
    end)
end)
