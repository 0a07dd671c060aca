-- Sandbox addresses the proxy refuses to dial: unspecified (0.0.0.0, ::), loopback (unless
-- allow_loopback_sandboxes, which the local demo and this suite's helper turn on), link-local
-- (169.254.0.0/16, fe80::/10), multicast and broadcast, whether the address is a pod IP or what
-- a serviceFQDN resolved to; and a name in podIPs. Each gets a 503 with the reason in the body
-- and a log line, and nothing is dialled (the fixture sandbox on 127.0.0.1 counts connections).
local H = require "spec.helpers.proxy"

local function sb(name, port, opts)
    return H.sandbox("u", name, port, opts)
end

-- The fixture's connection count, which counts the /__stats request itself: nothing else
-- dialled it since the previous call when it grew by exactly one.
local function dialled_since(up, last)
    local now = up.stats().connections
    return now - last - 1, now
end

describe("refused sandbox addresses", function()
    local up, px, seen

    setup(function()
        up = H.upstream{ name = "never" }
        px = H.start{ set = { allow_loopback_sandboxes = false }, sandboxes = {
            sb("loop", up.port), -- podIPs 127.0.0.1, the fixture itself
            sb("loop2", up.port, { ip = "127.0.0.2" }),
            sb("zero", up.port, { ip = "0.0.0.0" }), -- Linux dials the local host
            sb("v6zero", up.port, { ip = "::" }),
            sb("v6loop", up.port, { ip = "::1" }),
            sb("mapped", up.port, { ip = "::ffff:127.0.0.1" }),
            sb("linklocal", up.port, { ip = "169.254.169.254" }),
            sb("v6linklocal", up.port, { ip = "fe80::1" }),
            sb("mcast", up.port, { ip = "224.0.0.1" }),
            sb("v6mcast", up.port, { ip = "ff02::1" }),
            sb("bcast", up.port, { ip = "255.255.255.255" }),
            sb("podname", up.port, { ip = "localhost" }),
            -- ready, no pod IP: the Service name is the address; it resolves to loopback
            sb("svc", up.port, { ip = false, service = "localhost" }),
        } }
        seen = up.stats().connections
    end)

    teardown(function()
        H.stop_all()
    end)

    local cases = {
        { "loop", "loopback address" }, { "loop2", "loopback address" },
        { "zero", "unspecified address" }, { "v6zero", "unspecified address" },
        { "v6loop", "loopback address" }, { "mapped", "loopback address" },
        { "linklocal", "link-local address" }, { "v6linklocal", "link-local address" },
        { "mcast", "multicast address" }, { "v6mcast", "multicast address" },
        { "bcast", "broadcast address" }, { "svc", "loopback address" },
    }
    for _, c in ipairs(cases) do
        it("answers 503 for " .. c[1] .. " (" .. c[2] .. ") and dials nothing", function()
            local r = assert(px:get("/u/" .. c[1] .. "/echo"))
            assert.are.equal(503, r.status)
            local body = H.cjson.decode(r.body)
            assert.are.equal("sandbox address refused: " .. c[2], body.error)
            px:wait_log(function(l)
                return l.msg == "sandbox address refused" and l.reason == c[2]
            end)
            local n
            n, seen = dialled_since(up, seen)
            assert.are.equal(0, n)
        end)
    end

    it("answers 503 with the reason for a name in podIPs, logs it and dials nothing", function()
        local r = assert(px:get("/u/podname/echo"))
        assert.are.equal(503, r.status)
        local body = H.cjson.decode(r.body)
        assert.are.equal("sandbox has no address", body.error)
        assert.are.equal("status.podIPs[0] is not an IP address: localhost", body.reason)
        px:wait_log(function(l)
            return l.msg == "sandbox address refused" and l.path == "u/podname"
        end)
        local n
        n, seen = dialled_since(up, seen)
        assert.are.equal(0, n)
    end)
end)

describe("allow_loopback_sandboxes", function()
    teardown(function()
        H.stop_all()
    end)

    it("lets loopback pod IPs and resolved Service names through, never 0.0.0.0", function()
        local up = H.upstream{ name = "loop" }
        local px = H.start{ set = { allow_loopback_sandboxes = true }, sandboxes = {
            sb("loop", up.port), sb("svc", up.port, { ip = false, service = "localhost" }),
            sb("zero", up.port, { ip = "0.0.0.0" }) } }
        assert.are.equal(200, assert(px:get("/u/loop/echo")).status)
        assert.are.equal(200, assert(px:get("/u/svc/echo")).status)
        local before = up.stats().connections
        local r = assert(px:get("/u/zero/echo"))
        assert.are.equal(503, r.status)
        assert.are.equal("sandbox address refused: unspecified address",
            H.cjson.decode(r.body).error)
        assert.are.equal(0, (dialled_since(up, before)))
    end)

    it("is on in the local demo (the demo sandbox is on 127.0.0.1)", function()
        local px = H.start{ set = { allow_loopback_sandboxes = false }, args = { "--demo" } }
        local r = assert(px:get("/demo/hello/"))
        assert.are.equal(200, r.status)
    end)
end)
