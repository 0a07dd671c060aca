-- discovery.lua: turns Sandbox objects (agents.x-k8s.io, v1alpha1 or v1beta1, exactly as the
-- Kubernetes API returns them) into routes, and keeps the route table in step with a source:
--   * the local file source (--sandboxes-file): a JSON SandboxList, re-read when it changes;
--   * the Kubernetes watch (sp.k8s), when the runtime has a cluster configured.
-- Both feed the same mapping, so a file of real objects behaves like the cluster.
--
-- Mapping (../shared/KUBERNETES.md):
--   key      = "{owner or 'default'}/{metadata.name}"
--   user     = the owner: metadata.labels[user_label] ("user"), else
--              spec.podTemplate.metadata.labels[owner_label] ("sandbox.users.io/user": where the
--              claim controller puts a SandboxClaim's spec.additionalPodMetadata.labels), else,
--              for a Sandbox bound to a SandboxClaim, the claim's metadata.labels[owner_label];
--              none when all are absent (unowned: auth.lua lets only admins, or
--              auth.unowned_owner, reach it; its path keeps the default_user segment)
--   ready    = the Ready condition's status == "True"; reason = that condition's reason
--   address  = status.podIPs[1] when ready, else status.serviceFQDN when non-empty, else none
--              (a podIPs entry that is not an IP address is refused: no address, the reason
--              says why, a warning is logged; loopback, link-local... are refused by the core)
--              (never an invented <name>.<ns>.svc name: warm-pool sandboxes have no Service)
--   port     = annotation "sandbox-proxy.dev/port" if set, else config discovery.port (8888)
--   ports    = annotation "sandbox-proxy.dev/ports" ("3000,5173"): more ports path and host
--              routing may reach (router.lua); prefix = annotation "sandbox-proxy.dev/prefix"
--              ("strip" | "keep": path routing's prefix mode, router.lua)
--   mode     = spec.operatingMode (v1beta1), or "Suspended"/"Running" from spec.replicas
-- Two sandboxes with the same key in different namespaces: the oldest (creationTimestamp, then
-- namespace name) wins; the others are listed in the winner's `conflict` field and logged.
--
-- SandboxClaims (extensions.agents.x-k8s.io/v1beta1), watched alongside the Sandboxes when
-- the cluster serves them: a claim bound to a Sandbox (the claim's status.sandbox.name, else
-- its annotation agents.x-k8s.io/sandbox-name, naming a Sandbox whose controller
-- ownerReference is that claim: both must agree, so a claim cannot alias another's sandbox)
-- gives the Sandbox's route `claim` = the claim name, and, when the names differ (a warm-pool
-- sandbox keeps its <pool>-xxxxx name), an alias route "{owner}/{claim}" with the same
-- address (`alias_of` = the sandbox's key). A direct sandbox name always wins over an alias.
-- The name index (sp.routes.index_*; M.lookup) maps "namespace/name" -> route key for both.
-- No claim CRD (404), v1beta1 not served, claims = false, or a 403 on listing them: Sandboxes
-- only, said once in the log.
--
-- Config (section `discovery`): port (8888), user_label ("user"), owner_label
-- ("sandbox.users.io/user"), default_user ("default"), claims ("auto": when served; false:
-- never; true: without asking discovery), poll_interval (file source stat poll, 2 s),
-- state_interval (how often the watch state is published for /health, 1 s).
-- Runs on worker 0 only; routes are shared by all workers.
local routes = require "sp.routes"
local shared = require "sp.shared"
local core = require "sp.core"
local fs = require "sp.fs"
local log = require "sp.log"
local config = require "sp.config"
local k8s = require "sp.k8s"
local timer = require "sp.timer"
local cjson = require "cjson.safe"
local ip = require "sp.ip"

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local concat = table.concat
local sort = table.sort

local cfg = config.discovery or {}
local DEFAULT_PORT = tonumber(cfg.port) or 8888
local USER_LABEL = cfg.user_label or "user"
local OWNER_LABEL = cfg.owner_label or "sandbox.users.io/user"
local CLAIMS = cfg.claims == nil and "auto" or cfg.claims
local ASSIGNED_ANNOTATION = "agents.x-k8s.io/sandbox-name"
local DEFAULT_USER = cfg.default_user or "default"
local PORT_ANNOTATION = "sandbox-proxy.dev/port"
local PORTS_ANNOTATION = "sandbox-proxy.dev/ports"
local PREFIX_ANNOTATION = "sandbox-proxy.dev/prefix"
local IDLE_ANNOTATION = "sandbox-proxy.dev/idle-timeout"
local ACTIVITY_ANNOTATION = "sandbox-proxy.dev/last-activity"

local sp_dict = assert(shared.dict("sp"))

local M = {}

-- ------------------------------------------------------------------ mapping

local function ready_condition(status)
    local conds = type(status) == "table" and status.conditions
    if type(conds) ~= "table" then
        return nil
    end
    for _, c in ipairs(conds) do
        if type(c) == "table" and c.type == "Ready" then
            return c
        end
    end
    return nil
end

local function mode_of(spec)
    if type(spec) ~= "table" then
        return "Running"
    end
    if type(spec.operatingMode) == "string" then
        return spec.operatingMode
    end
    if spec.replicas ~= nil then
        return tonumber(spec.replicas) == 0 and "Suspended" or "Running"
    end
    return "Running"
end

-- The port of a sandbox: its annotation, else the configured default.
local function port_of(meta)
    local ann = type(meta.annotations) == "table" and meta.annotations[PORT_ANNOTATION]
    local p = type(ann) == "string" and ann:match("^%d%d?%d?%d?%d?$") and tonumber(ann)
    if p and p >= 1 and p <= 65535 then
        return p
    end
    return M.default_port or DEFAULT_PORT
end

-- More ports the sandbox serves: annotation sandbox-proxy.dev/ports ("3000,5173", commas or
-- spaces), normalized to "3000,5173"; entries that are not ports 1..65535 are left out.
local function ports_of(meta)
    local ann = type(meta.annotations) == "table" and meta.annotations[PORTS_ANNOTATION]
    if type(ann) ~= "string" then
        return nil
    end
    local out = {}
    for d in ann:gmatch("[^,%s]+") do
        local p = d:match("^%d%d?%d?%d?%d?$") and tonumber(d)
        if p and p >= 1 and p <= 65535 then
            out[#out + 1] = tostring(p)
        end
    end
    return out[1] and concat(out, ",") or nil
end

-- Path routing's prefix mode: annotation sandbox-proxy.dev/prefix, "strip" or "keep"; else nil
-- (router.prefix decides).
local function prefix_of(meta)
    local ann = type(meta.annotations) == "table" and meta.annotations[PREFIX_ANNOTATION]
    return (ann == "strip" or ann == "keep") and ann or nil
end

-- Parses a duration ("30m", "1h", "90s", "900") into seconds, or nil.
function M.parse_duration(v)
    if type(v) ~= "string" then
        return nil
    end
    local n, unit = v:match("^%s*(%d+%.?%d*)%s*([smhd]?)%s*$")
    n = tonumber(n)
    if not n or n <= 0 then
        return nil
    end
    local mult = ({ [""] = 1, s = 1, m = 60, h = 3600, d = 86400 })[unit]
    return n * mult
end

-- Maps one Sandbox object to a route. Returns route, or nil and a reason the object is
-- unusable. The route carries the identity fields discovery needs (namespace, name, user).
function M.to_route(obj)
    if type(obj) ~= "table" then
        return nil, "not an object"
    end
    local meta = obj.metadata
    if type(meta) ~= "table" or type(meta.name) ~= "string" or meta.name == "" then
        return nil, "metadata.name is missing"
    end
    local namespace = type(meta.namespace) == "string" and meta.namespace ~= "" and meta.namespace
        or "default"
    local labels = type(meta.labels) == "table" and meta.labels or {}
    local user = labels[USER_LABEL]
    if type(user) ~= "string" or user == "" then
        local spec = type(obj.spec) == "table" and obj.spec
        local pt = spec and type(spec.podTemplate) == "table" and spec.podTemplate
        local ptm = pt and type(pt.metadata) == "table" and pt.metadata
        local pl = ptm and type(ptm.labels) == "table" and ptm.labels
        user = pl and pl[OWNER_LABEL]
    end
    local owner = user
    if type(user) ~= "string" or user == "" then
        user, owner = DEFAULT_USER, nil
    end
    -- the SandboxClaim that controls it (its controller ownerReference)
    local claim_ref_name, claim_ref_uid
    if type(meta.ownerReferences) == "table" then
        for _, o in ipairs(meta.ownerReferences) do
            if type(o) == "table" and o.kind == "SandboxClaim" and o.controller == true
                and type(o.name) == "string" then
                claim_ref_name = o.name
                claim_ref_uid = type(o.uid) == "string" and o.uid or nil
            end
        end
    end
    local status = type(obj.status) == "table" and obj.status or {}
    local cond = ready_condition(status)
    local ready = cond ~= nil and cond.status == "True"
    local reason = cond and type(cond.reason) == "string" and cond.reason or "Unknown"
    local address, refused
    local ips = status.podIPs
    if ready and type(ips) == "table" and type(ips[1]) == "string" and ips[1] ~= "" then
        address = ips[1]
        if not ip.parse(address) then
            -- a pod IP is an IP: a name here would be resolved and dialled wherever it points
            refused = "status.podIPs[0] is not an IP address: " .. address:sub(1, 64)
            reason = refused
            address = nil
        end
    elseif type(status.serviceFQDN) == "string" and status.serviceFQDN ~= "" then
        address = status.serviceFQDN
    end
    local service = type(status.serviceFQDN) == "string" and status.serviceFQDN ~= ""
        and status.serviceFQDN or nil
    local ann = type(meta.annotations) == "table" and meta.annotations or {}
    local idle = M.parse_duration(ann[IDLE_ANNOTATION])
    local activity = type(ann[ACTIVITY_ANNOTATION]) == "string" and ann[ACTIVITY_ANNOTATION] or nil
    return {
        key = user .. "/" .. meta.name,
        namespace = namespace,
        name = meta.name,
        user = owner,
        address = address,
        port = port_of(meta),
        ports = ports_of(meta),
        prefix = prefix_of(meta),
        ready = ready,
        reason = reason,
        service = service,
        mode = mode_of(obj.spec),
        -- no timestamp sorts last: an object of unknown age never displaces a known one
        created = type(meta.creationTimestamp) == "string" and meta.creationTimestamp or "~",
        api_version = type(obj.apiVersion) == "string" and obj.apiVersion or nil,
        resource_version = type(meta.resourceVersion) == "string" and meta.resourceVersion or nil,
        idle_timeout = idle and tostring(idle) or nil,
        last_activity = activity,
        refused = refused, -- why the address was refused (logged by upsert; not stored)
        claim_ref_name = claim_ref_name,
        claim_ref_uid = claim_ref_uid,
    }
end

-- ------------------------------------------------------------------ the applied set
-- Kept lean for 100,000 sandboxes: the serving claimant's route lives only in sp.routes.
--   objects[id]       = key       every applied object (id = "namespace/name")
--   owner[key]        = id        the claimant whose route is served
--   owner_created[key]            its creationTimestamp (to rank a newcomer)
--   losers[key]       = { [id] = route }   other claimants of a key (conflicts only)

local objects = {}
local owner = {}
-- keys whose serving route carries an idle timeout (wake.lua's idle checks walk only these)
M.idle_keys = {}
-- called with the key after every route change (init.lua wires wake.route_changed here)
M.on_route_change = nil
local owner_created = {}
local losers = {}
local nobjects = 0

local function ns_of(id)
    return id:match("^(.-)/")
end

-- True if claimant a (created, namespace) ranks before b.
local function ranks_before(a_created, a_ns, b_created, b_ns)
    return a_created < b_created or (a_created == b_created and a_ns < b_ns)
end

local reported = {}

local function conflict_text(key, serving_ns)
    local l = losers[key]
    if not l then
        reported[key] = nil
        return nil
    end
    local others = {}
    for id in pairs(l) do
        others[#others + 1] = ns_of(id)
    end
    sort(others)
    local text = "also in namespace " .. concat(others, ", ") .. "; serving " .. serving_ns
    if reported[key] ~= text then
        reported[key] = text
        log.warn("sandbox key conflict", { key = key, serving = serving_ns, ignored = others })
    end
    return text
end

-- Publishes route r (a to_route result) as the one serving its key.
local function serve(id, r)
    local key = r.key
    owner[key] = id
    owner_created[key] = r.created
    r.conflict = conflict_text(key, r.namespace)
    r.meta = "discovery" -- routes this script owns (others' routes are left alone)
    routes.set(key, r)
    -- an alias shares its sandbox's idle clock (wake.activity records it under alias_of)
    M.idle_keys[key] = r.idle_timeout and not r.alias_of and true or nil
    if M.on_route_change then
        M.on_route_change(key)
    end
end

-- The route currently served for key, as a claimant record (for demotion).
local function served_route(key)
    local served = routes.get(key)
    if not served then
        return nil
    end
    -- a copy: route tables from routes.get are shared snapshots, never written to
    local cur = {}
    for k, v in pairs(served) do
        cur[k] = v
    end
    cur.created = owner_created[key]
    cur.conflict = nil
    return cur
end

-- Refreshes the conflict text of the served route after the losers changed.
local function refresh_conflict(key)
    local cur = served_route(key)
    if cur then
        serve(owner[key], cur)
    end
end

local function claim(id, r)
    local key = r.key
    local cur = owner[key]
    if cur == nil or cur == id then
        return serve(id, r)
    end
    local set = losers[key]
    if not set then
        set = {}
        losers[key] = set
    end
    if ranks_before(r.created, r.namespace, owner_created[key], ns_of(cur)) then
        local demoted = served_route(key)
        set[cur] = demoted
        set[id] = nil
        return serve(id, r)
    end
    set[id] = r
    refresh_conflict(key)
end

-- Drops id's claim on key, promoting the best other claimant if id was serving.
local function release(id, key)
    local set = losers[key]
    if owner[key] ~= id then
        if set then
            set[id] = nil
            if next(set) == nil then
                losers[key] = nil
            end
            refresh_conflict(key)
        end
        return
    end
    if set then
        local best_id, best
        for lid, lr in pairs(set) do
            if not best or ranks_before(lr.created, lr.namespace, best.created, best.namespace) then
                best_id, best = lid, lr
            end
        end
        set[best_id] = nil
        if next(set) == nil then
            losers[key] = nil
        end
        return serve(best_id, best)
    end
    owner[key] = nil
    owner_created[key] = nil
    reported[key] = nil
    M.idle_keys[key] = nil
    routes.delete(key)
    if M.on_route_change then
        M.on_route_change(key)
    end
end

local function id_of(obj)
    local meta = obj.metadata
    local ns = type(meta.namespace) == "string" and meta.namespace ~= "" and meta.namespace
        or "default"
    return ns .. "/" .. meta.name
end

-- ------------------------------------------------------------------ SandboxClaims
--   claims[cid]     = { name, namespace, uid, bound (sandbox name), user }   (cid = ns/claim)
--   sbx[id]         = the base route (to_route) of a Sandbox controlled by a claim
--   alias_keys[cid] = the key of the claim's alias route, when it has one
--   indexed[name]   = true for every name index entry this script set

local claims = {}
local sbx = {}
local alias_keys = {}
local indexed = {}

local function copy(t)
    local c = {}
    for k, v in pairs(t) do
        c[k] = v
    end
    return c
end

-- The claim bound to the Sandbox of base route r: its controller ownerReference names the
-- claim, and the claim's status (or annotation) names the Sandbox; else nil.
local function linked_claim(r)
    if not r.claim_ref_name then
        return nil
    end
    local c = claims[r.namespace .. "/" .. r.claim_ref_name]
    if c and c.bound == r.name and (c.uid == nil or r.claim_ref_uid == nil
        or c.uid == r.claim_ref_uid) then
        return c
    end
    return nil
end

-- Sets the name index entry of "ns/name": a Sandbox of that name, else a claim of that name
-- bound to a Sandbox (its alias, or the Sandbox's own key when the names are equal).
local function reindex(ns, name)
    local id = ns .. "/" .. name
    local key = objects[id]
    if not key then
        local c = claims[id]
        local b = c and c.bound and sbx[ns .. "/" .. c.bound]
        if b and linked_claim(b) == c then
            key = alias_keys[id] or objects[ns .. "/" .. c.bound]
        end
    end
    if key then
        routes.index_set(id, key)
        indexed[id] = true
    elseif indexed[id] then
        routes.index_delete(id)
        indexed[id] = nil
    end
end

local function unset_alias(cid)
    local akey = alias_keys[cid]
    if akey then
        alias_keys[cid] = nil
        release("claim:" .. cid, akey)
    end
end

-- The alias route of claim c, whose Sandbox's route is r.
local function set_alias(c, r)
    local cid = c.namespace .. "/" .. c.name
    local akey = c.name ~= r.name and ((r.user or DEFAULT_USER) .. "/" .. c.name) or nil
    if alias_keys[cid] and alias_keys[cid] ~= akey then
        unset_alias(cid)
    end
    if akey then
        alias_keys[cid] = akey
        local a = copy(r)
        a.key = akey
        a.alias_of = r.key
        a.claim = c.name
        a.created = "~~" .. r.created -- a direct sandbox name always ranks first
        claim("claim:" .. cid, a)
    end
end

-- Publishes the route of Sandbox id from its base route (refined by its claim, if bound).
local function place(id, base)
    local r = base
    local c = linked_claim(base)
    if c then
        r = copy(base)
        r.claim = c.name
        if not r.user and c.user then
            r.user = c.user
            r.key = c.user .. "/" .. r.name
        end
    end
    local old_key = objects[id]
    if old_key == nil then
        nobjects = nobjects + 1
    elseif old_key ~= r.key then
        -- the owner changed: the old key loses this claim
        release(id, old_key)
    end
    objects[id] = r.key
    claim(id, r)
    if c then
        set_alias(c, r)
        reindex(c.namespace, c.name)
    end
    reindex(r.namespace, r.name)
end

-- Adds or updates one object (ADDED / MODIFIED). Returns true, or nil and a reason.
function M.upsert(obj)
    local r, err = M.to_route(obj)
    if not r then
        return nil, err
    end
    local id = id_of(obj)
    if r.refused then
        log.warn("sandbox address refused", { sandbox = id, path = r.key, reason = r.refused })
    end
    local prev = sbx[id]
    sbx[id] = r.claim_ref_name and r or nil
    if prev and prev.claim_ref_name and prev.claim_ref_name ~= r.claim_ref_name then
        -- no longer controlled by that claim
        local cid = prev.namespace .. "/" .. prev.claim_ref_name
        unset_alias(cid)
        reindex(prev.namespace, prev.claim_ref_name)
    elseif prev and r.claim_ref_name and not linked_claim(r) then
        unset_alias(r.namespace .. "/" .. r.claim_ref_name)
        reindex(r.namespace, r.claim_ref_name)
    end
    place(id, r)
    return true
end

-- Removes one object (DELETED carries the last state; only its identity matters).
function M.remove(obj)
    if type(obj) ~= "table" or type(obj.metadata) ~= "table"
        or type(obj.metadata.name) ~= "string" then
        return nil, "metadata.name is missing"
    end
    local id = id_of(obj)
    local key = objects[id]
    if not key then
        return true
    end
    objects[id] = nil
    nobjects = nobjects - 1
    release(id, key)
    local base = sbx[id]
    sbx[id] = nil
    if base and base.claim_ref_name then
        unset_alias(base.namespace .. "/" .. base.claim_ref_name)
        reindex(base.namespace, base.claim_ref_name)
    end
    local ns, name = id:match("^(.-)/(.*)$")
    reindex(ns, name)
    return true
end

-- Reads a SandboxClaim: { name, namespace, uid, bound, user } or nil, err.
function M.to_claim(obj)
    local meta = type(obj) == "table" and obj.metadata
    if type(meta) ~= "table" or type(meta.name) ~= "string" or meta.name == "" then
        return nil, "metadata.name is missing"
    end
    local ns = type(meta.namespace) == "string" and meta.namespace ~= "" and meta.namespace
        or "default"
    local status = type(obj.status) == "table" and obj.status or {}
    local sb = type(status.sandbox) == "table" and status.sandbox or {}
    local bound = type(sb.name) == "string" and sb.name ~= "" and sb.name or nil
    if not bound then
        local ann = type(meta.annotations) == "table" and meta.annotations or {}
        local a = ann[ASSIGNED_ANNOTATION]
        bound = type(a) == "string" and a ~= "" and a or nil
    end
    local labels = type(meta.labels) == "table" and meta.labels or {}
    local user = labels[OWNER_LABEL]
    return { name = meta.name, namespace = ns, uid = type(meta.uid) == "string" and meta.uid or nil,
        bound = bound, user = type(user) == "string" and user ~= "" and user or nil }
end

-- Re-places the Sandbox of namespace ns named name, if it is controlled by a claim.
local function replace_sandbox(ns, name)
    local sid = name and ns .. "/" .. name
    if sid and sbx[sid] then
        place(sid, sbx[sid])
    end
end

-- A SandboxClaim was added or changed. Returns true or nil, err.
function M.claim_upsert(obj)
    local c, err = M.to_claim(obj)
    if not c then
        return nil, err
    end
    local cid = c.namespace .. "/" .. c.name
    local old = claims[cid]
    claims[cid] = c
    if old and old.bound ~= c.bound then
        replace_sandbox(c.namespace, old.bound)
    end
    local b = c.bound and sbx[c.namespace .. "/" .. c.bound]
    if b and linked_claim(b) == c then
        place(c.namespace .. "/" .. c.bound, b)
    else
        unset_alias(cid)
    end
    reindex(c.namespace, c.name)
    return true
end

-- A SandboxClaim was deleted.
function M.claim_remove(obj)
    local c = M.to_claim(obj)
    if not c then
        return nil, "metadata.name is missing"
    end
    local cid = c.namespace .. "/" .. c.name
    local old = claims[cid]
    claims[cid] = nil
    unset_alias(cid)
    if old then
        replace_sandbox(c.namespace, old.bound)
    end
    reindex(c.namespace, c.name)
    return true
end

function M.claim_count()
    local n = 0
    for _ in pairs(claims) do
        n = n + 1
    end
    return n
end

-- The route a name stands for in a namespace, from any worker: a Sandbox of that name, else
-- a SandboxClaim of that name bound to a Sandbox (for header routing: X-Sandbox-ID and
-- X-Sandbox-Namespace). nil when unknown, or when the name's key is served by a sandbox of
-- another namespace (a key conflict).
function M.lookup(namespace, name)
    local r = routes.lookup(namespace, name)
    if r and r.namespace == namespace then
        return r
    end
    return nil
end

-- Replaces the whole set (a full list): what is absent is deleted. Returns the number of
-- objects applied and a list of per-item problems.
-- In a task it yields to the loop every YIELD_EVERY objects, or sooner once YIELD_AFTER
-- seconds have passed since the last turn (checked every 100 objects: a starved CPU makes
-- 1,000 objects take long), so a list of 100,000 sandboxes neither stalls the worker's
-- requests nor runs into script_time_budget.
local YIELD_EVERY = 1000
local YIELD_AFTER = 0.05
local monotonic = core.monotonic

-- Yields when object i is due for a turn of the loop; returns the time of the last turn.
local function maybe_yield(i, since)
    if i % YIELD_EVERY == 0 or (i % 100 == 0 and monotonic() - since > YIELD_AFTER) then
        timer.sleep(0)
        return monotonic()
    end
    return since
end

-- items: an array of objects, or a function returning the next object (nil at the end;
-- false and a reason for an item that could not be read).
function M.replace_all(items)
    local seen = {}
    local problems = {}
    local applied = 0
    local can_yield = core.in_task()
    local nextf = items
    if type(items) == "table" then
        local k = 0
        nextf = function()
            k = k + 1
            return items[k]
        end
    end
    local i = 0
    local since = can_yield and monotonic() or 0
    while true do -- sp.lint: ok, ends when the items do
        local obj, why = nextf()
        if obj == nil then
            break
        end
        i = i + 1
        if can_yield then
            since = maybe_yield(i, since)
        end
        local ok, err
        if obj == false and why then
            err = why
        else
            ok, err = M.upsert(obj)
        end
        if ok then
            applied = applied + 1
            seen[id_of(obj)] = true
        else
            problems[#problems + 1] = "item " .. i .. ": " .. tostring(err)
        end
    end
    local gone = {}
    for id in pairs(objects) do
        if not seen[id] then
            local ns, name = id:match("^(.-)/(.*)$")
            gone[#gone + 1] = { metadata = { namespace = ns, name = name } }
        end
    end
    for i, obj in ipairs(gone) do
        if can_yield then
            since = maybe_yield(i, since)
        end
        M.remove(obj)
    end
    return applied, problems, #gone
end

-- Forgets everything (tests).
function M.reset()
    for key in pairs(owner) do
        routes.delete(key)
    end
    for name in pairs(indexed) do
        routes.index_delete(name)
    end
    indexed = {}
    claims = {}
    sbx = {}
    alias_keys = {}
    objects = {}
    owner = {}
    owner_created = {}
    losers = {}
    reported = {}
    nobjects = 0
    M.idle_keys = {}
end

function M.object_count()
    return nobjects
end

-- ------------------------------------------------------------------ source state (for /health)

local state = { type = "none", synced = false }

local function publish_state(changes)
    for k, v in pairs(changes) do
        state[k] = v
    end
    sp_dict:set("source", cjson.encode(state))
end
M.publish_state = publish_state

function M.state()
    return state
end

-- ------------------------------------------------------------------ the file source

-- Parses a sandboxes file's text: a SandboxList ({"items":[...]}) or a JSON array.
function M.parse_list(text)
    local doc, err = cjson.decode(text)
    if doc == nil then
        return nil, "invalid JSON: " .. tostring(err)
    end
    if type(doc) ~= "table" then
        return nil, "expected a SandboxList object"
    end
    local items = doc.items
    if items == nil and (doc[1] ~= nil or text:match("^%s*%[")) then
        items = doc -- a bare array (cjson decodes [] and {} alike: look at the text)
    end
    if items == nil and doc.kind == "SandboxList" then
        items = {}
    end
    if type(items) ~= "table" then
        return nil, "expected a SandboxList with an items array"
    end
    return items
end

-- Loads the file and replaces the routes. On any error the previous routes stay. A change
-- noticed while a (yielding) load runs is loaded right after it, never interleaved with it.
local loading, load_again = false, false

function M.load_file(path)
    if loading then
        load_again = true
        return nil, "a load is running; this change is loaded after it"
    end
    loading = true
    local ok, applied, err
    repeat
        load_again = false
        ok, applied, err = pcall(M.load_file_once, path)
    until not load_again or not ok
    loading = false
    if not ok then
        error(applied, 0)
    end
    return applied, err
end

-- Opens a sandboxes file for reading item by item (fs.json_list: the bytes stay in C memory,
-- the document is validated first, each object is decoded when its turn comes, so a 100,000
-- sandbox file never becomes one Lua table). Returns a function giving the next object (or
-- false and why for an item that does not decode), or nil, err, kind ("read" or "parse").
function M.open_list(path)
    local rd, err = fs.json_list(path, "items")
    if not rd then
        return nil, err, err:match("^invalid JSON") and "parse" or "read"
    end
    local shape, items = rd:shape(), rd:items()
    if shape ~= "array" and shape ~= "object" then
        rd:close()
        return nil, "expected a SandboxList object", "parse"
    end
    if items ~= "array" then
        local kind = items == "absent" and rd:string("kind")
        rd:close()
        if kind == "SandboxList" then
            return function() return nil end
        end
        return nil, "expected a SandboxList with an items array", "parse"
    end
    return function()
        local text = rd:next()
        if text == nil then
            rd:close()
            return nil
        end
        local obj, derr = cjson.decode(text)
        if obj == nil then
            return false, "invalid JSON: " .. tostring(derr)
        end
        return obj
    end
end

function M.load_file_once(path)
    local items, err, kind = M.open_list(path)
    if not items and kind == "read" then
        log.error("cannot read sandboxes file", { path = path, error = err })
        publish_state({ error = err, error_at = core.iso8601() })
        return nil, err
    end
    -- Reading and validating a big file is one call that cannot yield: give the loop a turn
    -- after it, so the time budget counts the Lua work that follows from zero.
    if core.in_task() then
        timer.sleep(0)
    end
    if not items then
        log.error("bad sandboxes file: keeping the previous routes", { path = path, error = err })
        publish_state({ error = err, error_at = core.iso8601() })
        return nil, err
    end
    local applied, problems, removed = M.replace_all(items)
    for _, p in ipairs(problems) do
        log.warn("sandbox skipped", { path = path, problem = p })
    end
    publish_state({
        type = "file",
        path = path,
        synced = true,
        items = applied,
        skipped = #problems,
        loaded_at = core.iso8601(),
        error = cjson.null,
    })
    log.info("sandboxes loaded", { path = path, sandboxes = applied, removed = removed,
        skipped = #problems })
    return applied
end

function M.start_file(path)
    publish_state({ type = "file", path = path, synced = false })
    -- The watch is set up whatever happens to the first load: a later change can fix it.
    M.file_watch = fs.watch(path, function()
        M.load_file(path)
    end, cfg.poll_interval or 2)
    local ok, err = pcall(M.load_file, path)
    if not ok then
        log.error("loading the sandboxes file failed", { path = path, error = tostring(err) })
        publish_state({ error = tostring(err), error_at = core.iso8601() })
    end
end

-- ------------------------------------------------------------------ the Kubernetes source

local GROUP = "agents.x-k8s.io"

-- Picks the Sandbox API version from the group's discovery document: v1beta1 when served,
-- else v1alpha1. Returns version or nil, err.
function M.pick_version(doc)
    if type(doc) ~= "table" or type(doc.versions) ~= "table" then
        return nil, "not an APIGroup document"
    end
    local served = {}
    for _, v in ipairs(doc.versions) do
        if type(v) == "table" and type(v.version) == "string" then
            served[v.version] = true
        end
    end
    if served.v1beta1 then
        return "v1beta1"
    elseif served.v1alpha1 then
        return "v1alpha1"
    end
    return nil, "the API server serves neither v1beta1 nor v1alpha1 of " .. GROUP
end

-- Asks the API server which version to use, retrying with backoff until it answers.
local function discover_version()
    local attempt = 0
    local version
    repeat
        local status, body, headers = k8s.request{ path = "/apis/" .. GROUP, retries = 0 }
        local err
        local forbidden = status == 403
        if status == 200 then
            version, err = M.pick_version(cjson.decode(body))
            if version then
                break
            end
        elseif status == 404 then
            err = GROUP .. " is not served: is agent-sandbox installed in this cluster?"
        elseif forbidden then
            err = "the Kubernetes API forbids discovery of " .. GROUP
                .. ": the service account needs get on /apis/" .. GROUP .. " (see k8s/base/rbac.yaml)"
        elseif status then
            err = "discovery answered " .. status
        else
            err = body
        end
        local delay = k8s.backoff(attempt, headers and headers.retry_after, forbidden)
        attempt = attempt + 1
        local say = forbidden and log.error or log.warn
        say("cannot discover the Sandbox API version", { error = err, retry_in = delay })
        publish_state({ last_error = err, last_error_at = core.iso8601() })
        timer.sleep(delay)
    until version
    return version
end

local CLAIM_GROUP = "extensions.agents.x-k8s.io"
local CLAIM_VERSION = "v1beta1"

-- The claims watch: "off" (claims = false), "asking" (discovery; readiness waits for its first
-- answer), "retrying" (discovery failed: readiness no longer waits), "not served", "watching"
-- (readiness waits for the first list), "forbidden" (403: Sandboxes only until a restart).
M.claims_state = "off"

-- Does the cluster serve SandboxClaims v1beta1? Retries transport errors and 5xx with backoff;
-- a 404 or a group without v1beta1 means no. Returns true, or false and why.
local function discover_claims()
    local attempt = 0
    while true do -- sp.lint: ok, yields: k8s.request, timer.sleep
        local status, body, headers = k8s.request{ path = "/apis/" .. CLAIM_GROUP, retries = 0 }
        if status == 200 then
            local doc = cjson.decode(body)
            if type(doc) == "table" and type(doc.versions) == "table" then
                for _, v in ipairs(doc.versions) do
                    if type(v) == "table" and v.version == CLAIM_VERSION then
                        return true
                    end
                end
            end
            return false, CLAIM_GROUP .. " does not serve " .. CLAIM_VERSION
        elseif status == 404 then
            return false, CLAIM_GROUP .. " is not served (the SandboxClaim CRD is not installed)"
        end
        local delay = k8s.backoff(attempt, headers and headers.retry_after, status == 403)
        attempt = attempt + 1
        -- readiness no longer waits for claims: Sandboxes are routed meanwhile
        M.claims_state = "retrying"
        log.warn("cannot discover the SandboxClaim API: routing Sandboxes by their own names "
            .. "until it answers", { status = status,
            error = status and ("discovery answered " .. status) or body, retry_in = delay })
        timer.sleep(delay)
    end
end

-- A watch's on_event: DELETED removes the object, anything else applies it (M[upsert],
-- M[remove], looked up per event so a spec's stub is seen); a refused object is logged.
local function event_handler(upsert, remove, skipped)
    return function(kind, obj)
        if kind == "DELETED" then
            M[remove](obj)
        else
            local done, why = M[upsert](obj)
            if not done then
                log.warn(skipped, { problem = why })
            end
        end
    end
end

-- (defined below: it reads both watches' state)
local publish_watch_state

local function watch_claims(settings)
    M.claims_state = "watching"
    log.info("watching SandboxClaims", { group = CLAIM_GROUP, version = CLAIM_VERSION,
        namespace = settings.kube_namespace or "(all)", owner_label = OWNER_LABEL })
    M.claim_watch = k8s.watch{
        group = CLAIM_GROUP,
        version = CLAIM_VERSION,
        resource = "sandboxclaims",
        namespace = settings.kube_namespace,
        on_event = event_handler("claim_upsert", "claim_remove", "sandbox claim skipped"),
        on_synced = function(info)
            log.info("sandbox claims synced", { claims = M.claim_count(),
                resource_version = info.resource_version, relist = info.relist })
            publish_watch_state()
        end,
        on_error = function(e)
            if e.status == 403 and M.claims_state == "watching" then
                -- no RBAC for claims: route Sandboxes only rather than never becoming ready
                M.claims_state = "forbidden"
                log.error("cannot watch SandboxClaims: forbidden; routing Sandboxes only (grant "
                    .. "get, list, watch on sandboxclaims: k8s/rbac-claims.yaml)",
                    { message = e.message })
                local w = M.claim_watch
                M.claim_watch = nil
                timer.after(0, function() w:stop() end)
            end
            publish_watch_state()
        end,
    }
end

function publish_watch_state()
    local w = M.watch
    if not w then
        return
    end
    local st = w:state()
    local synced = st.synced
    local claims_doc = { state = M.claims_state }
    local cw = M.claim_watch
    if cw then
        local cs = cw:state()
        claims_doc.synced = cs.synced
        claims_doc.watching = cs.watching
        claims_doc.resource_version = cs.resource_version
        claims_doc.objects = cs.objects
        claims_doc.errors = cs.errors
        claims_doc.last_error = cs.last_error or cjson.null
        -- routes of claimed sandboxes depend on their claims: ready once both are listed
        synced = synced and cs.synced
    elseif M.claims_state == "asking" then
        synced = false
    end
    local changes = {
        synced = synced,
        watching = st.watching,
        phase = st.phase,
        resource_version = st.resource_version,
        relists = st.relists,
        lists = st.lists,
        errors = st.errors,
        events = st.events,
        bookmarks = st.bookmarks,
        objects = st.objects,
        claims = claims_doc,
        last_error = st.last_error or cjson.null,
        last_event_at = st.seconds_since_event and (core.now() - st.seconds_since_event) or cjson.null,
        last_sync_at = st.seconds_since_sync and (core.now() - st.seconds_since_sync) or cjson.null,
    }
    publish_state(changes)
end

function M.start_kubernetes(settings)
    local kubeconn = require "sp.kubeconn"
    local conn, err = kubeconn.resolve(settings)
    if not conn then
        log.error("no Kubernetes API to watch", { error = err })
        publish_state({ type = "kubernetes", synced = false, last_error = err })
        return nil, err
    end
    local ok, cerr = k8s.configure(conn)
    if not ok then
        log.error("cannot configure the Kubernetes client", { error = cerr })
        publish_state({ type = "kubernetes", synced = false, last_error = cerr })
        return nil, cerr
    end
    publish_state({ type = "kubernetes", server = conn.server, credentials = conn.source,
        synced = false })
    log.info("watching Sandboxes", { server = conn.server, credentials = conn.source,
        namespace = settings.kube_namespace or "(all)" })
    timer.after(0, function()
        local version = settings.kube_api_version or discover_version()
        publish_state({ api_version = GROUP .. "/" .. version })
        if version == "v1alpha1" then
            log.warn("using agents.x-k8s.io/v1alpha1: a legacy fallback for clusters older than "
                .. "agent-sandbox v1.0 (v1.0 serves only v1beta1)", { api_version = version })
        end
        if CLAIMS ~= false then
            M.claims_state = "asking"
        end
        M.watch = k8s.watch{
            group = GROUP,
            version = version,
            resource = "sandboxes",
            namespace = settings.kube_namespace,
            label_selector = settings.kube_label_selector,
            on_event = event_handler("upsert", "remove", "sandbox skipped"),
            on_synced = function(info)
                log.info("sandboxes synced", { sandboxes = M.object_count(),
                    resource_version = info.resource_version, relist = info.relist })
                publish_watch_state()
            end,
            on_error = function()
                publish_watch_state()
            end,
        }
        timer.every(cfg.state_interval or 1, publish_watch_state)
        -- claims after the Sandbox watch started: a slow or failing claim discovery never
        -- delays the Sandboxes' list
        if CLAIMS ~= false then
            local served, why = true, nil
            if CLAIMS ~= true then
                served, why = discover_claims()
            end
            if served then
                watch_claims(settings)
            else
                M.claims_state = "not served"
                log.info("SandboxClaims are not served: routing Sandboxes by their own names",
                    { group = CLAIM_GROUP, reason = why })
            end
            publish_watch_state()
        end
    end)
    return true
end

-- ------------------------------------------------------------------ starting

function M.start()
    local settings = core.settings()
    if settings.demo and settings.demo_listen then
        -- the demo sandbox listens where demo_listen says: point the demo routes there
        M.default_port = tonumber(settings.demo_listen:match(":(%d+)$")) or DEFAULT_PORT
    end
    if settings.sandboxes_file then
        return M.start_file(settings.sandboxes_file)
    elseif settings.source == "kubernetes" then
        return M.start_kubernetes(settings)
    end
    return nil, "no sandbox source" -- `sandbox-proxy test`
end

-- For --check: problems with the configured source.
function M.check()
    local problems = {}
    local settings = core.settings()
    if settings.sandboxes_file then
        local text, err = fs.read(settings.sandboxes_file)
        if not text then
            problems[#problems + 1] = "sandboxes file: " .. err
        else
            local items, perr = M.parse_list(text)
            if not items then
                problems[#problems + 1] = "sandboxes file " .. settings.sandboxes_file .. ": " .. perr
            else
                for i, obj in ipairs(items) do
                    local ok, e = M.to_route(obj)
                    if not ok then
                        problems[#problems + 1] = "sandboxes file item " .. i .. ": " .. e
                    end
                end
            end
        end
    elseif settings.source == "kubernetes" then
        local conn, err = require("sp.kubeconn").resolve(settings)
        if not conn then
            problems[#problems + 1] = "kubernetes: " .. err
        end
    end
    return problems
end

return M
