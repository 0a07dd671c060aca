-- log.lua: the access log. One JSON line per request on stdout, formatted by the runtime
-- (req:access_log) and written by its buffered writer (never blocks the loop; flushed every
-- access_log_flush seconds and at exit, so a SIGTERM drain loses nothing):
--   {"time":..,"request_id":..,"client":..,"method":..,"path":..,"status":..,"bytes_in":..,
--    "bytes_out":..,"duration":..,"upstream_connect":..,"upstream_first_byte":..,
--    "upstream":..,"trace_id":..,"error":..,"user":..,"sandbox":..,"ratelimit":..,"worker":..}
-- (trace_id: the W3C trace id the sandbox received in traceparent; only while tracing is on)
-- (durations in seconds, to the microsecond; absent values are left out).
-- Config (section `access_log`): enabled (true), fields (a list: which of the names above to
-- write, default all), query (false: also write the query string).
local core = require "sp.core"
local config = require "sp.config"

local iso8601 = core.iso8601

local cfg = config.access_log or {}
local M = {}

M.enabled = cfg.enabled ~= false

local ALL = { "time", "request_id", "client", "method", "path", "query", "status", "bytes_in",
    "bytes_out", "duration", "upstream_connect", "upstream_first_byte", "user", "sandbox",
    "upstream", "trace_id", "ratelimit", "error", "worker" }
local fields = {}
for _, f in ipairs(cfg.fields or ALL) do
    if f ~= "query" or cfg.query then
        fields[f] = true
    end
end
M.fields = fields

-- The record of one exchange as the table that becomes the line.
function M.record(req)
    local rec = req:record()
    local ctx = rawget(req, "ctx")
    local route = ctx and ctx.route
    local out = {}
    if fields.time then out.time = iso8601() end
    if fields.request_id then out.request_id = rec.request_id end
    if fields.client then out.client = rec.client end
    if fields.method then out.method = rec.method end
    if fields.path then out.path = rec.path end
    if fields.query and rec.query ~= "" then out.query = rec.query end
    if fields.status then out.status = rec.status end
    if fields.bytes_in then out.bytes_in = rec.bytes_in end
    if fields.bytes_out then out.bytes_out = rec.bytes_out end
    if fields.duration then out.duration = rec.duration end
    if fields.upstream_connect then out.upstream_connect = rec.upstream_connect end
    if fields.upstream_first_byte then out.upstream_first_byte = rec.upstream_first_byte end
    if route then
        if fields.user then out.user = route.user end
        if fields.sandbox then out.sandbox = route.name end
    end
    if fields.upstream then out.upstream = rec.upstream end
    if fields.trace_id then out.trace_id = rec.trace_id end
    if fields.ratelimit and ctx then out.ratelimit = ctx.ratelimit end
    if fields.error then out.error = rec.error end
    if fields.worker then out.worker = rec.worker end
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
local want_user, want_sandbox, want_ratelimit = fields.user, fields.sandbox, fields.ratelimit

function M.write(req)
    if not M.enabled then
        return
    end
    local ctx = rawget(req, "ctx")
    local route = ctx and ctx.route
    req:access_log(mask,
        "user", want_user and route and route.user or nil,
        "sandbox", want_sandbox and route and route.name or nil,
        "ratelimit", want_ratelimit and ctx and ctx.ratelimit or nil)
end

return M
