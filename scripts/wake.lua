-- wake.lua: wake on request and idle suspend.
--
-- Wake on request: a request for a sandbox that is suspended (spec.operatingMode Suspended in
-- v1beta1, spec.replicas 0 in v1alpha1) makes the proxy send ONE merge-PATCH setting it
-- running again (shared by every request and worker: the first to claim it in the "wake"
-- shared dict asks worker 0, which owns the Kubernetes client), and holds the request until the
-- watch reports Ready=True, then proxies it. The whole start is held, not only its first step:
-- after the PATCH the controller first leaves the status suspended (spec Running, Ready=False
-- SandboxSuspended), then writes Ready=False DependenciesNotReady while the pod starts, then
-- Ready=True. A sandbox is "waking" (held, never PATCHed again) when
--   * its spec says running but its status still says SandboxSuspended (a PATCH, this
--     replica's or another's, is taking effect), or
--   * it is starting (DependenciesNotReady) and the shared mark waking:<key> says a wake is
--     under way: set when this proxy claims the PATCH, and by worker 0's route_changed when the
--     watch shows the sandbox leave the suspended state (so another replica's wake counts too);
--     cleared when it is Ready, terminal or deleted, and expiring after patch_timeout + max_wait.
-- A sandbox starting for another reason (just created, pod restarted) is held only with
-- wait_starting. A PATCH that fails (403 without the wake RBAC, 404, 409, 5xx, no answer) is
-- logged once ("cannot wake the sandbox") and the requests held for it, and those arriving in
-- the next retry_after seconds, get 503 {"error":"sandbox wake failed","path":..,"status":N}
-- with Retry-After (status 0: no answer); the next request after that tries again.
-- Bounded: at most max_held_per_sandbox held requests per sandbox and max_held in total; past
-- that, or at the deadline, 503 {"error":"sandbox waking","path":..} with Retry-After. A
-- client that disconnects while held is released at once. Terminal reasons (PodFailed,
-- SandboxExpired, PodSucceeded) are never woken: the router answers 503 with the reason.
--
-- Idle suspend (opt-in per sandbox): a Sandbox annotated `sandbox-proxy.dev/idle-timeout:
-- "30m"` is suspended after that long with no request and no open tunnel through ANY replica.
-- Replicas coordinate through the API server only, with a write rate bounded by replicas, not
-- sandboxes: each publishes the sandboxes it served (and those with a request or tunnel open)
-- in its own coordination.k8s.io Lease (annotation sandbox-proxy.dev/activity; sharded over
-- several Leases past lease_bytes), written every activity_interval and within activity_flush
-- of a sandbox getting a request the Lease does not report open yet (or reports as last active
-- more than min(activity_interval, idle/2) ago); every replica watches all the Leases. An
-- "open" report counts until its Lease expires (renewTime + leaseDurationSeconds), so a
-- replica that is gone stops counting. The decision is safe against late watches and slow
-- replicas: a sandbox's idle clock starts again when it starts running (a wake through any
-- replica is activity everywhere); a request held for a wake is open from its arrival and the
-- waker's Lease says so before its wake PATCH is sent; a replica about to suspend re-reads
-- every Lease (a LIST, not its watch's view) and its own requests right before the PATCH,
-- which carries the resourceVersion it last saw as a precondition (a 409 means another
-- replica acted first and this one backs off). Never suspends with a request or WebSocket in
-- flight on this replica, nor before the Leases are listed. The
-- per-sandbox annotation sandbox-proxy.dev/last-activity of earlier versions is still read.
--
-- Off by default: waking needs `patch` on sandboxes (k8s/overlays/wake/rbac-wake.yaml), so it is
-- enabled in the config together with that role. Config (section `wake`; defaults shown):
--   enabled = false,            -- wake suspended sandboxes on request (and idle suspend)
--   wait_starting = false,      -- also hold sandboxes starting for another reason than a wake
--   max_wait = 60,              -- seconds a request may be held (capped by its own deadline)
--   max_held_per_sandbox = 100, max_held = 1000,
--   retry_after = 5,            -- Retry-After of the 503s; how long a failed PATCH is remembered
--   patch_timeout = 15,         -- seconds for the PATCH to the API server
--   idle_suspend = true,        -- honour the idle-timeout annotation (when enabled)
--   check_interval = 5,         -- seconds between idle checks (worker 0)
--   activity_interval = 30,     -- seconds between this replica's Lease renewals
--   activity_flush = 1,         -- a sandbox that becomes active is published within this
--   lease_duration = 90,        -- leaseDurationSeconds (default 3 x activity_interval)
--   lease_bytes = 200000,       -- annotation bytes per Lease before sharding
--   lease_namespace = nil,      -- default $POD_NAMESPACE, the service account's, "default"
--   replica = nil,              -- this replica's name: $POD_NAME, $HOSTNAME, else host + random
local core = require "sp.core"
local config = require "sp.config"
local shared = require "sp.shared"
local routes = require "sp.routes"
local timer = require "sp.timer"
local log = require "sp.log"
local k8s = require "sp.k8s"
local cjson = require "cjson.safe"
local metrics = require "metrics"

local type = type
local tonumber = tonumber
local min = math.min

local cfg = config.wake or {}
local M = {}

M.enabled = cfg.enabled == true
M.wait_starting = cfg.wait_starting == true
local MAX_WAIT = cfg.max_wait or 60
local MAX_HELD_PER_SANDBOX = cfg.max_held_per_sandbox or 100
local MAX_HELD = cfg.max_held or 1000
local RETRY_AFTER = tostring(cfg.retry_after or 5)
local IDLE = M.enabled and cfg.idle_suspend ~= false
local CHECK_INTERVAL = cfg.check_interval or 5
local ACTIVITY_INTERVAL = cfg.activity_interval or 30
local PATCH_TIMEOUT = cfg.patch_timeout or 15

local GROUP = "agents.x-k8s.io"

local dict = shared.dict("wake") or assert(shared.dict("sp"))
local sp_dict = assert(shared.dict("sp"))
local DICT = shared.dict("wake") and "wake" or "sp"

local TERMINAL = { PodFailed = true, SandboxExpired = true, PodSucceeded = true }

-- How long a wake is remembered (waking:<key>) and a PATCH claim (patching:<key>) kept.
local WAKE_TTL = PATCH_TIMEOUT + MAX_WAIT
-- How long a failed PATCH is answered from memory before the next request tries again.
local FAIL_TTL = math.max(1, tonumber(RETRY_AFTER) or 5) -- (a TTL of 0 would never expire)

-- Suspended: what a PATCH to Running wakes (spec.operatingMode Suspended, or replicas 0).
function M.is_suspended(r)
    return r.mode == "Suspended"
end

-- Being woken: spec says Running, status still says SandboxSuspended (a PATCH, ours or
-- another replica's, is taking effect): wait for it, do not PATCH again.
function M.is_waking(r)
    return not r.ready and r.mode ~= "Suspended" and r.reason == "SandboxSuspended"
end

-- Starting: spec says Running, the pod is not ready yet.
function M.is_starting(r)
    return not r.ready and r.mode ~= "Suspended" and r.reason == "DependenciesNotReady"
end

-- What to do with a request for route r (pure, apart from reading the shared marks):
--   "wake"  PATCH it running (once, shared) and hold the request
--   "hold"  hold the request: a wake is under way, or it is starting and wait_starting is on
--   nil     do not hold: the caller answers (ready, terminal, disabled, starting unasked)
function M.decide(r)
    if r.ready or TERMINAL[r.reason] then
        return nil
    end
    if M.enabled then
        if M.is_suspended(r) then
            return "wake"
        end
        if M.is_waking(r) or (M.is_starting(r) and dict:get("waking:" .. r.key)) then
            return "hold"
        end
    end
    if M.wait_starting and M.is_starting(r) then
        return "hold"
    end
    return nil
end

-- The API path of a route's Sandbox.
local function sandbox_path(r)
    local version = (r.api_version or (GROUP .. "/v1beta1")):match("/(.+)$") or "v1beta1"
    return ("/apis/%s/%s/namespaces/%s/sandboxes/%s"):format(GROUP, version, r.namespace, r.name),
        version
end

-- Header-routed requests (sandbox_headers.lua) get the agent-sandbox router's "detail" too.
local function header_detail(req, text)
    local ctx = rawget(req, "ctx")
    local id = ctx and ctx.sandbox_id
    return id and ("Sandbox '" .. id .. "' " .. text) or nil
end

local function waking(req, key)
    return req:respond(503, { error = "sandbox waking", path = key,
        detail = header_detail(req, "is waking up; retry shortly.") },
        { ["Retry-After"] = RETRY_AFTER })
end

local function wake_failed(req, key, status)
    return req:respond(503, { error = "sandbox wake failed", path = key, status = status,
        detail = header_detail(req, "could not be woken.") },
        { ["Retry-After"] = RETRY_AFTER })
end

-- ------------------------------------------------------------------ wake on request

local HINTS = {
    [403] = "the proxy may not patch sandboxes: apply k8s/overlays/wake (rbac-wake.yaml)",
    [404] = "the sandbox is gone",
    [409] = "the sandbox changed meanwhile",
}

-- Worker 0: PATCH the sandbox running (one request at a time per sandbox: the caller holds
-- patching:<key>). On failure: one log line, the failure remembered for retry_after seconds
-- (wakefail:<key>) and the held requests woken to answer it.
function M.patch_running(key)
    local r = routes.get(key)
    if not r or not M.is_suspended(r) then
        dict:delete("patching:" .. key)
        return
    end
    if IDLE and r.idle_timeout and (dict:get("inflight:" .. (r.alias_of or key)) or 0) > 0
        and not M.publish_open(r.alias_of or key) then
        -- the wake goes ahead; another replica may suspend it again before this one's Lease
        -- says the request is open (it sees the wake as activity for one idle timeout)
        log.warn("waking before the activity lease reports the request", { key = key })
    end
    local path, version = sandbox_path(r)
    local body = version == "v1alpha1" and '{"spec":{"replicas":1}}'
        or '{"spec":{"operatingMode":"Running"}}'
    local status, resp = k8s.request{ method = "PATCH", path = path, body = body,
        content_type = "application/merge-patch+json", timeout = PATCH_TIMEOUT }
    if status and status >= 200 and status < 300 then
        -- patching:<key> stays until the watch shows the new spec (route_changed): a request
        -- arriving before that must not PATCH again
        sp_dict:incr("m:wakes", 1, 0)
        log.info("woke a suspended sandbox", { key = key, namespace = r.namespace, name = r.name })
        return
    end
    local code = tonumber(status) or 0
    local message = status and type(resp) == "string" and (cjson.decode(resp) or {}).message
        or resp
    dict:set("wakefail:" .. key, code, FAIL_TTL)
    sp_dict:incr("m:wake_failures", 1, 0)
    dict:delete("wakestart:" .. key)
    dict:delete("waking:" .. key)
    dict:delete("patching:" .. key)
    log.error("cannot wake the sandbox", { key = key, namespace = r.namespace, name = r.name,
        status = code, error = message, hint = HINTS[code] or (code >= 500 and
            "the API server failed" or code == 0 and "no answer from the API server" or nil) })
    core.post(-1, "route", key)
end

-- Holds the request until the sandbox is ready (waking it when suspended). Returns true if
-- it answered or forwarded, false to let the caller answer (terminal, disabled, not held).
-- forward(req, route) is how the caller proxies a ready route.
function M.handle(req, r, forward)
    local key = r.key
    local action = M.decide(r)
    if not action then
        return false
    end
    if action == "wake" then
        local failed = dict:get("wakefail:" .. key)
        if failed then
            wake_failed(req, key, failed)
            return true
        end
    end
    if not core.in_task() then
        return false -- not in a request's own coroutine (e.g. sp.testkit unit tests): no holding
    end
    if not req:hold(DICT, "held:" .. key, MAX_HELD_PER_SANDBOX) or
        not req:hold(DICT, "held:*", MAX_HELD) then
        waking(req, key)
        return true
    end
    -- a held request is activity, open from now on: the waker's Lease reports it before the
    -- wake PATCH goes out (patch_running), so no replica sees the sandbox running without it
    M.activity(req, r)
    -- the hold is the trace's "wake" span (req:wake_begin / req:wake_end: C marks, exported
    -- only with otlp_endpoint); patched: this request's wake sent the PATCH
    req:wake_begin()
    local patched = false
    local deadline = core.monotonic() + min(MAX_WAIT, req.ctx.deadline or MAX_WAIT)
    while true do -- sp.lint: ok, yields in core.wait; ends at the deadline
        if action == "wake" and dict:add("patching:" .. key, true, WAKE_TTL) then
            dict:set("waking:" .. key, true, WAKE_TTL)
            dict:set("wakestart:" .. key, core.now(), WAKE_TTL) -- for the duration metric
            core.post(0, "wake", key)
            patched = true
        end
        local left = deadline - core.monotonic()
        if left <= 0 then
            req:wake_end("timeout", patched)
            waking(req, key)
            return true
        end
        -- wake up at least every 2 s (a lost signal costs at most that)
        local ok, err = core.wait("route:" .. key, min(left, 2))
        if not ok and err and err:find("ECONNRESET", 1, true) then
            req:wake_end("client_gone", patched)
            return true -- the client went away: nothing to answer
        end
        local failed = dict:get("wakefail:" .. key)
        if failed then
            req:wake_end("failed", patched, failed)
            wake_failed(req, key, failed)
            return true
        end
        r = routes.get(key)
        if not r then
            req:wake_end("deleted", patched)
            return false -- deleted meanwhile: the caller answers 404
        end
        if r.ready and r.address and r.address ~= "" then
            req:wake_end("ready", patched)
            forward(req, r)
            return true
        end
        if TERMINAL[r.reason] then
            req:wake_end("terminal", patched)
            return false
        end
        -- once held, held through the whole start (whatever the status says meanwhile);
        -- suspended again (spec): woken again, through the shared claim
        action = M.is_suspended(r) and "wake" or "hold"
    end
end

-- Keys whose last route was suspended (worker 0, where discovery calls route_changed): a
-- later change to a running spec is a wake under way, whoever PATCHed.
local was_suspended = {}

-- Keeps the shared marks of key after its route changed (see the top of this file).
local function update_marks(key)
    local r = routes.get(key)
    if not r or r.ready or TERMINAL[r.reason] then
        -- a wake this proxy claimed ends here: its duration, from the claim to Ready
        local started = dict:get("wakestart:" .. key)
        if started then
            dict:delete("wakestart:" .. key)
            if r and r.ready and metrics.observe_wake then
                metrics.observe_wake(core.now() - started)
            end
        end
        was_suspended[key] = nil
        dict:delete("waking:" .. key)
        dict:delete("patching:" .. key)
    elseif M.is_suspended(r) then
        -- a PATCH in flight keeps its claim until the watch shows the new spec
        was_suspended[key] = true
    else
        -- spec running, not ready: the PATCH (if any) has landed
        dict:delete("patching:" .. key)
        if M.is_waking(r) or was_suspended[key] then
            dict:set("waking:" .. key, true, WAKE_TTL)
        end
        was_suspended[key] = nil
    end
end

-- Discovery calls this (worker 0) when a route changed: keeps the shared wake marks (only
-- when waking is on) and wakes the requests held for it on every worker.
function M.route_changed(key)
    if M.enabled then
        update_marks(key)
    end
    if IDLE then
        M.idle_clock(key)
    end
    if (dict:get("held:" .. key) or 0) > 0 then
        core.post(-1, "route", key)
    end
end

-- ------------------------------------------------------------------ activity and idle suspend

-- Keys whose route was last seen running (ready, spec not suspended), on worker 0.
local running = {}

-- Worker 0 (route_changed): a sandbox's idle clock starts again whenever it starts running
-- with an idle timeout (first seen, woken by a request through any replica, restarted,
-- annotated): running:<key> is when this replica saw that. A wake is activity on every
-- replica, whether or not the waker's Lease has been read yet.
function M.idle_clock(key)
    local r = routes.get(key)
    local up = r and r.idle_timeout and r.ready and r.mode ~= "Suspended" and true or nil
    if up and not running[key] then
        dict:set("running:" .. key, core.now())
    elseif not up then
        dict:delete("running:" .. key)
    end
    running[key] = up
end

local function iso_to_epoch(s)
    local y, mo, d, h, mi, sec, frac =
        tostring(s):match("^(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+)(%.?%d*)")
    if not y then
        return tonumber(s)
    end
    frac = tonumber("0" .. frac) or 0 -- MicroTime's fraction (renewTime) counts
    -- days from civil (Howard Hinnant's algorithm), UTC
    y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
    y = mo <= 2 and y - 1 or y
    local era = math.floor(y / 400)
    local yoe = y - era * 400
    local doy = math.floor((153 * (mo + (mo > 2 and -3 or 9)) + 2) / 5) + d - 1
    local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
    local days = era * 146097 + doe - 719468
    return days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(sec) + frac
end

-- The router calls this for every request it forwards to a sandbox with an idle timeout (and
-- wake.handle for a request it holds): it records this replica's activity and holds an
-- in-flight slot for the exchange (once per request). This replica's Leases are marked dirty
-- (worker 0 publishes them within activity_flush seconds) when the sandbox is not reported
-- open yet (a request or tunnel that stays open is published open at once, not at the next
-- renewal) or what was last published of it is older than min(activity_interval, half its
-- idle timeout) (another replica must see the request well before the timeout runs out).
function M.activity(req, r)
    if not IDLE or not r.idle_timeout then
        return
    end
    local key = r.alias_of or r.key -- a claim's alias shares its sandbox's idle clock
    local ctx = req.ctx
    if ctx and ctx.activity_key == key then
        return -- held for a wake, now forwarded: counted once
    end
    if ctx then
        ctx.activity_key = key
    end
    local now = core.now()
    dict:set("act:" .. key, now)
    req:hold(DICT, "inflight:" .. key, 1e9)
    local published = dict:get("pub:" .. key)
    local idle = tonumber(r.idle_timeout) or ACTIVITY_INTERVAL
    if not published or not dict:get("pubopen:" .. key)
        or now - published >= min(ACTIVITY_INTERVAL, idle / 2) then
        dict:set("lease:dirty", true)
    end
end

-- ------------------------------------------------------------------ the activity Leases
-- One coordination.k8s.io/v1 Lease per replica (per shard of it, when its activity does not
-- fit one object), written once per activity_interval and, when a sandbox becomes active,
-- within activity_flush: the write rate is bounded by replicas, not by sandboxes. Its
-- annotation sandbox-proxy.dev/activity holds {"t":T,"a":{key:age,...},"o":[key,...]}: the
-- sandboxes this replica served within their idle timeout (last at T - age) and those with a
-- request or tunnel open at T ("o": active until the Lease expires, renewTime +
-- leaseDurationSeconds). Every replica watches the Leases (one LIST + one WATCH) and keeps,
-- per sandbox, the latest activity any replica reported.

local bit = require "bit"

local LEASE_GROUP_PATH = "/apis/coordination.k8s.io/v1/namespaces/"
local LEASE_LABEL = "sandbox-proxy.dev/activity"
local LEASE_ANNOTATION = "sandbox-proxy.dev/activity"

local function read_file(path)
    local f = io.open(path, "r")
    if not f then
        return nil
    end
    local s = f:read("*l")
    f:close()
    return s and s ~= "" and s or nil
end

-- This replica's name (in a pod: POD_NAME or HOSTNAME, which is the pod's name).
local function replica_name()
    local name = cfg.replica or os.getenv("POD_NAME") or os.getenv("HOSTNAME")
    if not name then
        -- outside a pod: the host's name and a random suffix (several proxies on one host)
        local seed = core.now() * 1000 + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0)
        math.randomseed(math.floor(seed) % 2147483647)
        name = (read_file("/etc/hostname") or "proxy") .. ("-%06x"):format(math.random(0, 0xffffff))
    end
    name = tostring(name):lower():gsub("[^a-z0-9.-]", "-"):gsub("^[^a-z0-9]+", "")
        :gsub("[^a-z0-9]+$", "")
    return name:sub(1, 200)
