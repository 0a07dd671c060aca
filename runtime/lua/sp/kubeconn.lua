-- sp.kubeconn: works out how to reach the Kubernetes API server.
--
--   M.resolve(settings, env)         precedence: --kube-api flags, in-cluster, kubeconfig
--   M.in_cluster(env, sa_dir)        service-account environment of a pod
--   M.from_kubeconfig{path|paths|text, context, dir}
--   M.parse_yaml(text)               the YAML subset kubeconfig files are written in
--   M.base64_decode(s)
--
-- Every function returns a value, or nil and an error string; none raises on bad input.
-- A connection table is
--   { server, ca_file, ca_data, insecure, token, token_file, cert_file, cert_data,
--     key_file, key_data, namespace, source = "flags"|"in-cluster"|"kubeconfig", context }
-- with absent fields nil. Pure Lua 5.1/LuaJIT + cjson; files are read with io.open.
local cjson_mod = require "cjson.safe"

local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs, tostring, tonumber
local error, pcall, next = error, pcall, next
local byte, char, sub, find, match, gsub, rep, format, lower =
    string.byte, string.char, string.sub, string.find, string.match, string.gsub,
    string.rep, string.format, string.lower
local concat = table.concat
local floor = math.floor

local M = {}

-- YAML null is represented as cjson.null, so YAML and JSON input decode identically
-- (a null in a sequence keeps its position; a null value keeps its key).
local NULL = cjson_mod.null
M.null = NULL

-- A private cjson instance that rejects NaN/Infinity/hex, which are not JSON and would
-- decode differently from YAML.
local cjson = cjson_mod
if type(cjson_mod.new) == "function" then
    local ok, inst = pcall(cjson_mod.new)
    if ok and inst then
        cjson = inst
        if type(inst.decode_invalid_numbers) == "function" then
            pcall(inst.decode_invalid_numbers, false)
        end
    end
end

M.DEFAULT_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
M.NO_CONFIG_ERROR =
    "no Kubernetes API configured (tried --kube-api, in-cluster service account, kubeconfig)"

---------------------------------------------------------------------------------------------
-- base64 (RFC 4648 standard alphabet, '=' padding required, whitespace ignored)
---------------------------------------------------------------------------------------------

local B64 = {}
do
    local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for i = 1, 64 do
        B64[byte(alphabet, i)] = i - 1
    end
end

function M.base64_decode(s)
    if type(s) ~= "string" then
        return nil, "base64: expected a string, got " .. type(s)
    end
    local clean = gsub(s, "[ \t\r\n\f\v]", "")
    local bad = find(clean, "[^A-Za-z0-9+/=]")
    if bad then
        return nil, format("base64: invalid character %q at offset %d", sub(clean, bad, bad), bad)
    end
    local body, padding = match(clean, "^([A-Za-z0-9+/]*)(=*)$")
    if not body then
        return nil, "base64: '=' padding in the middle of the data"
    end
    if #clean % 4 ~= 0 or #padding > 2 then
        return nil, "base64: truncated or wrongly padded data (length must be a multiple of 4)"
    end
    local out, n = {}, 0
    local full = #body - #body % 4
    for i = 1, full, 4 do
        local a, b, c, d = byte(body, i, i + 3)
        local v = B64[a] * 262144 + B64[b] * 4096 + B64[c] * 64 + B64[d]
        n = n + 1
        out[n] = char(floor(v / 65536), floor(v / 256) % 256, v % 256)
    end
    local tail = #body - full
    if tail == 2 then
        local a, b = byte(body, full + 1, full + 2)
        n = n + 1
        out[n] = char(B64[a] * 4 + floor(B64[b] / 16))
    elseif tail == 3 then
        local a, b, c = byte(body, full + 1, full + 3)
        local v = B64[a] * 4096 + B64[b] * 64 + B64[c]
        n = n + 1
        out[n] = char(floor(v / 1024), floor(v / 4) % 256)
    end
    return concat(out)
end

---------------------------------------------------------------------------------------------
-- YAML subset
---------------------------------------------------------------------------------------------

local function fail(lineno, msg)
    error({ yaml_line = lineno, yaml_msg = msg }, 0)
end

local function rtrim(s)
    return (gsub(s, "[ \t]+$", ""))
end

local function utf8_char(cp)
    if cp < 0x80 then
        return char(cp)
    elseif cp < 0x800 then
        return char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
    elseif cp < 0x10000 then
        return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
    elseif cp <= 0x10FFFF then
        return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64,
            0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
    end
    return nil
end

local function is_doc_marker(t)
    local m = sub(t, 1, 3)
    if m ~= "---" and m ~= "..." then
        return false
    end
    local nx = sub(t, 4, 4)
    return nx == "" or nx == " " or nx == "\t"
end

local function is_seq_item(t)
    local nx = sub(t, 2, 2)
    return byte(t, 1) == 45 and (nx == "" or nx == " " or nx == "\t")
end

local function blank_or_comment(t)
    return find(t, "^[ \t]*$") ~= nil or find(t, "^[ \t]*#") ~= nil
end

