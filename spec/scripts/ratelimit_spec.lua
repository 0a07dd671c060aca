-- ratelimit.lua over the real "ratelimit" shared dict with fake requests: check() decisions,
-- the RateLimit-* headers, the 429 and 503 answers, key functions, per-sandbox concurrency
-- (fake holds, given back by req:complete()) and the trusted-proxy client address. Rates are
-- tiny (one token per 1000 s) so that the clock never refills a bucket during a test.
local testkit = require "sp.testkit"
local shared = require "sp.shared"

local dict = assert(shared.dict("ratelimit"))
local sp_dict = assert(shared.dict("sp"))

local SLOW = 0.001 -- tokens per second

-- A fresh ratelimit.lua with the given config section.
local function load(section)
    return testkit.load("ratelimit", "ratelimit", section)
end

local function request(target, opts)
    opts = opts or {}
    opts.target = target
    return testkit.request(opts)
end

-- admit() on a new request; returns the request and admit's first result.
local function check(rl, target, opts)
    local req = request(target, opts)
    local ok = rl.admit(req)
    return req, ok
end

local function counter(name)
    return sp_dict:get(name) or 0
end

describe("ratelimit.lua", function()
    before_each(function()
        dict:flush_all()
        sp_dict:delete("m:ratelimited")
        sp_dict:delete("m:concurrency_limited")
        sp_dict:delete("m:ratelimit_allowed")
    end)

    after_each(function()
        dict:flush_all()
    end)

    describe("rate limits", function()
        it("admits the burst, then answers 429 with the exact body and headers", function()
            local rl = load({ limits = { { name = "c", key = "client", rate = SLOW, burst = 3 } } })
            for i = 1, 3 do
                local req, ok = check(rl, "/alice/sb/x")
                assert.is_true(ok, "request " .. i)
                assert.is_nil(req.response)
                assert.are.equal("allowed", req.ctx.ratelimit)
                local h = req.response_headers
                assert.are.equal("3", h["RateLimit-Limit"])
                assert.are.equal(tostring(3 - i), h["RateLimit-Remaining"])
                -- the bucket is full again i tokens from now (rounded up; +1 for float noise)
                local reset = tonumber(h["RateLimit-Reset"])
                assert.is_true(reset > (i - 1) * 1000 and reset <= i * 1000 + 1, h["RateLimit-Reset"])
            end
            local req, ok = check(rl, "/alice/sb/x")
            assert.is_false(ok)
            assert.are.equal("limited", req.ctx.ratelimit)
            assert.are.equal(429, req.response.status)
            assert.are.equal('{"error":"rate limited"}', req.response.body)
            assert.are.equal("application/json", req.response.headers["Content-Type"])
            local h = req.response.headers
            local retry = tonumber(h["Retry-After"])
            assert.is_true(retry >= 999 and retry <= 1001, h["Retry-After"])
            assert.are.equal(h["Retry-After"], tostring(math.floor(retry)))
            assert.are.equal("3", h["RateLimit-Limit"])
            assert.are.equal("0", h["RateLimit-Remaining"])
            local reset = tonumber(h["RateLimit-Reset"])
            assert.is_true(reset > 2000 and reset <= 3001, h["RateLimit-Reset"])
            assert.are.equal(1, counter("m:ratelimited"))
            -- a limited request does not take a token: still limited, counted again
            req, ok = check(rl, "/alice/sb/x")
            assert.is_false(ok)
            assert.are.equal(2, counter("m:ratelimited"))
        end)

        it("counts the requests let through, adding them to the shared dict at each flush", function()
            local rl = load({ limits = { { name = "c", key = "client", rate = SLOW, burst = 3 } } })
            rl.flush_counts() -- nothing pending from other tests' loads: a new module
            assert.are.equal(0, counter("m:ratelimit_allowed"))
            for _ = 1, 5 do
                check(rl, "/alice/sb/x") -- 3 allowed, 2 limited
            end
            assert.are.equal(0, counter("m:ratelimit_allowed")) -- not before the flush
            rl.flush_counts()
            assert.are.equal(3, counter("m:ratelimit_allowed"))
            assert.are.equal(2, counter("m:ratelimited"))
            rl.flush_counts() -- nothing new
            assert.are.equal(3, counter("m:ratelimit_allowed"))
            local _, ok = check(rl, "/alice/sb/y", { client = "10.0.0.9" })
            assert.is_true(ok)
            rl.flush_counts()
            assert.are.equal(4, counter("m:ratelimit_allowed"))
        end)

        it("says RateLimit-Reset 0 (never -0) when the bucket is full again at once", function()
            local rl = load({ limits = { { name = "c", key = "client", rate = 1e9, burst = 1e9 } } })
            local req, ok = check(rl, "/alice/sb/x")
            assert.is_true(ok)
            assert.are.equal("0", req.response_headers["RateLimit-Reset"])
        end)

        it("answers the proxy's own and unroutable paths too (key client)", function()
            local rl = load({ limits = { { key = "client", rate = SLOW, burst = 1 } } })
            local _, ok = check(rl, "/anything")
            assert.is_true(ok)
            local req
            req, ok = check(rl, "/")
            assert.is_false(ok)
            assert.are.equal(429, req.response.status)
        end)

        it("defaults the burst to the rate and names limits", function()
            local rl = load({ limits = { { key = "client", rate = 2 } } })
            local req = check(rl, "/a/b/c")
            assert.are.equal("2", req.response_headers["RateLimit-Limit"])
            assert.are.equal("1", req.response_headers["RateLimit-Remaining"])
        end)

        it("keeps one bucket per client address", function()
            local rl = load({ limits = { { key = "client", rate = SLOW, burst = 1 } } })
            assert.is_true(select(2, check(rl, "/a/b/c", { client = "10.0.0.1" })))
            assert.is_false(select(2, check(rl, "/a/b/c", { client = "10.0.0.1" })))
            assert.is_true(select(2, check(rl, "/a/b/c", { client = "10.0.0.2" })))
            assert.is_true(select(2, check(rl, "/a/b/c", { client = "::1" })))
        end)

        it("keys by sandbox: each sandbox its own bucket, non-sandbox paths skipped", function()
            local rl = load({ limits = { { key = "sandbox", rate = SLOW, burst = 2 } } })
            for _ = 1, 2 do
                assert.is_true(select(2, check(rl, "/alice/a/x")))
            end
            assert.is_false(select(2, check(rl, "/alice/a/y")))
            assert.is_false(select(2, check(rl, "/al%69ce/a/z"))) -- the same sandbox, encoded
            assert.is_true(select(2, check(rl, "/alice/b/x")))
            assert.is_true(select(2, check(rl, "/bob/a/x")))
            -- no sandbox in the path: the limit does not apply, and no headers are added
            for _ = 1, 5 do
                local req, ok = check(rl, "/health")
                assert.is_true(ok)
                assert.is_nil(req.response_headers)
            end
        end)

        it("keys by user: one bucket for all of a user's sandboxes", function()
            local rl = load({ limits = { { key = "user", rate = SLOW, burst = 3 } } })
            assert.is_true(select(2, check(rl, "/alice/a/x")))
            assert.is_true(select(2, check(rl, "/alice/b/x")))
            assert.is_true(select(2, check(rl, "/alice/c/x")))
            assert.is_false(select(2, check(rl, "/alice/d/x")))
            assert.is_true(select(2, check(rl, "/bob/a/x")))
            assert.is_true(select(2, check(rl, "/nosandbox")))
        end)

        it("calls a function key, and a nil key skips the limit", function()
            local seen = {}
            local rl = load({ limits = { { name = "tenant", rate = SLOW, burst = 1,
                key = function(req)
                    seen[#seen + 1] = req:path()
                    return req:header("x-tenant")
                end } } })
            for _ = 1, 4 do
                local req, ok = check(rl, "/a/b/c")
                assert.is_true(ok)
                assert.is_nil(req.response_headers)
            end
            local req, ok = check(rl, "/a/b/c", { headers = { ["X-Tenant"] = "t1" } })
            assert.is_true(ok)
            assert.are.equal("0", req.response_headers["RateLimit-Remaining"])
            req, ok = check(rl, "/a/b/c", { headers = { ["X-Tenant"] = "t1" } })
            assert.is_false(ok)
            assert.are.equal(429, req.response.status)
            assert.is_true(select(2, check(rl, "/a/b/c", { headers = { ["X-Tenant"] = "t2" } })))
            assert.are.equal(7, #seen)
        end)

        it("reports the most constrained limit, and the first limit that refuses", function()
            local rl = load({ limits = {
                { name = "wide", key = "client", rate = SLOW, burst = 10 },
                { name = "narrow", key = "sandbox", rate = SLOW, burst = 2 },
            } })
            local req = check(rl, "/alice/a/x")
            assert.are.equal("2", req.response_headers["RateLimit-Limit"])
            assert.are.equal("1", req.response_headers["RateLimit-Remaining"])
            req = check(rl, "/health") -- only the wide limit applies
            assert.are.equal("10", req.response_headers["RateLimit-Limit"])
            assert.are.equal("8", req.response_headers["RateLimit-Remaining"])
            check(rl, "/alice/a/x")
            local ok
            req, ok = check(rl, "/alice/a/x")
            assert.is_false(ok)
            assert.are.equal("2", req.response.headers["RateLimit-Limit"])
            assert.are.equal("0", req.response.headers["RateLimit-Remaining"])
        end)

        it("keeps separate buckets for limits with different names", function()
            local rl = load({ limits = {
                { name = "one", key = "client", rate = SLOW, burst = 1 },
                { name = "two", key = "client", rate = SLOW, burst = 2 },
            } })
            local req, ok = check(rl, "/a/b/c")
            assert.is_true(ok)
            assert.are.equal("0", req.response_headers["RateLimit-Remaining"])
            req, ok = check(rl, "/a/b/c")
            assert.is_false(ok)
            assert.are.equal("1", req.response.headers["RateLimit-Limit"])
        end)

        it("uses a default limit of 1000/s with a burst of 2000", function()
            local rl = load(nil)
            local req, ok = check(rl, "/a/b/c")
            assert.is_true(ok)
            assert.are.equal("2000", req.response_headers["RateLimit-Limit"])
            assert.are.equal("1999", req.response_headers["RateLimit-Remaining"])
        end)

        -- A caller auth has identified (req.ctx.identity, left by auth.identify_request).
        local function as_user(user, target, client)
            local req = request(target or "/a/b/c", { client = client or "10.1.1.1" })
            req.ctx.identity = { user = user, admin = false, method = "key" }
            return req
        end

        -- the default limits (no `limits`), without the concurrency limit: these fake
        -- requests never complete, so each would keep its slot
        local NO_CC = { concurrency = { per_sandbox = 0 } }

        -- Runs step() (returns a request and check's answer) until a request is refused, at
        -- most 20,000 times (the bucket refills at 1000/s while the loop runs). Returns the
        -- refused request and how many were admitted before it.
        local function until_refused(step)
            for n = 0, 20000 do
                local r, ok = step()
                if not ok then
                    return r, n
                end
            end
            error("never refused")
        end

        it("limits callers auth did not identify per client address by default", function()
            local rl = load(NO_CC)
            local req, n = until_refused(function()
                local r = request("/a/b/c", { client = "10.1.1.1" })
                return r, rl.check(r)
            end)
            assert.is_true(n >= 2000, n)
            assert.are.equal(429, req.response.status)
            -- another address has its own bucket
            assert.is_true(select(2, check(rl, "/a/b/c", { client = "10.1.1.2" })))
            -- an authenticated caller from the exhausted address is not in that bucket
            req = as_user("alice")
            assert.is_true(rl.check(req))
            assert.are.equal("allowed", req.ctx.ratelimit)
            assert.are.equal("1999", req.response_headers["RateLimit-Remaining"])
        end)

        it("limits authenticated callers per user by default, wherever they connect from", function()
            local rl = load(NO_CC)
            -- alice, through one address (a load balancer's node, a NAT), spends her bucket
            local i = 0
            local req, n = until_refused(function()
                i = i + 1
                local r = as_user("alice", "/alice/s" .. (i % 7) .. "/x")
                return r, rl.check(r)
            end)
            assert.is_true(n >= 2000, n)
            assert.are.equal(429, req.response.status)
            assert.are.equal("2000", req.response.headers["RateLimit-Limit"])
            -- from another address too: the bucket is the user's (nearly empty: it refills
            -- at 1000/s, so this one may just get a token back)
            req = as_user("alice", "/alice/b/c", "10.9.9.9")
            rl.check(req)
            local h = req.response and req.response.headers or req.response_headers
            assert.is_true(tonumber(h["RateLimit-Remaining"]) < 1000, h["RateLimit-Remaining"])
            -- bob behind the same address is not affected, nor is an anonymous caller there
            req = as_user("bob")
            assert.is_true(rl.check(req))
            assert.are.equal("1999", req.response_headers["RateLimit-Remaining"])
            assert.is_true(select(2, check(rl, "/a/b/c", { client = "10.1.1.1" })))
        end)

        it("refuses an unknown key name at load time", function()
            local ok, err = pcall(load, { limits = { { key = "clinet", rate = 1 } } })
            assert.is_false(ok)
            assert.matches("key must be", tostring(err), 1, true)
        end)

        it("keys unauthenticated / identity by the caller's identity", function()
            local rl = load({ limits = {
                { name = "anon", key = "unauthenticated", rate = SLOW, burst = 1 },
                { name = "who", key = "identity", rate = SLOW, burst = 2 } } })
            -- anonymous: the address's bucket of 1; the identity limit does not apply
            local req, ok = check(rl, "/a/b/c")
            assert.is_true(ok)
            assert.are.equal("1", req.response_headers["RateLimit-Limit"])
            assert.is_false(select(2, check(rl, "/a/b/c")))
            -- identified: the user's bucket of 2; the address's empty bucket does not apply
            req = as_user("carol", "/a/b/c", "127.0.0.1")
            assert.is_true(rl.check(req))
            assert.are.equal("2", req.response_headers["RateLimit-Limit"])
            assert.is_true(rl.check(as_user("carol", "/a/b/c", "127.0.0.1")))
            assert.is_false(rl.check(as_user("carol", "/a/b/c", "127.0.0.1")))
        end)

        it("does nothing when disabled", function()
            local rl = load({ enabled = false, concurrency = { per_sandbox = 1 },
                limits = { { key = "client", rate = SLOW, burst = 1 } } })
            for _ = 1, 5 do
                local req, ok = check(rl, "/alice/sb/x")
                assert.is_true(ok)
                assert.is_nil(req.response)
                assert.is_nil(req.response_headers)
            end
        end)

        it("refuses a limit without a positive rate at load time", function()
            assert.has_error(function()
                load({ limits = { { key = "client", rate = 0 } } })
            end)
            local ok, err = pcall(load, { limits = { { key = "client" } } })
            assert.is_false(ok)
            assert.matches("rate must be > 0", tostring(err), 1, true)
        end)

        it("refuses bad trusted proxies at load time", function()
            local ok, err = pcall(load, { trusted_proxies = { "10.0.0.0/99" } })
            assert.is_false(ok)
            assert.matches("10.0.0.0/99", tostring(err), 1, true)
        end)
    end)

    describe("concurrency", function()
        local CFG = { limits = { { key = "client", rate = 1000, burst = 1000 } },
            concurrency = { per_sandbox = 2 } }

        it("admits per_sandbox requests in flight, then answers 503", function()
            local rl = load(CFG)
            local a = check(rl, "/alice/sb/x")
            local b = check(rl, "/alice/sb/y")
            assert.is_nil(a.response)
            assert.is_nil(b.response)
            assert.are.equal(2, rl.in_flight("alice/sb"))
            local c, ok = check(rl, "/alice/sb/z")
            assert.is_false(ok)
            assert.are.equal("concurrency", c.ctx.ratelimit)
            assert.are.equal(503, c.response.status)
            assert.are.same({ error = "too many requests in flight", path = "alice/sb" },
                c.response.json)
            assert.are.equal("1", c.response.headers["Retry-After"])
            assert.are.equal(1, counter("m:concurrency_limited"))
            assert.are.equal(0, counter("m:ratelimited"))
            -- the refused request holds nothing
            assert.are.equal(2, rl.in_flight("alice/sb"))
            c:complete{ status = 503 }
            assert.are.equal(2, rl.in_flight("alice/sb"))
        end)

        it("gives the slot back when the exchange completes", function()
            local rl = load(CFG)
            local a = check(rl, "/alice/sb/x")
            check(rl, "/alice/sb/y")
            assert.is_false(select(2, check(rl, "/alice/sb/z")))
            a:complete{ status = 200 }
            assert.are.equal(1, rl.in_flight("alice/sb"))
            local d, ok = check(rl, "/alice/sb/z")
            assert.is_true(ok)
            assert.are.equal("allowed", d.ctx.ratelimit)
            assert.are.equal(2, rl.in_flight("alice/sb"))
        end)

        it("counts each sandbox separately, and skips non-sandbox paths", function()
            local rl = load(CFG)
            check(rl, "/alice/sb/x")
            check(rl, "/alice/sb/x")
            assert.is_true(select(2, check(rl, "/alice/other/x")))
            assert.is_true(select(2, check(rl, "/bob/sb/x")))
            for _ = 1, 5 do
                assert.is_true(select(2, check(rl, "/health")))
            end
            assert.are.equal(2, rl.in_flight("alice/sb"))
            assert.are.equal(1, rl.in_flight("alice/other"))
            assert.are.equal(0, rl.in_flight("nobody/none"))
        end)

        it("does not hold a slot for a rate-limited request", function()
            local rl = load({ limits = { { key = "client", rate = SLOW, burst = 1 } },
                concurrency = { per_sandbox = 5 } })
            check(rl, "/alice/sb/x")
            local req, ok = check(rl, "/alice/sb/x")
            assert.is_false(ok)
            assert.are.equal(429, req.response.status)
            assert.are.equal(1, rl.in_flight("alice/sb"))
        end)

        it("is off with per_sandbox = 0", function()
            local rl = load({ limits = CFG.limits, concurrency = { per_sandbox = 0 } })
            for _ = 1, 10 do
                assert.is_true(select(2, check(rl, "/alice/sb/x")))
            end
            assert.are.equal(0, rl.in_flight("alice/sb"))
        end)

        it("defaults to 256 per sandbox", function()
            local rl = load({ limits = CFG.limits })
            for i = 1, 256 do
                assert.is_true(select(2, check(rl, "/alice/sb/x")), "request " .. i)
            end
            assert.is_false(select(2, check(rl, "/alice/sb/x")))
        end)
    end)

    describe("client address and trusted proxies", function()
        it("ignores X-Forwarded-For without trusted proxies", function()
            local rl = load({ limits = { { key = "client", rate = SLOW, burst = 1 } } })
            local req = request("/a/b/c", { headers = { ["X-Forwarded-For"] = "1.2.3.4" } })
            assert.are.equal("127.0.0.1", rl.client(req))
            assert.is_true(rl.admit(req))
            assert.are.equal(rl.admit, rl.check) -- the name before 0.2 keeps working
            -- another forwarded address shares the peer's bucket
            local _, ok = check(rl, "/a/b/c", { headers = { ["X-Forwarded-For"] = "5.6.7.8" } })
            assert.is_false(ok)
        end)

        it("believes X-Forwarded-For from a trusted proxy", function()
            local rl = load({ trusted_proxies = { "127.0.0.0/8" },
                limits = { { key = "client", rate = SLOW, burst = 1 } } })
            local function xff(v, client)
                return request("/a/b/c", { client = client, headers = { ["X-Forwarded-For"] = v } })
            end
            assert.are.equal("1.2.3.4", rl.client(xff("1.2.3.4")))
            assert.are.equal("1.2.3.4", rl.client(xff("9.9.9.9, 1.2.3.4, 127.0.0.2")))
            assert.are.equal("127.0.0.1", rl.client(xff("garbage")))
            assert.are.equal("192.0.2.1", rl.client(xff("1.2.3.4", "192.0.2.1")))
            -- buckets follow the believed address
            assert.is_true(rl.check(xff("1.2.3.4")))
            assert.is_false(rl.check(xff("1.2.3.4")))
            assert.is_false(rl.check(xff("8.8.8.8, 1.2.3.4")))
            assert.is_true(rl.check(xff("5.6.7.8")))
            assert.is_true(rl.admit(request("/a/b/c")))
            -- an untrusted peer cannot pick its bucket
            assert.is_true(rl.check(xff("4.4.4.4", "192.0.2.1")))
            assert.is_false(rl.check(xff("3.3.3.3", "192.0.2.1")))
        end)
    end)

    -- The cluster-wide mode (ratelimit.redis) over a fake store: a stand-in for sp.redis whose
    -- client runs the script ratelimit.lua sends (M.SCRIPT) over a Lua table with a clock the
    -- test moves, and fails on demand like the real client does ("EDOWN: ...", ...). Two
    -- modules loaded over one fake store are two replicas sharing one Redis.
    describe("cluster-wide mode (fake store)", function()
        local fake -- the fake sp.redis module
        local saved_redis

        -- Redis turns a Lua number into an integer reply by truncating it.
        local function to_reply(v)
            if type(v) == "number" then
                return v >= 0 and math.floor(v) or math.ceil(v)
            elseif type(v) == "table" then
                local out = {}
                for i, x in ipairs(v) do
                    out[i] = to_reply(x)
                end
                return out
            end
            return v
        end

        local function new_fake()
            local f = { data = {}, ttl = {}, scripts = {}, now_us = 1.7e15, calls = {},
                fail = nil, clients = {} }
            local function run(script, nkeys, ...)
                local args = { ... }
                local keys, argv = {}, {}
                for i = 1, nkeys do
                    keys[i] = args[i]
                end
                for i = nkeys + 1, #args do
                    argv[#argv + 1] = tostring(args[i])
                end
                local redis = { call = function(cmd, k, v, px, ms)
                    if cmd == "TIME" then
                        return { tostring(math.floor(f.now_us / 1e6)),
                            tostring(f.now_us % 1e6) }
                    elseif cmd == "GET" then
                        return f.data[k] or false
                    elseif cmd == "SET" then
                        assert(px == "PX" and ms > 0, "SET with PX")
                        f.data[k], f.ttl[k] = v, ms
                        return "OK"
                    end
                    error("unexpected redis.call " .. tostring(cmd))
                end }
                local env = { redis = redis, KEYS = keys, ARGV = argv, tonumber = tonumber,
                    tostring = tostring, math = math, string = string }
                local fn = assert(loadstring(script))
                setfenv(fn, env)
                return to_reply(fn())
            end
            local client = {}
            function client.command(_, cmd, ...)
                f.calls[#f.calls + 1] = cmd
                if f.fail then
                    return nil, f.fail
                end
                local a = { ... }
                if cmd == "SCRIPT" then
                    assert(a[1] == "LOAD")
                    f.scripts.sha1 = a[2]
                    return "sha1"
                elseif cmd == "EVALSHA" then
                    local script = f.scripts[a[1]]
                    if not script then
                        return nil, "EREDIS: NOSCRIPT No matching script. Please use EVAL."
                    end
                    return run(script, unpack(a, 2))
                elseif cmd == "EVAL" then
                    f.scripts.sha1 = a[1]
                    return run(a[1], unpack(a, 2))
                end
                error("unexpected command " .. tostring(cmd))
            end
            function client.status()
                return f.fail and "down" or "up"
            end
            f.module = { client = function(opts)
                f.clients[#f.clients + 1] = opts
                return client
            end }
            return f
        end

        local function load_redis(section)
            section.redis = section.redis or {}
            if section.redis.enabled == nil then
                section.redis.enabled = true
            end
            return load(section)
        end

        local function count(cmd)
            local n = 0
            for _, c in ipairs(fake.calls) do
                if c == cmd then
                    n = n + 1
                end
            end
            return n
        end

        before_each(function()
            fake = new_fake()
            saved_redis = package.loaded["sp.redis"]
            package.loaded["sp.redis"] = fake.module
            sp_dict:delete("m:ratelimit_store_fallbacks")
            sp_dict:delete("m:ratelimit_store_refused")
        end)

        after_each(function()
            package.loaded["sp.redis"] = saved_redis
            sp_dict:delete("m:ratelimit_store_fallbacks")
            sp_dict:delete("m:ratelimit_store_refused")
        end)

        it("is off by default: no store client is made", function()
            load({ limits = { { name = "c", key = "client", rate = SLOW, burst = 1 } } })
            assert.are.same({}, fake.clients)
        end)

        it("makes one client with the section's options, defaults filled in", function()
            load_redis({ limits = { { name = "c", key = "client", rate = SLOW, burst = 1 } } })
            load_redis({ redis = { host = "10.0.0.5", port = 7000, timeout_ms = 20,
                password = "pw" } })
            assert.are.same({ host = "127.0.0.1", port = 6379, timeout_ms = 50,
                name = "ratelimit" }, fake.clients[1])
            assert.are.same({ host = "10.0.0.5", port = 7000, timeout_ms = 20, password = "pw",
                name = "ratelimit" }, fake.clients[2])
        end)

        it("decides in the store: the burst, then 429 with the local mode's body and headers",
            function()
            local rl = load_redis({ limits = { { name = "c", key = "client", rate = SLOW,
                burst = 3 } } })
            for i = 1, 3 do
                local req, ok = check(rl, "/alice/sb/x")
                assert.is_true(ok, "request " .. i)
                assert.are.equal("allowed", req.ctx.ratelimit)
                local h = req.response_headers
                assert.are.equal("3", h["RateLimit-Limit"])
                assert.are.equal(tostring(3 - i), h["RateLimit-Remaining"])
                local reset = tonumber(h["RateLimit-Reset"])
                assert.is_true(reset > (i - 1) * 1000 and reset <= i * 1000 + 1, h["RateLimit-Reset"])
            end
            local req, ok = check(rl, "/alice/sb/x")
            assert.is_false(ok)
            assert.are.equal("limited", req.ctx.ratelimit)
            assert.are.equal(429, req.response.status)
            assert.are.equal('{"error":"rate limited"}', req.response.body)
            local h = req.response.headers
            local retry = tonumber(h["Retry-After"])
            assert.is_true(retry >= 999 and retry <= 1001, h["Retry-After"])
            assert.are.equal("0", h["RateLimit-Remaining"])
            assert.are.equal(1, counter("m:ratelimited"))
            -- the store holds the bucket under prefix .. name .. ":" .. key, with a TTL; the
            -- replica's own dict holds nothing
            assert.is_string(fake.data["sp:rl:c:127.0.0.1"])
            assert.is_true(fake.ttl["sp:rl:c:127.0.0.1"] > 3000 * 1000)
            assert.is_nil(dict:get("rl:c:127.0.0.1"))
            -- one round trip per decision (after one SCRIPT LOAD)
            assert.are.equal(1, count("SCRIPT"))
            assert.are.equal(4, count("EVALSHA"))
            assert.are.equal(0, counter("m:ratelimit_store_fallbacks"))
            -- the admitted ones are counted as in the local mode
            rl.flush_counts()
            assert.are.equal(3, counter("m:ratelimit_allowed"))
        end)

        it("refills on the store's clock", function()
            local rl = load_redis({ limits = { { name = "c", key = "client", rate = 2, burst = 1 } } })
            assert.is_true(select(2, check(rl, "/a/b/c")))
            local req, ok = check(rl, "/a/b/c")
            assert.is_false(ok)
            assert.are.equal("1", req.response.headers["Retry-After"])
            fake.now_us = fake.now_us + 0.4e6
            assert.is_false(select(2, check(rl, "/a/b/c")))
            fake.now_us = fake.now_us + 0.1e6
            assert.is_true(select(2, check(rl, "/a/b/c")))
            assert.is_false(select(2, check(rl, "/a/b/c")))
        end)

        it("shares one bucket between replicas: two modules over one store", function()
            local section = { limits = { { name = "u", key = "user", rate = SLOW, burst = 4 } } }
            local a = load_redis(section)
            local b = load_redis(section)
            assert.is_true(select(2, check(a, "/alice/x/y")))
            assert.is_true(select(2, check(b, "/alice/x/y")))
            assert.is_true(select(2, check(a, "/alice/x/y")))
            assert.is_true(select(2, check(b, "/alice/x/y")))
            assert.is_false(select(2, check(a, "/alice/x/y")))
            assert.is_false(select(2, check(b, "/alice/x/y")))
            assert.is_true(select(2, check(b, "/bob/x/y")))
        end)

        it("decides all of a request's limits in one round trip, stopping at the first refusal",
            function()
            local rl = load_redis({ redis = { prefix = "p:" }, limits = {
                { name = "u", key = "user", rate = SLOW, burst = 5 },
                { name = "s", key = "sandbox", rate = SLOW, burst = 2 },
                { name = "skip", key = function() return nil end, rate = SLOW },
            } })
            local req, ok = check(rl, "/alice/sb1/x")
            assert.is_true(ok)
            -- the most constrained limit is reported
            assert.are.equal("2", req.response_headers["RateLimit-Limit"])
            assert.are.equal("1", req.response_headers["RateLimit-Remaining"])
            assert.is_true(select(2, check(rl, "/alice/sb1/x")))
            req, ok = check(rl, "/alice/sb1/x")
            assert.is_false(ok)
            assert.are.equal("2", req.response.headers["RateLimit-Limit"])
            -- the user limit gave its token (as in the local mode): 5 - 3 left for sb2
            assert.is_true(select(2, check(rl, "/alice/sb2/x")))
            assert.is_true(select(2, check(rl, "/alice/sb2/x")))
            req, ok = check(rl, "/alice/sb3/x")
            assert.is_false(ok)
            assert.are.equal("5", req.response.headers["RateLimit-Limit"])
            assert.are.equal(6, count("EVALSHA"))
            assert.is_string(fake.data["p:u:alice"])
            assert.is_string(fake.data["p:s:alice/sb1"])
            assert.is_nil(fake.data["p:s:alice/sb3"]) -- not reached after the user refusal
        end)

        it("makes no round trip when no limit applies", function()
            local rl = load_redis({ limits = { { name = "s", key = "sandbox", rate = SLOW } } })
            assert.is_true(select(2, check(rl, "/health")))
            assert.are.same({}, fake.calls)
        end)

        it("loads the script again when the store lost it (NOSCRIPT: EVAL)", function()
            local rl = load_redis({ limits = { { name = "c", key = "client", rate = SLOW, burst = 2 } } })
            assert.is_true(select(2, check(rl, "/a/b/c")))
            fake.scripts = {} -- the store restarted
            assert.is_true(select(2, check(rl, "/a/b/c")))
            assert.are.equal(1, count("EVAL"))
            assert.is_false(select(2, check(rl, "/a/b/c")))
            assert.are.equal(3, count("EVALSHA"))
            assert.are.equal(0, counter("m:ratelimit_store_fallbacks"))
        end)

        local function failing_cases(name, fn)
            for _, err in ipairs({ "EDOWN: connection refused", "ETIMEDOUT: no reply within 50 ms",
                "ECONNRESET: the server closed the connection", "EREDIS: OOM command not allowed" }) do
                it(name .. " (" .. err:match("^%u+") .. ")", function()
                    fn(err)
                end)
            end
        end

        failing_cases("falls back to this replica's limits by default when the store fails",
            function(err)
            local rl = load_redis({ limits = { { name = "c", key = "client", rate = SLOW, burst = 2 } } })
            fake.fail = err
            local req, ok = check(rl, "/a/b/c")
            assert.is_true(ok)
            assert.are.equal("allowed", req.ctx.ratelimit)
            assert.are.equal("1", req.response_headers["RateLimit-Remaining"])
            assert.is_true(select(2, check(rl, "/a/b/c")))
            req, ok = check(rl, "/a/b/c")
            assert.is_false(ok)
            assert.are.equal(429, req.response.status)
            assert.is_number(dict:get("rl:c:127.0.0.1"))
            assert.are.equal(3, counter("m:ratelimit_store_fallbacks"))
            assert.are.equal(0, counter("m:ratelimit_store_refused"))
        end)

        failing_cases("fails open with fallback = \"open\"", function(err)
            local rl = load_redis({ redis = { fallback = "open" },
                limits = { { name = "c", key = "client", rate = SLOW, burst = 1 } } })
            fake.fail = err
            for _ = 1, 3 do
                local req, ok = check(rl, "/a/b/c")
                assert.is_true(ok)
                assert.are.equal("allowed", req.ctx.ratelimit)
                assert.is_nil(req.response_headers and req.response_headers["RateLimit-Remaining"])
            end
            assert.is_nil(dict:get("rl:c:127.0.0.1"))
            assert.are.equal(3, counter("m:ratelimit_store_fallbacks"))
        end)

        failing_cases("fails closed with fallback = \"closed\": 503", function(err)
            local rl = load_redis({ redis = { fallback = "closed" },
                limits = { { name = "c", key = "client", rate = SLOW, burst = 10 } } })
            fake.fail = err
            local req, ok = check(rl, "/a/b/c")
            assert.is_false(ok)
            assert.are.equal("store_unavailable", req.ctx.ratelimit)
            assert.are.equal(503, req.response.status)
            assert.are.equal('{"error":"rate limit store unavailable"}', req.response.body)
            assert.are.equal("1", req.response.headers["Retry-After"])
            assert.are.equal(1, counter("m:ratelimit_store_fallbacks"))
            assert.are.equal(1, counter("m:ratelimit_store_refused"))
            assert.are.equal(0, counter("m:ratelimited"))
        end)

        it("decides in the store again once it is back", function()
            local rl = load_redis({ redis = { fallback = "closed" },
                limits = { { name = "c", key = "client", rate = SLOW, burst = 2 } } })
            assert.is_true(select(2, check(rl, "/a/b/c")))
            fake.fail = "EDOWN: connection refused"
            assert.is_false(select(2, check(rl, "/a/b/c")))
            fake.fail = nil
            assert.is_true(select(2, check(rl, "/a/b/c")))
            assert.is_false(select(2, check(rl, "/a/b/c")))
            assert.are.equal(1, counter("m:ratelimit_store_fallbacks"))
        end)

        it("answers nothing when the request's client went away during the round trip", function()
            local rl = load_redis({ redis = { fallback = "closed" },
                limits = { { name = "c", key = "client", rate = SLOW, burst = 2 } } })
            fake.fail = "ECONNRESET: the client went away"
            local req, ok = check(rl, "/a/b/c")
            assert.is_false(ok)
            assert.is_nil(req.response)
            assert.are.equal(0, counter("m:ratelimit_store_fallbacks"))
        end)

        it("falls back when no store client could be made (no event loop)", function()
            fake.module.client = function()
                return nil, "ENOLOOP: no event loop here"
            end
            local rl = load_redis({ redis = { fallback = "closed" },
                limits = { { name = "c", key = "client", rate = SLOW, burst = 2 } } })
            local req, ok = check(rl, "/a/b/c")
            assert.is_false(ok)
            assert.are.equal(503, req.response.status)
        end)

        it("refuses a bad fallback or prefix at load time", function()
            assert.has_error(function()
                load_redis({ redis = { fallback = "maybe" } })
            end, 'ratelimit.redis.fallback must be "local", "open" or "closed"')
            assert.has_error(function()
                load_redis({ redis = { prefix = 5 } })
            end, "ratelimit.redis.prefix must be a string")
            assert.has_error(function()
                load_redis({ redis = { enabled = "true" } })
            end, "ratelimit.redis.enabled must be true or false")
        end)
    end)
end)