end

local REPLICA = IDLE and replica_name() or nil
M.replica = REPLICA
local LEASE_NS = cfg.lease_namespace or os.getenv("POD_NAMESPACE")
    or read_file("/var/run/secrets/kubernetes.io/serviceaccount/namespace") or "default"
local LEASE_PREFIX = "sandbox-proxy-activity-" .. (REPLICA or "") .. "-"
local ACTIVITY_FLUSH = cfg.activity_flush or 1
local LEASE_DURATION = math.max(1, math.ceil(cfg.lease_duration or 3 * ACTIVITY_INTERVAL))
local LEASE_BYTES = cfg.lease_bytes or 200000 -- of the 256 KiB all annotations may hold
local LEASE_GC_AFTER = 3600 -- seconds past its expiry before an abandoned Lease is deleted

-- What the other replicas (and this one, through the watch) reported:
local remote_last = {}      -- key -> latest activity (epoch seconds) any Lease reported
local remote_open_until = {} -- key -> when the latest Lease reporting it open expires
local leases_synced = false
M.remote_last, M.remote_open_until = remote_last, remote_open_until

local function micro_time(t)
    -- MicroTime: RFC 3339 with exactly six fractional digits
    local s = core.iso8601(t)
    local base, ms = s:match("^(.-)%.(%d+)Z$")
    if base then
        return base .. "." .. (ms .. "000000"):sub(1, 6) .. "Z"
    end
    return (s:gsub("Z$", ".000000Z"))
