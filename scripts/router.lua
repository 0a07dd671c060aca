-- router.lua: maps {METHOD} /{user}/{sandbox}/{rest} to the sandbox's route and forwards
-- /{rest} with the query string exactly as received.
--   unknown sandbox          -> 404 {"error":"sandbox not found","path":"user/sandbox"}
--   known, not ready         -> 503 {"error":"sandbox not ready","path":..,"reason":..} + Retry-After
--   ready, no address        -> 503 {"error":"sandbox has no address","path":..} + Retry-After
--   no user/sandbox in path  -> 400 with the expected form
-- The user and sandbox segments are percent-decoded for the lookup; a segment that decodes to
-- "", ".", ".." or contains "/" is rejected, so encoded tricks cannot reach another prefix.
-- Config (config file section `router`): retry_after (seconds, default 2).
local routes = require "sp.routes"
local config = require "sp.config"

local find = string.find
local sub = string.sub
local byte = string.byte
local gsub = string.gsub
local char = string.char
local tonumber = tonumber

local cfg = config.router or {}
local RETRY_AFTER = tostring(cfg.retry_after or 2)

local M = {}

local BAD_PATH = {
    error = "bad request path",
    expected = "/{user}/{sandbox}/{path}",
}

local function hex_to_char(h)
    return char(tonumber(h, 16))
end

-- Percent-decodes one path segment; nil if the result is unsafe as a name.
local function decode_segment(s)
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
M.decode_segment = decode_segment

-- Splits a request target into user, sandbox and the rest to forward (path and query).
-- Returns nil when the target has no /{user}/{sandbox} prefix.
function M.split(target)
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
    local name = decode_segment(sub(target, s1 + 1, name_end))
    if not user or not name then
        return nil
    end
    local rest
    if s2 then
        rest = sub(target, s2)
    else
        rest = "/" .. sub(target, plen + 1)
    end
    return user, name, rest
end

function M.handle(req)
    local user, name, rest = M.split(req:target())
    if not user then
        return req:respond(400, BAD_PATH)
    end
    local key = user .. "/" .. name
    local r = routes.get(key)
    if not r then
        return req:respond(404, { error = "sandbox not found", path = key })
    end
    if not r.ready then
        return req:respond(503, { error = "sandbox not ready", path = key, reason = r.reason },
            { ["Retry-After"] = RETRY_AFTER })
    end
    local address = r.address
    if not address or address == "" or r.port == 0 then
        return req:respond(503, { error = "sandbox has no address", path = key },
            { ["Retry-After"] = RETRY_AFTER })
    end
    req.ctx.route = r
    req:forward(address, r.port, rest)
end

return M
