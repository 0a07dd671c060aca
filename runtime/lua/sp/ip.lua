-- sp.ip: IP address and CIDR helpers for scripts (trusted proxies, allow lists).
--   ip.parse(s)            -> 16-byte string (IPv4 as ::ffff:a.b.c.d) | nil
--   ip.parse_cidr(s)       -> { bytes =, bits = } | nil, err   ("10.0.0.0/8", "fd00::/8", "1.2.3.4")
--   ip.ranges(list)        -> matcher | nil, err   (a list of CIDR strings)
--   matcher:contains(addr) -> bool
--   ip.client_address(peer, xff, matcher) -> the client address: the peer itself unless it is a
--       trusted proxy, else the right-most X-Forwarded-For entry that is not trusted.
local byte = string.byte
local char = string.char
local sub = string.sub
local find = string.find
local tonumber = tonumber
local floor = math.floor

local M = {}

local function parse4(s)
    local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not a then
        return nil
    end
    a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
    if a > 255 or b > 255 or c > 255 or d > 255 then
        return nil
    end
    return string.rep("\0", 10) .. "\255\255" .. char(a, b, c, d)
end

local function parse6(s)
    if s:sub(1, 1) == "[" and s:sub(-1) == "]" then
        s = s:sub(2, -2)
    end
    local pct = find(s, "%", 1, true) -- zone id
    if pct then
        s = sub(s, 1, pct - 1)
    end
    -- an embedded IPv4 tail
    local v4tail
    local last_colon = s:match("^.*():")
    if last_colon and find(s, ".", last_colon, true) then
        v4tail = parse4(sub(s, last_colon + 1))
        if not v4tail then
            return nil
        end
        s = sub(s, 1, last_colon) .. "0:0"
    end
    local head, tail = s, nil
    local dc = find(s, "::", 1, true)
    if dc then
        head, tail = sub(s, 1, dc - 1), sub(s, dc + 2)
        if find(tail, "::", 1, true) then
            return nil
        end
    end
    local function groups(part)
        local out = {}
        if part == "" then
            return out
        end
        for g in (part .. ":"):gmatch("([^:]*):") do
            if not g:match("^%x%x?%x?%x?$") then
                return nil
            end
            out[#out + 1] = tonumber(g, 16)
        end
        return out
    end
    local h, t = groups(head), {}
    if tail then
        t = groups(tail)
    end
    if not h or not t then
        return nil
    end
    local n = #h + #t
    if (dc and n > 7) or (not dc and n ~= 8) then
        return nil
    end
    local all = {}
    for _, g in ipairs(h) do
        all[#all + 1] = g
    end
    for _ = 1, 8 - n do
        all[#all + 1] = 0
    end
    for _, g in ipairs(t) do
        all[#all + 1] = g
    end
    local bytes = {}
    for i = 1, 8 do
        bytes[#bytes + 1] = char(floor(all[i] / 256), all[i] % 256)
    end
    local r = table.concat(bytes)
    if v4tail then
        r = sub(r, 1, 12) .. sub(v4tail, 13)
    end
    return r
end

-- 16-byte form of an IPv4 or IPv6 address, or nil.
function M.parse(s)
    if type(s) ~= "string" then
        return nil
    end
    s = s:match("^%s*(.-)%s*$")
    return parse4(s) or parse6(s)
end

function M.parse_cidr(s)
    local addr, bits = s:match("^%s*([^/%s]+)/(%d+)%s*$")
    if not addr then
        addr = s:match("^%s*(%S+)%s*$")
    end
    local b = addr and M.parse(addr)
    if not b then
        return nil, "not an IP address or CIDR: " .. tostring(s)
    end
    local is4 = parse4(addr) ~= nil
    local n = tonumber(bits) or (is4 and 32 or 128)
    if (is4 and n > 32) or n > 128 then
        return nil, "bad prefix length in " .. s
    end
    return { bytes = b, bits = is4 and n + 96 or n }
end

local function match(net, a)
    local bits = net.bits
    local full = floor(bits / 8)
    if sub(net.bytes, 1, full) ~= sub(a, 1, full) then
        return false
    end
    local rest = bits % 8
    if rest == 0 then
        return true
    end
    local x, y = byte(net.bytes, full + 1), byte(a, full + 1)
    return floor(x / 2 ^ (8 - rest)) == floor(y / 2 ^ (8 - rest))
end

local Ranges = {}
Ranges.__index = Ranges

function Ranges:contains(addr)
    local a = M.parse(addr)
    if not a then
        return false
    end
    for i = 1, #self do
        if match(self[i], a) then
            return true
        end
    end
    return false
end

function M.ranges(list)
    local r = setmetatable({}, Ranges)
    for _, s in ipairs(list or {}) do
        local net, err = M.parse_cidr(s)
        if not net then
            return nil, err
        end
        r[#r + 1] = net
    end
    return r
end

function M.client_address(peer, xff, trusted)
    if not trusted or #trusted == 0 or not xff or xff == "" or not trusted:contains(peer) then
        return peer
    end
    local hops = {}
    for part in xff:gmatch("[^,]+") do
        hops[#hops + 1] = part:match("^%s*(.-)%s*$")
    end
    for i = #hops, 1, -1 do
        local h = hops[i]
        if not M.parse(h) then
            return peer -- garbage in the header: do not trust any of it
        end
        if not trusted:contains(h) then
            return h
        end
    end
    return hops[1] or peer
end

return M
