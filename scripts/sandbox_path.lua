-- sandbox_path.lua: the one place that reads which sandbox (and which of its ports) a request
-- is for. Used by router.lua, ratelimit.lua, auth.lua and browser.lua, so all of them agree.
--   parse(target) -> user, sandbox, rest, port, prefix | nil   (path routing; split: the
--                    first three)
--   host(host)    -> user, sandbox, port | nil                 (host routing, when configured)
--   of(req)       -> user, sandbox, rest, key ("user/sandbox") | nil, for the request: its Host
--                    first when host routing is on and the Host matches, else its target; read
--                    once per request and kept in req.ctx (target_user, target_sandbox,
--                    target_rest, target_key, target_port, target_prefix, target_host), so every
--                    script that asks shares one parse
--
-- Path routing: /{user}/{sandbox}/{rest} reaches the sandbox's own port (the route's),
-- /{user}/{sandbox}:{port}/{rest} another port of it. A sandbox name is a DNS-1123 name, which
-- never holds ":", so the port form cannot be confused with a sandbox or with the rest of the
-- path. user and sandbox are percent-decoded; a segment that decodes to "", ".", "..", or
-- contains "/", "\0" or a bad escape is refused (nil), so encoded tricks cannot reach another
-- user's or sandbox's prefix. rest is the remainder exactly as received (still encoded), query
-- included, and "/" when the target names only the sandbox. prefix is the target's first two
-- segments exactly as received ("/alice/sb1" or "/alice/sb1:3000"). A port outside 1..65535 or
-- with a leading zero: nil (400).
--
-- Host routing (config `sandbox_path.base_domain`; off when unset): a Host of the form
-- {pattern}.{base_domain} (any letter case; a ":port" after it ignored) names the sandbox; the
-- path goes to it untouched (target_rest is the whole target, target_prefix nil). Patterns are
-- tried in order; {port} matches digits, {user} and {sandbox} anything but "." (so the user is
-- what follows the LAST "--" in the default pattern). When several patterns match, the first
-- whose sandbox has a route wins (else the first match: the router answers 404). Any other
-- Host (the bare base domain, an IP, a name elsewhere) is routed by path, and only those reach
-- the proxy's own endpoints.
-- Config (section `sandbox_path`; defaults shown):
--   base_domain = nil,                     -- e.g. "sandboxes.example.com"
--   host_patterns = { "{port}-{sandbox}--{user}", "{sandbox}--{user}" },
local find = string.find
local sub = string.sub
local gsub = string.gsub
local char = string.char
local tonumber = tonumber
local lower = string.lower
local match = string.match
local routes = require "sp.routes"
local config = require "sp.config"

local cfg = config.sandbox_path or {}
local M = {}

local function hex_to_char(h)
    return char(tonumber(h, 16))
end

-- Percent-decodes one path segment; nil if the result is unsafe as a name.
function M.decode_segment(s)
    if find(s, "%", 1, true) then
        s = gsub(s, "%%(%x%x)", hex_to_char)
        if find(s, "%", 1, true) or find(s, "/", 1, true) then
            return nil
        end
    end
    if s == "" or s == "." or s == ".." or find(s, "\0", 1, true) then
        return nil
    end
    return s
end
local decode_segment = M.decode_segment

-- A port written in a path or a host: digits, no leading zero, 1..65535; else nil.
local function parse_port(s)
    if not match(s, "^[1-9]%d?%d?%d?%d?$") then
        return nil
    end
    local p = tonumber(s)
    return p <= 65535 and p or nil
end
M.parse_port = parse_port

function M.parse(target)
    local qpos = find(target, "?", 1, true)
    local plen = qpos and qpos - 1 or #target
    local s1 = find(target, "/", 2, true)
    if not s1 or s1 > plen or s1 == 2 then
        return nil
    end
    local s2 = find(target, "/", s1 + 1, true)
    if s2 and s2 > plen then
        s2 = nil
    end
    local name_end = s2 and s2 - 1 or plen
    if name_end <= s1 then
        return nil
    end
    local user = decode_segment(sub(target, 2, s1 - 1))
    local seg = sub(target, s1 + 1, name_end)
    local port
    local colon = find(seg, ":", 1, true)
    if colon then
        port = parse_port(sub(seg, colon + 1))
        if not port then
            return nil
        end
        seg = sub(seg, 1, colon - 1)
    end
    local name = decode_segment(seg)
    if not user or not name then
        return nil
    end
    local rest
    if s2 then
        rest = sub(target, s2)
    else
        rest = "/" .. sub(target, plen + 1)
    end
    return user, name, rest, port, sub(target, 1, name_end)