end

local function shard_of(key, n)
    local h = 5381
    for i = 1, #key do
        h = bit.band(bit.bxor(h * 33, key:byte(i)), 0x7fffffff)
    end
    return h % n
end

-- Merges what one Lease reports into remote_last/remote_open_until; returns its metadata and
-- when it expires (nil if it reports nothing).
local function merge_lease(obj)
    if type(obj) ~= "table" then
        return
    end
    local meta, spec = obj.metadata or {}, obj.spec or {}
    local data = type(meta.annotations) == "table" and meta.annotations[LEASE_ANNOTATION]
    local doc = type(data) == "string" and cjson.decode(data)
    if type(doc) ~= "table" or type(doc.t) ~= "number" then
        return
    end
    local renew = iso_to_epoch(spec.renewTime or "") or doc.t
    local expires = renew + (tonumber(spec.leaseDurationSeconds) or 0)
    if type(doc.a) == "table" then
        for key, age in pairs(doc.a) do
            local t = doc.t - (tonumber(age) or 0)
            if t > (remote_last[key] or 0) then
                remote_last[key] = t
            end
        end
    end
    if type(doc.o) == "table" then
        for _, key in ipairs(doc.o) do
            if type(key) == "string" and expires > (remote_open_until[key] or 0) then
                remote_open_until[key] = expires
            end
            if type(key) == "string" and doc.t > (remote_last[key] or 0) then
                remote_last[key] = doc.t
            end
        end
    end
    return meta, expires
