-- auth.lua: authentication bound to the user in the path.
--
-- A request presents a credential in one header (default `Authorization: Bearer <credential>`;
-- set `header` to e.g. "X-Sandbox-Proxy-Key" so a sandbox application's own Authorization
-- header passes through untouched). The credential is an API key (looked up by its SHA-256 in
-- a keys file, compared in constant time) or a JWT (HS256 or RS256, verified with libcrypto;
-- issuer, audience, expiry and not-before checked with a small clock skew). It maps to a user;
--   * /{user}/{sandbox}/... is allowed only when the path's user is the authenticated user,
--     or the identity is an admin (403 otherwise);
--   * /sandboxes lists only what the caller may see; /metrics needs an admin;
--   * /health, /ready, /live stay open (probes).
-- Missing or wrong credentials: 401 {"error":...} with WWW-Authenticate. The proxy's own
-- credential header is always removed before forwarding. Credentials are never logged.
--
-- Config (section `auth`):
--   header = "Authorization",            -- the credential header ("Bearer " is expected there)
--   keys_file = "/etc/sandbox-proxy/auth/keys.json",
--       -- {"keys":[{"user":"alice","sha256":"<hex of sha256(key)>"},
--       --          {"user":"ops","sha256":"...","admin":true}]}; re-read when it changes
--   jwt = { hs256_secret_file = path | hs256_secret = "...", rs256_public_key_file = path,
--           issuer = "...", audience = "...", user_claim = "sub", admin_claim = "sandbox_admin",
--           admin_users = { ... }, leeway = 30 },
--   enabled = true|false                 -- default: on when keys_file or jwt is set
-- The runtime knob auth_required=true makes the proxy refuse to start without keys_file or jwt
-- (the manifests in k8s/ set it). Without auth the proxy says so loudly at start-up.
local core = require "sp.core"
local config = require "sp.config"
local fs = require "sp.fs"
local log = require "sp.log"
local crypto = require "sp.crypto"
local cjson = require "cjson.safe"
local sandbox_path = require "sandbox_path"

local type = type
local lower = string.lower
local sub = string.sub
local find = string.find
local tostring = tostring

local cfg = config.auth or {}
local settings = core.settings()
local M = {}

local HEADER = cfg.header or "Authorization"
local BEARER = lower(HEADER) == "authorization"
local jwt_cfg = cfg.jwt
local configured = cfg.keys_file ~= nil or jwt_cfg ~= nil
M.enabled = cfg.enabled ~= false and configured
M.header = HEADER

if settings.auth_required and not M.enabled then
    error("authentication is required (auth_required) but neither auth.keys_file nor auth.jwt "
        .. "is configured (or auth.enabled is false)", 0)
end

-- ------------------------------------------------------------------ API keys

local keys = {} -- sha256 hex -> { user =, admin =, digest = raw }

-- Parses a keys file's text. Returns the table or nil, err.
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
        local raw = hex:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
        out[hex] = { user = k.user, admin = k.admin == true, digest = raw }
    end
    return out
end

local function load_keys(path)
    local text, err = fs.read(path)
    local parsed
    if text then
        parsed, err = M.parse_keys(text)
    end
    if not parsed then
        log.error("cannot load the API keys file: keeping the previous keys",
            { path = path, error = err })
        return nil, err
    end
    keys = parsed
    local n = 0
    for _ in pairs(keys) do
        n = n + 1
    end
    log.info("API keys loaded", { path = path, keys = n, worker = core.worker_id() })
    return true
end

if cfg.keys_file then
    local ok, err = load_keys(cfg.keys_file)
    if not ok and settings.auth_required then
        error("auth.keys_file " .. cfg.keys_file .. ": " .. tostring(err), 0)
    end
end

-- Starts watching the keys file (each worker keeps its own copy). Called from init.on_start.
function M.start()
    if cfg.keys_file and M.enabled and not M.watch then
        M.watch = fs.watch(cfg.keys_file, function() load_keys(cfg.keys_file) end)
    end
end

local function by_key(credential)
    local digest = crypto.sha256(credential)
    local entry = keys[crypto.hex(digest)]
    if entry and crypto.equal(entry.digest, digest) then
        return { user = entry.user, admin = entry.admin, method = "key" }
    end
    return nil
end

-- ------------------------------------------------------------------ JWT

local hs_secret, rs_key
if jwt_cfg then
    hs_secret = jwt_cfg.hs256_secret
    if jwt_cfg.hs256_secret_file then
        hs_secret = assert(fs.read(jwt_cfg.hs256_secret_file)):gsub("%s+$", "")
    end
    if jwt_cfg.rs256_public_key_file then
        rs_key = assert(fs.read(jwt_cfg.rs256_public_key_file))
    end
    if not hs_secret and not rs_key then
        error("auth.jwt needs hs256_secret(_file) or rs256_public_key_file", 0)
    end
end
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
        return c
    end
    return v:match("^%s*(%S+)%s*$")
end

-- The identity behind a request: { user, admin, method } or nil and a reason.
function M.identify(req)
    local cred = credential(req)
    if not cred then
        return nil, "authentication required"
    end
    local id = by_key(cred)
    if id then
        return id
    end
    if jwt_cfg and find(cred, ".", 1, true) then
        local jid, why = M.verify_jwt(cred)
        if jid then
            return jid
        end
        return nil, "invalid token: " .. why
    end
    return nil, "invalid credentials"
end

-- Authenticates; answers 401 and returns false when it fails. Strips the credential header.
function M.authenticate(req)
    if not M.enabled then
        return true
    end
    local id, why = M.identify(req)
    if not id then
        req.ctx.auth_error = why
        req:respond(401, { error = why }, UNAUTHORIZED)
        return false
    end
    req.ctx.identity = id
    req:remove_header(HEADER)
    return true
end

-- After authenticate: may the caller reach `user`'s sandbox `name`? Answers 403 and returns
-- false when not. Routers call it once they know whose sandbox a request is for.
function M.may_access(req, user, name)
    if not M.enabled then
        return true
    end
    local id = rawget(req, "ctx") and req.ctx.identity
    if id and (id.admin or id.user == user) then
        return true
    end
    req:respond(403, { error = "forbidden: this sandbox belongs to another user",
        path = user .. "/" .. name })
    return false
end

-- authenticate + may_access for the path's user (for scripts that route by path).
function M.check(req)
    if not M.authenticate(req) then
        return false
    end
    local user, name = sandbox_path.of(req)
    if not user then
        return true -- the router answers 400
    end
    return M.may_access(req, user, name)
end

-- May this identity see this route (for /sandboxes)?
function M.can_see(id, route)
    return not M.enabled or (id ~= nil and (id.admin or route.user == id.user))
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
