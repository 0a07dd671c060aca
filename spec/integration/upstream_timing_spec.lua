-- The upstream timing histograms of /metrics, against the real binary and real slow sandboxes
-- (spec/fixtures/upstream.py, run by python3): sandbox_proxy_upstream_first_byte_seconds
-- holds a sandbox's own delay before its answer (GET /delay), counted once per forwarded
-- request; sandbox_proxy_upstream_connect_seconds counts new connections only (a pooled
-- connection is not a connect), holds the waits of refused-connect retries (a sandbox whose
-- port opens late), and is never more than the first-byte time minus the sandbox's delay (the
-- connection was up before the sandbox got the request). Requests the proxy answers itself and
-- failed connects add nothing to either. Lower bounds only: every bound below follows from
-- what the sandbox or the retry schedule did, none from how fast this machine is.
local H = require "spec.helpers.proxy"
local prom = require "spec.helpers.prometheus"

local CONNECT = "sandbox_proxy_upstream_connect_seconds"
local FIRST = "sandbox_proxy_upstream_first_byte_seconds"

local function scrape(px)
    local r = assert(px:get("/metrics"))
    assert.are.equal(200, r.status, r.body)
    return prom.assert_parse(r.body)
end

-- count, sum of a histogram, and the cumulative count of bucket le
local function hist(exp, name, le)
    return prom.value(exp, name .. "_count"), prom.value(exp, name .. "_sum"),
        le and prom.value(exp, name .. "_bucket", { le = le })
end

describe("upstream timing histograms", function()
    teardown(function()
        H.stop_all()
    end)

    it("are exported with no labels but le, empty before any forwarded request", function()
        local up = H.upstream{ name = "t0" }
        local px = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) } }
        local exp = scrape(px)
        for _, name in ipairs({ CONNECT, FIRST }) do
            assert.are.equal("histogram", exp.families[name].type)
            for _, s in ipairs(exp.families[name].samples) do
                for k in pairs(s.labels) do
                    assert.are.equal("le", k, name .. " has label " .. k)
                end
            end
            assert.are.equal(0, prom.value(exp, name .. "_count"))
        end
        -- the proxy's own answers (404, /health) are not upstream exchanges
        assert.are.equal(404, assert(px:get("/alice/nobody/x")).status)
        exp = scrape(px)
        assert.are.equal(0, prom.value(exp, CONNECT .. "_count"))
        assert.are.equal(0, prom.value(exp, FIRST .. "_count"))
    end)

    it("hold a slow sandbox's delay as time to first byte; a pooled request adds no connect",
        function()
        local up = H.upstream{ name = "slow" }
        local px = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) } }
        local r = assert(px:request{ path = "/alice/s/delay?ms=400", timeout = 20 })
        assert.are.equal(200, r.status, r.body)
        local exp = scrape(px)
        local fc, fsum, f_le = hist(exp, FIRST, "0.25")
        local cc, csum = hist(exp, CONNECT)
        assert.are.equal(1, fc)
        assert.is_true(fsum >= 0.4, "first byte " .. fsum .. " s < the sandbox's 0.4 s")
        assert.are.equal(0, f_le) -- not in a bucket below the delay
        assert.are.equal(1, prom.value(exp, FIRST .. "_bucket", { le = "+Inf" }))
        assert.are.equal(1, cc) -- one new connection
        -- connected before the sandbox received the request, which it then held 0.4 s
        assert.is_true(csum <= fsum - 0.4 + 1e-5, ("connect %g, first byte %g"):format(csum, fsum))

        -- the same sandbox again, on the pooled connection: a first byte, no connect
        r = assert(px:request{ path = "/alice/s/delay?ms=300", timeout = 20 })
        assert.are.equal(200, r.status, r.body)
        exp = scrape(px)
        local fc2, fsum2, f_le2 = hist(exp, FIRST, "0.25")
        assert.are.equal(2, fc2)
        assert.is_true(fsum2 - fsum >= 0.3, "second first byte " .. (fsum2 - fsum))
        assert.are.equal(0, f_le2)
        assert.are.equal(1, prom.value(exp, CONNECT .. "_count"))
    end)

    it("hold the retries of a refused connect as connect time", function()
        local port = assert(H.net.free_port()) -- nothing listens there yet: refused
        local px = H.start{ sandboxes = { H.sandbox("alice", "late", port) },
            set = { connect_retries = 8, connect_retry_delay = 0.3, log_level = "debug" } }
        local c = assert(px:connect{ timeout = 30 })
        assert(c:send_raw("GET /alice/late/delay?ms=200 HTTP/1.1\r\nHost: x\r\n\r\n"))
        -- the first connect was refused and a retry is scheduled: only now open the port
        px:wait_log(function(l) return l.msg == "upstream connect refused: retrying" end, 10)
        H.upstream{ name = "late", port = port }
        local r = assert(c:read_response{ timeout = 30 })
        c:close()
        assert.are.equal(200, r.status, r.body)
        local exp = scrape(px)
        local cc, csum, c_le = hist(exp, CONNECT, "0.25")
        local fc, fsum = hist(exp, FIRST)
        assert.are.equal(1, cc) -- the refused attempts are not connections
        -- connected at a retry, at least connect_retry_delay after forwarding began
        assert.is_true(csum >= 0.3, "connect " .. csum .. " s < the 0.3 s retry delay")
        assert.are.equal(0, c_le)
        assert.are.equal(1, fc)
        assert.is_true(fsum >= csum + 0.2 - 1e-5, ("first byte %g, connect %g"):format(fsum, csum))
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_upstream_connect_errors_total"))
    end)

    it("add nothing for a connect that fails", function()
        local port = assert(H.net.free_port()) -- nothing ever listens there
        local px = H.start{ sandboxes = { H.sandbox("alice", "gone", port) },
            set = { connect_retries = 0 } }
        assert.are.equal(502, assert(px:get("/alice/gone/x")).status)
        local exp = scrape(px)
        assert.are.equal(1, prom.value(exp, "sandbox_proxy_upstream_connect_errors_total"))
        assert.are.equal(0, prom.value(exp, CONNECT .. "_count"))
        assert.are.equal(0, prom.value(exp, FIRST .. "_count"))
    end)
end)
