-- bench/listing.lua: /sandboxes against a big route table, and memory by route count.
--   1. listing: the proxy (one worker, auth on, the file source) holds --routes routes (users
--      u0..u99 plus `lonely`, who owns one sandbox, and `probe`, who owns the probed one).
--      bench/listing_load.py runs 4 connections of GET /sandboxes back to back (`user`: the
--      lonely user's listing; `admin`: an admin's paginated walk of the whole table, limit
--      500) while a probe client sends GET /probe/sb/echo to an upstream one after another;
--      reported: the probe's p50, p99 and worst latency, next to the same run without the
--      listing load (`none`), and the listings served.
--   2. memory: RSS (and peak) of a fresh proxy once 1,000 / 10,000 / 100,000 routes are
--      loaded, from the file source and from the Kubernetes source (the stand-in).
-- Run from the repository root:  bench/listing [--routes N] [--duration S] [--steps listing,memory]
--   [--modes none,user,admin,none] [--sizes 1000,10000,100000] [--chunk N] (sandboxes.chunk)
--   [--scripts DIR] (another scripts directory, e.g. an older checkout's, for a before figure)
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local process = require "spec.helpers.process"
local cjson = require "cjson"

local args = { routes = 100000, duration = 10, steps = "listing,memory", scripts = nil,
    sizes = "1000,10000,100000", modes = "none,user,admin,none", chunk = nil }
local i = 1
while arg[i] do
    local k = arg[i]:match("^%-%-(.+)$")
    if k and arg[i + 1] then
        args[k] = tonumber(arg[i + 1]) or arg[i + 1]
        i = i + 1
    end
    i = i + 1
end
local steps = {}
for s in tostring(args.steps):gmatch("[^,]+") do
    steps[s] = true
end

local function sh(cmd)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    return out
end

local function sha256_hex(s)
    return (sh("printf %s '" .. s .. "' | sha256sum"):match("^(%x+)"))
end

local function mib(kb)
    return ("%.1f MiB"):format(kb / 1024)
end

local function ms(s)
    return s and ("%.2f ms"):format(s * 1000) or "-"
end

local function memory_of(px)
    local st = process.read_file("/proc/" .. px:pid() .. "/status")
    return tonumber(st:match("VmRSS:%s*(%d+)")), tonumber(st:match("VmHWM:%s*(%d+)"))
end

local function wait_routes(px, n)
    local ok, err = pcall(H.net.wait_until, function()
        local r = H.http.request{ port = px.port, path = "/health", timeout = 2 }
        return r and r.status == 200 and cjson.decode(r.body).sandboxes == n
    end, 300, 0.05, n .. " routes loaded")
    if not ok then
        for l in (px:stderr() or ""):gmatch("[^\n]+") do
            if l:find('"level":"error"', 1, true) or l:find('"level":"warn"', 1, true) then
                io.stderr:write(l, "\n")
            end
        end
        error(err, 0)
    end
end

local ok, err = pcall(function()
    if steps.listing then
        local up = H.upstream{ name = "probe" }
        local items = {}
        for n = 1, args.routes - 2 do
            items[n] = H.sandbox("u" .. (n % 100), "sb" .. n, 8888)
        end
        items[#items + 1] = H.sandbox("lonely", "only", 8888)
        items[#items + 1] = H.sandbox("probe", "sb", up.port)
        local dir = H.tmpdir()
        local keys = { lonely = "lonely-key-1", probe = "probe-key-1", ops = "ops-key-1" }
        local kf = assert(io.open(dir .. "/keys.json", "w"))
        kf:write(cjson.encode({ keys = {
            { user = "lonely", sha256 = sha256_hex(keys.lonely) },
            { user = "probe", sha256 = sha256_hex(keys.probe) },
            { user = "ops", sha256 = sha256_hex(keys.ops), admin = true },
        } }))
        kf:close()
        local px = H.start{ sandboxes = items, wait = false, scripts = args.scripts,
            config = "return { auth = { keys_file = '" .. dir .. "/keys.json' }, ratelimit = { "
                .. "limits = { { name = 'client', key = 'client', rate = 1e9, burst = 1e9 } } }, "
                .. "access_log = { enabled = false }, sandboxes = { chunk = " .. tostring(args.chunk or 50)
                .. " } }" }
        wait_routes(px, args.routes)
        print(("listing: %d routes, one worker, auth on; 4 connections of GET /sandboxes for "
            .. "%d s while a probe sends GET /probe/sb/echo one after another"):format(args.routes,
            args.duration))
        print(("  %-44s %9s %9s %9s %9s %14s"):format("listing load", "probe n", "p50", "p99",
            "worst", "listings/s"))
        for mode in tostring(args.modes):gmatch("[^,]+") do
            local out = sh(("%s %s/bench/listing_load.py --port %d --mode %s --list-key %s "
                .. "--probe-key %s --probe-path /probe/sb/echo --duration %s"):format(H.PYTHON,
                H.SOURCE_DIR, px.port, mode, mode == "admin" and keys.ops or keys.lonely,
                keys.probe, tostring(args.duration)))
            local r = cjson.decode((assert(out:match("([^\n]+)\n?$"), "no result from the load")))
            local what = ({ none = "none (baseline)",
                user = "user with 1 sandbox (1 page of 1)",
                admin = "admin, paginated walk (limit 500)" })[mode]
            local rate = r.listing.requests / r.listing.seconds
            print(("  %-44s %9d %9s %9s %9s %14s%s"):format(what, r.probe.requests, ms(r.probe.p50),
                ms(r.probe.p99), ms(r.probe.max), mode == "none" and "-" or ("%.0f"):format(rate),
                (r.listing.errors > 0 or (r.probe.statuses["200"] or 0) ~= r.probe.requests)
                    and "  (ERRORS: " .. cjson.encode(r) .. ")" or ""))
            if mode == "admin" then
                print(("  %-44s %d whole walks of %d routes, %.0f MB of JSON"):format("",
                    r.listing.walks, args.routes, r.listing.bytes / 1e6))
            end
        end
        px:stop()
        H.stop_all()
    end

    if steps.memory then
        print("\nmemory: RSS of a fresh proxy (one worker) once the routes are loaded; peak (VmHWM)")
        print(("  %-10s %22s %22s"):format("routes", "file source", "Kubernetes source"))
        for size in tostring(args.sizes):gmatch("%d+") do
            local n = tonumber(size)
            local items = {}
            for j = 1, n do
                items[j] = H.sandbox("u" .. (j % 100), "sb" .. j, 8888)
            end
            local px = H.start{ sandboxes = items, wait = false, scripts = args.scripts }
            items = nil
            collectgarbage()
            wait_routes(px, n)
            local frss, fhwm = memory_of(px)
            px:stop()
            local api = K.start{ bookmark_interval = 5, history = n + 10 }
            api:bulk{ count = n, namespace = "default", user_label_prefix = "u", ready = true,
                pod_ip = "127.0.0.1" }
            local kpx = api:proxy{ wait = false, scripts = args.scripts }
            wait_routes(kpx, n)
            local krss, khwm = memory_of(kpx)
            kpx:stop()
            api:stop()
            print(("  %-10d %22s %22s"):format(n, mib(frss) .. " (" .. mib(fhwm) .. ")",
                mib(krss) .. " (" .. mib(khwm) .. ")"))
        end
    end
end)
H.stop_all()
if not ok then
    io.stderr:write(tostring(err) .. "\n")
    os.exit(1)
end
