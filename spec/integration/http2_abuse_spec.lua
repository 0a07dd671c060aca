-- HTTP/2 abuse is bounded (nghttp2's limits, set from the proxy's knobs): rapid reset
-- (CVE-2023-44487), CONTINUATION floods, PING and SETTINGS floods, oversized SETTINGS frames and
-- an HPACK bomb. Each attack ends its connection (GOAWAY, then close) or, for the HPACK bomb,
-- its stream (431), and the proxy keeps serving with its memory bounded.
-- spec/fixtures/h2client.py (standard library only, run by the python3 on PATH) sends the raw
-- frames.
local H = require "spec.helpers.proxy"
local cjson = require "cjson"

local H2CLIENT = H.SOURCE_DIR .. "/spec/fixtures/h2client.py"
local ENHANCE_YOUR_CALM, PROTOCOL_ERROR, INTERNAL_ERROR = 11, 1, 2

local function h2client(px, args)
    local f = assert(io.popen(("%s %s --port %d --timeout 10 %s 2>&1"):format(H.PYTHON, H2CLIENT,
        px.port, args)))
    local out = f:read("*a")
    f:close()
    local res = {}
    for line in out:gmatch("[^\n]+") do
        local ok, v = pcall(cjson.decode, line)
        assert(ok, "h2client: " .. out)
        res[#res + 1] = v
    end
    return res
end

describe("HTTP/2 abuse", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "h2abuse" }
        px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) },
            set = { h2_reset_burst = 50, h2_reset_rate = 10, h2_max_outbound_ack = 100 } }
    end)

    teardown(function()
        H.stop_all()
    end)

    local function still_serves()
        local res = h2client(px, "streams --req /a/b/echo")
        assert.is_true(res[1]["end"])
        assert.matches('"target":"/echo"', res[1].body)
    end

    it("ends a connection that opens and resets streams in a rapid loop (CVE-2023-44487)", function()
        local before = up.stats().requests
        local res = h2client(px, "rapid-reset 5000")
        local g = res[#res]
        assert.is_true(g.closed)
        assert.are.equal(INTERNAL_ERROR, g.code) -- nghttp2's answer to the reset rate
        -- the streams the proxy took are bounded by the burst, not the 5000 sent
        assert.is_true(g.goaway < 2 * 5000 / 4, "last stream " .. tostring(g.goaway))
        assert.is_true(up.stats().requests - before < 1000)
        still_serves()
    end)

    it("ends a connection whose header block goes on in CONTINUATION frames", function()
        local g = h2client(px, "continuation 200")[1]
        assert.is_true(g.closed)
        assert.are.equal(PROTOCOL_ERROR, g.code)
        assert.matches("Too many CONTINUATION frames", px:stderr())
        still_serves()
    end)

    it("ends a connection that floods PINGs", function()
        local g = h2client(px, "ping 5000")[1]
        assert.is_true(g.closed)
        assert.are.equal(ENHANCE_YOUR_CALM, g.code)
        still_serves()
    end)

    it("ends a connection that floods SETTINGS", function()
        local g = h2client(px, "settings-flood 5000")[1]
        assert.is_true(g.closed)
        assert.are.equal(ENHANCE_YOUR_CALM, g.code)
        still_serves()
    end)

    it("ends a connection that sends a SETTINGS frame with too many entries", function()
        local g = h2client(px, "settings-entries 100")[1]
        assert.is_true(g.closed)
        assert.are.equal(ENHANCE_YOUR_CALM, g.code)
        still_serves()
    end)

    it("answers 431 to an HPACK bomb without holding its decoded size", function()
        local rss0 = px:rss_kib()
        -- one 4 KB header indexed once, referenced 60,000 times: 240 MB once decoded
        local res = h2client(px, "hpack-bomb 60000")
        assert.is_true(res[1]["end"])
        assert.matches("request header fields too large", res[1].body)
        assert.is_true(px:rss_kib() - rss0 < 32 * 1024)
        still_serves()
    end)
end)