end

-- Reads one Lease (a watch event): merges what it reports.
function M.lease_event(kind, obj)
    if kind == "DELETED" then
        return
    end
    local meta, expires = merge_lease(obj)
    if not meta then
        return
    end
    -- an abandoned Lease (its replica is gone) long past its expiry: delete it (best effort)
    if meta.name and meta.name:sub(1, #LEASE_PREFIX) ~= LEASE_PREFIX
        and core.now() - expires > LEASE_GC_AFTER then
        timer.after(math.random() * 10, function()
            k8s.request{ method = "DELETE", path = LEASE_GROUP_PATH .. LEASE_NS .. "/leases/"
                .. meta.name, timeout = PATCH_TIMEOUT, retries = 0 }
        end)
    end
end

local lease_rv = {}     -- shard -> resourceVersion of our Lease (nil: unknown, create it)
local shards_written = 0
local last_write = 0
local writing = false

local function lease_object(i, doc)
    return {
        apiVersion = "coordination.k8s.io/v1", kind = "Lease",
        metadata = { name = LEASE_PREFIX .. i, namespace = LEASE_NS,
            resourceVersion = lease_rv[i],
            labels = { [LEASE_LABEL] = "v1", ["sandbox-proxy.dev/replica"] = REPLICA:sub(1, 63)
                :gsub("[^a-z0-9]+$", "") },
            annotations = { [LEASE_ANNOTATION] = doc } },
        spec = { holderIdentity = REPLICA, leaseDurationSeconds = LEASE_DURATION,
            renewTime = micro_time(core.now()) },
    }
end

local function rv_of(body)
    local o = type(body) == "string" and cjson.decode(body)
    return type(o) == "table" and type(o.metadata) == "table" and o.metadata.resourceVersion or nil
end

-- Writes shard i: PUT with the resourceVersion it last wrote (POST the first time); a 404
-- creates it, a 409 (it changed, or exists already) reads it once and writes again.
local function write_lease(i, doc)
    local base = LEASE_GROUP_PATH .. LEASE_NS .. "/leases"
    for _ = 1, 2 do
        local status, body
        if lease_rv[i] then
            status, body = k8s.request{ method = "PUT", path = base .. "/" .. LEASE_PREFIX .. i,
                body = cjson.encode(lease_object(i, doc)), content_type = "application/json",
                timeout = PATCH_TIMEOUT, retries = 0 }
        else
            status, body = k8s.request{ method = "POST", path = base,
                body = cjson.encode(lease_object(i, doc)), content_type = "application/json",
                timeout = PATCH_TIMEOUT, retries = 0 }
        end
        if status and status >= 200 and status < 300 then
            lease_rv[i] = rv_of(body)
            sp_dict:incr("m:lease_writes", 1, 0)
            return true
        end
        if status == 404 then
            lease_rv[i] = nil
        elseif status == 409 then
            local st, got = k8s.request{ path = base .. "/" .. LEASE_PREFIX .. i,
                timeout = PATCH_TIMEOUT, retries = 0 }
            lease_rv[i] = st == 200 and rv_of(got) or nil
        else
            log.warn("cannot write the activity lease", { lease = LEASE_PREFIX .. i,
                namespace = LEASE_NS, status = status or 0, hint = status == 403 and
                "the proxy may not write leases: apply k8s/overlays/wake (rbac-wake.yaml)" or nil })
            return false
        end
    end
    return false
end

-- What the last successful write of each shard reported: published[i] = { a = {key = the
-- activity time reported}, o = {key = true} } (a flush rewrites only the shards that need it).
-- The shared dict mirrors it per key for M.activity: pub:<key> (the activity time last
-- published) and pubopen:<key> (reported open by the last write).
local published = {}

-- Whether shard i must be written now (a flush): it reports a sandbox the last write did not,
-- one as open that was not, or an activity time the last write had too old (older than
-- min(activity_interval, half the sandbox's idle timeout) behind).
local function shard_stale(i, d, last_of)
    local p = published[i]
    if not p then
        return true
    end
    for _, key in ipairs(d.o) do
        if not p.o[key] then
            return true
        end
    end
    for key in pairs(d.a) do
        local before = p.a[key]
        if not before then
            return true
        end
        if not p.o[key] then -- (an open report stands until its Lease expires)
            local r = routes.get(key)
            local idle = r and tonumber(r.idle_timeout) or ACTIVITY_INTERVAL
            if last_of[key] - before >= min(ACTIVITY_INTERVAL, idle / 2) then
                return true
            end
        end
    end
    return false
end

-- Worker 0: publishes this replica's activity: every shard (renew = true), or only those
-- that need it (a flush: see shard_stale). Reported times are never earlier than the real
-- ones (t is exact, ages are rounded down), so another replica never sees activity older
-- than it was.
function M.publish(renew)
    if writing then
        return
    end
    writing = true
    dict:delete("lease:dirty")
    local now = core.now()
    local t = math.floor(now * 1000) / 1000
    local entries, last_of, open, bytes = {}, {}, {}, 0
    for key in pairs(require("discovery").idle_keys) do
        local last = dict:get("act:" .. key)
        local r = last and routes.get(key)
        local idle = r and tonumber(r.idle_timeout)
        if last and idle then
            local inflight = (dict:get("inflight:" .. key) or 0) > 0
            if inflight then
                -- a request or tunnel open now: active at every write
                last = t
                dict:set("act:" .. key, now)
                open[#open + 1] = key
            end
            if now - last <= idle + ACTIVITY_INTERVAL then
                entries[key] = math.max(0, math.floor(t - last))
                last_of[key] = t - entries[key]
                bytes = bytes + #key + 8
            end
        end
    end
    local n = 1
    while bytes / n > LEASE_BYTES - 1000 do
        n = n * 2
    end
    local docs = {}
    for i = 0, math.max(n, shards_written) - 1 do
        docs[i] = { t = t, a = {}, o = {} }
    end
    for key, age in pairs(entries) do
        docs[shard_of(key, n)].a[key] = age
    end
    for _, key in ipairs(open) do
        local o = docs[shard_of(key, n)].o
        o[#o + 1] = key
    end
    local ok = true
    for i = 0, math.max(n, shards_written) - 1 do
        local d = docs[i]
        if renew or n ~= shards_written or shard_stale(i, d, last_of) then
            local before = published[i]
            if write_lease(i, cjson.encode(d)) then
                local p = { a = {}, o = {} }
                for key in pairs(d.a) do
                    p.a[key] = last_of[key]
                    dict:set("pub:" .. key, last_of[key])
                end
                for _, key in ipairs(d.o) do
                    p.o[key] = true
                    dict:set("pubopen:" .. key, true)
                end
                for key in pairs(before and before.o or {}) do
                    if not p.o[key] then
                        dict:delete("pubopen:" .. key)
                    end
                end
                published[i] = p
            else
                -- written again at the next tick, whatever it reports
                published[i] = nil
                ok = false
            end
        end
    end
    shards_written = math.max(n, shards_written)
    if renew then
        last_write = now
    end
    if not ok then
        dict:set("lease:dirty", true)
    end
    writing = false
    core.signal("lease:written")
end

-- Worker 0: makes sure this replica's Leases report key open (a request held for a wake of
-- it) before the caller goes on: waits for a write under way, then flushes. Bounded by
-- patch_timeout; returns whether the Lease reports it.
function M.publish_open(key)
    local deadline = core.monotonic() + PATCH_TIMEOUT
    while writing and core.monotonic() < deadline do
        core.wait("lease:written", deadline - core.monotonic())
    end
    if not writing and not dict:get("pubopen:" .. key) then
        M.publish(false)
    end
    return dict:get("pubopen:" .. key) == true
end

-- Worker 0, every activity_flush: publish when a sandbox became active, or to renew.
local function lease_tick()
    if core.now() - last_write >= ACTIVITY_INTERVAL then
        M.publish(true)
    elseif dict:get("lease:dirty") then
        M.publish(false)
    end
end

local function watch_leases()
    M.lease_watch = k8s.watch{
        group = "coordination.k8s.io", version = "v1", resource = "leases",
        namespace = LEASE_NS, label_selector = LEASE_LABEL,
        on_event = M.lease_event,
        on_synced = function(info)
            leases_synced = true
            log.info("activity leases synced", { namespace = LEASE_NS, replica = REPLICA,
                relist = info.relist })
        end,
    }
end

-- Forgets what the Leases said about sandboxes that are gone (worker 0, now and then).
local function prune_remote()
    for key in pairs(remote_last) do
        if not routes.get(key) then
            remote_last[key] = nil
            remote_open_until[key] = nil
        end
    end
end

-- The idle verdict on key from what this replica knows now: how long it has been idle (and
-- its route) when that is past its idle timeout, else nil. Activity: this replica's requests
-- (any open one: never idle), what any Lease reported (open until that Lease expires), the
-- annotation of earlier versions, and the moment this replica saw it start running.
local function idle_verdict(key, now)
    local r = routes.get(key)
    local idle = r and tonumber(r.idle_timeout)
    if not idle or not r.ready or r.mode == "Suspended" or not r.resource_version then
        return nil
    end
    if (dict:get("inflight:" .. key) or 0) > 0 or (remote_open_until[key] or 0) > now then
        return nil
    end
    local since = dict:get("running:" .. key)
    if not since then
        since = now
        dict:set("running:" .. key, now)
    end
    -- the per-sandbox annotation of earlier versions (a rolling upgrade) still counts
    local annotated = iso_to_epoch(r.last_activity or "") or 0
    local served = dict:get("act:" .. key)
    local last = math.max(served or 0, annotated, since, remote_last[key] or 0)
    if now - last > idle then
        return now - last, r, { served_here = served, running_since = since,
            served_elsewhere = remote_last[key], open_elsewhere_until = remote_open_until[key] }
    end
end

local function urlencode(s)
    return (s:gsub("[^%w%-%._~]", function(c)
        return ("%%%02X"):format(c:byte())
    end))
end

-- Reads every activity Lease from the API server (a LIST, not the watch's view, which may lag
-- behind) and merges what they report. Returns true, or false and the status.
local function reread_leases()
    local base = LEASE_GROUP_PATH .. LEASE_NS .. "/leases?labelSelector="
        .. urlencode(LEASE_LABEL) .. "&limit=500"
    local cont
    for _ = 1, 1000 do
        local status, body = k8s.request{ path = base .. (cont and ("&continue="
            .. urlencode(cont)) or ""), timeout = PATCH_TIMEOUT, retries = 0 }
        local list = status == 200 and cjson.decode(body)
        if type(list) ~= "table" then
            return false, status or 0
        end
        for _, item in ipairs(type(list.items) == "table" and list.items or {}) do
            merge_lease(item)
        end
        cont = type(list.metadata) == "table" and list.metadata["continue"]
        if type(cont) ~= "string" or cont == "" then
            return true
        end
    end
    return false, 0
end

local checking = false
local reread_failed = false

local function suspend(key, r, idle_for, why)
    local path, version = sandbox_path(r)
    local spec = version == "v1alpha1" and { replicas = 0 } or { operatingMode = "Suspended" }
    local body = cjson.encode({ metadata = { resourceVersion = r.resource_version },
        spec = spec })
    local status = k8s.request{ method = "PATCH", path = path, body = body,
        content_type = "application/merge-patch+json", timeout = PATCH_TIMEOUT, retries = 0 }
    if status and status >= 200 and status < 300 then
        sp_dict:incr("m:idle_suspends", 1, 0)
        log.info("suspended an idle sandbox", { key = key, idle_for = idle_for,
            served_here = why.served_here, served_elsewhere = why.served_elsewhere,
            open_elsewhere_until = why.open_elsewhere_until, running_since = why.running_since })
    elseif status == 409 then
        log.info("idle suspend skipped: the sandbox changed meanwhile (another "
            .. "replica acted)", { key = key })
    else
        log.warn("cannot suspend the idle sandbox", { key = key, status = status })
    end
end

local function check_idle()
    local now = core.now()
    local due = {}
    for key in pairs(require("discovery").idle_keys) do
        if idle_verdict(key, now) then
            due[#due + 1] = key
        end
    end
    local listed = nil
    for _, key in ipairs(due) do
        -- decided on fresh data: the Leases re-read (again when the last read is older than
        -- activity_flush), then this replica's own state, right before the PATCH
        if not listed or core.now() - listed > ACTIVITY_FLUSH then
            local ok, status = reread_leases()
            if not ok then
                if not reread_failed then
                    log.warn("idle suspend deferred: cannot read the activity leases",
                        { namespace = LEASE_NS, status = status, sandboxes = #due })
                end
                reread_failed = true
                return
            end
            reread_failed = false
            listed = core.now()
        end
        local idle_for, r, why = idle_verdict(key, core.now())
        if idle_for then
            suspend(key, r, idle_for, why)
        end
    end
end

-- Worker 0, every check_interval: suspend the idle sandboxes among the routes that carry an
-- idle timeout (discovery keeps the set of their keys, so a check costs nothing for the
-- others). Never before the Leases are listed (a starting replica knows nothing of the
-- others' traffic); one check at a time.
function M.check_idle()
    if not leases_synced or checking then
        return
    end
    checking = true
    local ok, err = pcall(check_idle)
    checking = false
    if not ok then
        error(err, 0)
    end
end

-- Per worker: listen for route changes; on worker 0 also for wake/activity requests and run
-- the idle checks.
function M.start()
    core.on("route", function(key)
        core.signal("route:" .. key)
    end)
    if core.worker_id() ~= 0 or not k8s.configured() then
        return
    end
    core.on("wake", M.patch_running)
    if IDLE then
        watch_leases()
        timer.every(ACTIVITY_FLUSH, lease_tick)
        timer.every(CHECK_INTERVAL, M.check_idle)
        timer.every(LEASE_DURATION, prune_remote)
    end
end

return M
