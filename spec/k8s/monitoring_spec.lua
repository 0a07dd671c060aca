-- The Grafana dashboard and the Prometheus alert rules of k8s/overlays/prometheus/ use only
-- metrics the proxy really exports: every metric name in every panel expression, template
-- query and alert expression must be the name of a sample in a live /metrics scrape (served on
-- metrics_listen, as in that overlay) after real traffic through the proxy and a Kubernetes
-- watch. The PromQL is reduced to its metric names by a small tokenizer (checked first on
-- expressions with functions, keywords, label matchers, durations, grouping clauses and
-- template variables), and the check is shown to fail on a misspelled name.
-- Files are read directly (cjson for the dashboard, lyaml -- Debian lua-yaml -- for the rules):
-- no kubectl needed.
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local prom = require "spec.helpers.prometheus"
local process = require "spec.helpers.process"
local http = require "spec.helpers.http"
local net = require "spec.helpers.net"
local cjson = require "cjson"
local lyaml = require "lyaml"

local DIR = "k8s/overlays/prometheus/"

local function set(list)
    local s = {}
    for _, v in ipairs(list) do
        s[v] = true
    end
    return s
end

-- PromQL functions and aggregation operators (an identifier followed by "(").
local FUNCTIONS = set{ "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "count", "count_over_time",
    "count_values", "day_of_month", "day_of_week", "delta", "deriv", "exp", "floor", "group",
    "histogram_quantile", "holt_winters", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2", "max", "max_over_time", "min",
    "min_over_time", "minute", "month", "predict_linear", "present_over_time", "quantile",
    "quantile_over_time", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt",
    "stddev", "stddev_over_time", "stdvar", "stdvar_over_time", "sum", "sum_over_time", "time",
    "timestamp", "topk", "vector", "year" }
-- Clauses whose parenthesised list holds label names, not metrics.
local LABEL_LISTS = set{ "by", "without", "on", "ignoring", "group_left", "group_right" }
-- Other keywords and literals.
local KEYWORDS = set{ "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2" }

