-- auth.lua: authentication bound to the user in the path.
--
-- A request presents a credential in one header (default `Authorization: Bearer <credential>`,
-- or `Authorization: Basic` with the credential as the password and any user name, which is
-- what a client that can only carry credentials in its URL sends: http://any:KEY@host/; set
-- `header` to e.g. "X-Sandbox-Proxy-Key" so a sandbox application's own Authorization
-- header passes through untouched). The credential is an API key (looked up by its SHA-256 in
-- a keys file, compared in constant time) or a JWT (HS256 or RS256, verified with libcrypto;
-- issuer, audience, expiry and not-before checked with a small clock skew). It maps to a user;
--   * /{user}/{sandbox}/... is allowed only when the sandbox's owner is the authenticated
--     user, or the identity is an admin (403 otherwise). The owner is the route's `user`
--     (discovery: the sandbox's user label). A sandbox without an owner (no user label; its
--     path is /{discovery.default_user}/{name}) is reachable by admins only, or also by the
--     user named in `unowned_owner`. User names compare exactly (bytes, after the path's
--     percent-decoding): no case folding, no prefix, no trimming;
--   * /sandboxes lists only what the caller may reach; /metrics needs an admin;
--   * /health, /ready, /live stay open (probes).
-- Browsers (browser.lua): a credential in the `sp_token` query parameter becomes a cookie
-- scoped to that sandbox (302); the cookie then counts as the credential when no header carries
-- one, with an Origin check for requests that change state or upgrade (403); the cookie is
-- removed from what the sandbox gets.
-- Missing or wrong credentials: 401 {"error":...} with WWW-Authenticate. The proxy's own
-- credential header is always removed before forwarding. Credentials are never logged.
--
-- Credentials that cannot be trusted refuse the start (an error at load: the proxy exits 1,
-- `--check` fails): an HS256 secret shorter than MIN_SECRET (32) bytes (RFC 7518 3.2: at
-- least the hash size; an empty secret would let anyone sign tokens), an RS256 public key file
-- that is unreadable or not a PEM public key, a keys file that is unreadable, malformed, or
-- lists one key for two users (or once admin, once not). The keys file and the secret/key
-- files are re-read when they change, with the same rules: a bad version is refused, the last
-- good credentials stay in force, and one error line says why.
--
-- Config (section `auth`):
--   header = "Authorization",            -- the credential header ("Bearer " is expected there)
--   keys_file = "/etc/sandbox-proxy/auth/keys.json",
--       -- {"keys":[{"user":"alice","sha256":"<hex of sha256(key)>"},
--       --          {"user":"ops","sha256":"...","admin":true}]}; re-read when it changes
--   jwt = { hs256_secret_file = path | hs256_secret = "...", rs256_public_key_file = path,
--           issuer = "...", audience = "...", user_claim = "sub", admin_claim = "sandbox_admin",
--           admin_users = { ... }, leeway = 30 },
--       -- the secret file's trailing whitespace (newline) is not part of the secret
--   unowned_owner = nil,                 -- a user who may also reach unowned sandboxes
--   tokenreview = { enabled = true, ... } -- Kubernetes ServiceAccount tokens (tokenreview.lua)
--   enabled = true|false                 -- default: on when keys_file, jwt or tokenreview is set
-- The runtime knob auth_required=true makes the proxy refuse to start without keys_file or jwt
-- (the manifests in k8s/ set it). Without auth the proxy says so loudly at start-up.
local core = require "sp.core"
local config = require "sp.config"
local fs = require "sp.fs"
local log = require "sp.log"
local crypto = require "sp.crypto"
local routes = require "sp.routes"
local cjson = require "cjson.safe"
local sandbox_path = require "sandbox_path"
local tokenreview = require "tokenreview"
local browser = require "browser"

local type = type
local lower = string.lower
local sub = string.sub
local find = string.find
local tostring = tostring

local cfg = config.auth or {}
local settings = core.settings()
local M = {}
browser.auth = M -- browser.lua's login checks a query credential with identify_credential

-- The shortest HS256 secret accepted, in bytes (RFC 7518 3.2: a key of at least the hash size).
M.MIN_SECRET = 32

local HEADER = cfg.header or "Authorization"
local BEARER = lower(HEADER) == "authorization"
local jwt_cfg = cfg.jwt
-- (auth.tokenreview: Kubernetes ServiceAccount tokens, reviewed by the API server; tokenreview.lua)
local configured = cfg.keys_file ~= nil or jwt_cfg ~= nil or tokenreview.enabled
M.enabled = cfg.enabled ~= false and configured
M.header = HEADER

