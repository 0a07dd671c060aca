-- metrics.lua: the exposition must pass a strict Prometheus text-format 0.0.4 parser
-- (spec/helpers/prometheus.lua, itself checked here against invalid input first), and its
-- values must come from the route table, the shared dicts and core.stats().
local prom = require "spec.helpers.prometheus"
local testkit = require "sp.testkit"
local shared = require "sp.shared"
local core = require "sp.core"
local cjson = require "cjson"
local metrics = require "metrics"

local sp_dict = assert(shared.dict("sp"))

local VALID = table.concat({
    "# HELP a_total A counter with \\\\ and \\n in its help.",
    "# TYPE a_total counter",
    'a_total{code="2xx",method="GET"} 3',
    'a_total{code="4xx",method="GET"} 1e+06',
    "# TYPE g gauge",
    "g -1.5",
    "# TYPE h histogram",
    'h_bucket{le="0.1"} 1',
    'h_bucket{le="1"} 2',
    'h_bucket{le="+Inf"} 2',
    "h_sum 0.7",
    "h_count 2",
    "# TYPE s summary",
    's{quantile="0.5"} 1',
    "s_sum 3",
    "s_count 2",
    "# TYPE l gauge",
    'l{v="q\\"b\\\\n\\n"} NaN 1700000000000',
    "",
}, "\n")

local function invalid(text, why)
    local exp, err = prom.parse(text)
    assert.is_nil(exp, "accepted: " .. why)
    assert.is_string(err)
    return err
end

