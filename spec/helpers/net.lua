-- Network/polling helpers for specs.
--
--   local net = require "spec.helpers.net"
--   local port = net.free_port()
--   assert(net.wait_port("127.0.0.1", port, 5, proc))
--   local v = net.wait_until(function() return check() end, 2)
--
-- Error convention: free_port/wait_port return nil, "message" on failure;
-- wait_until raises (it is an assertion helper).

local socket = require "socket"

local now = socket.gettime
local unpack = unpack or table.unpack
local sformat = string.format

local M = {}

-- Ports handed out by this process recently, so two free_port() calls in a
-- row never return the same number.
local handed_out = {}

--- A currently-free TCP port on 127.0.0.1 (or `host`). Racy by nature: bind
-- it soon. Returns port or nil, err.
function M.free_port(host)
    host = host or "127.0.0.1"
    local last_err
    for _ = 1, 50 do
        local s = socket.tcp()
        local ok, err = s:bind(host, 0)
        if ok then
            local _, port = s:getsockname()
            s:close()
            port = tonumber(port)
            if port and not handed_out[port] then
                handed_out[port] = true
                return port
            end
        else
            s:close()
            last_err = err
        end
    end
    return nil, "free_port: could not find a free port: " .. tostring(last_err)
end

--- Poll until a TCP connect to host:port succeeds (every 10 ms).
-- timeout_s default 5. If `proc` (a spec.helpers.process object) is given,
-- fail fast when it exits. Returns true or nil, "message".
function M.wait_port(host, port, timeout_s, proc)
    host = host or "127.0.0.1"
    local deadline = now() + (timeout_s or 5)
    local last_err = "not tried"
    while true do
        local s = socket.tcp()
        s:settimeout(math.max(0.05, math.min(1, deadline - now())))
        local ok, err = s:connect(host, port)
        s:close()
        if ok then return true end
        last_err = err
        if proc and not proc:alive() then
            return nil, sformat("wait_port %s:%s: process %s exited (%s %s) before the port opened",
                                host, tostring(port), tostring(proc:pid()), tostring(proc.how), tostring(proc.value))
        end
        if now() >= deadline then
            return nil, sformat("wait_port %s:%s: timeout after %.2fs (last error: %s)",
                                host, tostring(port), timeout_s or 5, tostring(last_err))
        end
        socket.sleep(0.01)
    end
end

local function pack(...)
    return { n = select("#", ...), ... }
end

local function describe(vals, n)
    local parts = {}
    for i = 1, math.max(n, 1) do parts[#parts + 1] = tostring(vals[i]) end
    return table.concat(parts, ", ")
end

--- Poll fn() every interval_s (default 0.01) until it returns a truthy first
-- value; returns all of fn's return values. Errors raised by fn count as
-- "not yet" (so assertions can be used inside fn). On timeout (default 5 s)
-- raises an error that includes the last return values / error of fn.
function M.wait_until(fn, timeout_s, interval_s, what)
    timeout_s = timeout_s or 5
    interval_s = interval_s or 0.01
    local deadline = now() + timeout_s
    local last
    while true do
        local res = pack(pcall(fn))
        if res[1] then
            if res[2] then return unpack(res, 2, res.n) end
            last = "last result: " .. describe({ unpack(res, 2, res.n) }, res.n - 1)
        else
            last = "last error: " .. tostring(res[2])
        end
        if now() >= deadline then
            error(sformat("wait_until%s: condition not met within %.2fs (%s)",
                          what and (" [" .. what .. "]") or "", timeout_s, last), 2)
        end
        socket.sleep(math.max(0, math.min(interval_s, deadline - now())))
    end
end

return M