if settings.auth_required and not M.enabled then
    error("authentication is required (auth_required) but none of auth.keys_file, auth.jwt, "
        .. "auth.tokenreview is configured (or auth.enabled is false)", 0)
end

local UNOWNED_OWNER = cfg.unowned_owner
if UNOWNED_OWNER ~= nil and (type(UNOWNED_OWNER) ~= "string" or UNOWNED_OWNER == "") then
    error("auth.unowned_owner must be a user name (a non-empty string)", 0)
end
M.unowned_owner = UNOWNED_OWNER

-- Refuses the start: one JSON error line, then the load error (exit 1, `--check` fails).
local function refuse(msg, fields)
    log.error("refusing to start: " .. msg, fields)
    error("auth: " .. msg .. (fields and fields.path and (" (" .. fields.path .. ")") or "")
        .. (fields and fields.error and (": " .. fields.error) or ""), 0)
end

-- ------------------------------------------------------------------ API keys

local keys = {} -- sha256 hex -> { user =, admin =, digest = raw }

-- Parses a keys file's text. Returns the table or nil, err. One key listed for two users (or
-- once as admin, once not) is an error: which one should win is unknowable.
function M.parse_keys(text)
    local doc = cjson.decode(text)
    if type(doc) ~= "table" or type(doc.keys) ~= "table" then
        return nil, "expected {\"keys\":[{\"user\":...,\"sha256\":...}]}"
    end
    local out = {}
    for i, k in ipairs(doc.keys) do
        if type(k) ~= "table" or type(k.user) ~= "string" or k.user == ""
            or type(k.sha256) ~= "string" or not k.sha256:match("^%x+$") or #k.sha256 ~= 64 then
            return nil, "keys[" .. i .. "]: needs user and a 64-digit hex sha256"
        end
        local hex = lower(k.sha256)
        local admin = k.admin == true
        local seen = out[hex]
        if seen and (seen.user ~= k.user or seen.admin ~= admin) then
            return nil, "keys[" .. i .. "]: the same key is also listed for user " .. seen.user
                .. (seen.user == k.user and " with another admin flag" or "")
                .. " (keys[" .. seen.index .. "])"
        end
        local raw = hex:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
        out[hex] = seen or { user = k.user, admin = admin, digest = raw, index = i }
    end
    return out
end

-- Reads and parses a keys file. Returns the keys and their count, or nil, err.
local function read_keys(path)
    local text, err = fs.read(path)
    if not text then
        return nil, err
    end
    local parsed
    parsed, err = M.parse_keys(text)
    if not parsed then
        return nil, err
    end
    local n = 0
    for _ in pairs(parsed) do
        n = n + 1
    end
    return parsed, n
end

-- Re-reads the keys file; a bad version keeps the previous keys. Returns true or nil, err.
function M.reload_keys()
    local path = cfg.keys_file
    local parsed, n = read_keys(path)
    if not parsed then
        log.error("cannot load the API keys file: keeping the previous keys",
            { path = path, error = n })
        return nil, n
    end
    keys = parsed
    log.info("API keys loaded", { path = path, keys = n, worker = core.worker_id() })
    return true
end

local function by_key(credential)
    local digest = crypto.sha256(credential)
    local entry = keys[crypto.hex(digest)]
    if entry and crypto.equal(entry.digest, digest) then
        return { user = entry.user, admin = entry.admin, method = "key" }
    end
    return nil
end

-- ------------------------------------------------------------------ JWT keys

-- Checks an HS256 secret. Returns the secret or nil, err.
function M.check_secret(secret)
    if type(secret) ~= "string" then
        return nil, "the HS256 secret must be a string"
    end
    if #secret < M.MIN_SECRET then
        return nil, "the HS256 secret is " .. #secret .. " bytes, at least " .. M.MIN_SECRET
            .. " are required (RFC 7518 3.2)"
    end
    return secret
end

-- Reads an HS256 secret file (trailing whitespace is not part of the secret) and checks it.
local function read_secret(path)
    local text, err = fs.read(path)
    if not text then
        return nil, err
    end
    return M.check_secret((text:gsub("%s+$", "")))
end

-- The DER of rsaEncryption's OID (1.2.840.113549.1.1.1), in the key's AlgorithmIdentifier.
local RSA_OID = "\6\9\42\134\72\134\247\13\1\1\1"