-- The index just past the quoted string that starts at i (backslash escapes inside).
local function skip_string(s, i)
    local q = s:sub(i, i)
    local j = i + 1
    while j <= #s and s:sub(j, j) ~= q do
        j = j + (s:sub(j, j) == "\\" and 2 or 1)
    end
    assert(j <= #s, "unterminated string in: " .. s)
    return j + 1
end

-- The index just past the bracketed group that starts at i (open, close: its brackets),
-- skipping quoted strings inside.
local function skip_group(s, i, open, close)
    local depth = 0
    while i <= #s do
        local c = s:sub(i, i)
        if c == '"' or c == "'" or c == "`" then
            i = skip_string(s, i) - 1
        elseif c == open then
            depth = depth + 1
        elseif c == close then
            depth = depth - 1
            if depth == 0 then
                return i + 1
            end
        end
        i = i + 1
    end
    error("unbalanced " .. open .. close .. " in: " .. s)
end

-- The metric names an expression selects, in order of appearance (duplicates kept).
local function metric_names(expr)
    local names = {}
    local i, n = 1, #expr
    while i <= n do
        local c = expr:sub(i, i)
        if c == '"' or c == "'" or c == "`" then
            i = skip_string(expr, i) -- a string literal
        elseif c == "{" then
            i = skip_group(expr, i, "{", "}") -- label matchers
        elseif c == "[" then
            i = skip_group(expr, i, "[", "]") -- a range or subquery: durations, variables
        elseif c == "$" then
            -- a Grafana variable: ${name}, ${name:fmt} or $name
            i = expr:sub(i + 1, i + 1) == "{" and skip_group(expr, i + 1, "{", "}")
                or (expr:find("[^%w_]", i + 1) or n + 1)
        elseif c:match("%d") or (c == "." and expr:sub(i + 1, i + 1):match("%d")) then
            i = expr:find("[^%w%.]", i) or n + 1 -- a number or a duration (5m, 1e6, 0x1f)
        elseif c:match("[%a_:]") then
            local j = expr:find("[^%w_:]", i) or n + 1
            local word = expr:sub(i, j - 1)
            local k = expr:find("%S", j) or n + 1
            local paren = expr:sub(k, k) == "("
            if LABEL_LISTS[word] then
                i = paren and skip_group(expr, k, "(", ")") or j
            elseif FUNCTIONS[word] then
                i = j -- (also an aggregation before its clause: sum by (x) (...))
            elseif paren then
                error("unknown PromQL function " .. word .. " in: " .. expr)
            elseif KEYWORDS[word:lower()] then
                i = j
            else
                names[#names + 1] = word
                i = j
            end
        else
            i = i + 1
        end
    end
    return names
end

-- Every expression of the dashboard (panel targets, nested panels, template queries), as
-- { where, expr }.
local function dashboard_exprs(dash)
    local out = {}
    local function walk(panels)
        for _, p in ipairs(panels or {}) do
            for _, t in ipairs(p.targets or {}) do
                if t.expr then
                    out[#out + 1] = { "panel " .. p.title .. " " .. t.refId, t.expr }
                end
            end
            walk(p.panels)
        end
    end
    walk(dash.panels)
    for _, v in ipairs((dash.templating or {}).list or {}) do
        local q = type(v.query) == "table" and v.query.query or v.definition
        if v.type == "query" and type(q) == "string" then
            -- label_values(selector, label): the selector is PromQL, the label is not
            local sel = q:match("^%s*label_values%((.*),%s*[%a_][%w_]*%s*%)%s*$")
            out[#out + 1] = { "variable " .. v.name, sel or q }
        end
    end
    return out
end

local function rule_exprs(doc)
    local out = {}
    for _, g in ipairs(doc.spec.groups) do
        for _, r in ipairs(g.rules) do
            out[#out + 1] = { "rule " .. (r.alert or r.record), r.expr }
        end
    end
    return out
end

-- The names used by exprs that no sample of the exposition has, as "where: name" lines.
local function missing(exprs, exp)
    local have = {}
    for _, s in ipairs(exp.samples) do
        have[s.name] = true
    end
    local out = {}
    for _, e in ipairs(exprs) do
        local names = metric_names(e[2])
        if #names == 0 then
            out[#out + 1] = e[1] .. ": no metric at all in " .. e[2]
        end
        for _, name in ipairs(names) do
            if not have[name] then
                out[#out + 1] = e[1] .. ": " .. name
            end
        end
    end
    return out
end

describe("the PromQL tokenizer", function()
    it("keeps metric names and skips functions, keywords, matchers, durations and clauses",
        function()
        assert.are.same({ "a_total" }, metric_names(
            'sum by (code, le) (rate(a_total{job=~"$job",code=~"5xx|none"}[$__rate_interval]))'))
        assert.are.same({ "x", "y_total" }, metric_names(
            "histogram_quantile(0.99, sum without(pod) (rate(x[5m] offset 1h))) / on(ns) "
            .. "group_left(pod) y_total > bool 5 * 1024 and vector(1)"))
        assert.are.same({ "m:recorded", "m:recorded" }, metric_names(
            'max(m:recorded{a="sum(b)", c=\'{d}\'}) '
            .. "unless absent(m:recorded) or 1e3 < .5"))
        assert.are.same({ "z" }, metric_names('min by (pod) (z{job=~"${job:regex}"}) == 0'))
        assert.are.same({}, metric_names("vector(1) + time()"))
        assert.has_error(function() metric_names("frobnicate(x)") end)
    end)

    it("finds the names the dashboard's variables and a label_values query select", function()
        local out = dashboard_exprs{ panels = { { title = "r", panels = {
            { title = "p", targets = { { refId = "A", expr = "rate(a[1m])" } } } } } },
            templating = { list = { { name = "job", type = "query",
                query = { query = "label_values(b{x=\"1\"}, job)" } } } } }
        assert.are.same({ "a" }, metric_names(out[1][2]))
        assert.are.same({ "b" }, metric_names(out[2][2]))
    end)
end)

describe("the dashboard and the alert rules", function()
    local dash, rules, exp

    setup(function()
        local function read(file)
            return (assert(process.read_file(H.SOURCE_DIR .. "/" .. DIR .. file)))
        end
        dash = cjson.decode(read("dashboard.json"))
        rules = lyaml.load(read("prometheusrule.yaml"))
        -- a proxy watching a Kubernetes API stand-in, with its metrics on their own listener
        local up = H.upstream{ name = "mon" }
        local api = K.start{}
        api:put(H.sandbox("alice", "box", up.port))
        api:put(H.sandbox("alice", "gone", assert(net.free_port()))) -- nothing listens there
        local mport = assert(net.free_port())
        local px = api:proxy{ set = { metrics_listen = "127.0.0.1:" .. mport } }
        assert(net.wait_port("127.0.0.1", mport, 5))
        -- traffic: proxied answers, a 404, a refused connection (502), a malformed request
        for _ = 1, 5 do
            assert.are.equal(200, assert(px:get("/alice/box/echo")).status)
        end
        assert.are.equal(404, assert(px:get("/alice/nobody/echo")).status)
        assert.are.equal(502, assert(px:get("/alice/gone/echo")).status)
        local c = assert(px:connect{})
        assert(c:send_raw("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            .. "Content-Length: 2\r\n\r\n"))
        assert.are.equal(400, assert(c:read_response{}).status)
        c:close()
        -- the watch has seen an event or a bookmark (the fixture sends one every second)
        local r
        net.wait_until(function()
            r = assert(http.request{ port = mport, path = "/metrics" })
            return r.body:find("\nsandbox_proxy_watch_seconds_since_event ", 1, true)
        end, 10, 0.1, "a watch event or bookmark")
        exp = prom.assert_parse(r.body)
        assert.are.equal(1, prom.value(exp, "sandbox_proxy_watch_synced"))
        assert.is_true(prom.sum(exp, "sandbox_proxy_requests_total", { code = "2xx" }) >= 5)
        assert.are.equal(1, prom.value(exp, "sandbox_proxy_upstream_connect_errors_total"))
        -- the five proxied answers were timed (one connection, pooled after)
        assert.are.equal(5, prom.value(exp, "sandbox_proxy_upstream_first_byte_seconds_count"))
        assert.is_true(prom.value(exp, "sandbox_proxy_upstream_connect_seconds_count") >= 1)
    end)

    teardown(function()
        H.stop_all()
    end)

    it("use only metric names a live /metrics exports (dashboard panels and variables)", function()
        local exprs = dashboard_exprs(dash)
        assert.is_true(#exprs >= 20, "expected the dashboard's panels, found " .. #exprs)
        assert.are.same({}, missing(exprs, exp))
    end)

    it("use only metric names a live /metrics exports (alert rules)", function()
        local exprs = rule_exprs(rules)
        assert.is_true(#exprs >= 4)
        assert.are.same({}, missing(exprs, exp))
    end)

    it("alert on the watch, the error ratio, p99 latency and wake failures", function()
        local by_name = {}
        for _, g in ipairs(rules.spec.groups) do
            for _, r in ipairs(g.rules) do
                by_name[r.alert] = r.expr
                assert.is_truthy(r.labels.severity, r.alert)
                assert.is_truthy(r.annotations.summary, r.alert)
            end
        end
        assert.matches("sandbox_proxy_watch_synced", by_name.SandboxProxyWatchNotSynced)
        assert.matches("sandbox_proxy_requests_total", by_name.SandboxProxyHighErrorRatio)
        assert.matches("histogram_quantile%(0%.99,.*sandbox_proxy_request_duration_seconds_bucket",
            (by_name.SandboxProxyHighLatencyP99:gsub("%s+", " ")))
        assert.matches("sandbox_proxy_wake_failures_total", by_name.SandboxProxyWakeFailures)
    end)

    it("show sandbox connect and first-byte times (the upstream histograms)", function()
        local used = {}
        for _, e in ipairs(dashboard_exprs(dash)) do
            for _, name in ipairs(metric_names(e[2])) do
                used[name] = (used[name] or "") .. e[1] .. "; "
            end
        end
        for _, h in ipairs({ "sandbox_proxy_upstream_connect_seconds",
            "sandbox_proxy_upstream_first_byte_seconds" }) do
            assert.is_truthy(used[h .. "_bucket"], "no dashboard panel uses " .. h)
            assert.are.equal("histogram", exp.families[h].type)
        end
        local alerts = {}
        for _, e in ipairs(rule_exprs(rules)) do
            alerts[#alerts + 1] = e[2]
        end
        assert.matches("sandbox_proxy_upstream_connect_seconds_bucket", table.concat(alerts, "\n"))
    end)

    it("would fail on a misspelled metric (the check itself can fail)", function()
        local exprs = dashboard_exprs(dash)
        local bad = exprs[1][2]:gsub("sandbox_proxy_requests_total", "sandbox_proxy_request_total")
        assert.are_not.equal(exprs[1][2], bad)
        assert.are.same({ exprs[1][1] .. ": sandbox_proxy_request_total" },
            missing({ { exprs[1][1], bad } }, exp))
        -- and an alert that lost its metric entirely
        assert.are.equal(1, #missing({ { "rule x", "vector(1) > 0" } }, exp))
    end)
end)
