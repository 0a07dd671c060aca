-- tokenreview.lua: Kubernetes ServiceAccount tokens as the proxy's credential (auth.lua asks it
-- for a bearer token that is neither an API key nor a JWT it can verify itself).
--
-- The proxy POSTs a TokenReview (authentication.k8s.io/v1) with ITS OWN credentials (the same
-- Kubernetes client as the watch: it needs `create` on tokenreviews, k8s/rbac-tokenreview.yaml)
-- and maps the reviewed identity to a user:
--   user_from = "namespace"  the service account's namespace (system:serviceaccount:<ns>:<name>;
--                            a token that is not a service account's is refused), the default
--   user_from = "username"   the first capture of `username_pattern` in the username (default
--                            "^system:serviceaccount:[^:]+:([^:]+)$": the service account's name)
--   user_from = "extra"      the first value of status.user.extra[extra_key] (e.g.
--                            "authentication.kubernetes.io/pod-name")
-- The same rule as every credential then applies (auth.lua): the caller's user must own the
-- sandbox, unless the identity is an admin (its username in admin_users, or one of its groups in
-- admin_groups). The credential header is removed before forwarding (auth.authenticate).
--
-- Results are cached per worker for cache_ttl seconds (a revoked token keeps working at most
-- that long), keyed by the token's SHA-256, at most cache_max entries (the cache is emptied when
-- full); a refused token is cached too (so a flood of one bad token costs one review per
-- cache_ttl). A review that cannot be made (the API server unreachable, 5xx, 403 without the
-- RBAC) is not cached: the request gets 503 {"error":"authentication unavailable"} with
-- Retry-After, and one error log line per failure streak. Reviews run on worker 0 (the owner of
-- the Kubernetes client); concurrent requests with one token share one review.
--
-- Config (section auth.tokenreview; only enabled is needed):
--   auth = { tokenreview = { enabled = true, user_from = "namespace", username_pattern = ...,
--       extra_key = nil, audiences = nil, admin_users = {}, admin_groups = {},
--       cache_ttl = 10, cache_max = 10000, timeout = 5 } }
local core = require "sp.core"
local config = require "sp.config"
local crypto = require "sp.crypto"
local log = require "sp.log"
local k8s = require "sp.k8s"
local cjson = require "cjson.safe"

local type = type

local cfg = (config.auth or {}).tokenreview
local M = {}

M.enabled = type(cfg) == "table" and cfg.enabled ~= false
cfg = type(cfg) == "table" and cfg or {}

local USER_FROM = cfg.user_from or "namespace"
local PATTERN = cfg.username_pattern or "^system:serviceaccount:[^:]+:([^:]+)$"
local EXTRA_KEY = cfg.extra_key
M.CACHE_TTL = tonumber(cfg.cache_ttl) or 10
local CACHE_MAX = tonumber(cfg.cache_max) or 10000
local TIMEOUT = tonumber(cfg.timeout) or 5
local AUDIENCES = cfg.audiences
local PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

if M.enabled then
    if USER_FROM ~= "namespace" and USER_FROM ~= "username" and USER_FROM ~= "extra" then
        error("auth.tokenreview.user_from must be \"namespace\", \"username\" or \"extra\"", 0)
    end
    if USER_FROM == "extra" and (type(EXTRA_KEY) ~= "string" or EXTRA_KEY == "") then
        error("auth.tokenreview.user_from = \"extra\" needs auth.tokenreview.extra_key", 0)
    end
    if AUDIENCES ~= nil and type(AUDIENCES) ~= "table" then
        error("auth.tokenreview.audiences must be a list of strings", 0)
    end
end

local ADMIN_USERS, ADMIN_GROUPS = {}, {}
for _, u in ipairs(cfg.admin_users or {}) do
    ADMIN_USERS[u] = true
end
for _, g in ipairs(cfg.admin_groups or {}) do
    ADMIN_GROUPS[g] = true
end

-- Maps a reviewed UserInfo ({username, uid, groups, extra}) to an identity, or nil, why.
function M.map(info)
    if type(info) ~= "table" or type(info.username) ~= "string" then
        return nil, "the review returned no user"
    end
    local username = info.username
    local user
    if USER_FROM == "namespace" then
        user = username:match("^system:serviceaccount:([^:]+):[^:]+$")
    elseif USER_FROM == "username" then
        user = username:match(PATTERN)
    else
        local v = type(info.extra) == "table" and info.extra[EXTRA_KEY]
        user = type(v) == "table" and v[1] or v
    end
    if type(user) ~= "string" or user == "" then
        return nil, "the token's identity maps to no user (user_from = " .. USER_FROM .. ")"
    end
    local admin = ADMIN_USERS[username] == true
    if type(info.groups) == "table" then
        for _, g in ipairs(info.groups) do
            if ADMIN_GROUPS[g] then
                admin = true
            end
        end
    end
    return { user = user, admin = admin, method = "tokenreview", username = username }