-- Checks an RS256 public key: a PEM "PUBLIC KEY" (SubjectPublicKeyInfo) that libcrypto reads
-- and that is an RSA key (another kind would never verify a token). Returns it or nil, err.
function M.check_public_key(pem)
    local b64 = type(pem) == "string"
        and pem:match("%-%-%-%-%-BEGIN PUBLIC KEY%-%-%-%-%-(.-)%-%-%-%-%-END PUBLIC KEY%-%-%-%-%-")
    if not b64 then
        return nil, "not a PEM public key (-----BEGIN PUBLIC KEY-----)"
    end
    local _, err = crypto.rsa_sha256_verify(pem, "", "")
    if err and sub(err, 1, 6) == "EINVAL" then
        return nil, "not a usable PEM public key"
    end
    local der = crypto.b64_decode((b64:gsub("%s", "")))
    if not der or not find(sub(der, 1, 32), RSA_OID, 1, true) then
        return nil, "not an RSA public key"
    end
    return pem
end

local function read_public_key(path)
    local text, err = fs.read(path)
    if not text then
        return nil, err
    end
    return M.check_public_key(text)
end

local hs_secret, rs_key
if jwt_cfg and M.enabled then
    local err
    if jwt_cfg.hs256_secret_file then
        hs_secret, err = read_secret(jwt_cfg.hs256_secret_file)
        if not hs_secret then
            refuse("bad auth.jwt.hs256_secret_file",
                { path = jwt_cfg.hs256_secret_file, error = err })
        end
    elseif jwt_cfg.hs256_secret ~= nil then
        hs_secret, err = M.check_secret(jwt_cfg.hs256_secret)
        if not hs_secret then
            refuse("bad auth.jwt.hs256_secret", { error = err })
        end
    end
    if jwt_cfg.rs256_public_key_file then
        rs_key, err = read_public_key(jwt_cfg.rs256_public_key_file)
        if not rs_key then
            refuse("bad auth.jwt.rs256_public_key_file",
                { path = jwt_cfg.rs256_public_key_file, error = err })
        end
    end
    if not hs_secret and not rs_key then
        refuse("auth.jwt needs hs256_secret(_file) or rs256_public_key_file")
    end
end

if cfg.keys_file and M.enabled then
    local parsed, n = read_keys(cfg.keys_file)
    if not parsed then
        refuse("bad auth.keys_file", { path = cfg.keys_file, error = n })
    end
    keys = parsed
    log.info("API keys loaded", { path = cfg.keys_file, keys = n, worker = core.worker_id() })
end

-- Re-reads the HS256 secret file; a bad version keeps the previous secret. true or nil, err.
function M.reload_secret()
    local path = jwt_cfg.hs256_secret_file
    local secret, err = read_secret(path)
    if not secret then
        log.error("cannot load the HS256 secret file: keeping the previous secret",
            { path = path, error = err })
        return nil, err
    end
    hs_secret = secret
    log.info("HS256 secret loaded", { path = path, worker = core.worker_id() })
    return true
end

-- Re-reads the RS256 public key file; a bad version keeps the previous key. true or nil, err.
function M.reload_public_key()
    local path = jwt_cfg.rs256_public_key_file
    local pem, err = read_public_key(path)
    if not pem then
        log.error("cannot load the RS256 public key file: keeping the previous key",
            { path = path, error = err })
        return nil, err
    end
    rs_key = pem
    log.info("RS256 public key loaded", { path = path, worker = core.worker_id() })
    return true
end

