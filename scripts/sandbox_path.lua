-- sandbox_path.lua: the one place that reads /{user}/{sandbox}/{rest} out of a request target.
-- Used by router.lua, ratelimit.lua and auth.lua, so all of them agree on who a request is for.
--   split(target) -> user, sandbox, rest | nil
-- user and sandbox are percent-decoded; a segment that decodes to "", ".", "..", or contains
-- "/", "\0" or a bad escape is refused (nil), so encoded tricks cannot reach another user's or
-- sandbox's prefix. rest is the remainder exactly as received (still encoded), query included,
-- and "/" when the target names only the sandbox.
local find = string.find
local sub = string.sub
local gsub = string.gsub
local char = string.char
local tonumber = tonumber

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

return M