end

-- user, sandbox, rest (parse without the port and prefix).
function M.split(target)
    local user, name, rest = M.parse(target)
    return user, name, rest
end

-- ------------------------------------------------------------------ host routing

local BASE = cfg.base_domain
assert(BASE == nil or (type(BASE) == "string" and BASE ~= "" and not find(BASE, "[/:%s]")),
    "sandbox_path.base_domain must be a domain name (\"sandboxes.example.com\")")
local SUFFIX = BASE and ("." .. lower(BASE)) or nil
local PATTERNS = cfg.host_patterns or { "{port}-{sandbox}--{user}", "{sandbox}--{user}" }
assert(type(PATTERNS) == "table" and #PATTERNS > 0,
    "sandbox_path.host_patterns must be a list of patterns")

-- "{port}-{sandbox}--{user}" -> a Lua pattern and the order of its captures.
local function compile(p)
    assert(type(p) == "string" and find(p, "{sandbox}", 1, true) and find(p, "{user}", 1, true),
        "sandbox_path.host_patterns: " .. tostring(p) .. " needs {sandbox} and {user}")
    local order, out, i = {}, { "^" }, 1
    while i <= #p do
        local a, b, what = find(p, "^{(%a+)}", i)
        if a then
            assert(what == "port" or what == "sandbox" or what == "user",
                "sandbox_path.host_patterns: unknown placeholder {" .. what .. "}")
            order[#order + 1] = what
            out[#out + 1] = what == "port" and "(%d+)" or "([^.]+)"
            i = b + 1
        else
            local c = sub(p, i, i)
            assert(c ~= "{" and c ~= "}", "sandbox_path.host_patterns: bad pattern " .. p)
            out[#out + 1] = gsub(lower(c), "%W", "%%%0")
            i = i + 1
        end
    end
    out[#out + 1] = "$"
    return { pattern = table.concat(out), order = order }
end
local compiled = {}
for i, p in ipairs(PATTERNS) do
    compiled[i] = compile(p)
end
M.host_routing = SUFFIX ~= nil

-- user, sandbox, port of a Host header value under the base domain, or nil.
function M.host(host)
    if not SUFFIX or not host then
        return nil
    end
    host = lower(host)
    local colon = find(host, ":", 1, true)
    if colon then
        host = sub(host, 1, colon - 1)
    end
    local n = #host - #SUFFIX
    if n < 1 or sub(host, n + 1) ~= SUFFIX then
        return nil
    end
    local label = sub(host, 1, n)
    local first
    for _, c in ipairs(compiled) do
        local caps = { match(label, c.pattern) }
        if caps[1] then
            local got, ok = {}, true
            for j, what in ipairs(c.order) do
                got[what] = caps[j]
            end
            local port = got.port and parse_port(got.port)
            if got.port and not port then
                ok = false
            end
            local user, name = decode_segment(got.user), decode_segment(got.sandbox)
            if ok and user and name then
                if routes.version(user .. "/" .. name) ~= 0 then
                    return user, name, port
                end
                first = first or { user, name, port }
            end
        end
    end
    if first then
        return first[1], first[2], first[3]
    end
    return nil
end

-- user, sandbox, rest, key of the request (nil when it names no sandbox).
function M.of(req)
    local ctx = req.ctx
    local user = ctx.target_user
    if user == nil then
        local name, rest, port, prefix
        if SUFFIX then
            user, name, port = M.host(req:header("host"))
            if user then
                ctx.target_host = true
                rest = req:target()
            end
        end
        if not user then
            user, name, rest, port, prefix = M.parse(req:target())
        end
        if not user then
            ctx.target_user = false
            return nil
        end
        ctx.target_user, ctx.target_sandbox, ctx.target_rest = user, name, rest
        ctx.target_port, ctx.target_prefix = port, prefix
        ctx.target_key = user .. "/" .. name
    elseif user == false then
        return nil
    end
    return user, ctx.target_sandbox, ctx.target_rest, ctx.target_key
end

return M
