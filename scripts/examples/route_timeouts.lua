-- examples/route_timeouts.lua: per-sandbox upstream timeouts, then the built-in router.
--
-- USE: mount this file as `router.lua` in the --scripts override directory. For each request
-- it finds the sandbox key "{user}/{sandbox}" from the path (sandbox_path.lua, the same parser
-- as the built-in router), calls req:set_timeouts{...} with that sandbox's timeouts, and then
-- hands the request to the built-in router.lua (loaded by path from the built-in directory;
-- `require "router"` would return this file). 404/503/400 answers are the built-in router's.
--
-- Config (config file section `route_timeouts`), seconds, fields connect / first_byte / idle:
--   route_timeouts = {
--       default       = { first_byte = 180 },
--       ["alice/*"]   = { first_byte = 900 },     -- every sandbox of user alice
--       ["bob/build"] = { idle = 3600 },          -- one sandbox
--   }
-- Precedence, field by field: the exact key beats the user wildcard, which beats `default`.
-- So bob/build above gets { first_byte = 180 (default), idle = 3600 (exact) }, and
-- alice/anything gets { first_byte = 900 }. A field nobody sets keeps the runtime's value
-- (--set connect_timeout / first_byte_timeout / upstream_idle_timeout). Merged tables are
-- computed once at load, so a request costs one or two table lookups. A misspelt field or
-- key shape fails at load (the worker does not start), not silently at request time.
--
-- Sandbox annotations are NOT consulted: discovery.lua stores only selected fields in a
-- route (namespace, name, user, address, port, ready, reason, service, conflict, mode, and
-- `meta`, which it uses for the apiVersion), so an annotation such as
-- "sandbox-proxy.dev/timeout" is not available here. Timeouts come from this config only.
-- (The port annotation works because discovery itself turns it into the route's port.)
--
-- Limits of req:set_timeouts (runtime): `idle` is the gap allowed between response bytes of
-- a plain HTTP exchange; an upgraded (WebSocket) tunnel uses the global tunnel_idle_timeout
-- and is not affected. A value of 0 or less cannot lower a field back to the default: it is
-- ignored.
local config = require "sp.config"
local core = require "sp.core"
local sandbox_path = require "sandbox_path"

local type = type
local pairs = pairs
local tostring = tostring
local find = string.find
local next = next
local select = select

local cfg = config.route_timeouts or {}
local M = {}

local FIELDS = { connect = true, first_byte = true, idle = true }

local function check_entry(name, t)
    assert(type(t) == "table", "route_timeouts[" .. name .. "] must be a table")
    for k, v in pairs(t) do
        assert(FIELDS[k], "route_timeouts[" .. name .. "]: unknown field '" .. tostring(k)
            .. "' (connect, first_byte, idle)")
        assert(type(v) == "number" and v > 0 and v < math.huge,
            "route_timeouts[" .. name .. "]." .. k .. " must be a positive number of seconds")
    end
    return t
end

local function merge(...)
    local out = {}
    for i = 1, select("#", ...) do
        local t = select(i, ...)
        if t then
            for k, v in pairs(t) do
                out[k] = v
            end
        end
    end
    return out
end

-- Builds the lookup tables from a config section (exposed so specs can rebuild).
--   default  the default entry (may be empty)
--   users    user -> default + "user/*"
--   exact    key  -> default + "user/*" + "user/name"
function M.compile(section)
    local default = {}
    local wild, exact_in = {}, {}
    for k, v in pairs(section or {}) do
        assert(type(k) == "string", "route_timeouts keys must be strings")
        if k == "default" then
            default = check_entry(k, v)
        else
            local user, rest = k:match("^([^/]+)/(.+)$")
            assert(user and not find(rest, "/", 1, true) and not find(user, "*", 1, true)
                and (rest == "*" or not find(rest, "*", 1, true)),
                "route_timeouts key '" .. k .. "' must be \"default\", \"user/*\" or \"user/name\"")
            if rest == "*" then
                wild[user] = check_entry(k, v)
            else
                exact_in[k] = check_entry(k, v)
            end
        end
    end
    local users = {}
    for user, t in pairs(wild) do
        users[user] = merge(default, t)
    end
    local exact = {}
    for key, t in pairs(exact_in) do
        local user = key:match("^([^/]+)/")
        exact[key] = merge(default, wild[user], t)
    end
    return { default = default, users = users, exact = exact }
end

local tables = M.compile(cfg)

-- Replaces the compiled config (tests).
function M.configure(section)
    tables = M.compile(section)
end

-- The timeouts of sandbox key user/name (a table; empty when nothing is configured).
-- The returned table is shared: do not modify it.
function M.timeouts_for(user, name)
    local t = tables.exact[user .. "/" .. name]
    if t then
        return t
    end
    return tables.users[user] or tables.default
end

-- The delegate: the built-in path router. Replaceable (tests, or another router module).
local dir = core.settings().builtin_dir
assert(dir, "route_timeouts needs the built-in scripts directory (not found)")
M.delegate = dofile(dir .. "/router.lua")

function M.handle(req)
    local user, name = sandbox_path.split(req:target())
    if user then
        local t = M.timeouts_for(user, name)
        if next(t) ~= nil then
            req:set_timeouts(t)
            req.ctx.route_timeouts = t
        end
    end
    return M.delegate.handle(req)
end

return M
