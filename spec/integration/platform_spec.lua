-- The platform under real traffic, in the real binary on loopback: shared dicts shared by the
-- workers, rate limits (accuracy, headers, keys, trusted proxies), per-sandbox concurrency
-- slots given back however an exchange ends, the access log, the Prometheus metrics, and
-- script reloads (SIGHUP, file changes, broken scripts, ConfigMap swaps, in-flight requests).
-- Every wait is a bounded readiness poll; rates and limits are small so each test is short.
local H = require "spec.helpers.proxy"
local http = require "spec.helpers.http"
local ws = require "spec.helpers.ws"
local prom = require "spec.helpers.prometheus"
local cjson = require "cjson"
local socket = require "socket"
local unistd = require "posix.unistd"

local process = H.process
local net = H.net
local now = socket.gettime

local function write(path, text)
    assert(process.write_file(path, text))
end

-- Writes a file the way editors and kubectl cp do: a new inode renamed over the old one.
local function replace(path, text)
    write(path .. ".tmp", text)
    assert(os.rename(path .. ".tmp", path))
end

local function raw_get(path, extra)
    return "GET " .. path .. " HTTP/1.1\r\nHost: t\r\n" .. (extra or "") .. "\r\n"
end

-- Opens n keep-alive connections to px.
local function connections(px, n)
    local conns = {}
    for i = 1, n do
        conns[i] = assert(px:connect{ timeout = 10 })
    end
    return conns
end

local function close_all(conns)
    for _, c in ipairs(conns) do
        c:close()
    end
end

local function count(list, pred)
    local n = 0
    for _, v in ipairs(list) do
        if pred(v) then
            n = n + 1
        end
    end
    return n
end