-- Plain scalar resolution (YAML 1.2 core schema).
local function resolve_plain(s)
    if s == "" or s == "~" or s == "null" or s == "Null" or s == "NULL" then
        return NULL
    end
    if s == "true" or s == "True" or s == "TRUE" then
        return true
    end
    if s == "false" or s == "False" or s == "FALSE" then
        return false
    end
    if find(s, "^[-+]?%d+$") then
        return tonumber(s)
    end
    if find(s, "^0x%x+$") then
        return tonumber(sub(s, 3), 16)
    end
    if find(s, "^0o[0-7]+$") then
        return tonumber(sub(s, 3), 8)
    end
    local unsigned = match(s, "^[-+]?(.*)$")
    local mant = match(unsigned, "^([%d.]+)[eE][-+]?%d+$") or match(unsigned, "^([%d.]+)$")
    if mant and find(mant, "%d") and not find(mant, "%..*%.") then
        local v = tonumber(s)
        if v then
            return v
        end
    end
    local inf = match(s, "^([-+]?)%.[iI][nN][fF]$")
    if inf and (find(s, "inf") or find(s, "Inf") or find(s, "INF")) then
        return inf == "-" and -math.huge or math.huge
    end
    if s == ".nan" or s == ".NaN" or s == ".NAN" then
        return 0 / 0
    end
    return s
end


