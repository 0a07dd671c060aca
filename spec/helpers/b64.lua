-- Base64 (RFC 4648, standard alphabet, with padding) in pure Lua.
--
--   local b64 = require "spec.helpers.b64"
--   b64.encode(s)  --> string
--   b64.decode(s)  --> string, or nil, "message" on malformed input
--                      (whitespace is ignored; padding is optional)

local bit = require "bit"

local band, bor, lshift, rshift = bit.band, bit.bor, bit.lshift, bit.rshift
local sbyte, schar, ssub = string.byte, string.char, string.sub
local tconcat = table.concat

local M = {}

local ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local ENC, DEC = {}, {}
for i = 1, 64 do
    local c = ssub(ALPHABET, i, i)
    ENC[i - 1] = c
    DEC[sbyte(c)] = i - 1
end

function M.encode(s)
    assert(type(s) == "string", "b64.encode: string expected")
    local out, n = {}, #s
    for i = 1, n, 3 do
        local a, b, c = sbyte(s, i, i + 2)
        local v = bor(lshift(a, 16), lshift(b or 0, 8), c or 0)
        out[#out + 1] = ENC[rshift(v, 18)] .. ENC[band(rshift(v, 12), 63)]
            .. (b and ENC[band(rshift(v, 6), 63)] or "=")
            .. (c and ENC[band(v, 63)] or "=")
    end
    return tconcat(out)
end

function M.decode(s)
    assert(type(s) == "string", "b64.decode: string expected")
    s = s:gsub("%s", "")
    s = s:gsub("=+$", "")
    if #s % 4 == 1 then return nil, "b64.decode: invalid length" end
    local out = {}
    for i = 1, #s, 4 do
        local v, cnt = 0, 0
        for j = i, math.min(i + 3, #s) do
            local d = DEC[sbyte(s, j)]
            if not d then return nil, "b64.decode: invalid character at " .. j end
            v = bor(lshift(v, 6), d)
            cnt = cnt + 1
        end
        if cnt == 4 then
            out[#out + 1] = schar(rshift(v, 16), band(rshift(v, 8), 255), band(v, 255))
        elseif cnt == 3 then
            v = lshift(v, 6)
            out[#out + 1] = schar(rshift(v, 16), band(rshift(v, 8), 255))
        elseif cnt == 2 then
            v = lshift(v, 12)
            out[#out + 1] = schar(rshift(v, 16))
        end
    end
    return tconcat(out)
end

return M
