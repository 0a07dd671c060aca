-- Pure-Lua SHA-1 (FIPS 180-4) for LuaJIT, using the `bit` library.
--
--   local sha1 = require "spec.helpers.sha1"
--   sha1.binary(s) --> 20-byte raw digest
--   sha1.hex(s)    --> 40-char lowercase hex digest
--
-- Small and correct rather than fast; meant for WebSocket handshakes
-- (Sec-WebSocket-Accept) and test assertions.

local bit = require "bit"

local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local lshift, rshift, rol, tobit, tohex = bit.lshift, bit.rshift, bit.rol, bit.tobit, bit.tohex
local sbyte, schar, srep, floor = string.byte, string.char, string.rep, math.floor
local tconcat = table.concat

local M = {}

local function be32(n)
    return schar(band(rshift(n, 24), 255), band(rshift(n, 16), 255),
                 band(rshift(n, 8), 255), band(n, 255))
end

local function pad(msg)
    local ml = #msg
    local bits = ml * 8
    local hi = floor(bits / 4294967296)
    local lo = bits % 4294967296
    return msg .. "\128" .. srep("\0", (55 - ml) % 64) .. be32(tobit(hi)) .. be32(tobit(lo))
end

local function digest_words(msg)
    msg = pad(msg)
    local h0, h1, h2, h3, h4 =
        tobit(0x67452301), tobit(0xEFCDAB89), tobit(0x98BADCFE), tobit(0x10325476), tobit(0xC3D2E1F0)
    local w = {}
    for blk = 1, #msg, 64 do
        for i = 0, 15 do
            local a, b, c, d = sbyte(msg, blk + i * 4, blk + i * 4 + 3)
            w[i] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
        end
        for i = 16, 79 do
            w[i] = rol(bxor(w[i - 3], w[i - 8], w[i - 14], w[i - 16]), 1)
        end
        local a, b, c, d, e = h0, h1, h2, h3, h4
        for i = 0, 79 do
            local f, k
            if i < 20 then
                f = bor(band(b, c), band(bnot(b), d)); k = 0x5A827999
            elseif i < 40 then
                f = bxor(b, c, d); k = 0x6ED9EBA1
            elseif i < 60 then
                f = bor(band(b, c), band(b, d), band(c, d)); k = 0x8F1BBCDC
            else
                f = bxor(b, c, d); k = 0xCA62C1D6
            end
            local temp = tobit(rol(a, 5) + f + e + k + w[i])
            e = d; d = c; c = rol(b, 30); b = a; a = temp
        end
        h0 = tobit(h0 + a); h1 = tobit(h1 + b); h2 = tobit(h2 + c)
        h3 = tobit(h3 + d); h4 = tobit(h4 + e)
    end
    return h0, h1, h2, h3, h4
end

function M.binary(msg)
    assert(type(msg) == "string", "sha1.binary: string expected")
    local h0, h1, h2, h3, h4 = digest_words(msg)
    return be32(h0) .. be32(h1) .. be32(h2) .. be32(h3) .. be32(h4)
end

function M.hex(msg)
    assert(type(msg) == "string", "sha1.hex: string expected")
    local h = { digest_words(msg) }
    for i = 1, 5 do h[i] = tohex(h[i], 8) end
    return tconcat(h)
end

M.digest = M.binary

return M
