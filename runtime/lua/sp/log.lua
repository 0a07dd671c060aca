-- sp.log: leveled event logging for scripts. Each call writes one JSON line to stderr:
-- {"time":...,"level":...,"msg":...,<fields>}. Fields are a table of extra keys.
local core = require "sp.core"
local cjson = require "cjson.safe"

local log_write = core.log_write
local log_enabled = core.log_enabled
local iso8601 = core.iso8601
local encode = cjson.encode
local type = type
local pairs = pairs
local tostring = tostring
local concat = table.concat

local M = {}

local function line(level, msg, fields)
    local parts = { '{"time":', encode(iso8601()), ',"level":"', level, '","msg":',
        encode(tostring(msg)) }
    if type(fields) == "table" then
        for k, v in pairs(fields) do
            local ev = encode(v)
            if ev == nil then
                ev = encode(tostring(v))
            end
            parts[#parts + 1] = ","
            parts[#parts + 1] = encode(tostring(k))
            parts[#parts + 1] = ":"
            parts[#parts + 1] = ev
        end
    end
    parts[#parts + 1] = "}"
    return concat(parts)
end

for _, level in ipairs({ "debug", "info", "warn", "error" }) do
    M[level] = function(msg, fields)
        if log_enabled(level) then
            log_write(level, line(level, msg, fields))
        end
    end
end

-- The JSON line that M.<level> would write (for tests and custom sinks).
M.format = line

return M