-- Starts watching the keys, secret and public key files (each worker keeps its own copy).
-- Called from init.on_start.
function M.start()
    if not M.enabled or M.watches then
        return
    end
    tokenreview.start()
    M.watches = {}
    if cfg.keys_file then
        M.watches[#M.watches + 1] = fs.watch(cfg.keys_file, M.reload_keys)
    end
    if jwt_cfg and jwt_cfg.hs256_secret_file then
        M.watches[#M.watches + 1] = fs.watch(jwt_cfg.hs256_secret_file, M.reload_secret)
    end
    if jwt_cfg and jwt_cfg.rs256_public_key_file then
        M.watches[#M.watches + 1] = fs.watch(jwt_cfg.rs256_public_key_file, M.reload_public_key)
    end
end

-- ------------------------------------------------------------------ JWT

local LEEWAY = (jwt_cfg and jwt_cfg.leeway) or 30
local USER_CLAIM = (jwt_cfg and jwt_cfg.user_claim) or "sub"
local ADMIN_CLAIM = jwt_cfg and jwt_cfg.admin_claim
local ADMIN_USERS = {}
for _, u in ipairs((jwt_cfg and jwt_cfg.admin_users) or {}) do
    ADMIN_USERS[u] = true
end

local function aud_ok(aud, want)
    if type(aud) == "string" then
        return aud == want
    end
    if type(aud) == "table" then
        for _, a in ipairs(aud) do
            if a == want then
                return true
            end
        end
    end
    return false
end

-- Verifies a JWT. Returns an identity, or nil and why (never the token itself).
function M.verify_jwt(token, now)
    if not jwt_cfg then
        return nil, "JWT not configured"
    end
    local d1 = find(token, ".", 1, true)
    local d2 = d1 and find(token, ".", d1 + 1, true)
    if not d2 or find(token, ".", d2 + 1, true) then
        return nil, "malformed token"
    end
    local head = cjson.decode(crypto.b64url_decode(sub(token, 1, d1 - 1)) or "")
    local body = cjson.decode(crypto.b64url_decode(sub(token, d1 + 1, d2 - 1)) or "")
    local sig = crypto.b64url_decode(sub(token, d2 + 1))
    if type(head) ~= "table" or type(body) ~= "table" or not sig then
        return nil, "malformed token"
    end
    local signed = sub(token, 1, d2 - 1)
    if head.alg == "HS256" and hs_secret then
        if not crypto.equal(crypto.hmac_sha256(hs_secret, signed), sig) then
            return nil, "bad signature"
        end
    elseif head.alg == "RS256" and rs_key then
        if not crypto.rsa_sha256_verify(rs_key, signed, sig) then
            return nil, "bad signature"
        end
    else
        return nil, "unsupported algorithm"
    end
    now = now or core.now()
    if type(body.exp) ~= "number" or now > body.exp + LEEWAY then
        return nil, "token expired"
    end
    if body.nbf ~= nil and (type(body.nbf) ~= "number" or now + LEEWAY < body.nbf) then
        return nil, "token not yet valid"
    end
    if jwt_cfg.issuer and body.iss ~= jwt_cfg.issuer then
        return nil, "wrong issuer"
    end
    if jwt_cfg.audience and not aud_ok(body.aud, jwt_cfg.audience) then
        return nil, "wrong audience"
    end
    local user = body[USER_CLAIM]
    if type(user) ~= "string" or user == "" then
        return nil, "no user claim"
    end
    local admin = ADMIN_USERS[user] == true or (ADMIN_CLAIM ~= nil and body[ADMIN_CLAIM] == true)
    return { user = user, admin = admin, method = "jwt" }
end

-- ------------------------------------------------------------------ the checks

local UNAUTHORIZED = { ["WWW-Authenticate"] = 'Bearer realm="sandbox-proxy"' }

-- The presented credential, or nil.
local function credential(req)
    local v = req:header(HEADER)
    if not v then
        return nil
    end
    if BEARER then
        local c = v:match("^[Bb]earer%s+(%S+)%s*$")
        if c then
            return c
        end
        -- HTTP Basic (RFC 7617): the password is the credential, the user name is ignored. What
        -- a client that can only put credentials in a URL sends (http://any:KEY@proxy/...).
        local b = v:match("^[Bb]asic%s+([%w+/=]+)%s*$")
        local pair = b and crypto.b64_decode(b)
        local pass = pair and pair:match("^[^:]*:(%S+)$")
        return pass
    end
    return v:match("^%s*(%S+)%s*$")
end

-- The identity behind a credential (an API key, a JWT, a ServiceAccount token): { user, admin,
-- method } or nil, a reason and (503) when no review could be made. browser.lua checks the
-- credential of a query string with it.
function M.identify_credential(cred)
    local id = by_key(cred)
    if id then
        return id
    end
    if jwt_cfg and find(cred, ".", 1, true) then
        local jid, why = M.verify_jwt(cred)
        if jid then
            return jid
        end
        if not tokenreview.enabled then
            return nil, "invalid token: " .. why
        end
    end
    if tokenreview.enabled then
        return tokenreview.identify(cred) -- identity | nil, why, 401 or 503 (no review possible)
    end
    return nil, "invalid credentials"
end

-- The identity behind a request: { user, admin, method } or nil and a reason. The credential
-- is the header's, else (browser auth) the proxy's cookie: req.ctx.via_cookie is then set.
function M.identify(req)
    local cred = credential(req)
    if not cred and browser.enabled then
        cred = browser.cookie_credential(req)
        if cred then
            req.ctx.via_cookie = true
        end
    end
    if not cred then
        return nil, "authentication required"
    end
    return M.identify_credential(cred)
end

-- Identifies the caller once per request, answering nothing: leaves req.ctx.identity (or
-- req.ctx.auth_error, the reason there is none) for the rate limits (init.lua calls it before
-- ratelimit.admit, so limits can key by the authenticated user), authenticate and the log.
-- Returns the identity or nil. Without auth: nil, and nothing is touched.
function M.identify_request(req)
    if not M.enabled then
        return nil
    end
    local ctx = req.ctx
    if ctx.auth_checked then
        return ctx.identity
    end
    ctx.auth_checked = true
    local id, why, code = M.identify(req)
    if id then
        ctx.identity = id
    else
        ctx.auth_error = why
        ctx.auth_code = code -- 503: no review could be made (TokenReview)
    end
    return id
end
local identify_request = M.identify_request

-- Authenticates; answers 401 and returns false when it fails. Strips the credential header.
-- The credential is verified once per request (identify_request).
function M.authenticate(req)
    if not M.enabled then
        return true
    end
    local id = identify_request(req)
    if not id then
        local why = req.ctx.auth_error
        if req.ctx.auth_code == 503 then
            req:respond(503, { error = "authentication unavailable",
                detail = req:header("x-sandbox-id") and "authentication unavailable" or nil },
                { ["Retry-After"] = "2" })
            return false
        end
        -- an agent-sandbox SDK request (X-Sandbox-ID) also gets that router's "detail"
        req:respond(401, { error = why, detail = req:header("x-sandbox-id") and why or nil },
            UNAUTHORIZED)
        return false
    end
    req:remove_header(HEADER)
    if browser.enabled then
        browser.strip_cookie(req)
        if req.ctx.via_cookie and not browser.origin_ok(req) then
            req:respond(403, { error = "forbidden: a cookie-authenticated request that changes "
                .. "state or opens a WebSocket needs an Origin of this host" })
            return false
        end
    end
    return true
end

-- The user who owns a route: its `user`, or for a sandbox without one (unowned) the
-- configured unowned_owner (nil: nobody but admins).
function M.owner_of(route)
    local user = route.user
    if user == nil or user == "" then
        return M.unowned_owner
    end
    return user
end
local owner_of = M.owner_of

-- May identity id reach `user`'s sandbox (its route, or nil when there is none)? Names compare
-- exactly. Without a route the path's user decides (the router then answers 404).
local function allowed(id, user, route)
    if id == nil then
        return false
    end
    if id.admin then
        return true
    end
    if route then
        local owner = owner_of(route)
        return owner ~= nil and owner == id.user
    end
    return id.user == user
end

-- After authenticate: may the caller reach `user`'s sandbox `name`? Answers 403 and returns
-- false when not. Routers call it once they know whose sandbox a request is for; route is the
-- sandbox's route (false: looked up, there is none; nil: looked up here).
function M.may_access(req, user, name, route)
    if not M.enabled then
        return true
    end
    if route == nil then
        route = routes.get(user .. "/" .. name)
    end
    local id = rawget(req, "ctx") and req.ctx.identity
    if allowed(id, user, route or nil) then
        return true
    end
    if route and owner_of(route) == nil then
        req:respond(403, { error = "forbidden: this sandbox has no owner (admins only)",
            path = user .. "/" .. name })
        return false
    end
    req:respond(403, { error = "forbidden: this sandbox belongs to another user",
        path = user .. "/" .. name })
    return false
end

-- authenticate + may_access for the path's user (for scripts that route by path). (Named
-- check before 0.2; `check` now means only --check's configuration check. M.check stays as an
-- alias for override scripts that call it.)
function M.guard(req)
    if not M.authenticate(req) then
        return false
    end
    local user, name = sandbox_path.of(req)
    if not user then
        return true -- the router answers 400
    end
    return M.may_access(req, user, name)
end
M.check = M.guard

-- May this identity see and reach this route (for /sandboxes and header routing)?
function M.can_see(id, route)
    return not M.enabled or allowed(id, nil, route)
end

-- For admin-only endpoints (/metrics).
function M.check_admin(req)
    if not M.enabled then
        return true
    end
    if not M.authenticate(req) then
        return false
    end
    if not req.ctx.identity.admin then
        req:respond(403, { error = "forbidden: admin only" })
        return false
    end
    return true
end

return M
