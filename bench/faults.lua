-- bench/faults.lua: upstream faults at volume. N requests (default 100,000) through the proxy,
-- mixing healthy sandbox requests with sandboxes that die mid-response, reset the connection,
-- answer garbage, or never answer (black-holed). Checks that every faulty request fails
-- cleanly (502/504 or a closed connection, never a response that looks complete), that every
-- healthy one succeeds untouched, and that the proxy's descriptors and memory come back to
-- where they were. Run from the repository root:  bench/faults [--requests N]
local H = require "spec.helpers.proxy"
local http = require "spec.helpers.http"
local process = require "spec.helpers.process"
local socket = require "socket"

local N = 100000
for i = 1, #arg do
    if arg[i] == "--requests" then
        N = tonumber(arg[i + 1])
    end
end

local function fds(pid)
    local p = io.popen("ls /proc/" .. pid .. "/fd | wc -l")
    local n = tonumber(p:read("*l"))
    p:close()
    return n
end

local function rss(pid)
    local s = process.read_file("/proc/" .. pid .. "/status")
    return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local ok, err = pcall(function()
    local up = H.upstream{ name = "faults" }
    local hole_port = assert(H.net.free_port())
    local hole = assert(socket.bind("127.0.0.1", hole_port, 1024)) -- listens, never accepts
    local px = H.start{ workers = 1, sandboxes = { H.sandbox("f", "ok", up.port),
        H.sandbox("f", "hole", hole_port) },
        set = { connect_timeout = 0.2, first_byte_timeout = 0.2, connect_retries = 0 },
        -- one client sends as fast as it can: the default per-client rate limit would refuse it
        config = "return { ratelimit = { enabled = false } }" }
    local pid = px:pid()
    -- warm up, then take the baseline
    for _ = 1, 200 do
        http.request{ port = px.port, path = "/f/ok/echo" }
    end
    local fd0, rss0 = fds(pid), rss(pid)
    local kinds = {
        { "/f/ok/echo", "ok" }, { "/f/ok/echo", "ok" }, { "/f/ok/bytes/2000", "ok" },
        { "/f/ok/echo", "ok" }, { "/f/ok/close-mid?n=3000", "mid" }, { "/f/ok/reset", "reset" },
        { "/f/ok/garbage", "garbage" }, { "/f/ok/bad-chunked?valid_chunks=1", "badchunk" },
        { "/f/ok/echo", "ok" }, { "/f/hole/x", "hole" },
    }
    local counts, bad = {}, {}
    local conn
    local t0 = socket.gettime()
    for i = 1, N do
        local k = kinds[(i - 1) % #kinds + 1]
        if k[2] == "hole" and i % 1000 ~= 10 then
            k = kinds[1] -- black holes are slow (a timeout each): 1 in 1,000
        end
        conn = conn or assert(px:connect{ timeout = 10 })
        local r, e = conn:request{ path = k[1] }
        local outcome
        if r and r.status == 200 and k[2] == "ok" then
            outcome = "ok"
        elseif r and (r.status == 502 or r.status == 504) and k[2] ~= "ok" then
            outcome = "clean " .. r.status
        elseif not r and k[2] ~= "ok" and tostring(e):find("protocol error", 1, true) then
            outcome = "closed" -- the head went out, then the connection was closed mid-body
        else
            outcome = "BAD " .. k[2] .. " " .. tostring(r and r.status) .. " " .. tostring(e)
            bad[#bad + 1] = outcome
        end
        counts[outcome] = (counts[outcome] or 0) + 1
        if not r or r.closed or (r.headers["connection"] == "close") then
            conn:close()
            conn = nil
        end
    end
    if conn then
        conn:close()
    end
    local took = socket.gettime() - t0
    -- let idle pooled connections and closing handles settle
    H.net.wait_until(function() return fds(pid) <= fd0 + 2 end, 70, 0.2)
    local fd1, rss1 = fds(pid), rss(pid)
    print(("%d requests in %.1f s (%.0f/s)"):format(N, took, N / took))
    local keys = {}
    for k in pairs(counts) do
        keys[#keys + 1] = k
    end
    table.sort(keys)
    for _, k in ipairs(keys) do
        print(("  %-14s %d"):format(k, counts[k]))
    end
    print(("descriptors: %d before, %d after; RSS: %d KiB before, %d KiB after"):format(
        fd0, fd1, rss0, rss1))
    hole:close()
    assert(#bad == 0, #bad .. " requests failed uncleanly, e.g. " .. tostring(bad[1]))
    assert(fd1 <= fd0 + 2, "descriptors leaked")
    assert(rss1 < rss0 + 16 * 1024, "memory grew by " .. (rss1 - rss0) .. " KiB")
    print("no unclean failures, no descriptor or memory growth")
end)
H.stop_all()
if not ok then
    io.stderr:write(tostring(err) .. "\n")
    os.exit(1)
end