describe("the strict Prometheus parser (spec/helpers/prometheus.lua)", function()
    it("accepts a valid exposition and reads it", function()
        local exp = assert(prom.parse(VALID))
        assert.are.equal("counter", exp.families.a_total.type)
        assert.are.equal("A counter with \\ and \n in its help.", exp.families.a_total.help)
        assert.are.equal(3, prom.value(exp, "a_total", { method = "GET", code = "2xx" }))
        assert.are.equal(1e6, prom.value(exp, "a_total", { method = "GET", code = "4xx" }))
        assert.are.equal(1000003, prom.sum(exp, "a_total", { method = "GET" }))
        assert.are.equal(-1.5, prom.value(exp, "g"))
        assert.are.equal(2, prom.value(exp, "h_count"))
        local nan = prom.value(exp, "l", { v = 'q"b\\n\n' })
        assert.is_true(nan ~= nan)
        assert.is_nil(prom.value(exp, "a_total", { method = "GET" }))
    end)

    it("refuses what the format forbids", function()
        local T = "# TYPE x counter\n"
        invalid("# TYPE x counter\nx 1", "no final newline")
        invalid("x 1\n", "a sample without TYPE")
        invalid(T .. "x{a=\"1\"} 1\n# TYPE y gauge\ny 1\nx{a=\"2\"} 1\n", "an interleaved family")
        invalid(T .. "x 1\n# HELP x late\n", "HELP after the samples")
        invalid(T .. "# TYPE x gauge\nx 1\n", "two TYPE lines")
        invalid("# HELP x a\n# HELP x b\n" .. T .. "x 1\n", "two HELP lines")
        invalid("# TYPE x countr\nx 1\n", "an unknown type")
        invalid("# HELP x bad \\t escape\n" .. T .. "x 1\n", "a bad HELP escape")
        invalid("# TYPE 1x counter\n1x 1\n", "a bad metric name")
        invalid("# TYPE x-y counter\nx-y 1\n", "a dash in a metric name")
        invalid(T .. "x{1a=\"v\"} 1\n", "a bad label name")
        invalid(T .. "x{__a=\"v\"} 1\n", "a reserved label name")
        invalid(T .. "x{a=\"v\",a=\"w\"} 1\n", "a repeated label")
        invalid(T .. "x{a=\"v\\t\"} 1\n", "a bad label escape")
        invalid(T .. "x{a=\"v\"\"} 1\n", "an unescaped quote in a label value")
        invalid(T .. "x{a=\"v} 1\n", "an unterminated label value")
        invalid(T .. "x{a=v} 1\n", "an unquoted label value")
        invalid(T .. "x{a=\"v\" b=\"w\"} 1\n", "labels without a comma")
        invalid(T .. "x one\n", "a bad value")
        invalid(T .. "x 0x10\n", "a hex value")
        invalid(T .. "x\n", "no value")
        assert(prom.parse(T .. "x{ a = \"1\" , b=\"2\", }  1\t 17\n"), "blanks between tokens")
        invalid(T .. "x 1 1.5\n", "a float timestamp")
        invalid(T .. "x 1 2 3\n", "trailing fields")
        invalid(T .. "x 1\nx 2\n", "a duplicate series")
        invalid(T .. "x{a=\"1\",b=\"2\"} 1\nx{b=\"2\",a=\"1\"} 2\n", "a duplicate series, reordered")
        invalid(T .. "x -1\n", "a negative counter")
        invalid(T .. "x NaN\n", "a NaN counter")
        invalid(T .. "x 1\r\n", "a carriage return")
        invalid(T .. "x{le=\"1\"} 1\n", "le outside a histogram")
        invalid("# TYPE h histogram\nh 1\n", "a bare histogram sample")
        invalid("# TYPE s summary\ns_bucket{le=\"1\"} 1\ns_sum 1\ns_count 1\n", "a summary bucket")
        invalid("# TYPE s summary\ns{quantile=\"2\"} 1\ns_sum 1\ns_count 1\n", "a quantile > 1")
        invalid("# TYPE s summary\ns{quantile=\"0.5\"} 1\ns_count 1\n", "a summary without _sum")
    end)

    it("refuses broken histograms", function()
        local H = "# TYPE h histogram\n"
        local function hist(lines)
            return H .. table.concat(lines, "\n") .. "\n"
        end
        invalid(hist{ 'h_bucket{le="1"} 1', 'h_sum 1', 'h_count 1' }, "no +Inf bucket")
        invalid(hist{ 'h_bucket{le="1"} 2', 'h_bucket{le="+Inf"} 1', 'h_sum 1', 'h_count 1' },
            "non-cumulative buckets")
        invalid(hist{ 'h_bucket{le="2"} 1', 'h_bucket{le="1"} 1', 'h_bucket{le="+Inf"} 1',
            'h_sum 1', 'h_count 1' }, "unsorted buckets")
        invalid(hist{ 'h_bucket{le="+Inf"} 2', 'h_sum 1', 'h_count 3' }, "_count != +Inf bucket")
        invalid(hist{ 'h_bucket{le="+Inf"} 2', 'h_count 2' }, "no _sum")
        invalid(hist{ 'h_bucket{le="+Inf"} 2', 'h_sum 2' }, "no _count")
        invalid(hist{ 'h_bucket{le="x"} 1', 'h_bucket{le="+Inf"} 1', 'h_sum 1', 'h_count 1' },
            "a bad le")
        invalid(hist{ 'h_bucket 1', 'h_sum 1', 'h_count 1' }, "a bucket without le")
        invalid(hist{ 'h_bucket{le="+Inf"} -1', 'h_sum 1', 'h_count -1' }, "a negative bucket")
        invalid(hist{ 'h_bucket{le="1",a="x"} 1', 'h_bucket{le="+Inf",a="x"} 1', 'h_sum{a="x"} 1',
            'h_count{a="x"} 1', 'h_bucket{le="+Inf",a="y"} 1', 'h_count{a="y"} 1' },
            "one label set without _sum")
        assert(prom.parse(hist{ 'h_bucket{le="1",a="x"} 1', 'h_bucket{le="+Inf",a="x"} 1',
            'h_sum{a="x"} 1', 'h_count{a="x"} 1', 'h_bucket{le="+Inf",a="y"} 0', 'h_sum{a="y"} 0',
            'h_count{a="y"} 0' }))
    end)
end)

