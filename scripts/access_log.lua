-- access_log.lua: the access log (named log.lua before 0.2; sp.log is the event log). One
-- JSON line per request on stdout, formatted by the runtime (req:access_log) and written by
-- its buffered writer (never blocks the loop; flushed every access_log_flush seconds and at
-- exit, so a SIGTERM drain loses nothing); the fields in line order are sp.request.LOG_LINE:
--   {"time":..,"request_id":..,"client":..,"method":..,"path":..,"status":..,"bytes_in":..,
--    "bytes_out":..,"duration":..,"upstream_connect":..,"upstream_first_byte":..,
--    "upstream":..,"error":..,"delivered":..,"user":..,"sandbox":..,"ratelimit":..,"worker":..}
-- (durations in seconds, to the microsecond; absent values are left out; `delivered` is written
-- with `error` for a forwarded request that failed: false when nothing reached the sandbox).
-- Config (section `access_log`): enabled (true), fields (a list: which of the names above to
-- write, default all), query (false: also write the query string).
local core = require "sp.core"
local config = require "sp.config"

local iso8601 = core.iso8601

local cfg = config.access_log or {}
local M = {}

M.enabled = cfg.enabled ~= false

local LOG_LINE = require("sp.request").LOG_LINE
local ALL = {}
for i, f in ipairs(LOG_LINE) do
    ALL[i] = f[1]
end
local fields = {}
for _, f in ipairs(cfg.fields or ALL) do
    if f ~= "query" or cfg.query then
        fields[f] = true
    end
end
M.fields = fields

-- The values only the scripts know, from the request's ctx.
local SCRIPT_FIELD = {
    user = function(ctx) return ctx.route and ctx.route.user end,
    sandbox = function(ctx) return ctx.route and ctx.route.name end,
    ratelimit = function(ctx) return ctx.ratelimit end,
}

-- The record of one exchange as the table that becomes the line.
function M.record(req)
    local rec = req:record()
    local ctx = rawget(req, "ctx")
    local out = {}
    for _, f in ipairs(LOG_LINE) do
        local name = f[1]
        if fields[name] then
            if name == "time" then
                out.time = iso8601()
            elseif f[2] then
                out[name] = rec[name]
                if name == "error" and rec.error then
                    out.delivered = rec.delivered -- nil unless the request was forwarded
                end
            elseif ctx and SCRIPT_FIELD[name] then
                out[name] = SCRIPT_FIELD[name](ctx)
            end
        end
    end
    if out.query == "" or (ctx and ctx.secret_query) then
        out.query = nil
    end
    return out
end

-- The line itself is written by the runtime (req:access_log): the fields it knows as a bit
-- mask, the ones only the scripts know (user, sandbox, rate-limit decision) as name/value
-- pairs. No table and no JSON encoding in Lua per request. M.record gives the same content
-- as a table, for scripts that want to send it elsewhere.
local LOG_FIELDS = require("sp.request").LOG_FIELDS
local mask = 0
for f in pairs(fields) do
    mask = mask + (LOG_FIELDS[f] or 0)
end
M.mask = mask
local mask_secret = fields.query and mask - LOG_FIELDS.query or mask
local want_user, want_sandbox, want_ratelimit = fields.user, fields.sandbox, fields.ratelimit

function M.write(req)
    if not M.enabled then
        return
    end
    local ctx = rawget(req, "ctx")
    local route = ctx and ctx.route
    -- a query string that carried a credential (browser.lua's login) is never written
    req:access_log(ctx and ctx.secret_query and mask_secret or mask,
        "user", want_user and route and route.user or nil,
        "sandbox", want_sandbox and route and route.name or nil,
        "ratelimit", want_ratelimit and ctx and ctx.ratelimit or nil)
end

return M
