-- bench/replicas.lua: idle-suspend coordination across replicas (issue 16, "many replicas"),
-- against the project's API server stand-in (its Leases). Loopback only; every loop bounded.
--   1. N sandboxes (--sandboxes), of which --idle carry sandbox-proxy.dev/idle-timeout (30m: no
--      suspend during the run) and all of those receive traffic, spread over --replicas proxy
--      processes for --seconds seconds.
--   2. Reported: API-server writes (Lease creates/updates; Sandbox PATCHes, which must be 0)
--      per second in all and per replica, Lease watch events delivered, the size of the Leases,
--      the RSS of each replica.
--   3. A relist storm: the stand-in ends every Lease watch and refuses the old
--      resourceVersions (410), and compacts + drops the Sandbox watches: time until every
--      replica has listed both again, and what those LISTs cost (pages, bytes).
-- Run from the repository root:  bench/replicas [--sandboxes N] [--idle N] [--replicas N]
--   [--seconds S] [--interval S] [--flush S] [--suspend 0 (idle suspend off: a baseline)]
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local socket = require "socket"
local cjson = require "cjson"

local args = { sandboxes = 100000, idle = 10000, replicas = 5, seconds = 60, interval = 30,
    flush = 1, suspend = 1 }
args.page = 500 -- the kube_page_size default
local i = 1
while arg[i] do
    local k = arg[i]:match("^%-%-(.+)$")
    if k and args[k] then
        args[k] = tonumber(arg[i + 1])
        i = i + 1
    end
    i = i + 1
end

local function stats(api)
    return api:call("GET", "/leases").stats
end

io.stdout:setvbuf("line")
local ok, err = pcall(function()
    local up = H.upstream{ name = "bench" }
    local api = K.start{ bookmark_interval = 5, history = args.sandboxes + 1000 }
    local t0 = socket.gettime()
    if args.sandboxes > args.idle then
        api:bulk{ count = args.sandboxes - args.idle, namespace = "default",
            user_label_prefix = "u", name_prefix = "plain-" }
    end
    local names, batch = {}, {}
    for n = 1, args.idle do
        local name = ("idle-%06d"):format(n)
        names[n] = name
        local obj = H.sandbox("busy", name, up.port)
        obj.metadata.annotations["sandbox-proxy.dev/idle-timeout"] = "30m"
        batch[#batch + 1] = obj
        if #batch == 2000 or n == args.idle then
            api:put_all(batch)
            batch = {}
        end
    end
    print(("stand-in: %d sandboxes (%d with an idle timeout) in %.1f s"):format(args.sandboxes,
        args.idle, socket.gettime() - t0))
    local cfg = ("return { wake = { enabled = true, check_interval = 5, activity_interval = %s, "
        .. "activity_flush = %s, idle_suspend = %s, replica = '%%s' }, ratelimit = { enabled = false }, "
        .. "auth = { enabled = false } }"):format(args.interval, args.flush,
        tostring(args.suspend ~= 0))
    local pxs = {}
    local ts = socket.gettime()
    for r = 1, args.replicas do
        pxs[r] = api:proxy{ config = cfg:format("r" .. r), ready_wait = 600 }
    end
    print(("%d replicas ready (synced) in %.1f s"):format(args.replicas, socket.gettime() - ts))
    local base_req = api:stats().requests
    api:call("POST", "/leases/reset-stats")
    -- traffic: every idle-annotated sandbox, round-robin over the replicas (bounded in time
    -- and in count)
    local conns = {}
    for r, px in ipairs(pxs) do
        conns[r] = assert(px:connect{ timeout = 10 })
    end
    local tt = socket.gettime()
    local sent, bad, k = 0, 0, 0
    while socket.gettime() - tt < args.seconds and sent < 10000000 do
        k = k % #names + 1
        -- each pass over the sandboxes shifts the replica, so every replica serves each one
        local r = (sent + math.floor(sent / #names)) % #pxs + 1
        local resp = conns[r]:request{ path = "/busy/" .. names[k] .. "/echo" }
        if not resp or resp.status ~= 200 then
            bad = bad + 1
            conns[r] = assert(pxs[r]:connect{ timeout = 10 })
        end
        sent = sent + 1
    end
    local elapsed = socket.gettime() - tt
    local st = stats(api)
    local writes = st.creates + st.updates
    local leases = api:call("GET", "/leases").items
    local max_ann, entries = 0, 0
    for _, l in ipairs(leases) do
        local a = l.metadata.annotations["sandbox-proxy.dev/activity"] or ""
        max_ann = math.max(max_ann, #a)
        for _ in pairs((cjson.decode(a) or {}).a or {}) do
            entries = entries + 1
        end
    end
    local patches = 0
    for _, v in pairs(api:stats().patches or {}) do
        patches = patches + v
    end
    print(("\ntraffic: %d requests in %.1f s (%.0f req/s, %d not 200) over %d sandboxes and %d "
        .. "replicas"):format(sent, elapsed, sent / elapsed, bad, #names, #pxs))
    print(("API-server writes: %d Lease writes (%.2f/s, %.2f/s per replica), %d Sandbox PATCHes; "
        .. "%d conflicts; %.1f KiB written"):format(writes, writes / elapsed,
        writes / elapsed / #pxs, patches, st.conflicts, st.write_bytes / 1024))
    print(("Leases: %d objects, %d activity entries in all, largest annotation %d bytes"):format(
        #leases, entries, max_ann))
    print(("Lease watch events delivered: %d (%.1f/s)"):format(st.events_delivered,
        st.events_delivered / elapsed))
    local rss = {}
    for r, px in ipairs(pxs) do
        rss[r] = ("%d"):format((px:rss_kib() or 0) / 1024)
    end
    print("RSS per replica (MiB): " .. table.concat(rss, " "))
    -- relist storm
    local before = api:stats().requests
    local lists0 = before.list or 0
    api:call("POST", "/leases/reset-stats")
    local t1 = socket.gettime()
    api:call("POST", "/leases/expire")
    api:compact()
    api:drop_watches()
    local pages = math.ceil(args.sandboxes / args.page)
    H.net.wait_until(function()
        local s = stats(api)
        return (args.suspend == 0 or s.lists >= #pxs)
            and (api:stats().requests.list or 0) - lists0 >= #pxs * pages
    end, 600, 0.05, "every replica to relist")
    local took = socket.gettime() - t1
    local s = stats(api)
    print(("\nrelist storm: every replica listed Sandboxes (%d pages of %d each) and Leases "
        .. "again in %.1f s; Lease LIST bytes %d"):format(pages, args.page, took, s.list_bytes))
    -- the size of one full Sandbox LIST (what each replica reads on a relist)
    local bytes, cont, npages = 0, nil, 0
    repeat
        local r = assert(H.http.request{ port = api.port, path = "/apis/agents.x-k8s.io/v1beta1/"
            .. "sandboxes?limit=" .. args.page .. (cont and ("&continue=" .. cont) or "") })
        bytes = bytes + #r.body
        npages = npages + 1
        cont = (cjson.decode(r.body).metadata or {}).continue
    until not cont or cont == "" or npages > 100000
    print(("one Sandbox LIST: %d pages, %.1f MiB; %d replicas: %.1f MiB"):format(npages,
        bytes / 1048576, #pxs, bytes * #pxs / 1048576))
    local _ = base_req
end)
H.stop_all()
if not ok then
    io.stderr:write(tostring(err) .. "\n")
    os.exit(1)
end
