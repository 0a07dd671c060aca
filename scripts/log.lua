-- log.lua: the access log. One JSON line per request on stdout, written by the runtime's
-- buffered writer (never blocks the loop; flushed every access_log_flush seconds and at exit,
-- so a SIGTERM drain loses nothing):
--   {"time":..,"request_id":..,"client":..,"method":..,"path":..,"status":..,"bytes_in":..,
--    "bytes_out":..,"duration":..,"upstream_connect":..,"upstream_first_byte":..,"user":..,
--    "sandbox":..,"upstream":..,"ratelimit":..,"error":..,"worker":..}
-- (durations in seconds; absent values are left out).
-- Config (section `access_log`): enabled (true), fields (a list: which of the names above to
-- write, default all), query (false: also write the query string).
local core = require "sp.core"
local config = require "sp.config"
local cjson = require "cjson"

local encode = cjson.encode
local iso8601 = core.iso8601
local access_log = core.access_log
local gsub = string.gsub

local cfg = config.access_log or {}
local M = {}

M.enabled = cfg.enabled ~= false

local ALL = { "time", "request_id", "client", "method", "path", "query", "status", "bytes_in",
    "bytes_out", "duration", "upstream_connect", "upstream_first_byte", "user", "sandbox",
    "upstream", "ratelimit", "error", "worker" }
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
    if fields.ratelimit and ctx then out.ratelimit = ctx.ratelimit end
    if fields.error then out.error = rec.error end
    if fields.worker then out.worker = rec.worker end
    return out
end

function M.write(req)
    if not M.enabled then
        return
    end
    -- cjson escapes '/' as '\/': paths read better without
    access_log((gsub(encode(M.record(req)), "\\/", "/")))
end

return M