---------------------------------------------------------------------------------------------
describe("shared dicts", function()
    teardown(function()
        H.stop_all()
    end)

    it("are atomic across workers (incr from 2 workers under concurrent load)", function()
        local dir = H.tmpdir()
        write(dir .. "/init.lua", [[
-- wraps the built-in entry point: /__incr and /__get, then the built-in chain
local core = require "sp.core"
local shared = require "sp.shared"
local builtin = dofile(core.settings().builtin_dir .. "/init.lua")
local t = assert(shared.dict("t"))
local M = {}
for k, v in pairs(builtin) do
    M[k] = v
end
function M.on_request(req)
    local p = req:path()
    if p == "/__incr" then
        local v = assert(t:incr("k", 1, 0))
        return req:respond(200, core.worker_id() .. " " .. v)
    elseif p == "/__get" then
        return req:respond(200, tostring(t:get("k") or 0))
    end
    return builtin.on_request(req)
end
return M
]])
        local px = H.start{ workers = 2, scripts = dir,
            config = 'return { shared_dicts = { t = "1m" } }' }
        local INCR = "POST /__incr HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
        local values, by_worker, sent = {}, { [0] = 0, [1] = 0 }, 0
        local function take(r)
            assert.are.equal(200, r.status, r.body)
            local w, v = r.body:match("^(%d+) (%d+)$")
            assert(w, "unexpected body " .. r.body)
            w, v = tonumber(w), tonumber(v)
            assert.is_nil(values[v], "value " .. v .. " handed out twice")
            values[v] = true
            by_worker[w] = by_worker[w] + 1
            return w
        end
        -- connections until there are at least 8 and both workers have some (SO_REUSEPORT
        -- spreads connections by hash; 64 all on one worker is a broken distribution)
        local conns, seen = {}, {}
        while #conns < 8 or not (seen[0] and seen[1]) do
            assert(#conns < 64, "64 connections and only one worker answered")
            local c = assert(px:connect{ timeout = 10 })
            assert(c:send_raw(INCR))
            sent = sent + 1
            seen[take(assert(c:read_response{}))] = true
            conns[#conns + 1] = c
        end
        local probe = { [0] = by_worker[0], [1] = by_worker[1] }
        -- 10 rounds: each connection pipelines 25 requests, then the responses are read
        for _ = 1, 10 do
            for _, c in ipairs(conns) do
                assert(c:send_raw(string.rep(INCR, 25)))
                sent = sent + 25
            end
            for _, c in ipairs(conns) do
                for _ = 1, 25 do
                    take(assert(c:read_response{}))
                end
            end
        end
        close_all(conns)
        assert.is_true(sent >= 8 + 8 * 250)
        assert.is_true(by_worker[0] - probe[0] > 0, "worker 0 served none of the load")
        assert.is_true(by_worker[1] - probe[1] > 0, "worker 1 served none of the load")
        local r = assert(px:get("/__get"))
        assert.are.equal(tostring(sent), r.body)
        for i = 1, sent do
            assert(values[i], "value " .. i .. " never handed out")
        end
    end)
end)

---------------------------------------------------------------------------------------------
describe("rate limiting", function()
    local up

    setup(function()
        up = H.upstream{ name = "rl" }
    end)

    teardown(function()
        H.stop_all()
    end)

    local function check_429(r)
        assert.are.equal(429, r.status)
        assert.are.equal('{"error":"rate limited"}', r.body)
        local retry = r.headers["retry-after"]
        assert.matches("^%d+$", retry)
        assert.is_true(tonumber(retry) >= 1, "Retry-After " .. retry)
        assert.matches("^%d+$", r.headers["ratelimit-limit"])
        assert.are.equal("0", r.headers["ratelimit-remaining"])
        assert.matches("^%d+$", r.headers["ratelimit-reset"])
    end

    it("admits burst + rate*T over a measured window, across 2 workers", function()
        local px = H.start{ workers = 2, sandboxes = { H.sandbox("alice", "sb", up.port) },
            config = [[return { ratelimit = { limits = {
                { name = "client", key = "client", rate = 20, burst = 10 } } } }]] }
        local RATE, BURST, WINDOW = 20, 10, 2
        local conns = connections(px, 4)
        local t0 = now()
        -- from a full bucket, sequentially: Remaining counts down from burst - 1
        local remaining = {}
        local ta = now()
        for i = 1, 5 do
            local r = assert(conns[1]:request{ path = "/alice/sb/" })
            assert.are.equal(200, r.status)
            assert.are.equal("fixture-upstream", r.headers["server"])
            assert.are.equal(tostring(BURST), r.headers["ratelimit-limit"])
            assert.matches("^%d+$", r.headers["ratelimit-reset"])
            remaining[i] = tonumber(r.headers["ratelimit-remaining"])
        end
        local tb = now()
        assert.are.equal(BURST - 1, remaining[1])
        -- five tokens taken, and at most RATE per second refilled meanwhile (a slow machine,
        -- an ASan build, refills some: the bound follows the time the five took)
        assert.is_true(remaining[5] <= BURST - 5 + math.floor(RATE * (tb - ta)),
            table.concat(remaining, ",") .. (" in %.3f s"):format(tb - ta))
        -- then as fast as possible from 4 connections until the window is over
        local admitted, limited, total = 5, 0, 5
        while now() - t0 < WINDOW do
            for _, c in ipairs(conns) do
                assert(c:send_raw(raw_get("/alice/sb/")))
            end
            for _, c in ipairs(conns) do
                local r = assert(c:read_response{})
                total = total + 1
                if r.status == 200 then
                    admitted = admitted + 1
                    assert.are.equal(tostring(BURST), r.headers["ratelimit-limit"])
                    local rem = tonumber(r.headers["ratelimit-remaining"])
                    assert.is_true(rem >= 0 and rem < BURST)
                else
                    check_429(r)
                    assert.are.equal(tostring(BURST), r.headers["ratelimit-limit"])
                    limited = limited + 1
                end
            end
        end
        local T = now() - t0
        close_all(conns)
        local expected = BURST + RATE * T
        assert.is_true(limited > 0 and total > 4 * expected,
            ("the client was too slow to test anything: %d requests in %.2f s"):format(total, T))
        assert.is_true(math.abs(admitted - expected) <= 0.15 * expected,
            ("admitted %d of %d in %.3f s; expected %.1f +-15%%"):format(admitted, total, T,
                expected))
    end)

    it("keeps one bucket per sandbox with key = sandbox", function()
        local px = H.start{ sandboxes = { H.sandbox("alice", "a", up.port),
            H.sandbox("alice", "b", up.port), H.sandbox("bob", "c", up.port) },
            config = [[return { ratelimit = { limits = {
                { name = "sb", key = "sandbox", rate = 0.1, burst = 3 } } } }]] }
        for i = 1, 3 do
            local r = assert(px:get("/alice/a/"))
            assert.are.equal(200, r.status)
            assert.are.equal(tostring(3 - i), r.headers["ratelimit-remaining"])
        end
        check_429(assert(px:get("/alice/a/echo")))
        check_429(assert(px:get("/%61lice/a/")))  -- the same sandbox, spelled differently
        for _ = 1, 3 do
            assert.are.equal(200, assert(px:get("/alice/b/")).status)
        end
        check_429(assert(px:get("/alice/b/")))
        assert.are.equal(200, assert(px:get("/bob/c/")).status)
        -- not a sandbox path: the limit does not apply
        local r = assert(px:get("/nosandbox"))
        assert.are.equal(400, r.status)
        assert.is_nil(r.headers["ratelimit-limit"])
    end)

    it("groups a user's sandboxes with key = user", function()
        local px = H.start{ sandboxes = { H.sandbox("alice", "a", up.port),
            H.sandbox("alice", "b", up.port), H.sandbox("bob", "c", up.port) },
            config = [[return { ratelimit = { limits = {
                { name = "user", key = "user", rate = 0.1, burst = 3 } } } }]] }
        assert.are.equal(200, assert(px:get("/alice/a/")).status)
        assert.are.equal(200, assert(px:get("/alice/b/")).status)
        assert.are.equal(200, assert(px:get("/alice/a/")).status)
        check_429(assert(px:get("/alice/b/")))
        check_429(assert(px:get("/alice/zzz/"))) -- limited before routing: any of alice's paths
        for _ = 1, 3 do
            assert.are.equal(200, assert(px:get("/bob/c/")).status)
        end
        check_429(assert(px:get("/bob/c/")))
    end)

    -- The default keys (ratelimit.lua: "unauthenticated" and "identity") with small rates:
    -- auth identifies the caller before the limits, so users behind one address (here all of
    -- them: 127.0.0.1, as behind a load balancer's node) each have their own bucket, and only
    -- callers without valid credentials share the address's bucket.
    it("limits anonymous callers per address and authenticated callers per user", function()
        local crypto = require "sp.crypto"
        local dir = H.tmpdir()
        local function sha(k)
            return crypto.hex(crypto.sha256(k))
        end
        assert(process.write_file(dir .. "/keys.json", cjson.encode({ keys = {
            { user = "alice", sha256 = sha("alice-key") }, { user = "bob", sha256 = sha("bob-key") } } })))
        local px = H.start{ sandboxes = { H.sandbox("alice", "a", up.port), H.sandbox("bob", "c", up.port) },
            config = ([[return { auth = { keys_file = %q }, ratelimit = { limits = {
                { name = "client", key = "unauthenticated", rate = 0.01, burst = 2 },
                { name = "user", key = "identity", rate = 0.01, burst = 3 } } } }]]):format(dir .. "/keys.json") }
        local function as(key, path)
            return assert(px:get(path, key and { Authorization = "Bearer " .. key } or nil))
        end
        for i = 1, 3 do
            local r = as("alice-key", "/alice/a/")
            assert.are.equal(200, r.status, i)
            assert.are.equal("3", r.headers["ratelimit-limit"])
        end
        check_429(as("alice-key", "/alice/a/"))
        -- bob, from the same address, has his own bucket
        for i = 1, 3 do
            assert.are.equal(200, as("bob-key", "/bob/c/").status, i)
        end
        check_429(as("bob-key", "/bob/c/"))
        -- callers without valid credentials share 127.0.0.1's bucket of 2 (401 until spent)
        local r = as("wrong-key", "/alice/a/")
        assert.are.equal(401, r.status)
        assert.are.equal("2", r.headers["ratelimit-limit"])
        assert.are.equal(401, as(nil, "/bob/c/").status)
        check_429(as("wrong-key", "/alice/a/"))
        check_429(as(nil, "/alice/a/"))
    end)
end)

---------------------------------------------------------------------------------------------
describe("trusted proxies", function()
    teardown(function()
        H.stop_all()
    end)

    local LIMITS = "limits = { { name = 'c', key = 'client', rate = 0.1, burst = 2 } }"

    local function status(px, xff)
        local r = assert(px:get("/u/s/x", xff and { ["X-Forwarded-For"] = xff } or nil))
        return r.status
    end

    it("limit each X-Forwarded-For client separately when the peer is trusted", function()
        local px = H.start{ sandboxes = {}, config = "return { ratelimit = { " .. LIMITS
            .. ", trusted_proxies = { '127.0.0.0/8' } } }" }
        -- admitted requests go on to the router: 404 (no such sandbox); limited ones get 429
        assert.are.equal(404, status(px, "10.0.0.1"))
        assert.are.equal(404, status(px, "10.0.0.1"))
        assert.are.equal(429, status(px, "10.0.0.1"))
        assert.are.equal(404, status(px, "10.0.0.2"))
        assert.are.equal(404, status(px, "10.0.0.2"))
        assert.are.equal(429, status(px, "10.0.0.2"))
        -- a chain: the right-most untrusted hop is the client
        assert.are.equal(404, status(px, "10.0.0.3, 127.0.0.9"))
        assert.are.equal(404, status(px, "6.6.6.6, 10.0.0.3"))
        assert.are.equal(429, status(px, "10.0.0.3"))
        -- the peer's own bucket is separate
        assert.are.equal(404, status(px, nil))
        assert.are.equal(404, status(px, nil))
        assert.are.equal(429, status(px, nil))
        -- garbage falls back to the peer (already limited)
        assert.are.equal(429, status(px, "not-an-address"))
    end)

    it("ignore X-Forwarded-For without trusted_proxies (one bucket for 127.0.0.1)", function()
        local px = H.start{ sandboxes = {}, config = "return { ratelimit = { " .. LIMITS .. " } }" }
        assert.are.equal(404, status(px, "10.0.0.1"))
        assert.are.equal(404, status(px, "10.0.0.2"))
        assert.are.equal(429, status(px, "10.0.0.3"))
        assert.are.equal(429, status(px, nil))
    end)
end)

---------------------------------------------------------------------------------------------
describe("concurrency limit per sandbox", function()
    local up, px
    local refused = 0 -- 503s seen (compared with the metric at the end)
    local streams = {} -- long requests, closed after each test whatever happened

    setup(function()
        up = H.upstream{ name = "cc" }
        local sandboxes = { H.sandbox("alice", "other", up.port) }
        for i = 1, 6 do
            sandboxes[#sandboxes + 1] = H.sandbox("alice", "s" .. i, up.port)
        end
        px = H.start{ workers = 2, sandboxes = sandboxes,
            -- first_byte_timeout: how long the 504 test's delayed request holds its slot, the
            -- window in which that test probes for a 503
            set = { first_byte_timeout = 2, connect_retries = 0, drain_timeout = 3 },
            config = [[return { ratelimit = {
                limits = { { key = "client", rate = 100000, burst = 100000 } },
                concurrency = { per_sandbox = 2 } } }]] }
    end)

    teardown(function()
        H.stop_all()
    end)

    after_each(function()
        for _, r in ipairs(streams) do
            r:close()
        end
        streams = {}
    end)

    local function quick(sb)
        local r = assert(px:get("/" .. sb .. "/echo"))
        if r.status == 503 then
            refused = refused + 1
        end
        return r
    end

    -- A request that stays in flight ~10 s (the head arrives at once, then a slow body).
    -- A slot is given back when the exchange ends in the proxy, which may be a moment after
    -- the client has read the whole response: so this retries a 503 (bounded).
    local function hold(sb)
        return net.wait_until(function()
            local r = assert(http.stream{ port = px.port, timeout = 15,
                path = "/" .. sb .. "/slow-body?chunks=100&interval_ms=100" })
            if r.status == 503 then
                refused = refused + 1
                r:read_all(5)
                r:close()
                return false
            end
            streams[#streams + 1] = r
            assert.are.equal(200, r.status)
            return r
        end, 5, 0.02, "a slot for a long request on " .. sb)
    end

    -- px:get(path), retrying a 503 like hold(); returns what px:get returned otherwise.
    local function get_admitted(path)
        local r, err
        net.wait_until(function()
            r, err = px:get(path)
            if r and r.status == 503 then
                refused = refused + 1
                return false
            end
            return true
        end, 5, 0.02, "admitted: " .. path)
        return r, err
    end

    -- A WebSocket tunnel to sb's /ws (retrying a 503 like hold()).
    local function ws_open(sb)
        return net.wait_until(function()
            local w, err, resp = ws.connect{ port = px.port, path = "/" .. sb .. "/ws" }
            if not w and resp and resp.status == 503 then
                refused = refused + 1
                return false
            end
            return assert(w, err)
        end, 5, 0.02, "a WebSocket tunnel to " .. sb)
    end

    local function assert_full(sb)
        local r = quick(sb)
        assert.are.equal(503, r.status)
        assert.are.same({ error = "too many requests in flight", path = sb }, cjson.decode(r.body))
        assert.are.equal("1", r.headers["retry-after"])
    end

    local function wait_admitted(sb)
        net.wait_until(function()
            return quick(sb).status == 200
        end, 5, 0.02, "a request admitted on " .. sb)
    end

    -- With `a` still holding one slot: exactly one more fits (a slot given back twice would
    -- let a third one in).
    local function assert_exactly_one_free(sb)
        local b = hold(sb)
        assert_full(sb)
        b:close()
        wait_admitted(sb)
    end

    it("refuses a third request while two are in flight, per sandbox", function()
        local a, b = hold("alice/s1"), hold("alice/s1")
        assert_full("alice/s1")
        assert_full("alice/s1")
        -- other sandboxes are not affected
        assert.are.equal(200, quick("alice/other").status)
        assert.are.equal(200, quick("alice/s2").status)
        -- a normal end gives the slot back
        local c = assert(http.stream{ port = px.port, timeout = 15,
            path = "/alice/s2/slow-body?chunks=10&interval_ms=100" })
        streams[#streams + 1] = c
        assert.are.equal(200, c.status)
        local d = hold("alice/s2")
        assert_full("alice/s2")
        local body = assert(c:read_all(10))
        assert.are.equal(10, select(2, body:gsub("chunk %d+\n", "")))
        c:close()
        wait_admitted("alice/s2")
        assert_exactly_one_free("alice/s2")
        a:close()
        b:close()
        d:close()
        wait_admitted("alice/s1")
    end)

    it("gives the slot back when the client aborts mid-response", function()
        local a, b = hold("alice/s3"), hold("alice/s3")
        assert_full("alice/s3")
        assert(b:read_all(0.15) == nil) -- some of the body is flowing
        b:close()
        wait_admitted("alice/s3")
        assert_exactly_one_free("alice/s3")
        a:close()
    end)

    it("gives the slot back when the upstream fails mid-response or resets", function()
        local a = hold("alice/s4")
        -- FIN after half the promised body: the client connection is closed, not completed
        local r, err = get_admitted("/alice/s4/close-mid?n=1000")
        assert.is_nil(r)
        assert.matches("still expected", err)
        wait_admitted("alice/s4")
        assert_exactly_one_free("alice/s4")
        r, err = get_admitted("/alice/s4/close-mid?n=1000&rst=1")
        assert.is_nil(r, "a truncated body was delivered as complete")
        wait_admitted("alice/s4")
        assert_exactly_one_free("alice/s4")
        -- no response at all: 502
        r = assert(get_admitted("/alice/s4/reset"))
        assert.are.equal(502, r.status)
        wait_admitted("alice/s4")
        assert_exactly_one_free("alice/s4")
        a:close()
    end)

    it("gives the slot back on a 504 first-byte timeout", function()
        local a = hold("alice/s5")
        -- Probing with requests while the delayed one arrives could let a probe take the
        -- second slot first and the delayed request be refused: wait until the sandbox has
        -- it instead (the sandbox counts every request line, its /__stats calls included).
        local base = up.stats().requests
        local c = assert(px:connect{ timeout = 10 })
        assert(c:send_raw(raw_get("/alice/s5/delay?ms=3000")))
        local calls = 0
        net.wait_until(function()
            calls = calls + 1
            return up.stats().requests >= base + calls + 1
        end, 5, 0.02, "the delayed request reached the sandbox")
        -- it holds the second slot while it waits for its first byte
        assert_full("alice/s5")
        local r = assert(c:read_response{ timeout = 10 })
        assert.are.equal(504, r.status)
        c:close()
        wait_admitted("alice/s5")
        assert_exactly_one_free("alice/s5")
        a:close()
    end)

    it("holds a slot for a WebSocket tunnel and gives it back when the tunnel closes", function()
        local a = hold("alice/s6")
        local w = ws_open("alice/s6")
        assert_full("alice/s6")
        assert(w:send_text("still open"))
        assert.are.same({ "text", "still open" }, { w:receive(5) })
        assert(w:close(1000))
        wait_admitted("alice/s6")
        assert_exactly_one_free("alice/s6")
        -- closed by the sandbox this time
        w = ws_open("alice/s6")
        assert_full("alice/s6")
        assert(w:send_text("__close__"))
        local kind, reason, code = w:receive(5)
        assert.are.equal("close", kind)
        assert.are.equal(1000, code)
        assert.are.equal("bye", reason)
        w:raw():close()
        wait_admitted("alice/s6")
        assert_exactly_one_free("alice/s6")
        a:close()
    end)

    it("counts every refusal in sandbox_proxy_ratelimited_total{kind=\"concurrency\"}", function()
        -- refusals of its own, so that it holds when run alone; `refused` also counts those
        -- of the specs before it in this block, which the metric must count too
        local before = refused
        local a, b = hold("alice/s1"), hold("alice/s1")
        assert_full("alice/s1")
        assert_full("alice/s1")
        a:close()
        b:close()
        assert.is_true(refused >= before + 2)
        local exp = prom.assert_parse(assert(px:get("/metrics")).body)
        assert.are.equal(refused,
            prom.value(exp, "sandbox_proxy_ratelimited_total", { kind = "concurrency" }))
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_ratelimited_total", { kind = "rate" }))
    end)
end)

---------------------------------------------------------------------------------------------
describe("access log", function()
    local up, dead_port

    setup(function()
        up = H.upstream{ name = "alog" }
        dead_port = assert(net.free_port())
    end)

    teardown(function()
        H.stop_all()
    end)

    -- The access-log lines of px (stdout), all of which must be JSON.
    local function lines(px)
        return px:log_lines("stdout")
    end

    local function by_id(px, ids, n)
        return net.wait_until(function()
            local found, got = {}, 0
            for _, l in ipairs(lines(px)) do
                if ids[l.request_id] then
                    assert.is_nil(found[l.request_id], "two lines for " .. tostring(l.request_id))
                    found[l.request_id] = l
                    got = got + 1
                end
            end
            return got == n and found
        end, 5, 0.02, "access log lines")
    end

    it("writes one JSON line per request with the documented fields", function()
        local px = H.start{ workers = 2, sandboxes = { H.sandbox("alice", "sb", up.port),
            H.sandbox("alice", "dead", dead_port) },
            set = { access_log_flush = 0.05, connect_retries = 0 },
            config = [[return { ratelimit = { limits = { { name = "tagged", rate = 0.1, burst = 1,
                key = function(req) return req:header("x-limit-me") end } } } }]] }
        local started_lines = #lines(px)
        local reqs = {
            ok = { path = "/alice/sb/echo?q=1" },
            post = { method = "POST", path = "/alice/sb/echo", body = string.rep("b", 1000) },
            notfound = { path = "/alice/nope/x" },
            dead = { path = "/alice/dead/x" },
            health = { path = "/live" },
            allowed = { path = "/alice/sb/echo", headers = { ["X-Limit-Me"] = "1" } },
            limited = { path = "/alice/sb/echo", headers = { ["X-Limit-Me"] = "1" } },
        }
        local order = { "ok", "post", "notfound", "dead", "health", "allowed", "limited" }
        local ids, resp = {}, {}
        for _, k in ipairs(order) do
            local r = assert(px:request(reqs[k]))
            local id = r.headers["x-request-id"]
            assert.is_string(id, k)
            ids[id] = k
            resp[k] = r
        end
        assert.are.equal(200, resp.ok.status)
        assert.are.equal(502, resp.dead.status)
        assert.are.equal(429, resp.limited.status)
        local found = by_id(px, ids, #order)
        local L = {}
        for id, l in pairs(found) do
            L[ids[id]] = l
        end
        -- a proxied exchange: every field
        local l = L.ok
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d+Z$", l.time)
        assert.are.equal(resp.ok.headers["x-request-id"], l.request_id)
        assert.are.equal("GET", l.method)
        assert.are.equal("/alice/sb/echo", l.path)
        assert.is_nil(l.query) -- only with access_log.query = true
        assert.are.equal(200, l.status)
        assert.is_true(l.bytes_in > 0)
        assert.are.equal(#resp.ok.raw_head + #resp.ok.body, l.bytes_out)
        assert.is_true(l.duration >= 0 and l.duration < 5)
        assert.is_true(l.upstream_connect >= 0 and l.upstream_connect <= l.duration)
        assert.is_true(l.upstream_first_byte >= 0 and l.upstream_first_byte <= l.duration)
        assert.are.equal("alice", l.user)
        assert.are.equal("sb", l.sandbox)
        assert.are.equal("127.0.0.1:" .. up.port, l.upstream)
        assert.are.equal("allowed", l.ratelimit)
        assert.is_nil(l.error)
        assert.is_true(l.worker == 0 or l.worker == 1)
        assert.are.equal("127.0.0.1", l.client)
        -- the runtime writes the fields in the order of the one field list (sp.request's
        -- LOG_LINE), the script's own fields included
        local raw
        for line in px:stdout():gmatch("[^\n]+") do
            if line:find(l.request_id, 1, true) then
                raw = line
            end
        end
        local keys = {}
        for k in raw:gmatch('"([%w_]+)":') do
            keys[#keys + 1] = k
        end
        local expected = {}
        for _, f in ipairs(require("sp.request").LOG_LINE) do
            if l[f[1]] ~= nil then
                expected[#expected + 1] = f[1]
            end
        end
        assert.are.same(expected, keys)
        assert.are.equal(17, #keys) -- all but query and error (trace_id included: propagation is on)
        assert.matches("^%x+$", l.trace_id)
        assert.are.equal(32, #l.trace_id)
        -- a request body counts in bytes_in
        assert.are.equal("POST", L.post.method)
        assert.is_true(L.post.bytes_in > 1000)
        assert.are.equal(200, L.post.status)
        -- unknown sandbox: no route fields
        assert.are.equal(404, L.notfound.status)
        assert.is_nil(L.notfound.user)
        assert.is_nil(L.notfound.sandbox)
        assert.is_nil(L.notfound.upstream)
        assert.are.equal("allowed", L.notfound.ratelimit)
        assert.is_true(L.notfound.bytes_out > 0)
        -- upstream down: 502 with the error and the address tried
        assert.are.equal(502, L.dead.status)
        assert.are.equal("upstream connect failed", L.dead.error)
        assert.are.equal("127.0.0.1:" .. dead_port, L.dead.upstream)
        assert.are.equal("dead", L.dead.sandbox)
        assert.is_nil(L.dead.upstream_first_byte)
        -- the proxy's own endpoint: not rate limited, no ratelimit field
        assert.are.equal(200, L.health.status)
        assert.are.equal("/live", L.health.path)
        assert.is_nil(L.health.ratelimit)
        -- rate limit decisions
        assert.are.equal("allowed", L.allowed.ratelimit)
        assert.are.equal("limited", L.limited.ratelimit)
        assert.are.equal(429, L.limited.status)
        assert.is_nil(L.limited.upstream)
        -- and nothing else was logged
        net.wait_until(function()
            return #lines(px) >= started_lines + #order
        end, 5)
        local mine = count(lines(px), function(x)
            return x.path ~= "/health"
        end)
        assert.are.equal(#order, mine)
    end)

    it("writes only the configured fields (and the query when asked)", function()
        local px = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) },
            set = { access_log_flush = 0.05 },
            config = [[return { access_log = { fields = { "status", "path", "query" },
                query = true } }]] }
        assert.are.equal(200, assert(px:get("/alice/sb/echo?a=1&b=%2F")).status)
        assert.are.equal(404, assert(px:get("/alice/none/x")).status)
        local got = net.wait_until(function()
            local out = {}
            for _, l in ipairs(lines(px)) do
                if l.path ~= "/health" then
                    out[#out + 1] = l
                end
            end
            return #out == 2 and out
        end, 5, 0.02, "2 lines")
        assert.are.same({ status = 200, path = "/alice/sb/echo", query = "a=1&b=%2F" }, got[1])
        assert.are.same({ status = 404, path = "/alice/none/x" }, got[2])
    end)

    it("loses nothing at SIGTERM (lines still buffered are written at exit)", function()
        -- flushed every 60 s: everything below is still buffered when SIGTERM arrives
        local px = H.start{ workers = 2, sandboxes = { H.sandbox("alice", "sb", up.port) },
            set = { access_log_flush = 60 } }
        local N = 120
        local conns = connections(px, 4)
        for round = 1, N / 4 do
            for i, c in ipairs(conns) do
                assert(c:send_raw(raw_get("/alice/sb/echo?n=" .. (round * 4 + i))))
            end
            for _, c in ipairs(conns) do
                assert.are.equal(200, assert(c:read_response{}).status)
            end
        end
        assert(px.proc:signal("TERM"))
        local code, how = px.proc:wait(20)
        assert.are.equal("exited", how)
        assert.are.equal(0, code)
        close_all(conns)
        local mine = count(lines(px), function(l)
            return l.path == "/alice/sb/echo" and l.status == 200
        end)
        assert.are.equal(N, mine)
    end)
end)

---------------------------------------------------------------------------------------------
describe("metrics", function()
    local up, px, dead_port

    setup(function()
        up = H.upstream{ name = "m" }
        dead_port = assert(net.free_port())
        px = H.start{ workers = 2, sandboxes = { H.sandbox("alice", "sb", up.port),
            H.sandbox("alice", "dead", dead_port), H.sandbox("bob", "sleepy", nil,
                { ready = false }) },
            set = { connect_retries = 0 },
            config = [[return { ratelimit = { limits = { { name = "tagged", rate = 0.1, burst = 1,
                key = function(req) return req:header("x-limit-me") end } } } }]] }
    end)

    teardown(function()
        H.stop_all()
    end)

    local function scrape()
        local r = assert(px:get("/metrics"))
        assert.are.equal(200, r.status)
        assert.are.equal("text/plain; version=0.0.4; charset=utf-8", r.headers["content-type"])
        return prom.assert_parse(r.body)
    end

    local function get2xx(exp)
        return prom.value(exp, "sandbox_proxy_requests_total", { method = "GET", code = "2xx" })
            or 0
    end

    local function v(exp, name, labels)
        return prom.value(exp, name, labels) or 0
    end

    it("serves a strictly valid exposition", function()
        local exp = scrape()
        assert.are.equal("histogram", exp.families.sandbox_proxy_request_duration_seconds.type)
        assert.is_true(v(exp, "sandbox_proxy_open_connections") >= 1)
        assert.is_true(v(exp, "sandbox_proxy_active_requests") >= 1) -- the scrape itself
        assert.is_true(v(exp, "sandbox_proxy_lua_memory_bytes") > 0)
        assert.are.equal(1, v(exp, "sandbox_proxy_watch_synced"))
    end)

    it("counts the requests made, by method and status class", function()
        -- a baseline in which every earlier request is counted: the scrape before it shows +1
        local base, scrapes
        net.wait_until(function()
            local a = scrape()
            local b = scrape()
            if get2xx(b) == get2xx(a) + 1 then
                base, scrapes = b, 0
                return true
            end
        end, 5, 0.02, "a stable baseline")
        local N, M = 7, 4
        for _ = 1, N do
            assert.are.equal(200, assert(px:get("/alice/sb/echo")).status)
        end
        for _ = 1, M do
            assert.are.equal(404, assert(px:get("/alice/nope/x")).status)
        end
        assert.are.equal(200, assert(px:request{ method = "POST", path = "/alice/sb/echo",
            body = "x" }).status)
        assert.are.equal(200, assert(px:request{ method = "DELETE", path = "/alice/sb/echo" }).status)
        assert.are.equal(502, assert(px:get("/alice/dead/x")).status)
        local limited = 0
        for _ = 1, 3 do
            local r = assert(px:get("/alice/sb/echo", { ["X-Limit-Me"] = "yes" }))
            if r.status == 429 then
                limited = limited + 1
            end
        end
        assert.are.equal(2, limited)
        local function d(exp, name, labels)
            return v(exp, name, labels) - v(base, name, labels)
        end
        local T = "sandbox_proxy_requests_total"
        -- a request is counted when its exchange ends, which may be just after its response
        -- reached the client: wait until the last ones (the refused, the failed) are in too
        local exp = net.wait_until(function()
            scrapes = scrapes + 1
            local e = scrape()
            -- the 1 admitted tagged request is a GET 2xx too; each earlier scrape is one more
            return get2xx(e) - get2xx(base) == N + 1 + scrapes
                and d(e, T, { method = "GET", code = "4xx" }) >= M + limited
                and d(e, T, { method = "GET", code = "5xx" }) >= 1 and e
        end, 5, 0.02, "GET 2xx, 4xx and 5xx counted")
        assert.are.equal(M + limited, d(exp, T, { method = "GET", code = "4xx" }))
        assert.are.equal(1, d(exp, T, { method = "GET", code = "5xx" }))
        assert.are.equal(1, d(exp, T, { method = "POST", code = "2xx" }))
        assert.are.equal(1, d(exp, T, { method = "DELETE", code = "2xx" }))
        assert.are.equal(0, d(exp, T, { method = "POST", code = "4xx" }))
        assert.are.equal(1, d(exp, "sandbox_proxy_upstream_connect_errors_total"))
        assert.are.equal(0, d(exp, "sandbox_proxy_upstream_timeouts_total"))
        assert.are.equal(limited, d(exp, "sandbox_proxy_ratelimited_total", { kind = "rate" }))
        assert.are.equal(0, d(exp, "sandbox_proxy_ratelimited_total", { kind = "concurrency" }))
        assert.are.equal(0, d(exp, "sandbox_proxy_script_errors_total"))
        -- every request is in the histogram exactly once
        local all = prom.sum(exp, T)
        assert.are.equal(all, v(exp, "sandbox_proxy_request_duration_seconds_count"))
        assert.are.equal(N + M + 1 + 1 + 1 + 3 + scrapes,
            prom.sum(exp, T) - prom.sum(base, T))
        assert.is_true(v(exp, "sandbox_proxy_request_duration_seconds_sum")
            > v(base, "sandbox_proxy_request_duration_seconds_sum"))
    end)

    it("shows an open WebSocket tunnel while it is open", function()
        local function tunnels()
            return v(scrape(), "sandbox_proxy_open_tunnels")
        end
        assert.are.equal(0, tunnels())
        local w = assert(ws.connect{ port = px.port, path = "/alice/sb/ws" })
        net.wait_until(function()
            return tunnels() == 1
        end, 5, 0.02, "open_tunnels 1")
        assert(w:send_text("x"))
        assert.are.equal("text", (w:receive(5)))
        assert.are.equal(1, tunnels())
        assert(w:close(1000))
        net.wait_until(function()
            return tunnels() == 0
        end, 5, 0.02, "open_tunnels 0")
    end)

    it("has the routes gauge agree with /sandboxes", function()
        local list = px:json("/sandboxes")
        local ready = count(list.sandboxes, function(s)
            return s.ready
        end)
        assert.are.equal(3, list.count)
        assert.are.equal(2, ready)
        local exp = scrape()
        assert.are.equal(ready, v(exp, "sandbox_proxy_routes", { ready = "true" }))
        assert.are.equal(list.count - ready, v(exp, "sandbox_proxy_routes", { ready = "false" }))
    end)

    it("counts the requests the rate limiter let through, from every worker", function()
        -- scraped on metrics_listen, which the limiter never sees, so only the requests below
        -- are counted; the tagged limit refuses 2 of 3 (they must not count as let through)
        local mport = assert(net.free_port())
        local px2 = H.start{ workers = 2, sandboxes = { H.sandbox("alice", "sb", up.port) },
            set = { metrics_listen = "127.0.0.1:" .. mport },
            config = [[return { ratelimit = { limits = { { name = "tagged", rate = 0.1, burst = 1,
                key = function(req) return req:header("x-limit-me") end } } } }]] }
        assert(net.wait_port("127.0.0.1", mport, 5))
        local function mscrape()
            local r = assert(http.request{ port = mport, path = "/metrics" })
            assert.are.equal(200, r.status)
            return prom.assert_parse(r.body)
        end
        assert.are.equal(0, v(mscrape(), "sandbox_proxy_ratelimit_allowed_total"))
        local N = 30
        local conns = connections(px2, 4) -- several connections: both workers take some
        for i = 1, N do
            assert.are.equal(200, assert(conns[i % 4 + 1]:request{ path = "/alice/sb/echo" }).status)
        end
        local limited = 0
        for _ = 1, 3 do
            if assert(px2:get("/alice/sb/echo", { ["X-Limit-Me"] = "yes" })).status == 429 then
                limited = limited + 1
            end
        end
        assert.are.equal(2, limited)
        -- each worker adds its count once a second
        local exp = net.wait_until(function()
            local e = mscrape()
            return v(e, "sandbox_proxy_ratelimit_allowed_total") >= N + 1 and e
        end, 10, 0.05, "the requests let through counted")
        assert.are.equal(N + 1, v(exp, "sandbox_proxy_ratelimit_allowed_total"))
        assert.are.equal(2, v(exp, "sandbox_proxy_ratelimited_total", { kind = "rate" }))
        close_all(conns)
    end)

    it("is served only on metrics_listen when that is set", function()
        local mport = assert(net.free_port())
        local px2 = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) },
            set = { metrics_listen = "127.0.0.1:" .. mport } }
        assert(net.wait_port("127.0.0.1", mport, 5))
        local r = assert(http.request{ port = mport, path = "/metrics" })
        assert.are.equal(200, r.status)
        local exp = prom.assert_parse(r.body)
        assert.is_table(exp.families.sandbox_proxy_requests_total)
        -- nothing else on that listener
        r = assert(http.request{ port = mport, path = "/health" })
        assert.are.equal(404, r.status)
        assert.are.same({ error = "not found" }, cjson.decode(r.body))
        r = assert(http.request{ port = mport, path = "/alice/sb/echo" })
        assert.are.equal(404, r.status)
        -- and no exposition on the main listener: /metrics is an ordinary (bad) path there
        r = assert(px2:get("/metrics"))
        assert.are_not.equal(200, r.status)
        assert.is_nil(r.body:find("# TYPE", 1, true))
        assert.is_true(r.status == 400 or r.status == 404, tostring(r.status))
        -- the main listener still proxies
        assert.are.equal(200, assert(px2:get("/alice/sb/echo")).status)
    end)
end)

---------------------------------------------------------------------------------------------
describe("script reload", function()
    local up

    setup(function()
        up = H.upstream{ name = "rl" }
    end)

    teardown(function()
        H.stop_all()
    end)

    -- An override router: adds X-Script-Version (the Lua expression `version`), sleeps 1 s
    -- first for a "?slow=1" query (setting test:slow in the sp dict when it starts; "?peek=1"
    -- answers that value), then routes like the built-in router.
    local function router(version)
        return [[
local core = require "sp.core"
local timer = require "sp.timer"
local shared = require "sp.shared"
local builtin = dofile(core.settings().builtin_dir .. "/router.lua")
local VERSION = ]] .. version .. [[

local M = {}
function M.handle(req)
    req:add_response_header("X-Script-Version", VERSION)
    if req:query() == "slow=1" then
        shared.dict("sp"):set("test:slow", VERSION)
        timer.sleep(1)
    elseif req:query() == "peek=1" then
        return req:respond(200, shared.dict("sp"):get("test:slow") or "-")
    end
    return builtin.handle(req)
end
return M
]]
    end

    local function version_of(px)
        local r = assert(px:get("/alice/sb/echo"))
        assert.are.equal(200, r.status)
        return r.headers["x-script-version"]
    end

    local function reload_lines(px)
        local per = {}
        for _, l in ipairs(px:log_lines()) do
            if l.msg == "scripts reloaded" then
                per[l.worker] = (per[l.worker] or 0) + 1
            end
        end
        return per
    end

    -- H.start returns once one worker answers /health; the scripts must not change before
    -- every worker has loaded them (else a worker still starting loads the new ones), so this
    -- also waits for "listening", which is logged when all workers are up.
    local function start(dir, opts)
        opts = opts or {}
        local px = H.start{ workers = opts.workers or 2, scripts = dir,
            sandboxes = { H.sandbox("alice", "sb", up.port) }, set = opts.set,
            config = "return { ratelimit = { enabled = false } }" }
        px:wait_log(function(l)
            return l.msg == "listening"
        end)
        return px
    end

    it("(a) on SIGHUP, under load: no failed request, the new script answers, once per worker", function()
        -- the version lives in a module in a subdirectory, which the file watcher does not
        -- look into: here only SIGHUP reloads
        local dir = H.tmpdir()
        assert(os.execute("mkdir -p " .. dir .. "/lib"))
        write(dir .. "/lib/version.lua", 'return "v1"\n')
        write(dir .. "/router.lua", router('require "lib.version"'))
        local px = start(dir)
        assert.are.equal("v1", version_of(px))
        local conns = connections(px, 3)
        local results = {}
        local t0, hup_at = now(), nil
        while now() - t0 < 2 do
            if not hup_at and now() - t0 > 0.5 then
                write(dir .. "/lib/version.lua", 'return "v2"\n')
                assert(px.proc:signal("HUP"))
                hup_at = #results
            end
            for _, c in ipairs(conns) do
                assert(c:send_raw(raw_get("/alice/sb/echo")))
            end
            for i, c in ipairs(conns) do
                local r, err = c:read_response{}
                results[#results + 1] = r and { r.status, r.headers["x-script-version"], i }
                    or { "error: " .. tostring(err) }
                if not r then
                    conns[i] = assert(px:connect{ timeout = 10 })
                end
            end
        end
        close_all(conns)
        assert.is_true(#results > 100, "only " .. #results .. " requests")
        local failed = {}
        for i, x in ipairs(results) do
            if x[1] ~= 200 and #failed < 10 then
                failed[#failed + 1] = "#" .. i .. ": " .. tostring(x[1])
            end
        end
        assert.are.equal(0, #failed, #results .. " requests; failed: " .. table.concat(failed, ", "))
        -- v1 until the reload, v2 after it, never anything else; on each connection (one
        -- worker) it switches once and for good
        local first_v2, switched = nil, {}
        for i, x in ipairs(results) do
            assert(x[2] == "v1" or x[2] == "v2", tostring(x[2]))
            if x[2] == "v2" then
                first_v2 = first_v2 or i
                switched[x[3]] = true
            else
                assert(not switched[x[3]], "v1 again after v2 on connection " .. x[3])
            end
        end
        assert(first_v2 and first_v2 > hup_at, "no switch to v2 after SIGHUP")
        assert.are.equal("v2", results[#results][2])
        net.wait_until(function()
            local per = reload_lines(px)
            return per[0] == 1 and per[1] == 1
        end, 5, 0.02, "one reload per worker")
        assert.are.same({ [0] = 1, [1] = 1 }, reload_lines(px))
        assert.are.equal("v2", version_of(px))
    end)

    -- After the usual "edit the script, then SIGHUP", each worker must reload exactly once:
    -- the SIGHUP reload must also take the watcher's fingerprint of the scripts (watch_sig in
    -- runtime/main.c on_hup()), or the watcher must not see the same edit ~200 ms later
    -- (debounce) and reload every worker a second time ("scripts reloaded" twice per worker;
    -- the second reload would discard the first state and rerun on_start, e.g. restarting
    -- discovery).
    it("reloads each worker once for an edit followed by SIGHUP", function()
        local dir = H.tmpdir()
        write(dir .. "/router.lua", router('"v1"'))
        local px = start(dir)
        replace(dir .. "/router.lua", router('"v2"'))
        assert(px.proc:signal("HUP"))
        net.wait_until(function()
            return version_of(px) == "v2"
        end, 5, 0.02, "v2")
        -- watch for a second reload past the watcher's debounce (0.2 s) and its periodic
        -- check (every 2 s)
        local deadline = now() + 2.5
        repeat
            local per = reload_lines(px)
            assert.is_true((per[0] or 0) <= 1 and (per[1] or 0) <= 1,
                "reloads per worker: " .. cjson.encode({ per[0], per[1] }))
            process.sleep(0.05)
        until now() > deadline
        assert.are.same({ [0] = 1, [1] = 1 }, reload_lines(px))
    end)

    it("(b) reloads by itself when a file in the --scripts directory changes", function()
        local dir = H.tmpdir()
        write(dir .. "/router.lua", router('"v1"'))
        local px = start(dir)
        assert.are.equal("v1", version_of(px))
        replace(dir .. "/router.lua", router('"v2"'))
        net.wait_until(function()
            return version_of(px) == "v2"
        end, 6, 0.05, "v2 without SIGHUP")
        -- an in-place rewrite (same inode) is seen too
        write(dir .. "/router.lua", router('"v3-longer"'))
        net.wait_until(function()
            return version_of(px) == "v3-longer"
        end, 6, 0.05, "v3 without SIGHUP")
        -- a new module file is picked up
        write(dir .. "/ver.lua", 'return "v4"\n')
        write(dir .. "/router.lua", router('require "ver"'))
        net.wait_until(function()
            return version_of(px) == "v4"
        end, 6, 0.05, "v4 without SIGHUP")
        px:wait_log(function(l)
            return l.msg == "scripts or config changed: reloading"
        end)
    end)

    it("(c) keeps the old scripts when the new ones do not load, and --check names the file", function()
        local dir = H.tmpdir()
        write(dir .. "/router.lua", router('"v1"'))
        local px = start(dir)
        assert.are.equal("v1", version_of(px))
        replace(dir .. "/router.lua", "local M = {}\nfunction M.handle(req)\n  return (\n")
        assert(px.proc:signal("HUP"))
        local seen = {}
        net.wait_until(function()
            for _, l in ipairs(px:log_lines()) do
                if l.level == "error" and tostring(l.msg):find("^reload rejected") then
                    assert.matches("router.lua", l.error, 1, true)
                    seen[l.worker] = true
                end
            end
            return seen[0] and seen[1]
        end, 6, 0.05, "reload rejected by both workers")
        -- the old behaviour goes on
        for _ = 1, 20 do
            assert.are.equal("v1", version_of(px))
        end
        assert.are.same({}, reload_lines(px))
        -- the check mode names the broken file
        local out = H.tmpdir()
        local p = assert(process.spawn{ cmd = { H.BIN, "--check", "--scripts", dir,
            "--sandboxes-file", px.sandboxes_file }, stdout = out .. "/check.out",
            stderr = out .. "/check.err" })
        assert.are.equal(1, p:wait(20))
        assert.matches("router.lua", p:read_stderr(), 1, true)
        -- fixed: the next reload takes it
        replace(dir .. "/router.lua", router('"v2"'))
        net.wait_until(function()
            return version_of(px) == "v2"
        end, 6, 0.05, "v2 after the fix")
    end)

    it("(d) follows a ConfigMap-style ..data symlink swap", function()
        local dir = H.tmpdir()
        assert(os.execute("mkdir " .. dir .. "/..v1 " .. dir .. "/..v2"))
        write(dir .. "/..v1/router.lua", router('"cm-v1"'))
        assert(unistd.link("..v1", dir .. "/..data", true))
        assert(unistd.link("..data/router.lua", dir .. "/router.lua", true))
        local px = start(dir)
        assert.are.equal("cm-v1", version_of(px))
        -- what the kubelet does: write the new version, point a new link at it, rename it
        -- over ..data in one step (mv -T)
        write(dir .. "/..v2/router.lua", router('"cm-v2"'))
        assert(unistd.link("..v2", dir .. "/..data_tmp", true))
        assert(os.rename(dir .. "/..data_tmp", dir .. "/..data"))
        net.wait_until(function()
            return version_of(px) == "cm-v2"
        end, 6, 0.05, "cm-v2 after the ..data swap")
    end)

    -- A slow request started on the "old" scripts, a reload to "new" while it sleeps there,
    -- then its response. Returns the proxy and that response.
    local function straddle_reload()
        local dir = H.tmpdir()
        write(dir .. "/router.lua", router('"old"'))
        local px = start(dir, { workers = 1, set = { access_log_flush = 0.05 } })
        assert.are.equal("old", version_of(px))
        local c = assert(px:connect{ timeout = 10 })
        assert(c:send_raw(raw_get("/alice/sb/echo?slow=1")))
        -- wait until it sleeps in the old script
        net.wait_until(function()
            return assert(px:get("/alice/sb/echo?peek=1")).body == "old"
        end, 5, 0.01, "the slow request started")
        replace(dir .. "/router.lua", router('"new"'))
        assert(px.proc:signal("HUP"))
        net.wait_until(function()
            return version_of(px) == "new"
        end, 5, 0.02, "the new scripts answer")
        local r = assert(c:read_response{ timeout = 10 })
        c:close()
        return px, r
    end

    it("(e) lets a request in flight finish on the scripts it started with", function()
        local px, r = straddle_reload()
        assert.are.equal(200, r.status)
        assert.are.equal("old", r.headers["x-script-version"])
        assert.are.equal("/echo?slow=1", cjson.decode(r.body).target)
        assert.are.equal("new", version_of(px))
        assert.is_true(r.headers["x-request-id"] ~= nil)
    end)

    -- on_log must run in the Lua state that ran on_request (runtime/lua_vm.c hook_log() uses
    -- r->script_vm), not in the worker's current state after a reload: the decisions
    -- (req.ctx.route, req.ctx.ratelimit) live on the old state's request object, and must not
    -- be lost from the access-log line of a request that was in flight during a reload. The
    -- line carries user "alice" and sandbox "sb" like any other proxied request.
    it("(e) logs a request that straddled a reload with what its scripts decided", function()
        local px, r = straddle_reload()
        assert.are.equal(200, r.status)
        local id = r.headers["x-request-id"]
        local line = px:wait_log(function(l)
            return l.request_id == id
        end, 5, "stdout")
        assert.are.equal(200, line.status)
        assert.are.equal("127.0.0.1:" .. up.port, line.upstream)
        assert.are.equal("alice", line.user)
        assert.are.equal("sb", line.sandbox)
        -- (ratelimit is disabled in this suite's config: no decision is logged)
        assert.is_nil(line.ratelimit)
    end)
end)

---------------------------------------------------------------------------------------------
describe("a worker that fails to start", function()
    teardown(function()
        H.stop_all()
    end)

    -- A start-up failure must end the process with exit code 1 whatever signal arrives
    -- meanwhile. When a worker fails to start after another one is already running, the
    -- process stops the workers and is stopping from then on; a SIGHUP (or a script-change
    -- reload) handled right after must not cancel that STOP (commands are bits that
    -- accumulate, worker.c: atomic_fetch_or(&w->command)): the running worker must not reload
    -- and keep serving while the half-started process lives on until SIGTERM. (Seen for real
    -- when scripts changed while the workers were starting.)
    -- Here worker 1 refuses to start after 1 s, and worker 0 is kept from reading its commands
    -- for 2 s (it sleeps in on_start), so the SIGHUP lands between the two deterministically.
    it("ends the process with exit code 1 even if a SIGHUP arrives meanwhile", function()
        local dir = H.tmpdir()
        write(dir .. "/init.lua", [[
local core = require "sp.core"
local shared = require "sp.shared"
local builtin = dofile(core.settings().builtin_dir .. "/init.lua")
if core.worker_id() == 1 then
    os.execute("sleep 1")
    error("worker 1 refuses to start")
end
local M = {}
for k, v in pairs(builtin) do
    M[k] = v
end
function M.on_start()
    if core.worker_id() == 0 and shared.dict("sp"):add("test:slept", true) then
        os.execute("sleep 2") -- blocks the worker's loop: commands wait
    end
    if builtin.on_start then
        return builtin.on_start()
    end
end
return M
]])
        local port = assert(net.free_port())
        local out = H.tmpdir()
        local p = assert(process.spawn{ cmd = { H.BIN, "--listen", "127.0.0.1:" .. port,
            "--workers", "2", "--scripts", dir, "--set", "demo_listen=127.0.0.1:0",
            "--set", "script_time_budget=0", "--sandboxes-file",
            H.SOURCE_DIR .. "/scripts/demo/sandboxes.json" },
            stdout = out .. "/stdout.log", stderr = out .. "/stderr.log" })
        assert(p:wait_output("worker failed to start", 10, "stderr", true))
        assert(p:signal("HUP"))
        local code, how = p:wait(5)
        local alive = p:alive()
        if alive then
            p:kill()
        end
        assert.is_false(alive, "still running 5 s after the start-up failure:\n"
            .. p:read_stderr())
        assert.are.equal("exited", how)
        assert.are.equal(1, code)
    end)
end)