-- Parser state: raw lines, plus per-line indentation and text that a sequence entry may
-- rewrite ("- a: 1" is re-read as "a: 1" two columns further right).
local function new_parser(text)
    if sub(text, 1, 3) == "\239\187\191" then
        text = sub(text, 4)
    end
    local raw, ind, txt, n = {}, {}, {}, 0
    if text ~= "" and sub(text, -1) ~= "\n" then
        text = text .. "\n"
    end
    for line in string.gmatch(text, "([^\n]*)\n") do
        n = n + 1
        if sub(line, -1) == "\r" then
            line = sub(line, 1, -2)
        end
        raw[n] = line
        local lead = match(line, "^ *")
        ind[n] = #lead
        txt[n] = sub(line, #lead + 1)
    end
    return { raw = raw, ind = ind, txt = txt, n = n, pos = 1 }
end

-- Next line that carries structure (skips blank and comment lines); nil at the end of the
-- text or at a document marker. Leaves P.pos on that line.
local function peek(P)
    local i = P.pos
    while i <= P.n do
        local t = P.txt[i]
        if not blank_or_comment(t) then
            P.pos = i
            if P.ind[i] == 0 and is_doc_marker(t) then
                return nil
            end
            if byte(t, 1) == 9 then
                fail(i, "tab character used for indentation")
            end
            return i
        end
        i = i + 1
    end
    P.pos = i
    return nil
end

-- A cursor walks text that may continue over several lines (quoted and flow scalars).
-- cur = { li = line number, s = text of that line, k = position in s }
local function next_line(P, cur)
    local j = cur.li + 1
    if j > P.n then
        return false
    end
    local raw = P.raw[j]
    if is_doc_marker(raw) then
        return false
    end
    cur.li, cur.s, cur.k = j, raw, 1
    if P.pos <= j then
        P.pos = j + 1
    end
    return true
end

-- After a line break inside a quoted scalar: skip empty lines and leading whitespace;
-- returns how many empty lines were skipped.
local function fold_break(P, cur, start_line, what)
    local blanks = 0
    while true do
        if not next_line(P, cur) then
            fail(start_line, "unterminated " .. what)
        end
        local lead = match(cur.s, "^[ \t]*")
        if #lead < #cur.s then
            cur.k = #lead + 1
            return blanks
        end
        blanks = blanks + 1
    end
end

local ESCAPES = {
    ["0"] = "\0", a = "\a", b = "\b", t = "\t", ["\t"] = "\t", n = "\n", v = "\v", f = "\f",
    r = "\r", e = "\27", [" "] = " ", ['"'] = '"', ["/"] = "/", ["\\"] = "\\",
    N = "\194\133", _ = "\194\160", L = "\226\128\168", P = "\226\128\169",
}
local HEX_LEN = { x = 2, u = 4, U = 8 }

-- cur.k is at the opening '"'; returns the value and leaves cur.k after the closing quote.
-- P may be nil: then the scalar must end on this line.
local function scan_double(P, cur)
    local start_line = cur.li
    local buf, nb = {}, 0
    local k = cur.k + 1
    while true do
        local s = cur.s
        local a = find(s, '["\\]', k)
        if not a then
            nb = nb + 1
            buf[nb] = rtrim(sub(s, k))
            if not P then
                fail(start_line, "unterminated double-quoted string")
            end
            local blanks = fold_break(P, cur, start_line, "double-quoted string")
            nb = nb + 1
            buf[nb] = blanks == 0 and " " or rep("\n", blanks)
            k = cur.k
        else
            nb = nb + 1
            buf[nb] = sub(s, k, a - 1)
            if byte(s, a) == 34 then
                cur.k = a + 1
                return concat(buf)
            end
            local e = sub(s, a + 1, a + 1)
            if e == "" then
                -- escaped line break: no folding space
                if not P then
                    fail(start_line, "unterminated double-quoted string")
                end
                local blanks = fold_break(P, cur, start_line, "double-quoted string")
                nb = nb + 1
                buf[nb] = rep("\n", blanks)
                k = cur.k
            elseif ESCAPES[e] then
                nb = nb + 1
                buf[nb] = ESCAPES[e]
                k = a + 2
            elseif HEX_LEN[e] then
                local len = HEX_LEN[e]
                local hex = sub(s, a + 2, a + 1 + len)
                if #hex < len or find(hex, "[^%x]") then
                    fail(cur.li, "invalid \\" .. e .. " escape in double-quoted string")
                end
                local cp = tonumber(hex, 16)
                k = a + 2 + len
                if e == "u" and cp >= 0xD800 and cp <= 0xDBFF then
                    local lo = match(s, "^\\u([dD][c-fC-F]%x%x)", k)
                    if lo then
                        cp = 0x10000 + (cp - 0xD800) * 1024 + (tonumber(lo, 16) - 0xDC00)
                        k = k + 6
                    end
                end
                local u = utf8_char(cp)
                if not u then
                    fail(cur.li, "invalid code point in \\" .. e .. " escape")
                end
                nb = nb + 1
                buf[nb] = u
            else
                fail(cur.li, "invalid escape \\" .. e .. " in double-quoted string")
            end
        end
    end
end

-- cur.k is at the opening "'".
local function scan_single(P, cur)
    local start_line = cur.li
    local buf, nb = {}, 0
    local k = cur.k + 1
    while true do
        local s = cur.s
        local a = find(s, "'", k, true)
        if not a then
            nb = nb + 1
            buf[nb] = rtrim(sub(s, k))
            if not P then
                fail(start_line, "unterminated single-quoted string")
            end
            local blanks = fold_break(P, cur, start_line, "single-quoted string")
            nb = nb + 1
            buf[nb] = blanks == 0 and " " or rep("\n", blanks)
            k = cur.k
        else
            nb = nb + 1
            buf[nb] = sub(s, k, a - 1)
            if byte(s, a + 1) == 39 then
                nb = nb + 1
                buf[nb] = "'"
                k = a + 2
            else
                cur.k = a + 1
                return concat(buf)
            end
        end
    end
end

local function scan_quoted(P, cur)
    if byte(cur.s, cur.k) == 34 then
        return scan_double(P, cur)
    end
    return scan_single(P, cur)
end

-- The rest of a line after a complete value must be blank or a comment.
local function expect_line_end(cur, what)
    local rest = sub(cur.s, cur.k)
    if find(rest, "^[ \t]*$") or find(rest, "^[ \t]+#") then
        return
    end
    fail(cur.li, "unexpected text after " .. what .. ": " .. rest)
end

local function check_plain_start(lineno, t)
    local c = sub(t, 1, 1)
    local nx = sub(t, 2, 2)
    local sep = nx == "" or nx == " " or nx == "\t"
    if c == "&" or c == "*" then
        fail(lineno, "anchors and aliases are not supported")
    elseif c == "!" then
        fail(lineno, "tags are not supported")
    elseif c == "%" or c == "@" or c == "`" then
        fail(lineno, "a plain scalar cannot start with '" .. c .. "'")
    elseif c == "]" or c == "}" or c == "," then
        fail(lineno, "unexpected '" .. c .. "'")
    elseif c == "?" and sep then
        fail(lineno, "complex mapping keys ('? ') are not supported")
    elseif c == ":" and sep then
        fail(lineno, "missing mapping key before ':'")
    elseif c == "-" and sep then
        fail(lineno, "a block sequence is not allowed here")
    end
end

-- Flow collections: [a, b], {a: b}, nested, possibly over several lines.
local FLOW_STOP = { [44] = true, [91] = true, [93] = true, [123] = true, [125] = true }

local function flow_skip(P, cur, lineno)
    while true do
        local s = cur.s
        local k = find(s, "[^ \t]", cur.k)
        if k and byte(s, k) == 35 and (k == 1 or find(sub(s, k - 1, k - 1), "[ \t]")) then
            k = nil -- comment: the rest of the line is ignored
        end
        if k then
            cur.k = k
            return byte(s, k)
        end
        if not next_line(P, cur) then
            fail(lineno, "unterminated flow collection")
        end
    end
end

local parse_flow_node

local function flow_plain(cur)
    local s, k = cur.s, cur.k
    check_plain_start(cur.li, sub(s, k))
    local c = byte(s, k)
    if c == 35 or c == 124 or c == 62 then
        fail(cur.li, "unexpected '" .. char(c) .. "' in flow collection")
    end
    local j = k
    local len = #s
    while j <= len do
        local b = byte(s, j)
        if FLOW_STOP[b] then
            break
        end
        if b == 58 then -- ':' ends the scalar before a space, a flow indicator or line end
            local nb = byte(s, j + 1)
            if nb == nil or nb == 32 or nb == 9 or FLOW_STOP[nb] then
                break
            end
        elseif b == 35 and j > k then
            local pb = byte(s, j - 1)
            if pb == 32 or pb == 9 then
                break
            end
        end
        j = j + 1
    end
    cur.k = j
    return rtrim(sub(s, k, j - 1))
end

local function parse_flow_seq(P, cur, lineno)
    cur.k = cur.k + 1
    local arr, n = {}, 0
    while true do
        local c = flow_skip(P, cur, lineno)
        if c == 93 then
            cur.k = cur.k + 1
            return arr
        end
        n = n + 1
        arr[n] = parse_flow_node(P, cur, lineno)
        c = flow_skip(P, cur, lineno)
        if c == 44 then
            cur.k = cur.k + 1
        elseif c == 58 then
            fail(cur.li, "mappings inside flow sequences are not supported")
        elseif c ~= 93 then
            fail(cur.li, "expected ',' or ']' in flow sequence")
        end
    end
end

local function parse_flow_map(P, cur, lineno)
    cur.k = cur.k + 1
    local map = {}
    while true do
        local c = flow_skip(P, cur, lineno)
        if c == 125 then
            cur.k = cur.k + 1
            return map
        end
        local key
        if c == 34 or c == 39 then
            key = scan_quoted(P, cur)
        elseif c == 91 or c == 123 then
            fail(cur.li, "flow collections as mapping keys are not supported")
        else
            key = flow_plain(cur)
            if key == "" then
                fail(cur.li, "missing mapping key")
            end
        end
        local value = NULL
        c = flow_skip(P, cur, lineno)
        if c == 58 then
            cur.k = cur.k + 1
            c = flow_skip(P, cur, lineno)
            if c ~= 44 and c ~= 125 then
                value = parse_flow_node(P, cur, lineno)
            end
        end
        if map[key] ~= nil then
            fail(cur.li, "duplicate mapping key " .. format("%q", key))
        end
        map[key] = value
        c = flow_skip(P, cur, lineno)
        if c == 44 then
            cur.k = cur.k + 1
        elseif c ~= 125 then
            fail(cur.li, "expected ',' or '}' in flow mapping")
        end
    end
end

parse_flow_node = function(P, cur, lineno)
    local c = byte(cur.s, cur.k)
    if c == 91 then
        return parse_flow_seq(P, cur, lineno)
    elseif c == 123 then
        return parse_flow_map(P, cur, lineno)
    elseif c == 34 or c == 39 then
        return scan_quoted(P, cur)
    end
    return resolve_plain(flow_plain(cur))
end

-- Block scalar ('|' or '>') whose header is on line i; content lines must be indented more
-- than parent_indent.
local function block_scalar(P, i, style, header, parent_indent)
    local chomp, explicit = "clip", nil
    for ch in string.gmatch(header, ".") do
        if ch == "-" or ch == "+" then
            if chomp ~= "clip" then
                fail(i, "invalid block scalar header")
            end
            chomp = ch == "-" and "strip" or "keep"
        elseif ch ~= "0" and find(ch, "%d") then
            if explicit then
                fail(i, "invalid block scalar header")
            end
            explicit = tonumber(ch)
        else
            fail(i, "invalid block scalar header")
        end
    end
    local base = parent_indent < 0 and 0 or parent_indent
    local content_indent
    if explicit then
        content_indent = (parent_indent < 0 and 0 or parent_indent) + explicit
    else
        for j = i + 1, P.n do
            local raw = P.raw[j]
            if not find(raw, "^ *$") then
                local lead = #match(raw, "^ *")
                if lead > parent_indent then
                    content_indent = lead
                end
                break
            end
        end
    end
    local lines, nl = {}, 0
    local j = i + 1
    if content_indent then
        while j <= P.n do
            local raw = P.raw[j]
            if find(raw, "^ *$") then
                nl = nl + 1
                lines[nl] = ""
            else
                local lead = #match(raw, "^ *")
                if lead < content_indent or (lead == 0 and is_doc_marker(raw)) then
                    if lead > base and not blank_or_comment(raw) then
                        fail(j, "block scalar line is less indented than its first line")
                    end
                    break
                end
                nl = nl + 1
                lines[nl] = sub(raw, content_indent + 1)
            end
            j = j + 1
        end
    end
    P.pos = j
    local last = nl
    while last > 0 and lines[last] == "" do
        last = last - 1
    end
    local body
    if style == "|" then
        body = concat(lines, "\n", 1, last)
    else
        local out, no, blanks, prev = {}, 0, 0, nil
        for x = 1, last do
            local l = lines[x]
            if l == "" then
                blanks = blanks + 1
            else
                local kind = find(l, "^[ \t]") and "more" or "normal"
                if prev == nil then
                    no = no + 1
                    out[no] = rep("\n", blanks)
                elseif prev == "normal" and kind == "normal" then
                    no = no + 1
                    out[no] = blanks == 0 and " " or rep("\n", blanks)
                else
                    no = no + 1
                    out[no] = rep("\n", blanks + 1)
                end
                no = no + 1
                out[no] = l
                blanks, prev = 0, kind
            end
        end
        body = concat(out)
    end
    if last == 0 then
        return chomp == "keep" and rep("\n", nl) or ""
    elseif chomp == "strip" then
        return body
    elseif chomp == "clip" then
        return body .. "\n"
    end
    return body .. "\n" .. rep("\n", nl - last)
end

-- Plain scalar in block context, starting with text t on line i; continuation lines must be
-- indented more than parent_indent (they fold into one line, as YAML emitters wrap long
-- strings).
local function block_plain(P, i, t, parent_indent)
    check_plain_start(i, t)
    local cpos = find(t, "[ \t]#")
    local first = rtrim(cpos and sub(t, 1, cpos - 1) or t)
    if find(first, ":[ \t]") or sub(first, -1) == ":" then
        fail(i, "mapping values are not allowed here (quote the value if it contains ': ')")
    end
    if cpos then
        return resolve_plain(first)
    end
    local parts, np = { first }, 1
    local j, blanks = i + 1, 0
    while j <= P.n do
        local raw = P.raw[j]
        if find(raw, "^[ \t]*$") then
            blanks = blanks + 1
        else
            local lead = #match(raw, "^ *")
            if lead <= parent_indent then
                break
            end
            local lt = gsub(raw, "^[ \t]+", "")
            if byte(lt, 1) == 35 or (lead == 0 and is_doc_marker(lt)) then
                break
            end
            local c2 = find(lt, "[ \t]#")
            local seg = rtrim(c2 and sub(lt, 1, c2 - 1) or lt)
            if find(seg, ":[ \t]") or sub(seg, -1) == ":" then
                fail(j, "mapping values are not allowed here (quote the value if it contains ': ')")
            end
            np = np + 1
            parts[np] = blanks == 0 and " " or rep("\n", blanks)
            np = np + 1
            parts[np] = seg
            blanks = 0
            P.pos = j + 1
            if c2 then
                break
            end
        end
        j = j + 1
    end
    if np == 1 then
        return resolve_plain(first)
    end
    return concat(parts)
end

local parse_block_node, parse_block_at

-- The value whose text t starts on line i (after "key:" or on a line of its own).
local function parse_value_text(P, i, t, parent_indent, is_map_value)
    P.pos = i + 1
    local c = byte(t, 1)
    if c == nil or c == 35 then
        return parse_block_node(P, parent_indent, is_map_value)
    end
    if c == 124 or c == 62 then -- | >
        local header, rest = match(t, "^[|>]([^ \t]*)(.*)$")
        if not (find(rest, "^[ \t]*$") or find(rest, "^[ \t]+#")) then
            fail(i, "invalid block scalar header")
        end
        return block_scalar(P, i, char(c), header, parent_indent)
    end
    if c == 34 or c == 39 or c == 91 or c == 123 then
        local cur = { li = i, s = t, k = 1 }
        local v
        if c == 34 or c == 39 then
            v = scan_quoted(P, cur)
            expect_line_end(cur, "quoted string")
        else
            v = parse_flow_node(P, cur, i)
            expect_line_end(cur, "flow collection")
        end
        return v
    end
    return block_plain(P, i, t, parent_indent)
end

-- "key: rest" split of a block mapping line, or nil if the line is not one.
local function split_key(t, lineno)
    local c = byte(t, 1)
    if c == 34 or c == 39 then
        local cur = { li = lineno, s = t, k = 1 }
        local ok, key = pcall(scan_quoted, nil, cur)
        if not ok then
            return nil
        end
        local rest = match(t, "^[ \t]*:(.*)$", cur.k)
        if rest and (rest == "" or find(rest, "^[ \t]")) then
            return key, (gsub(rest, "^[ \t]+", ""))
        end
        return nil
    end
    if c == 91 or c == 123 or c == 38 or c == 42 or c == 33 or c == 124 or c == 62
        or c == 37 or c == 64 or c == 96 or c == 35 or c == 63 then
        return nil
    end
    local pos = 1
    while true do
        local s = find(t, "[:#]", pos)
        if not s then
            return nil
        end
        if byte(t, s) == 35 then
            if s == 1 or find(sub(t, s - 1, s - 1), "[ \t]") then
                return nil
            end
        else
            local nx = sub(t, s + 1, s + 1)
            if nx == "" or nx == " " or nx == "\t" then
                local key = rtrim(sub(t, 1, s - 1))
                if key == "" then
                    return nil
                end
                return key, (gsub(sub(t, s + 1), "^[ \t]+", ""))
            end
        end
        pos = s + 1
    end
end

local function parse_mapping(P, ind)
    local map = {}
    while true do
        local i = peek(P)
        if not i or P.ind[i] < ind then
            break
        end
        if P.ind[i] > ind then
            fail(i, "unexpected indentation")
        end
        local t = P.txt[i]
        if is_seq_item(t) then
            fail(i, "expected a mapping key, found a sequence item")
        end
        local key, rest = split_key(t, i)
        if not key then
            if byte(t, 1) == 34 or byte(t, 1) == 39 then
                -- a quoted key that does not close: report the quoting problem
                local cur = { li = i, s = t, k = 1 }
                scan_quoted(nil, cur)
            end
            fail(i, "expected 'key: value'")
        end
        if map[key] ~= nil then
            fail(i, "duplicate mapping key " .. format("%q", key))
        end
        map[key] = parse_value_text(P, i, rest, ind, true)
    end
    return map
end

local function parse_sequence(P, ind)
    local seq, n = {}, 0
    while true do
        local i = peek(P)
        if not i or P.ind[i] < ind then
            break
        end
        if P.ind[i] > ind then
            fail(i, "unexpected indentation")
        end
        local t = P.txt[i]
        if not is_seq_item(t) then
            break
        end
        local sp = match(t, "^%-([ \t]*)")
        local rest = sub(t, 2 + #sp)
        n = n + 1
        if rest == "" or byte(rest, 1) == 35 then
            P.pos = i + 1
            seq[n] = parse_block_node(P, ind, false)
        else
            if find(sp, "\t") and (is_seq_item(rest) or split_key(rest, i)) then
                fail(i, "tab character used for indentation")
            end
            P.ind[i] = ind + 1 + #sp
            P.txt[i] = rest
            seq[n] = parse_block_at(P, i, ind)
        end
    end
    return seq
end

-- The node starting on line i (at its own indentation), inside a parent at parent_indent.
parse_block_at = function(P, i, parent_indent)
    local t = P.txt[i]
    if is_seq_item(t) then
        return parse_sequence(P, P.ind[i])
    end
    if split_key(t, i) then
        return parse_mapping(P, P.ind[i])
    end
    return parse_value_text(P, i, t, parent_indent, false)
end

-- A value that starts on the next line(s): more indented than its parent, or, for a mapping
-- value, a block sequence at the parent's own indentation (as kubectl writes them).
parse_block_node = function(P, parent_indent, allow_same_indent_seq)
    local i = peek(P)
    if not i then
        return NULL
    end
    local ind = P.ind[i]
    if ind > parent_indent then
        return parse_block_at(P, i, parent_indent)
    end
    if allow_same_indent_seq and ind == parent_indent and is_seq_item(P.txt[i]) then
        return parse_sequence(P, ind)
    end
    return NULL
end

local function parse_document(P)
    -- directives and the document start marker
    local i = 1
    while i <= P.n do
        local raw = P.raw[i]
        if not blank_or_comment(raw) then
            if byte(raw, 1) == 37 then -- %YAML / %TAG directive
                i = i + 1
            elseif sub(raw, 1, 3) == "---" and is_doc_marker(raw) then
                local rest = sub(raw, 4)
                if not (find(rest, "^[ \t]*$") or find(rest, "^[ \t]+#")) then
                    fail(i, "content on the '---' line is not supported")
                end
                i = i + 1
                break
            else
                break
            end
        else
            i = i + 1
        end
    end
    P.pos = i
    local root = NULL
    local first = peek(P)
    if first then
        root = parse_block_at(P, first, -1)
    end
    local extra = peek(P)
    if extra then
        fail(extra, "unexpected content after the document root (check the indentation)")
    end
    -- only '...' / '---' markers, blank lines and comments may follow
    local seen_start = false
    for j = P.pos, P.n do
        local raw = P.raw[j]
        if not blank_or_comment(raw) then
            if is_doc_marker(raw) then
                local rest = sub(raw, 4)
                if not (find(rest, "^[ \t]*$") or find(rest, "^[ \t]+#")) then
                    fail(j, "multiple documents are not supported")
                end
                if sub(raw, 1, 3) == "---" then
                    seen_start = true
                end
            else
                fail(j, seen_start and "multiple documents are not supported"
                    or "unexpected content after the end of the document")
            end
        end
    end
    return root
end

-- Parse YAML (or JSON) text. Returns the value (YAML null is M.null) or nil, "line N: ...".
function M.parse_yaml(text)
    if type(text) ~= "string" then
        return nil, "line 1: expected a string, got " .. type(text)
    end
    local first = match(text, "^[ \t\r\n]*(.)")
    if first == "{" or first == "[" then
        local v = cjson.decode(text)
        if v ~= nil then
            return v
        end
    end
    local P = new_parser(text)
    local ok, res = pcall(parse_document, P)
    if ok then
        return res
    end
    if type(res) == "table" and res.yaml_line then
        return nil, format("line %d: %s", res.yaml_line, res.yaml_msg)
    end
    return nil, "yaml parser error: " .. tostring(res)
end

---------------------------------------------------------------------------------------------
-- helpers shared by the connection sources
---------------------------------------------------------------------------------------------

local function str(v)
    if type(v) == "string" and v ~= "" then
        return v
    end
    return nil
end

local function trim(s)
    return (gsub(gsub(s, "^%s+", ""), "%s+$", ""))
end

local function env_getter(env)
    if env == nil then
        return os.getenv
    elseif type(env) == "table" then
        return function(name)
            return env[name]
        end
    end
    return env
end

local function read_file(path)
    local f, err, code = io.open(path, "rb")
    if not f then
        return nil, err or (path .. ": cannot open"), code
    end
    local data, rerr, rcode = f:read("*a")
    f:close()
    if not data then
        return nil, path .. ": " .. tostring(rerr or "read failed"), rcode
    end
    return data
end

local function truthy(v)
    return v == true or v == "true" or v == "1" or v == 1
end

-- Checks an API server URL: http or https scheme, a host; strips one trailing '/'.
function M.normalize_server(url)
    if type(url) ~= "string" or url == "" then
        return nil, "API server URL is empty"
    end
    local scheme, rest = match(url, "^([%a][%w+.-]*)://(.*)$")
    scheme = scheme and lower(scheme)
    if scheme ~= "http" and scheme ~= "https" then
        return nil, format("API server URL %q must start with http:// or https://", url)
    end
    if find(url, "%s") then
        return nil, format("API server URL %q contains whitespace", url)
    end
    if match(rest, "^([^/?#]*)") == "" then
        return nil, format("API server URL %q has no host", url)
    end
    local out = scheme .. "://" .. rest
    if sub(out, -1) == "/" then
        out = sub(out, 1, -2)
    end
    return out
end

---------------------------------------------------------------------------------------------
-- kubeconfig
---------------------------------------------------------------------------------------------

local function dir_of(path)
    local d = match(path, "^(.*)/[^/]*$")
    if d == nil then
        return nil -- no directory part: relative paths stay relative to the working dir
    end
    if d == "" then
        return "/"
    end
    return d
end

local function resolve_path(dir, p)
    if not p or not dir or sub(p, 1, 1) == "/" then
        return p
    end
    if sub(dir, -1) == "/" then
        return dir .. p
    end
    return dir .. "/" .. p
end

-- Collect the named entries of one file's clusters/contexts/users list into `into`
-- (first file wins across files; within one file the last duplicate wins, as kubectl's
-- list-to-map conversion does).
local function collect(doc, field, inner, label, dir, into)
    local list = doc[field]
    if list == nil or list == NULL then
        return true
    end
    if type(list) ~= "table" or (next(list) ~= nil and list[1] == nil) then
        return nil, format("kubeconfig %s: %q must be a list", label, field)
    end
    local mine = {}
    for idx, item in ipairs(list) do
        if type(item) ~= "table" then
            return nil, format("kubeconfig %s: %s[%d] is not a mapping", label, field, idx)
        end
        local name = item.name
        if type(name) ~= "string" or name == "" then
            return nil, format("kubeconfig %s: %s[%d] has no name", label, field, idx)
        end
        local body = item[inner]
        if body == nil or body == NULL then
            body = {}
        end
        if type(body) ~= "table" then
            return nil, format("kubeconfig %s: %s %q: %q is not a mapping", label, field, name,
                inner)
        end
        mine[name] = { body = body, dir = dir, label = label }
    end
    for name, entry in pairs(mine) do
        if into[name] == nil then
            into[name] = entry
        end
    end
    return true
end

local function split_paths(value)
    local out, seen = {}, {}
    for p in string.gmatch(value, "[^:]+") do
        if not seen[p] then
            seen[p] = true
            out[#out + 1] = p
        end
    end
    return out
end
M.split_paths = split_paths

-- `kubectl config view` without --raw writes these in place of secrets
local REDACTED = { ["DATA+OMITTED"] = true, REDACTED = true }

local function redacted_error(label, what, key)
    return format("kubeconfig %s: %s: %s is redacted (the file was written by `kubectl config "
        .. "view` without --raw)", label, what, key)
end

local function decode_field(body, key, what, label)
    local v = body[key]
    if v == nil or v == NULL or v == "" then
        return nil
    end
    if REDACTED[v] then
        return nil, redacted_error(label, what, key)
    end
    if type(v) ~= "string" then
        return nil, format("kubeconfig %s: %s: %s must be a base64 string", label, what, key)
    end
    local d, err = M.base64_decode(v)
    if not d then
        return nil, format("kubeconfig %s: %s: %s: %s", label, what, key, err)
    end
    return d
end

-- opts: { path = file } | { paths = { file, ... } } | { text = yaml, dir = base dir },
-- plus optional context = name.
function M.from_kubeconfig(opts)
    if type(opts) == "string" then
        opts = { path = opts }
    end
    if type(opts) ~= "table" then
        return nil, "from_kubeconfig: expected a table"
    end
    local sources = {} -- { text, label, dir }
    if opts.text ~= nil then
        if type(opts.text) ~= "string" then
            return nil, "from_kubeconfig: text must be a string"
        end
        sources[1] = { text = opts.text, label = "<text>", dir = opts.dir }
    elseif opts.path ~= nil then
        local path = opts.path
        if type(path) ~= "string" or path == "" then
            return nil, "kubeconfig path is empty"
        end
        local data, err = read_file(path)
        if not data then
            return nil, "cannot read kubeconfig " .. err
        end
        sources[1] = { text = data, label = path, dir = dir_of(path) }
    elseif opts.paths ~= nil then
        -- a KUBECONFIG list: missing files are skipped (as kubectl does), other errors are not
        local missing = {}
        for _, path in ipairs(opts.paths) do
            local data, err, code = read_file(path)
            if data then
                sources[#sources + 1] = { text = data, label = path, dir = dir_of(path) }
            elseif code == 2 then
                missing[#missing + 1] = path
            else
                return nil, "cannot read kubeconfig " .. err
            end
        end
        if #sources == 0 then
            if #missing == 0 then
                return nil, "KUBECONFIG names no files"
            end
            return nil, "kubeconfig not found: " .. concat(missing, ", ")
        end
    else
        return nil, "from_kubeconfig: give path, paths or text"
    end

    local clusters, contexts, users = {}, {}, {}
    local current, current_label
    local labels = {}
    for _, src in ipairs(sources) do
        labels[#labels + 1] = src.label
        local doc, err = M.parse_yaml(src.text)
        if doc == nil then
            return nil, format("kubeconfig %s: %s", src.label, err)
        end
        if doc == NULL then
            doc = {} -- an empty file adds nothing
        end
        if type(doc) ~= "table" or doc[1] ~= nil then
            return nil, format("kubeconfig %s: not a kubeconfig (expected a mapping)", src.label)
        end
        local ok, cerr = collect(doc, "clusters", "cluster", src.label, src.dir, clusters)
        if ok then
            ok, cerr = collect(doc, "contexts", "context", src.label, src.dir, contexts)
        end
        if ok then
            ok, cerr = collect(doc, "users", "user", src.label, src.dir, users)
        end
        if not ok then
            return nil, cerr
        end
        local cc = doc["current-context"]
        if current == nil and str(cc) then
            current, current_label = cc, src.label
        end
    end
    local label = concat(labels, ":")

    local ctxname = str(opts.context) or current
    if not ctxname then
        return nil, format("kubeconfig %s: no current-context is set", label)
    end
    local ctx = contexts[ctxname]
    if not ctx then
        return nil, format("kubeconfig %s: context %q not found", label, ctxname)
    end
    local clname = str(ctx.body.cluster)
    if not clname then
        return nil, format("kubeconfig %s: context %q names no cluster", label, ctxname)
    end
    local cl = clusters[clname]
    if not cl then
        return nil, format("kubeconfig %s: cluster %q (context %q) not found", label, clname,
            ctxname)
    end
    local uname = str(ctx.body.user)
    local user
    if uname then
        user = users[uname]
        if not user then
            return nil, format("kubeconfig %s: user %q (context %q) not found", label, uname,
                ctxname)
        end
    end

    local c = cl.body
    local what = format("cluster %q", clname)
    local server, serr = M.normalize_server(c.server)
    if not server then
        if c.server == nil or c.server == NULL or c.server == "" then
            serr = "no server URL"
        end
        return nil, format("kubeconfig %s: %s: %s", cl.label, what, serr)
    end
    local conn = {
        server = server,
        insecure = truthy(c["insecure-skip-tls-verify"]),
        namespace = str(ctx.body.namespace),
        source = "kubeconfig",
        context = ctxname,
    }
    local err
    -- *-data wins over the file form, as in client-go
    conn.ca_data, err = decode_field(c, "certificate-authority-data", what, cl.label)
    if err then
        return nil, err
    end
    if not conn.ca_data then
        conn.ca_file = resolve_path(cl.dir, str(c["certificate-authority"]))
    end
    if conn.insecure and (conn.ca_data or conn.ca_file) then
        return nil, format("kubeconfig %s: %s: specifying a root certificates file with the "
            .. "insecure flag is not allowed (as kubectl reports)", cl.label, what)
    end

    if user then
        local u = user.body
        local uwhat = format("user %q", uname)
        local token_file = resolve_path(user.dir, str(u.tokenFile))
        if token_file then
            conn.token_file = token_file -- tokenFile wins over token, as in client-go
        else
            conn.token = str(u.token)
            if REDACTED[conn.token] then
                return nil, redacted_error(user.label, uwhat, "token")
            end
        end
        conn.cert_data, err = decode_field(u, "client-certificate-data", uwhat, user.label)
        if err then
            return nil, err
        end
        if not conn.cert_data then
            conn.cert_file = resolve_path(user.dir, str(u["client-certificate"]))
        end
        conn.key_data, err = decode_field(u, "client-key-data", uwhat, user.label)
        if err then
            return nil, err
        end
        if not conn.key_data then
            conn.key_file = resolve_path(user.dir, str(u["client-key"]))
        end
        local has_cert = conn.cert_data or conn.cert_file
        local has_key = conn.key_data or conn.key_file
        if has_cert and not has_key then
            return nil, format("kubeconfig %s: %s has a client certificate but no client key",
                user.label, uwhat)
        elseif has_key and not has_cert then
            return nil, format("kubeconfig %s: %s has a client key but no client certificate",
                user.label, uwhat)
        end
        local exec, ap = u.exec, u["auth-provider"]
        local has_plugin = (type(exec) == "table") or (type(ap) == "table")
        if has_plugin and not (conn.token or conn.token_file or has_cert) then
            local detail
            if type(exec) == "table" then
                detail = format("an exec plugin (%s)", str(exec.command) or "?")
            else
                detail = format("an auth-provider (%s)", str(ap.name) or "?")
            end
            return nil, format("kubeconfig %s: %s (context %q) gets its credentials from %s; "
                .. "exec-plugin credentials are not supported. Run `kubectl proxy` and start "
                .. "sandbox-proxy with --kube-api http://127.0.0.1:8001", user.label, uwhat,
                ctxname, detail)
        end
    end
    return conn
end

---------------------------------------------------------------------------------------------
-- in-cluster
---------------------------------------------------------------------------------------------

-- The pod's service-account connection, or nil when not in a pod. Like client-go, it also
-- requires the token file to be readable (a pod without an automounted token falls through
-- to the other sources); nil, reason then.
function M.in_cluster(env, sa_dir)
    local getenv = env_getter(env)
    local host = str(getenv("KUBERNETES_SERVICE_HOST"))
    local port = str(getenv("KUBERNETES_SERVICE_PORT"))
    if not host or not port then
        return nil
    end
    host, port = trim(host), trim(port)
    local pnum = find(port, "^%d+$") and tonumber(port)
    if not pnum or pnum < 1 or pnum > 65535 then
        return nil, format("KUBERNETES_SERVICE_PORT %q is not a port number", port)
    end
    if find(host, ":", 1, true) and sub(host, 1, 1) ~= "[" then
        host = "[" .. host .. "]"
    end
    sa_dir = str(sa_dir) or M.DEFAULT_SA_DIR
    if #sa_dir > 1 and sub(sa_dir, -1) == "/" then
        sa_dir = sub(sa_dir, 1, -2)
    end
    local token_file = sa_dir .. "/token"
    local tf = io.open(token_file, "rb")
    if not tf then
        return nil, format("KUBERNETES_SERVICE_HOST is set but the service account token %s "
            .. "is not readable", token_file)
    end
    tf:close()
    local namespace
    local ns = read_file(sa_dir .. "/namespace")
    if ns then
        namespace = str(trim(ns))
    end
    return {
        server = "https://" .. host .. ":" .. port,
        ca_file = sa_dir .. "/ca.crt",
        token_file = token_file,
        namespace = namespace,
        source = "in-cluster",
    }
end

---------------------------------------------------------------------------------------------
-- precedence
---------------------------------------------------------------------------------------------

-- settings: { kube_api, kube_token_file, kube_ca_file, kube_insecure_skip_verify, kubeconfig,
-- kube_serviceaccount_dir, kube_context }; env: function(name) (default os.getenv) or table.
function M.resolve(settings, env)
    settings = settings or {}
    local getenv = env_getter(env)

    local api = str(settings.kube_api)
    if api then
        local server, err = M.normalize_server(api)
        if not server then
            return nil, "--kube-api: " .. err
        end
        return {
            server = server,
            token_file = str(settings.kube_token_file),
            ca_file = str(settings.kube_ca_file),
            insecure = truthy(settings.kube_insecure_skip_verify),
            source = "flags",
        }
    end

    local ic, ic_err = M.in_cluster(getenv, settings.kube_serviceaccount_dir)
    if ic then
        return ic
    end

    local kc = str(settings.kubeconfig)
    if kc then
        return M.from_kubeconfig { path = kc, context = settings.kube_context }
    end
    local kenv = str(getenv("KUBECONFIG"))
    if kenv then
        local paths = split_paths(kenv)
        if #paths == 0 then
            return nil, format("KUBECONFIG %q names no files", kenv)
        end
        return M.from_kubeconfig { paths = paths, context = settings.kube_context }
    end

    if ic_err then
        return nil, M.NO_CONFIG_ERROR .. "; in-cluster: " .. ic_err
    end
    return nil, M.NO_CONFIG_ERROR
end

return M
