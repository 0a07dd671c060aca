-- A strict parser of the Prometheus text exposition format, version 0.0.4, for specs.
--
--   local prom = require "spec.helpers.prometheus"
--   local exp = assert(prom.parse(text))          -- nil, "line N: reason" when invalid
--   prom.value(exp, "x_total", { code = "2xx" })   -- a sample's value, or nil
--   prom.sum(exp, "x_total", { method = "GET" })   -- the sum over samples matching the labels
--
-- What is enforced (https://prometheus.io/docs/instrumenting/exposition_formats/):
--   * lines end with "\n" (the text too); no "\r"; blank lines are allowed
--   * "# HELP name text" and "# TYPE name type" (type: counter, gauge, histogram, summary,
--     untyped) come before the family's first sample, at most once each per family; HELP text
--     escapes only "\\" and "\n"; other "#" lines are comments
--   * every sample belongs to a family declared by a TYPE line (histogram: name_bucket,
--     name_sum, name_count; summary: name, name_sum, name_count), and a family's lines are
--     one group (no family comes back after another one started)
--   * metric names [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]* not starting
--     with "__", no label twice in a sample (blanks between tokens allowed); label values in double quotes with only the
--     escapes \\ \" \n; values are Go-style floats (also NaN, +Inf, -Inf); an optional
--     integer timestamp
--   * no duplicate series (same name and label set)
--   * counters (and histogram/summary _count, _sum of counters, buckets) are >= 0 and not NaN
--   * histograms: per label set, buckets have a "le" label with a float, sorted by le
--     increasing without repeats, cumulative (non-decreasing), the last one le="+Inf";
--     name_count equals the +Inf bucket and name_sum is present; "le" never elsewhere
--   * summaries: "quantile" labels are floats in [0, 1]; _sum and _count present
local M = {}

local TYPES = { counter = true, gauge = true, histogram = true, summary = true, untyped = true }

local function is_metric_name(s)
    return s:match("^[a-zA-Z_:][a-zA-Z0-9_:]*$") ~= nil
end
M.is_metric_name = is_metric_name

local function is_label_name(s)
    return s:match("^[a-zA-Z_][a-zA-Z0-9_]*$") ~= nil and s:sub(1, 2) ~= "__"
end
M.is_label_name = is_label_name

-- A Go ParseFloat-compatible float, or nil.
local function parse_float(s)
    if s == "NaN" then
        return 0 / 0
    elseif s == "+Inf" or s == "Inf" then
        return math.huge
    elseif s == "-Inf" then
        return -math.huge
    end
    if not (s:match("^[+-]?%d+%.?%d*$") or s:match("^[+-]?%d*%.%d+$")
        or s:match("^[+-]?%d+%.?%d*[eE][+-]?%d+$") or s:match("^[+-]?%d*%.%d+[eE][+-]?%d+$")) then
        return nil
    end
    return tonumber(s)
end
M.parse_float = parse_float

-- Unescapes a HELP docstring; nil if it has an escape other than \\ and \n.
local function unescape_help(s)
    local bad = false
    local out = s:gsub("\\(.?)", function(c)
        if c == "\\" then
            return "\\"
        elseif c == "n" then
            return "\n"
        end
        bad = true
        return ""
    end)
    if bad then
        return nil
    end
    return out
end

-- Parses `{a="x",b="y"}` starting at position i of line (at the "{"). Returns labels (a map),
-- the list of names in order, and the position after "}"; or nil, err.
local function parse_labels(line, i)
    local labels, order = {}, {}
    local function skip_blanks()
        i = line:find("[^ \t]", i) or (#line + 1)
    end
    i = i + 1
    while true do
        skip_blanks()
        local c = line:sub(i, i)
        if c == "}" then
            return labels, order, i + 1
        end
        local name = line:match("^[a-zA-Z_][a-zA-Z0-9_]*", i)
        if not name then
            return nil, "bad label name at column " .. i
        end
        if not is_label_name(name) then
            return nil, "reserved label name " .. name
        end
        if labels[name] then
            return nil, "label " .. name .. " given twice"
        end
        i = i + #name
        skip_blanks()
        if line:sub(i, i) ~= "=" then
            return nil, "expected = after label " .. name
        end
        i = i + 1
        skip_blanks()
        if line:sub(i, i) ~= '"' then
            return nil, "expected a quoted value for label " .. name
        end
        i = i + 1
        local parts = {}
        while true do
            local ch = line:sub(i, i)
            if ch == "" then
                return nil, "unterminated label value for " .. name
            elseif ch == '"' then
                i = i + 1
                break
            elseif ch == "\\" then
                local e = line:sub(i + 1, i + 1)
                if e == "\\" then
                    parts[#parts + 1] = "\\"
                elseif e == '"' then
                    parts[#parts + 1] = '"'
                elseif e == "n" then
                    parts[#parts + 1] = "\n"
                else
                    return nil, "bad escape \\" .. e .. " in label value of " .. name
                end
                i = i + 2
            else
                parts[#parts + 1] = ch
                i = i + 1
            end
        end
        labels[name] = table.concat(parts)
        order[#order + 1] = name
        skip_blanks()
        c = line:sub(i, i)
        if c == "," then
            i = i + 1
        elseif c ~= "}" then
            return nil, "expected , or } after the value of label " .. name
        end
    end
end

-- A canonical key of a label set (sorted), optionally without one label.
local function label_key(labels, without)
    local names = {}
    for k in pairs(labels) do
        if k ~= without then
            names[#names + 1] = k
        end
    end
    table.sort(names)
    local parts = {}
    for _, k in ipairs(names) do
        parts[#parts + 1] = k .. "=" .. string.format("%q", labels[k])
    end
    return table.concat(parts, ",")
end
M.label_key = label_key

-- The family a sample name belongs to, given the declared types.
local function family_of(name, types)
    if types[name] and types[name] ~= "histogram" then
        return name, nil
    end
    for _, suffix in ipairs({ "_bucket", "_sum", "_count" }) do
        if #name > #suffix and name:sub(-#suffix) == suffix then
            local base = name:sub(1, -#suffix - 1)
            local t = types[base]
            if t == "histogram" or (t == "summary" and suffix ~= "_bucket") then
                return base, suffix
            end
        end
    end
    return nil
end

local function check_histograms(fam)
    -- group by label set without "le"
    local groups, order = {}, {}
    for _, s in ipairs(fam.samples) do
        local key = label_key(s.labels, s.suffix == "_bucket" and "le" or nil)
        local g = groups[key]
        if not g then
            g = { buckets = {} }
            groups[key] = g
            order[#order + 1] = key
        end
        if s.suffix == "_bucket" then
            local le = s.labels.le
            if not le then
                return nil, s.name .. ": a bucket without an le label"
            end
            local v = parse_float(le)
            if not v or v ~= v then
                return nil, s.name .. ": le=" .. le .. " is not a float"
            end
            g.buckets[#g.buckets + 1] = { le = v, value = s.value, raw = le }
        elseif s.suffix == "_sum" then
            if s.labels.le then
                return nil, s.name .. ": le label outside a bucket"
            end
            g.sum = s.value
        elseif s.suffix == "_count" then
            if s.labels.le then
                return nil, s.name .. ": le label outside a bucket"
            end
            g.count = s.value
        else
            return nil, s.name .. ": not a histogram sample"
        end
    end
    for _, key in ipairs(order) do
        local g = groups[key]
        local where = fam.name .. "{" .. key .. "}"
        if #g.buckets == 0 then
            return nil, where .. ": no buckets"
        end
        for i, b in ipairs(g.buckets) do
            if i > 1 then
                local p = g.buckets[i - 1]
                if not (b.le > p.le) then
                    return nil, where .. ": buckets not sorted by increasing le (" .. p.raw
                        .. " then " .. b.raw .. ")"
                end
                if b.value < p.value then
                    return nil, where .. ": buckets not cumulative (le=" .. p.raw .. " " .. p.value
                        .. ", le=" .. b.raw .. " " .. b.value .. ")"
                end
            end
            if b.value < 0 or b.value ~= b.value then
                return nil, where .. ": bucket value " .. tostring(b.value)
            end
        end
        local last = g.buckets[#g.buckets]
        if last.le ~= math.huge then
            return nil, where .. ": the last bucket is not le=\"+Inf\""
        end
        if g.count == nil then
            return nil, where .. ": _count missing"
        end
        if g.sum == nil then
            return nil, where .. ": _sum missing"
        end
        if g.count ~= last.value then
            return nil, where .. ": _count " .. g.count .. " differs from the +Inf bucket "
                .. last.value
        end
    end
    return true
end

local function check_summary(fam)
    local seen = {}
    for _, s in ipairs(fam.samples) do
        local key = label_key(s.labels, s.suffix == nil and "quantile" or nil)
        seen[key] = seen[key] or {}
        if s.suffix == nil then
            local q = s.labels.quantile and parse_float(s.labels.quantile)
            if not q or q < 0 or q > 1 then
                return nil, s.name .. ": summary sample without a quantile in [0, 1]"
            end
        else
            if s.labels.quantile then
                return nil, s.name .. ": quantile label on " .. s.suffix
            end
            seen[key][s.suffix] = true
        end
    end
    for key, g in pairs(seen) do
        if not g._sum or not g._count then
            return nil, fam.name .. "{" .. key .. "}: _sum or _count missing"
        end
    end
    return true
end

-- Parses an exposition. Returns { families = { name = { name, type, help, samples } },
-- order = { family names }, samples = { { name, labels, value, family, suffix } } }, or
-- nil, "line N: reason".
function M.parse(text)
    if type(text) ~= "string" then
        return nil, "not a string"
    end
    if text ~= "" and text:sub(-1) ~= "\n" then
        return nil, "the exposition does not end with a newline"
    end
    if text:find("\r", 1, true) then
        return nil, "carriage return in the exposition"
    end
    local families, order, samples = {}, {}, {}
    local types = {}
    local series = {}
    local current -- family whose group is open
    local closed = {} -- families whose group has ended
    local lineno = 0

    local function open_family(name)
        if current == name then
            return true
        end
        if closed[name] then
            return nil, "family " .. name .. " appears again after another family"
        end
        if current then
            closed[current] = true
        end
        current = name
        return true
    end

    local function family(name)
        local f = families[name]
        if not f then
            f = { name = name, samples = {} }
            families[name] = f
            order[#order + 1] = name
        end
        return f
    end

    for line in text:gmatch("([^\n]*)\n") do
        lineno = lineno + 1
        local function fail(msg)
            return nil, ("line %d: %s: %q"):format(lineno, msg, line)
        end
        if line:match("^%s*$") then
            -- blank: ignored
        elseif line:sub(1, 1) == "#" then
            local kw, rest = line:match("^#%s+(%S+)%s*(.*)$")
            if kw == "HELP" or kw == "TYPE" then
                local name, arg = rest:match("^(%S+)%s?(.*)$")
                if not name or not is_metric_name(name) then
                    return fail("bad metric name in " .. kw)
                end
                local ok, err = open_family(name)
                if not ok then
                    return fail(err)
                end
                local f = family(name)
                if #f.samples > 0 then
                    return fail(kw .. " after the family's samples")
                end
                if kw == "HELP" then
                    if f.help then
                        return fail("second HELP for " .. name)
                    end
                    local help = unescape_help(arg)
                    if not help then
                        return fail("bad escape in HELP text")
                    end
                    f.help = help
                else
                    if f.type then
                        return fail("second TYPE for " .. name)
                    end
                    if not TYPES[arg] then
                        return fail("unknown type '" .. arg .. "'")
                    end
                    f.type = arg
                    types[name] = arg
                end
            end
            -- any other comment is ignored
        else
            local name = line:match("^[a-zA-Z_:][a-zA-Z0-9_:]*")
            if not name then
                return fail("bad metric name")
            end
            local i = #name + 1
            local labels, lorder = {}, {}
            if line:sub(i, i) == "{" then
                local l, o, ni = parse_labels(line, i)
                if not l then
                    return fail(o)
                end
                labels, lorder, i = l, o, ni
            end
            local rest = line:sub(i)
            local value_s, ts = rest:match("^[ \t]+([^ \t]+)[ \t]*$")
            if not value_s then
                value_s, ts = rest:match("^[ \t]+([^ \t]+)[ \t]+([^ \t]+)[ \t]*$")
            end
            if not value_s then
                return fail("expected ' value [timestamp]' after the name and labels")
            end
            local value = parse_float(value_s)
            if value == nil then
                return fail("bad value '" .. value_s .. "'")
            end
            if ts and not ts:match("^%-?%d+$") then
                return fail("bad timestamp '" .. ts .. "'")
            end
            local fname, suffix = family_of(name, types)
            if not fname then
                return fail("sample of an undeclared family (no TYPE line)")
            end
            local ok, err = open_family(fname)
            if not ok then
                return fail(err)
            end
            local f = families[fname]
            local ftype = f.type
            if labels.le and not (ftype == "histogram" and suffix == "_bucket") then
                return fail("le label outside a histogram bucket")
            end
            if ftype == "histogram" and suffix == "_bucket" and not labels.le then
                return fail("histogram bucket without le")
            end
            local key = name .. "{" .. label_key(labels) .. "}"
            if series[key] then
                return fail("duplicate series " .. key)
            end
            series[key] = true
            local counterish = ftype == "counter" or (ftype == "histogram")
                or (ftype == "summary" and suffix == "_count")
            if counterish and (value ~= value or value < 0) then
                return fail("a " .. ftype .. " value must be >= 0")
            end
            local s = { name = name, labels = labels, label_order = lorder, value = value,
                family = fname, suffix = suffix }
            f.samples[#f.samples + 1] = s
            samples[#samples + 1] = s
        end
    end
    for _, name in ipairs(order) do
        local f = families[name]
        if not f.type then
            return nil, "family " .. name .. " has no TYPE line"
        end
        if f.type == "histogram" then
            local ok, err = check_histograms(f)
            if not ok then
                return nil, err
            end
        elseif f.type == "summary" then
            local ok, err = check_summary(f)
            if not ok then
                return nil, err
            end
        end
    end
    return { families = families, order = order, samples = samples }
end

local function matches(s, labels)
    for k, v in pairs(labels or {}) do
        if s.labels[k] ~= v then
            return false
        end
    end
    return true
end

-- The value of the one sample `name` whose labels are exactly `labels` (default none), or nil.
function M.value(exp, name, labels)
    local want = label_key(labels or {})
    for _, s in ipairs(exp.samples) do
        if s.name == name and label_key(s.labels) == want then
            return s.value
        end
    end
    return nil
end

-- The sum of the samples `name` that carry at least the given labels (0 when none).
function M.sum(exp, name, labels)
    local total = 0
    for _, s in ipairs(exp.samples) do
        if s.name == name and matches(s, labels) then
            total = total + s.value
        end
    end
    return total
end

-- parse() that raises with the reason and the text.
function M.assert_parse(text)
    local exp, err = M.parse(text)
    if not exp then
        error("invalid Prometheus exposition: " .. tostring(err) .. "\n" .. tostring(text), 2)
    end
    return exp
end

return M
