-- sp.ip: address parsing (IPv4, IPv6, IPv4-mapped), CIDRs with any prefix length, range
-- matching, and the trusted-proxy client address that ratelimit.lua keys on.
local ip = require "sp.ip"

local function hex(b)
    return (b:gsub(".", function(c)
        return string.format("%02x", c:byte())
    end))
end

-- the 16-byte form as 32 hex digits, or nil
local function P(s)
    local b = ip.parse(s)
    return b and hex(b)
end

local MAPPED = "00000000000000000000ffff"

local function ranges(list)
    return assert(ip.ranges(list))
end

describe("sp.ip.parse", function()
    it("gives IPv4 as the 16-byte IPv4-mapped form", function()
        assert.are.equal(MAPPED .. "01020304", P("1.2.3.4"))
        assert.are.equal(MAPPED .. "00000000", P("0.0.0.0"))
        assert.are.equal(MAPPED .. "ffffffff", P("255.255.255.255"))
        assert.are.equal(MAPPED .. "7f000001", P("127.0.0.1"))
        assert.are.equal(16, #ip.parse("10.0.0.1"))
    end)

    it("trims surrounding white space", function()
        assert.are.equal(MAPPED .. "01020304", P("  1.2.3.4\t"))
        assert.are.equal(string.rep("0", 31) .. "1", P(" ::1 "))
    end)

    it("refuses malformed IPv4", function()
        for _, s in ipairs({ "256.1.1.1", "1.2.3.256", "1.2.3", "1.2.3.4.5", "1..2.3", "1.2.3.",
            ".1.2.3", "a.b.c.d", "1.2.3.4x", "-1.2.3.4", "1.2.3.4/8", "1.2.3.4:80", "1,2,3,4",
            "", " ", "999999999999.1.1.1" }) do
            assert.is_nil(ip.parse(s), s)
        end
    end)

    it("parses IPv6 in full, compressed and mixed forms", function()
        assert.are.equal(string.rep("0", 32), P("::"))
        assert.are.equal(string.rep("0", 31) .. "1", P("::1"))
        assert.are.equal("20010db8000000000000000000000001", P("2001:db8::1"))
        assert.are.equal("20010db8000000000000000000000001", P("2001:DB8:0:0:0:0:0:1"))
        assert.are.equal("20010db8000000000000000000000001", P("2001:0db8:0000:0000:0000:0000:0000:0001"))
        assert.are.equal("00010002000300040005000600070008", P("1:2:3:4:5:6:7:8"))
        assert.are.equal("00010002000300040005000600070000", P("1:2:3:4:5:6:7::"))
        assert.are.equal("00000002000300040005000600070008", P("::2:3:4:5:6:7:8"))
        assert.are.equal("fe800000000000000000000000000001", P("fe80::1"))
        assert.are.equal("10000000000000000000000000000000", P("1000::"))
        -- an embedded IPv4 tail
        assert.are.equal("00010002000300040005000601020304", P("1:2:3:4:5:6:1.2.3.4"))
        assert.are.equal(string.rep("0", 24) .. "01020304", P("::1.2.3.4"))
    end)

    it("strips brackets and a zone id", function()
        assert.are.equal(string.rep("0", 31) .. "1", P("[::1]"))
        assert.are.equal("fe800000000000000000000000000001", P("fe80::1%eth0"))
    end)

    it("gives ::ffff:a.b.c.d the same bytes as a.b.c.d", function()
        assert.are.equal(P("1.2.3.4"), P("::ffff:1.2.3.4"))
        assert.are.equal(P("10.0.0.1"), P("::FFFF:10.0.0.1"))
        assert.are.equal(P("192.168.1.1"), P("::ffff:c0a8:101"))
        assert.are.equal(P("127.0.0.1"), P("0:0:0:0:0:ffff:7f00:1"))
    end)

    it("refuses malformed IPv6", function()
        for _, s in ipairs({ "1::2::3", "12345::", "g::1", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7",
            ":1:2:3:4:5:6:7", "1:2:3:4:5:6:7:", "::ffff:1.2.3", "::ffff:1.2.3.256", "1.2.3.4::",
            "[::1", "1:2:3:4:5:6:7:8::", "zz::", "1:zz::2" }) do
            assert.is_nil(ip.parse(s), s)
        end
    end)

    -- An invalid part after "::" must refuse the address, not count as no groups at all
    -- (":::" must not parse as "::", "1::zzzz" as "1::", "fe80::1:g" as "fe80::"; the trap is
    -- `tail and groups(tail) or {}`, which turns a failed parse of the tail into {}).
    it("refuses garbage after '::'", function()
        for _, s in ipairs({ ":::", "1::zzzz", "1::2:", "fe80:::1", "fe80::1:g", "::-1", "::1]",
            "::1.2.3.4:1", "::ffff:zz" }) do
            assert.is_nil(ip.parse(s), s)
        end
        assert.is_nil(ip.parse_cidr("fd00::zz/8"))
        assert.are.equal("127.0.0.1",
            ip.client_address("127.0.0.1", "1::zzzz", assert(ip.ranges({ "127.0.0.0/8" }))))
    end)

    it("returns nil for anything that is not a string", function()
        assert.is_nil(ip.parse(nil))
        assert.is_nil(ip.parse(1234))
        assert.is_nil(ip.parse({}))
    end)
end)

describe("sp.ip.parse_cidr", function()
    it("reads an IPv4 CIDR with its prefix counted in the 128-bit space", function()
        local n = assert(ip.parse_cidr("10.0.0.0/8"))
        assert.are.equal(96 + 8, n.bits)
        assert.are.equal(MAPPED .. "0a000000", hex(n.bytes))
        assert.are.equal(96, assert(ip.parse_cidr("0.0.0.0/0")).bits)
        assert.are.equal(128, assert(ip.parse_cidr("1.2.3.4/32")).bits)
        assert.are.equal(96 + 13, assert(ip.parse_cidr("10.8.0.0/13")).bits)
    end)

    it("reads IPv6 CIDRs", function()
        assert.are.equal(0, assert(ip.parse_cidr("::/0")).bits)
        assert.are.equal(128, assert(ip.parse_cidr("::1/128")).bits)
        assert.are.equal(65, assert(ip.parse_cidr("2001:db8::/65")).bits)
        assert.are.equal(8, assert(ip.parse_cidr("fd00::/8")).bits)
    end)

    it("takes a bare address as a single-host network", function()
        assert.are.equal(128, assert(ip.parse_cidr("1.2.3.4")).bits)
        assert.are.equal(128, assert(ip.parse_cidr("::1")).bits)
        assert.are.equal(128, assert(ip.parse_cidr(" 10.0.0.1 ")).bits)
    end)

    it("refuses prefixes too long for the family", function()
        for _, s in ipairs({ "1.2.3.4/33", "0.0.0.0/64", "::/129", "::1/200" }) do
            local n, err = ip.parse_cidr(s)
            assert.is_nil(n, s)
            assert.matches("bad prefix length", err, 1, true)
        end
    end)

    it("refuses malformed CIDRs with a message naming the input", function()
        for _, s in ipairs({ "1.2.3.4/", "1.2.3.4/-1", "1.2.3.4/x", "1.2.3.4/8/9", "/8", "abc/8",
            "300.0.0.0/8", "10.0.0.0 /8", "", "1.2.3.4 5.6.7.8" }) do
            local n, err = ip.parse_cidr(s)
            assert.is_nil(n, s)
            assert.is_string(err)
        end
        local _, err = ip.parse_cidr("nonsense/8")
        assert.matches("nonsense/8", err, 1, true)
    end)
end)

describe("sp.ip.ranges", function()
    it("matches IPv4 networks of any prefix length", function()
        local r = ranges({ "10.8.0.0/13" }) -- 10.8.0.0 - 10.15.255.255
        assert.is_true(r:contains("10.8.0.0"))
        assert.is_true(r:contains("10.12.34.56"))
        assert.is_true(r:contains("10.15.255.255"))
        assert.is_false(r:contains("10.16.0.0"))
        assert.is_false(r:contains("10.7.255.255"))
        assert.is_false(r:contains("11.8.0.0"))

        r = ranges({ "192.168.1.128/25" })
        assert.is_true(r:contains("192.168.1.128"))
        assert.is_true(r:contains("192.168.1.255"))
        assert.is_false(r:contains("192.168.1.127"))

        r = ranges({ "172.16.0.0/12" })
        assert.is_true(r:contains("172.31.255.255"))
        assert.is_false(r:contains("172.32.0.0"))
    end)

    it("matches exactly one host with /32 and /128", function()
        local r = ranges({ "1.2.3.4/32", "2001:db8::7/128" })
        assert.is_true(r:contains("1.2.3.4"))
        assert.is_false(r:contains("1.2.3.5"))
        assert.is_false(r:contains("1.2.3.3"))
        assert.is_true(r:contains("2001:db8::7"))
        assert.is_false(r:contains("2001:db8::6"))
        assert.is_false(r:contains("2001:db8::8"))
    end)

    it("with 0.0.0.0/0 matches every IPv4 address and no IPv6 one", function()
        local r = ranges({ "0.0.0.0/0" })
        assert.is_true(r:contains("0.0.0.0"))
        assert.is_true(r:contains("255.255.255.255"))
        assert.is_true(r:contains("::ffff:8.8.8.8"))
        assert.is_false(r:contains("::1"))
        assert.is_false(r:contains("2001:db8::1"))
    end)

    it("with ::/0 matches everything", function()
        local r = ranges({ "::/0" })
        assert.is_true(r:contains("::"))
        assert.is_true(r:contains("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))
        assert.is_true(r:contains("1.2.3.4"))
    end)

    it("matches IPv6 networks with prefixes off the 16-bit and 8-bit boundaries", function()
        local r = ranges({ "2001:db8::/65" })
        assert.is_true(r:contains("2001:db8::"))
        assert.is_true(r:contains("2001:db8:0:0:7fff:ffff:ffff:ffff"))
        assert.is_false(r:contains("2001:db8:0:0:8000::"))
        assert.is_false(r:contains("2001:db8:0:1::"))

        r = ranges({ "fd00::/7" })
        assert.is_true(r:contains("fc00::1"))
        assert.is_true(r:contains("fdff::1"))
        assert.is_false(r:contains("fe00::1"))
        assert.is_false(r:contains("fb00::1"))
    end)

    it("treats IPv4-mapped IPv6 addresses as the IPv4 address (both ways)", function()
        local r = ranges({ "10.0.0.0/8" })
        assert.is_true(r:contains("::ffff:10.1.2.3"))
        assert.is_true(r:contains("::ffff:a01:203"))
        assert.is_false(r:contains("::ffff:11.1.2.3"))
        -- an IPv4 network written as a mapped IPv6 CIDR
        r = ranges({ "::ffff:10.0.0.0/104" })
        assert.is_true(r:contains("10.200.0.1"))
        assert.is_false(r:contains("11.0.0.1"))
        -- all of IPv4
        r = ranges({ "::ffff:0:0/96" })
        assert.is_true(r:contains("1.2.3.4"))
        assert.is_false(r:contains("::1"))
    end)

    it("does not confuse IPv4-compatible ::a.b.c.d with the IPv4 address", function()
        local r = ranges({ "1.2.3.4/32" })
        assert.is_false(r:contains("::1.2.3.4"))
    end)

    it("compares the prefix only (host bits in the network are ignored)", function()
        local r = ranges({ "10.1.2.3/8" })
        assert.is_true(r:contains("10.200.200.200"))
    end)

    it("matches any of several networks", function()
        local r = ranges({ "10.0.0.0/8", "192.168.0.0/16", "::1" })
        assert.is_true(r:contains("10.0.0.1"))
        assert.is_true(r:contains("192.168.5.5"))
        assert.is_true(r:contains("::1"))
        assert.is_false(r:contains("172.16.0.1"))
        assert.is_false(r:contains("::2"))
    end)

    it("matches nothing when empty (also for nil)", function()
        assert.is_false(ranges({}):contains("1.2.3.4"))
        assert.is_false(ranges(nil):contains("::1"))
        assert.are.equal(0, #ranges({}))
    end)

    it("answers false for addresses that do not parse", function()
        local r = ranges({ "::/0", "0.0.0.0/0" })
        assert.is_false(r:contains("garbage"))
        assert.is_false(r:contains(""))
        assert.is_false(r:contains(nil))
        assert.is_false(r:contains("1.2.3.4:80"))
    end)

    it("refuses a list with an invalid entry, naming it", function()
        local r, err = ip.ranges({ "10.0.0.0/8", "10.0.0.0/40" })
        assert.is_nil(r)
        assert.matches("10.0.0.0/40", err, 1, true)
        r, err = ip.ranges({ "localhost" })
        assert.is_nil(r)
        assert.matches("localhost", err, 1, true)
    end)
end)

describe("sp.ip.client_address", function()
    local trusted = ranges({ "127.0.0.0/8", "10.0.0.0/8", "::1/128" })

    it("is the peer when nothing is trusted", function()
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", "1.1.1.1", nil))
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", "1.1.1.1", ranges({})))
    end)

    it("is the peer when the peer is not a trusted proxy (X-Forwarded-For ignored)", function()
        assert.are.equal("8.8.8.8", ip.client_address("8.8.8.8", "1.1.1.1", trusted))
        assert.are.equal("2001:db8::5", ip.client_address("2001:db8::5", "1.1.1.1", trusted))
    end)

    it("is the peer without an X-Forwarded-For", function()
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", nil, trusted))
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", "", trusted))
    end)

    it("is the X-Forwarded-For address from a trusted peer", function()
        assert.are.equal("1.1.1.1", ip.client_address("127.0.0.1", "1.1.1.1", trusted))
        assert.are.equal("1.1.1.1", ip.client_address("10.2.3.4", "  1.1.1.1  ", trusted))
        assert.are.equal("2001:db8::1", ip.client_address("::1", "2001:db8::1", trusted))
        assert.are.equal("1.1.1.1", ip.client_address("::ffff:127.0.0.1", "1.1.1.1", trusted))
    end)

    it("takes the right-most untrusted hop of a chain (earlier hops can be forged)", function()
        assert.are.equal("2.2.2.2", ip.client_address("127.0.0.1", "1.1.1.1, 2.2.2.2", trusted))
        assert.are.equal("2.2.2.2",
            ip.client_address("127.0.0.1", "6.6.6.6,2.2.2.2, 10.0.0.9 ,127.0.0.5", trusted))
        assert.are.equal("1.1.1.1", ip.client_address("127.0.0.1", "1.1.1.1,\t10.0.0.1", trusted))
    end)

    it("takes the left-most hop when every hop is trusted", function()
        assert.are.equal("10.0.0.1", ip.client_address("127.0.0.1", "10.0.0.1, 10.0.0.2", trusted))
        assert.are.equal("127.0.0.9", ip.client_address("127.0.0.1", "127.0.0.9", trusted))
    end)

    it("falls back to the peer when the chain has garbage before an untrusted hop", function()
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", "not-an-ip", trusted))
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", "1.1.1.1, garbage", trusted))
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", "1.1.1.1, 10.0.0.1, x", trusted))
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", "1.2.3.4:5678", trusted))
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", " , ", trusted))
        assert.are.equal("127.0.0.1", ip.client_address("127.0.0.1", "unknown", trusted))
        -- garbage to the left of the right-most untrusted hop is never looked at
        assert.are.equal("1.1.1.1", ip.client_address("127.0.0.1", "garbage, 1.1.1.1", trusted))
    end)
end)
