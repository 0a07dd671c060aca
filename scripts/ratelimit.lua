-- ratelimit.lua: request rate limits and per-sandbox concurrency limits, shared by all workers
-- of the process (a shared dict; per-node scope).
--
-- A limited request gets 429 {"error":"rate limited"} with Retry-After; every request that a
-- rate limit looked at carries RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset (of
-- the most constrained limit). Over the concurrency limit: 503 {"error":"too many requests in
-- flight","path":..} with Retry-After. A concurrency slot is held in C and given back however
-- the exchange ends (response, client abort, upstream error, timeout, WebSocket close).
--
-- Config (section `ratelimit`; defaults shown):
--   enabled = true,
--   dict = "ratelimit",                 -- the shared dict (declare a size in shared_dicts)
--   limits = {                          -- rate: per second; burst: the bucket's size
--     { name = "client", key = "unauthenticated", rate = 1000, burst = 2000 },
--     { name = "user", key = "identity", rate = 1000, burst = 2000 },
--   },
--   concurrency = { per_sandbox = 256 },  -- in-flight requests per sandbox (0: off)
--   trusted_proxies = {},               -- CIDRs whose X-Forwarded-For is believed; default:
--                                       -- the runtime knob trusted_proxies (also exempt from
--                                       -- max_connections_per_ip)
--   redis = {                           -- cluster-wide rate limits (off: per replica)
--     enabled = false,
--     host = "127.0.0.1", port = 6379, password = nil,
--     timeout_ms = 50,                  -- per decision; later: the fallback decides
--     prefix = "sp:rl:",                -- of the Redis keys: prefix .. name .. ":" .. key
--     fallback = "local",               -- store unreachable: "local" (this replica's limits),
--                                       -- "open" (no rate limit) or "closed" (503)
--   },
-- Keys: "unauthenticated" the client address of a caller auth has not identified (every
-- caller when auth is off; skipped once auth has identified the caller), "identity" the
-- authenticated user (req.ctx.identity.user, left by auth.identify_request, which init.lua
-- runs before admit; skipped for unidentified callers), "client" the client address of every
-- caller, "user" the user in the path, "sandbox" the path's user/sandbox, or a function(req);
-- a key that is nil skips that limit for the request. So by default an authenticated user
-- has a bucket of their own wherever they connect from, and users behind one address (a NAT,
-- a load balancer's node addresses) never share one; only callers without valid credentials
-- share their address's bucket.
-- trusted_proxies is empty by default: the shipped Service (k8s/base/deployment.yaml) is an L4
-- LoadBalancer with externalTrafficPolicy: Local, so the peer address is the client's own and
-- nothing in front adds X-Forwarded-For (a client could write any). Behind an L7 proxy or
-- ingress, list its addresses here; with externalTrafficPolicy: Cluster peers are node
-- addresses (SNAT) and per-address limits see one client per node.
-- With redis.enabled the rate limits are cluster-wide: every replica (and worker) decides with
-- one atomic round trip to a shared Redis (SCRIPT below: GCRA over Redis' clock, all the
-- request's limits in one EVALSHA); the per-sandbox concurrency limit stays per replica. When
-- the store fails (down, refused, no reply within timeout_ms, an error reply) the request is
-- decided by `fallback` and counted in m:ratelimit_store_fallbacks; sp.redis logs one line when
-- the store goes down and one when it is back, and reconnects by itself.
-- The decision is left in req.ctx.ratelimit ("allowed", "limited", "concurrency",
-- "store_unavailable") for access_log.lua.
-- Counted for /metrics (metrics.lua): refusals at once in the shared dict "sp" (m:ratelimited,
-- m:concurrency_limited, m:ratelimit_store_refused, and m:ratelimit_store_fallbacks);
-- requests let through in a per-worker counter (a Lua local: no shared write per request)
-- that M.start's timer adds to m:ratelimit_allowed every ALLOWED_FLUSH_SECONDS, so that count
-- lags by at most that long.
local config = require "sp.config"
local shared = require "sp.shared"
local ip = require "sp.ip"
local sandbox_path = require "sandbox_path"

local type = type
local tostring = tostring
local ceil = math.ceil
local floor = math.floor
local unpack = unpack

local cfg = config.ratelimit or {}
local M = {}

M.enabled = cfg.enabled ~= false
M.ALLOWED_FLUSH_SECONDS = 1
local allowed_pending = 0 -- requests this worker let through since the last flush
local DICT_NAME = cfg.dict or "ratelimit"
local dict = assert(shared.dict(DICT_NAME))
local sp_dict = assert(shared.dict("sp"))
-- The defaults (also in `--help` and the README's table of refusing defaults).
M.DEFAULT_LIMITS = {
    { name = "client", key = "unauthenticated", rate = 1000, burst = 2000 },
    { name = "user", key = "identity", rate = 1000, burst = 2000 },
}
M.DEFAULT_PER_SANDBOX = 256
local function copy_defaults()
    local out = {}
    for i, l in ipairs(M.DEFAULT_LIMITS) do
        out[i] = { name = l.name, key = l.key, rate = l.rate, burst = l.burst }
    end
    return out
end
local LIMITS = cfg.limits or copy_defaults()
local PER_SANDBOX = (cfg.concurrency or {}).per_sandbox
if PER_SANDBOX == nil then
    PER_SANDBOX = M.DEFAULT_PER_SANDBOX
end
-- The runtime knob's comma-separated text, as a list (the section's own list wins).
local function knob_list(text)
    local out = {}
    for item in (text or ""):gmatch("[^,%s]+") do
        out[#out + 1] = item
    end
    return out
end
local trusted = assert(ip.ranges(cfg.trusted_proxies
    or knob_list(require("sp.core").settings().trusted_proxies)))

-- Cluster-wide mode (see the header).
local RCFG = cfg.redis or {}
M.DEFAULT_REDIS = { host = "127.0.0.1", port = 6379, timeout_ms = 50, prefix = "sp:rl:",
    fallback = "local" }
assert(RCFG.enabled == nil or type(RCFG.enabled) == "boolean",
    "ratelimit.redis.enabled must be true or false")
M.redis = RCFG.enabled == true
local FALLBACK = RCFG.fallback or M.DEFAULT_REDIS.fallback
assert(FALLBACK == "local" or FALLBACK == "open" or FALLBACK == "closed",
    "ratelimit.redis.fallback must be \"local\", \"open\" or \"closed\"")
local PREFIX = RCFG.prefix or M.DEFAULT_REDIS.prefix
assert(type(PREFIX) == "string", "ratelimit.redis.prefix must be a string")
local store, store_err
if M.redis then
    -- a client per Lua state (one per worker); nil, err in --check and test states (no loop)
    store, store_err = require("sp.redis").client({
        host = RCFG.host or M.DEFAULT_REDIS.host,
        port = RCFG.port or M.DEFAULT_REDIS.port,
        timeout_ms = RCFG.timeout_ms or M.DEFAULT_REDIS.timeout_ms,
        password = RCFG.password,
        name = "ratelimit",
    })
end

local KEYS = { unauthenticated = true, identity = true, client = true, user = true, sandbox = true }
for i, l in ipairs(LIMITS) do
    assert(type(l.rate) == "number" and l.rate > 0, "ratelimit.limits[" .. i .. "].rate must be > 0")
    assert(type(l.key) == "function" or KEYS[l.key], "ratelimit.limits[" .. i .. "].key must be "
        .. "\"unauthenticated\", \"identity\", \"client\", \"user\", \"sandbox\" or a function")
    l.burst = l.burst or l.rate
    l.name = l.name or ("limit" .. i)
    l.prefix = "rl:" .. l.name .. ":"
    l.burst_text = tostring(l.burst)
    -- the store's arguments: the emission interval and the burst's span, in microseconds
    l.interval_us = string.format("%.17g", 1e6 / l.rate)
    l.span_us = string.format("%.17g", l.burst * 1e6 / l.rate)
end

-- Seconds as a whole number for a header: rounded up, never "-0" or negative. A number:
-- req:add_response_header writes whole numbers itself (no double formatting in Lua).
local function whole_seconds(s)
    local n = ceil(s - 1e-6)
    if n <= 0 then
        return 0
    end
    return n
end

-- The client address, believing X-Forwarded-For only from trusted proxies.
function M.client(req)
    return ip.client_address(req:client_addr(), req:header("x-forwarded-for"), trusted)
end

-- "user/sandbox" of the request target, or nil; and the user.
local function sandbox_key(req)
    local user, _, _, key = sandbox_path.of(req)
    return key, user
end

-- The authenticated caller's identity, without making req.ctx for a request that has none.
local function identity(req)
    local ctx = rawget(req, "ctx")
    return ctx and ctx.identity
end

local function key_of(l, req)
    local k = l.key
    if k == "unauthenticated" then
        if identity(req) then
            return nil
        end
        return M.client(req)
    elseif k == "identity" then
        local id = identity(req)
        return id and id.user
    elseif k == "client" then
        return M.client(req)
    elseif k == "user" then
        local _, user = sandbox_key(req)
        return user
    elseif k == "sandbox" then
        return (sandbox_key(req))
    elseif type(k) == "function" then
        return k(req)
    end
    return nil
end

-- Answers 429 for limit l (retry, reset: seconds); returns false.
local function refuse(req, l, retry, reset)
    sp_dict:incr("m:ratelimited", 1, 0)
    req.ctx.ratelimit = "limited"
    req:respond(429, { error = "rate limited" }, {
        ["Retry-After"] = tostring(math.max(1, ceil(retry - 1e-6))),
        ["RateLimit-Limit"] = l.burst_text,
        ["RateLimit-Remaining"] = "0",
        ["RateLimit-Reset"] = whole_seconds(reset),
    })
    return false
end

-- Takes a token of limit l for req. Returns true, remaining, reset when allowed (or true and
-- nothing when the limit does not apply); false after answering 429.
local function apply(l, req)
    local key = key_of(l, req)
    if not key then
        return true
    end
    local ok, remaining, retry, reset = dict:rate(l.prefix .. key, l.rate, l.burst)
    if not ok then
        return refuse(req, l, retry, reset)
    end
    return true, remaining, reset
end

-- The per-sandbox concurrency slot and the RateLimit-* headers of an admitted request.
local function admit_rest(req, best_remaining, best_limit, best_reset)
    if best_remaining then
        req:add_response_header("RateLimit-Limit", best_limit)
        req:add_response_header("RateLimit-Remaining", floor(best_remaining))
        req:add_response_header("RateLimit-Reset", whole_seconds(best_reset))
    end
    if PER_SANDBOX and PER_SANDBOX > 0 then
        local sb = sandbox_key(req)
        if sb then
            local held, err = req:hold(DICT_NAME, "cc:" .. sb, PER_SANDBOX)
            if held == false then
                sp_dict:incr("m:concurrency_limited", 1, 0)
                req.ctx.ratelimit = "concurrency"
                return false, req:respond(503, { error = "too many requests in flight", path = sb },
                    { ["Retry-After"] = "1" })
            elseif held == nil then
                error(err)
            end
        end
    end
    req.ctx.ratelimit = "allowed"
    allowed_pending = allowed_pending + 1
    return true
end

-- The rate limits over this replica's shared dict. Returns true, remaining, limit, reset of the
-- most constrained limit (nils when none applied), or false after answering 429.
local function local_rates(req)
    local best_remaining, best_limit, best_reset
    -- The first two limits outside the loop: with the default two no loop runs, and the
    -- routing path compiles as one trace (a loop left after one pass aborts a root trace).
    local n = #LIMITS
    if n > 0 then
        local l = LIMITS[1]
        local ok, remaining, reset = apply(l, req)
        if not ok then
            return false
        end
        if remaining then
            best_remaining, best_limit, best_reset = remaining, l.burst_text, reset
        end
    end
    if n > 1 then
        local l = LIMITS[2]
        local ok, remaining, reset = apply(l, req)
        if not ok then
            return false
        end
        if remaining and (not best_remaining or remaining < best_remaining) then
            best_remaining, best_limit, best_reset = remaining, l.burst_text, reset
        end
    end
    for i = 3, n do
        local l = LIMITS[i]
        local ok, remaining, reset = apply(l, req)
        if not ok then
            return false
        end
        if remaining and (not best_remaining or remaining < best_remaining) then
            best_remaining, best_limit, best_reset = remaining, l.burst_text, reset
        end
    end
    return true, best_remaining, best_limit, best_reset
end

-- The store's side of a decision, run atomically by Redis: GCRA (as sp_shdict_rate does it)
-- on Redis' own clock, so replicas need no synchronised clocks. KEYS: the request's limit keys
-- in order; ARGV: per key the emission interval and the burst's span (microseconds). Stops at
-- the first refusal (the earlier limits keep the token they gave, as in the local mode).
-- Returns per key decided: allowed (1/0), remaining, retry after (us), reset (us). A key
-- expires a second after its bucket is full again.
M.SCRIPT = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #KEYS do
    local interval = tonumber(ARGV[2 * i - 1])
    local span = tonumber(ARGV[2 * i])
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if tat < now then
        tat = now
    end
    local new_tat = tat + interval
    local allowed = new_tat - now <= span + 0.001
    local retry = 0
    if allowed then
        redis.call('SET', KEYS[i], string.format('%.0f', new_tat),
            'PX', math.ceil((new_tat - now) / 1000) + 1000)
        tat = new_tat
    else
        retry = new_tat - span - now
    end
    local left = math.floor((span - (tat - now)) / interval + 1e-9)
    if left < 0 then
        left = 0
    end
    out[#out + 1] = allowed and 1 or 0
    out[#out + 1] = left
    out[#out + 1] = math.ceil(retry)
    out[#out + 1] = math.ceil(tat - now)
    if not allowed then
        break
    end
end
return out
]]
local sha -- the script's SHA1 as the store told it (SCRIPT LOAD, once per state)

-- One decision from the store: its reply (the flat list above) or nil, err.
local function store_decide(argv)
    if not store then
        return nil, "EDOWN: " .. tostring(store_err)
    end
    if not sha then
        local r, err = store:command("SCRIPT", "LOAD", M.SCRIPT)
        if not r then
            return nil, err
        end
        sha = r
    end
    argv[2] = sha
    local r, err = store:command(unpack(argv))
    if not r and err and err:find("NOSCRIPT", 1, true) then
        -- the store restarted (its script cache is empty): EVAL decides and caches it again
        argv[1], argv[2] = "EVAL", M.SCRIPT
        r, err = store:command(unpack(argv))
    end
    if r and type(r) ~= "table" then
        return nil, "EREDIS: unexpected reply " .. tostring(r)
    end
    return r, err
end

local function store_unavailable(req, err)
    sp_dict:incr("m:ratelimit_store_fallbacks", 1, 0)
    if FALLBACK == "local" then
        local ok, best_remaining, best_limit, best_reset = local_rates(req)
        if not ok then
            return false
        end
        return admit_rest(req, best_remaining, best_limit, best_reset)
    elseif FALLBACK == "open" then
        return admit_rest(req)
    end
    sp_dict:incr("m:ratelimit_store_refused", 1, 0)
    req.ctx.ratelimit = "store_unavailable"
    return false, req:respond(503, { error = "rate limit store unavailable" },
        { ["Retry-After"] = "1" })
end

-- The cluster-wide decision: one round trip for all of the request's limits.
local function admit_cluster(req)
    local argv, limits, n = { "EVALSHA", false, 0 }, {}, 0
    for i = 1, #LIMITS do
        local l = LIMITS[i]
        local key = key_of(l, req)
        if key then
            n = n + 1
            limits[n] = l
            argv[3 + n] = PREFIX .. l.name .. ":" .. key
        end
    end
    if n == 0 then
        return admit_rest(req)
    end
    argv[3] = n
    for i = 1, n do
        argv[3 + n + 2 * i - 1] = limits[i].interval_us
        argv[3 + n + 2 * i] = limits[i].span_us
    end
    local r, err = store_decide(argv)
    if not r then
        if err and err:find("the client went away", 1, true) then
            return false -- nobody to answer
        end
        return store_unavailable(req, err)
    end
    local best_remaining, best_limit, best_reset
    for i = 1, #r / 4 do
        local l = limits[i]
        local remaining, retry, reset = r[4 * i - 2], r[4 * i - 1] / 1e6, r[4 * i] / 1e6
        if r[4 * i - 3] ~= 1 then
            return refuse(req, l, retry, reset)
        end
        if not best_remaining or remaining < best_remaining then
            best_remaining, best_limit, best_reset = remaining, l.burst_text, reset
        end
    end
    return admit_rest(req, best_remaining, best_limit, best_reset)
end

-- Applies the limits. Returns true if the request may go on; otherwise it has been answered.
-- (Named check before 0.2; M.check stays as an alias for override scripts that call it.)
function M.admit(req)
    if not M.enabled then
        return true
    end
    if M.redis then
        return admit_cluster(req)
    end
    local ok, best_remaining, best_limit, best_reset = local_rates(req)
    if not ok then
        return false
    end
    return admit_rest(req, best_remaining, best_limit, best_reset)
end
M.check = M.admit

-- Adds this worker's requests let through since the last call to m:ratelimit_allowed.
function M.flush_counts()
    if allowed_pending > 0 then
        sp_dict:incr("m:ratelimit_allowed", allowed_pending, 0)
        allowed_pending = 0
    end
end

-- Per worker (init.lua's on_start): flush the count of requests let through every second.
function M.start()
    if M.enabled then
        require("sp.timer").every(M.ALLOWED_FLUSH_SECONDS, M.flush_counts)
    end
end

-- In-flight requests of a sandbox right now (all workers).
function M.in_flight(sandbox)
    return dict:get("cc:" .. sandbox) or 0
end

return M