describe("metrics.lua", function()
    before_each(function()
        testkit.clear_routes()
        sp_dict:delete("m:ratelimited")
        sp_dict:delete("m:concurrency_limited")
        sp_dict:delete("source")
    end)

    after_each(function()
        testkit.clear_routes()
        sp_dict:delete("m:ratelimited")
        sp_dict:delete("m:concurrency_limited")
        sp_dict:delete("source")
    end)

    it("renders an exposition that passes the strict parser", function()
        local exp = prom.assert_parse(metrics.render())
        for _, name in ipairs({ "sandbox_proxy_requests_total",
            "sandbox_proxy_request_duration_seconds", "sandbox_proxy_upstream_connect_errors_total",
            "sandbox_proxy_upstream_timeouts_total", "sandbox_proxy_ratelimited_total",
            "sandbox_proxy_open_connections", "sandbox_proxy_open_tunnels",
            "sandbox_proxy_active_requests", "sandbox_proxy_routes", "sandbox_proxy_watch_synced",
            "sandbox_proxy_watch_relists_total", "sandbox_proxy_script_errors_total",
            "sandbox_proxy_parse_errors_total", "sandbox_proxy_accesslog_dropped_total",
            "sandbox_proxy_shared_dict_evictions_total", "sandbox_proxy_shared_dict_used_bytes",
            "sandbox_proxy_lua_memory_bytes" }) do
            assert.is_table(exp.families[name], name)
            assert.is_string(exp.families[name].help, name)
        end
        assert.are.equal("histogram", exp.families.sandbox_proxy_request_duration_seconds.type)
        assert.are.equal("counter", exp.families.sandbox_proxy_requests_total.type)
        assert.are.equal("gauge", exp.families.sandbox_proxy_open_tunnels.type)
    end)

    it("counts routes by ready state", function()
        testkit.set_routes{
            ["alice/a"] = { address = "10.0.0.1" },
            ["alice/b"] = { address = "10.0.0.2" },
            ["bob/c"] = { ready = false },
        }
        local exp = prom.assert_parse(metrics.render())
        assert.are.equal(2, prom.value(exp, "sandbox_proxy_routes", { ready = "true" }))
        assert.are.equal(1, prom.value(exp, "sandbox_proxy_routes", { ready = "false" }))
        testkit.clear_routes()
        exp = prom.assert_parse(metrics.render())
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_routes", { ready = "true" }))
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_routes", { ready = "false" }))
    end)

    it("reads the rate and concurrency refusals from the sp dict", function()
        sp_dict:set("m:ratelimited", 7)
        sp_dict:set("m:concurrency_limited", 2)
        local exp = prom.assert_parse(metrics.render())
        assert.are.equal(7, prom.value(exp, "sandbox_proxy_ratelimited_total", { kind = "rate" }))
        assert.are.equal(2, prom.value(exp, "sandbox_proxy_ratelimited_total", { kind = "concurrency" }))
    end)

    it("reads the Redis store's fallbacks and refusals from the sp dict", function()
        sp_dict:set("m:ratelimit_store_fallbacks", 5)
        sp_dict:set("m:ratelimit_store_refused", 3)
        local exp = prom.assert_parse(metrics.render())
        sp_dict:delete("m:ratelimit_store_fallbacks")
        sp_dict:delete("m:ratelimit_store_refused")
        assert.are.equal(5, prom.value(exp, "sandbox_proxy_ratelimit_store_fallbacks_total"))
        assert.are.equal(3, prom.value(exp, "sandbox_proxy_ratelimited_total", { kind = "store" }))
    end)

    it("reports the sandbox source's state", function()
        local exp = prom.assert_parse(metrics.render())
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_watch_synced"))
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_watch_relists_total"))
        assert.is_nil(exp.families.sandbox_proxy_watch_seconds_since_event)
        sp_dict:set("source", cjson.encode({ synced = true, relists = 3,
            last_event_at = core.now() - 10 }))
        exp = prom.assert_parse(metrics.render())
        assert.are.equal(1, prom.value(exp, "sandbox_proxy_watch_synced"))
        assert.are.equal(3, prom.value(exp, "sandbox_proxy_watch_relists_total"))
        local since = prom.value(exp, "sandbox_proxy_watch_seconds_since_event")
        assert.is_true(since >= 10 and since < 60, tostring(since))
        -- an event "in the future" (clock skew) is never a negative age
        sp_dict:set("source", cjson.encode({ synced = true, last_event_at = core.now() + 100 }))
        exp = prom.assert_parse(metrics.render())
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_watch_seconds_since_event"))
    end)

    it("lists every shared dict, sorted, with its usage", function()
        local exp = prom.assert_parse(metrics.render())
        local names = shared.dicts()
        table.sort(names)
        local listed = {}
        for _, s in ipairs(exp.families.sandbox_proxy_shared_dict_used_bytes.samples) do
            listed[#listed + 1] = s.labels.dict
        end
        assert.are.same(names, listed)
        for _, name in ipairs(names) do
            local st = shared.dict(name):stats()
            assert.are.equal(st.evictions,
                prom.value(exp, "sandbox_proxy_shared_dict_evictions_total", { dict = name }))
        end
    end)

    -- Label values must be escaped (\\ \" \n): a dict name is any string the config's
    -- shared_dicts accepts (e.g. shared_dicts = { ['we"ird\\x'] = "8k" }), and written raw it
    -- would give sandbox_proxy_shared_dict_used_bytes{dict="we"ird\x"} 0, which no Prometheus
    -- parser accepts, so the whole scrape would fail. Expected: {dict="we\"ird\\x"}.
    -- (Given to render() here as a dict list.)
    it("escapes label values (a dict name with a quote, a backslash, a newline)", function()
        local real_dicts, real_dict = shared.dicts, shared.dict
        local odd = 'we"ird\\x\ny'
        shared.dicts = function()
            local l = real_dicts()
            l[#l + 1] = odd
            return l
        end
        shared.dict = function(name)
            if name == odd then
                return { stats = function()
                    return { capacity = 8192, used = 5, count = 1, evictions = 0 }
                end }
            end
            return real_dict(name)
        end
        local ok, text = pcall(metrics.render)
        shared.dicts, shared.dict = real_dicts, real_dict
        assert(ok, text)
        local exp = prom.assert_parse(text)
        assert.are.equal(5, prom.value(exp, "sandbox_proxy_shared_dict_used_bytes", { dict = odd }))
    end)

    -- the request duration and the upstream connect / first-byte histograms
    for _, h in ipairs({ { "sandbox_proxy_request_duration_seconds", "latency_buckets" },
        { "sandbox_proxy_upstream_connect_seconds", "upstream_connect_buckets" },
        { "sandbox_proxy_upstream_first_byte_seconds", "upstream_first_byte_buckets" } }) do
        it("has a cumulative histogram " .. h[1] .. " matching core.stats()", function()
            local st = core.stats()
            local exp = prom.assert_parse(metrics.render())
            local fam = exp.families[h[1]]
            local buckets = {}
            for _, s in ipairs(fam.samples) do
                if s.suffix == "_bucket" then
                    buckets[#buckets + 1] = s
                end
            end
            assert.is_true(#st[h[2]] >= 10)
            assert.are.equal(#st[h[2]], #buckets)
            local cum = 0
            for i, b in ipairs(st[h[2]]) do
                cum = cum + b[2]
                assert.are.equal(cum, buckets[i].value)
                if b[1] == "+Inf" then
                    assert.are.equal("+Inf", buckets[i].labels.le)
                else
                    assert.are.equal(b[1], tonumber(buckets[i].labels.le))
                end
            end
            assert.are.equal(cum, prom.value(exp, h[1] .. "_count"))
        end)
    end

    it("bounds the upstream histograms by the sandbox timeouts", function()
        local st = core.stats()
        local connect, first = st.upstream_connect_buckets, st.upstream_first_byte_buckets
        -- sub-millisecond connects resolved; the last finite bound covers connect_timeout (5 s)
        assert.are.equal(0.00025, connect[1][1])
        assert.are.equal(5, connect[#connect - 1][1])
        -- the last finite first-byte bound is first_byte_timeout (180 s)
        assert.are.equal(180, first[#first - 1][1])
    end)

    it("renders the runtime's counters (core.stats) faithfully", function()
        local real_stats = core.stats
        core.stats = function()
            local st = real_stats()
            st.by_method = {
                GET = { 0, 5, 0, 2, 1, none = 1 },
                POST = { 0, 1, 0, 0, 0, none = 0 },
                PUT = { 0, 0, 0, 0, 0, none = 0 },
            }
            st.latency_buckets = { { 0.001, 2 }, { 0.0025, 0 }, { 0.01, 3 }, { "+Inf", 1 } }
            st.latency_sum = 0.123456789
            st.upstream_connect_buckets = { { 0.00025, 4 }, { 0.0005, 1 }, { 5, 2 }, { "+Inf", 0 } }
            st.upstream_connect_sum = 1.5
            st.upstream_first_byte_buckets = { { 0.001, 0 }, { 0.5, 3 }, { 180, 1 }, { "+Inf", 2 } }
            st.upstream_first_byte_sum = 400.25
            st.upstream_connect_errors = 4
            st.upstream_timeouts = 5
            st.script_errors = 6
            st.parse_errors = 7
            st.accesslog_dropped = 8
            st.active_requests = 2
            st.open_connections = 3
            st.open_tunnels = 1
            st.lua_memory = 2 ^ 53
            return st
        end
        local ok, text = pcall(metrics.render)
        core.stats = real_stats
        assert(ok, text)
        local exp = prom.assert_parse(text)
        local T = "sandbox_proxy_requests_total"
        local reqs = {}
        for _, s in ipairs(exp.families[T].samples) do
            reqs[#reqs + 1] = s.labels.method .. " " .. s.labels.code .. " " .. s.value
        end
        table.sort(reqs)
        -- classes with no request are left out
        assert.are.same({ "GET 2xx 5", "GET 4xx 2", "GET 5xx 1", "GET none 1", "POST 2xx 1" }, reqs)
        local H = "sandbox_proxy_request_duration_seconds"
        assert.are.equal(2, prom.value(exp, H .. "_bucket", { le = "0.001" }))
        assert.are.equal(2, prom.value(exp, H .. "_bucket", { le = "0.0025" }))
        assert.are.equal(5, prom.value(exp, H .. "_bucket", { le = "0.01" }))
        assert.are.equal(6, prom.value(exp, H .. "_bucket", { le = "+Inf" }))
        assert.are.equal(6, prom.value(exp, H .. "_count"))
        assert.is_true(math.abs(prom.value(exp, H .. "_sum") - 0.123456789) < 1e-6)
        local UC = "sandbox_proxy_upstream_connect_seconds"
        assert.are.equal(4, prom.value(exp, UC .. "_bucket", { le = "0.00025" }))
        assert.are.equal(5, prom.value(exp, UC .. "_bucket", { le = "0.0005" }))
        assert.are.equal(7, prom.value(exp, UC .. "_bucket", { le = "5" }))
        assert.are.equal(7, prom.value(exp, UC .. "_count"))
        assert.are.equal(1.5, prom.value(exp, UC .. "_sum"))
        local UF = "sandbox_proxy_upstream_first_byte_seconds"
        assert.are.equal(0, prom.value(exp, UF .. "_bucket", { le = "0.001" }))
        assert.are.equal(3, prom.value(exp, UF .. "_bucket", { le = "0.5" }))
        assert.are.equal(4, prom.value(exp, UF .. "_bucket", { le = "180" }))
        assert.are.equal(6, prom.value(exp, UF .. "_bucket", { le = "+Inf" }))
        assert.are.equal(6, prom.value(exp, UF .. "_count"))
        assert.are.equal(400.25, prom.value(exp, UF .. "_sum"))
        assert.are.equal(4, prom.value(exp, "sandbox_proxy_upstream_connect_errors_total"))
        assert.are.equal(5, prom.value(exp, "sandbox_proxy_upstream_timeouts_total"))
        assert.are.equal(6, prom.value(exp, "sandbox_proxy_script_errors_total"))
        assert.are.equal(7, prom.value(exp, "sandbox_proxy_parse_errors_total"))
        assert.are.equal(8, prom.value(exp, "sandbox_proxy_accesslog_dropped_total"))
        assert.are.equal(2, prom.value(exp, "sandbox_proxy_active_requests"))
        assert.are.equal(3, prom.value(exp, "sandbox_proxy_open_connections"))
        assert.are.equal(1, prom.value(exp, "sandbox_proxy_open_tunnels"))
        local mem = prom.value(exp, "sandbox_proxy_lua_memory_bytes")
        assert.is_true(math.abs(mem - 2 ^ 53) / 2 ^ 53 < 1e-5, tostring(mem))
    end)

    describe("handle", function()
        it("answers GET with the exposition and its content type", function()
            local req = testkit.request{ target = "/metrics" }
            metrics.handle(req)
            assert.are.equal(200, req.response.status)
            assert.are.equal("text/plain; version=0.0.4; charset=utf-8",
                req.response.headers["Content-Type"])
            prom.assert_parse(req.response.body)
        end)

        it("answers HEAD", function()
            local req = testkit.request{ method = "HEAD", target = "/metrics" }
            metrics.handle(req)
            assert.are.equal(200, req.response.status)
        end)

        it("refuses other methods with 405 and Allow", function()
            for _, m in ipairs({ "POST", "PUT", "DELETE" }) do
                local req = testkit.request{ method = m, target = "/metrics" }
                metrics.handle(req)
                assert.are.equal(405, req.response.status)
                assert.are.equal("GET, HEAD", req.response.headers.Allow)
                assert.are.same({ error = "method not allowed" }, req.response.json)
            end
        end)

        it("is the /metrics endpoint", function()
            assert.are.equal(metrics.handle, metrics.endpoints["/metrics"])
        end)
    end)
end)
