-- sandbox_path.lua: the one place that reads /{user}/{sandbox}/{rest} out of a request target.
-- Used by router.lua, ratelimit.lua and auth.lua, so all of them agree on who a request is for.
--   split(target) -> user, sandbox, rest | nil
--   of(req)       -> user, sandbox, rest, key ("user/sandbox") | nil, for the request's target;
--                    read once per request and kept in req.ctx (target_user, target_sandbox,
--                    target_rest, target_key), so every script that asks shares one parse
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

-- user, sandbox, rest, key of the request (nil when its target has no valid sandbox path).
function M.of(req)
    local ctx = req.ctx
    local user = ctx.target_user
    if user == nil then
        local name, rest
        user, name, rest = M.split(req:target())
        if not user then
            ctx.target_user = false
            return nil
        end
        ctx.target_user, ctx.target_sandbox, ctx.target_rest = user, name, rest
        ctx.target_key = user .. "/" .. name
    elseif user == false then
        return nil
    end
    return user, ctx.target_sandbox, ctx.target_rest, ctx.target_key
end

return M