end

-- ------------------------------------------------------------------ the per-worker cache

local cache, ncache = {}, 0 -- sha256 hex -> { id, why, expires }
local waiting = {}          -- sha256 hex -> true while this worker waits for a review

local function remember(h, id, why)
    if ncache >= CACHE_MAX then
        cache, ncache = {}, 0
    end
    if not cache[h] then
        ncache = ncache + 1
    end
    cache[h] = { id = id, why = why, expires = core.monotonic() + M.CACHE_TTL }
end

-- ------------------------------------------------------------------ worker 0: the reviews

local inflight = {} -- sha256 hex -> { [worker] = true } waiting for the review under way
local failing = false

local function configured()
    if k8s.configured() then
        return true
    end
    local conn, err = require("sp.kubeconn").resolve(core.settings())
    if not conn then
        return nil, err
    end
    local ok, cerr = k8s.configure(conn)
    return ok, cerr
end

-- One TokenReview. Returns "ok", identity | "refused", why | "unavailable", why.
function M.review_now(token)
    local ok, err = configured()
    if not ok then
        return "unavailable", "no Kubernetes API: " .. tostring(err)
    end
    local body = cjson.encode({ apiVersion = "authentication.k8s.io/v1", kind = "TokenReview",
        spec = { token = token, audiences = AUDIENCES } })
    local status, resp = k8s.request{ method = "POST", path = PATH, body = body,
        content_type = "application/json", timeout = TIMEOUT, retries = 1 }
    if status ~= 200 and status ~= 201 then
        local message = status and (cjson.decode(resp or "") or {}).message or resp
        return "unavailable", message, status
    end
    local doc = cjson.decode(resp)
    local st = type(doc) == "table" and type(doc.status) == "table" and doc.status
    if not st then
        return "unavailable", "the TokenReview answer has no status", status
    end
    if st.authenticated ~= true then
        return "refused", "invalid token"
    end
    local id, why = M.map(st.user)
    if not id then
        return "refused", why
    end
    return "ok", id
end

local function review_for(data, from)
    local msg = cjson.decode(data)
    if type(msg) ~= "table" or type(msg.token) ~= "string" then
        return
    end
    local h = msg.h
    local set = inflight[h]
    if set then
        set[from] = true
        return
    end
    set = { [from] = true }
    inflight[h] = set
    local verdict, v, status = M.review_now(msg.token)
    inflight[h] = nil
    if verdict == "unavailable" then
        if not failing then
            failing = true
            log.error("cannot review a token (TokenReview)", { status = status or 0, error = v,
                hint = status == 403 and "the proxy may not create tokenreviews: apply "
                    .. "k8s/rbac-tokenreview.yaml" or nil })
        end
    elseif failing then
        failing = false
        log.info("token reviews work again")
    end
    local reply = cjson.encode({ h = h, verdict = verdict,
        id = verdict == "ok" and v or nil, why = verdict ~= "ok" and v or nil })
    for w in pairs(set) do
        core.post(w, "tokenreview_done", reply)
    end
end

local function review_done(data)
    local r = cjson.decode(data)
    if type(r) ~= "table" then
        return
    end
    if r.verdict ~= "unavailable" then
        remember(r.h, r.id, r.why)
    end
    waiting[r.h] = nil
    core.signal("tr:" .. r.h, data)
end

-- ------------------------------------------------------------------ for auth.lua

-- The identity behind a bearer token: identity | nil, why, status (401 refused, 503 when no
-- review could be made). Yields while the review runs.
function M.identify(token)
    local h = crypto.hex(crypto.sha256(token))
    local e = cache[h]
    if e and e.expires > core.monotonic() then
        if e.id then
            return e.id
        end
        return nil, e.why, 401
    end
    if not core.in_task() then
        return nil, "token review needs a request task", 503
    end
    if not waiting[h] then
        waiting[h] = true
        local ok, err = core.post(0, "tokenreview", cjson.encode({ token = token, h = h }))
        if not ok then
            waiting[h] = nil
            return nil, "token review failed: " .. tostring(err), 503
        end
    end
    local reply, err = core.wait("tr:" .. h, TIMEOUT * 2 + 1)
    if not reply then
        waiting[h] = nil
        return nil, "token review failed: " .. tostring(err), 503
    end
    local r = cjson.decode(reply) or {}
    if r.verdict == "ok" then
        return r.id
    elseif r.verdict == "refused" then
        return nil, r.why or "invalid token", 401
    end
    return nil, "authentication unavailable", 503
end

-- Per worker, from auth.start.
function M.start()
    if not M.enabled or M.started then
        return
    end
    M.started = true
    core.on("tokenreview_done", review_done)
    if core.worker_id() == 0 then
        core.on("tokenreview", review_for)
    end
end

-- Forgets the cache (tests).
function M.flush()
    cache, ncache, waiting = {}, 0, {}
end

return M
