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
-- The decision is left in req.ctx.ratelimit ("allowed", "limited", "concurrency") for access_log.lua.
-- Counted for /metrics (metrics.lua): refusals at once in the shared dict "sp" (m:ratelimited,
-- m:concurrency_limited); requests let through in a per-worker counter (a Lua local: no shared
-- write per request) that M.start's timer adds to m:ratelimit_allowed every
-- ALLOWED_FLUSH_SECONDS, so that count lags by at most that long.
local config = require "sp.config"
local shared = require "sp.shared"
local ip = require "sp.ip"
local sandbox_path = require "sandbox_path"

local type = type
local tostring = tostring
local ceil = math.ceil
local floor = math.floor

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

local KEYS = { unauthenticated = true, identity = true, client = true, user = true, sandbox = true }
for i, l in ipairs(LIMITS) do
    assert(type(l.rate) == "number" and l.rate > 0, "ratelimit.limits[" .. i .. "].rate must be > 0")
    assert(type(l.key) == "function" or KEYS[l.key], "ratelimit.limits[" .. i .. "].key must be "
        .. "\"unauthenticated\", \"identity\", \"client\", \"user\", \"sandbox\" or a function")
    l.burst = l.burst or l.rate
    l.name = l.name or ("limit" .. i)
    l.prefix = "rl:" .. l.name .. ":"
    l.burst_text = tostring(l.burst)
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

-- Takes a token of limit l for req. Returns true, remaining, reset when allowed (or true and
-- nothing when the limit does not apply); false after answering 429.
local function apply(l, req)
    local key = key_of(l, req)
    if not key then
        return true
    end
    local ok, remaining, retry, reset = dict:rate(l.prefix .. key, l.rate, l.burst)
    if not ok then
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
    return true, remaining, reset
end

-- Applies the limits. Returns true if the request may go on; otherwise it has been answered.
-- (Named check before 0.2; M.check stays as an alias for override scripts that call it.)
function M.admit(req)
    if not M.enabled then
        return true
    end
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
