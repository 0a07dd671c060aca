-- browser.lua: authentication for browsers, which cannot send an Authorization header when they
-- navigate or open a WebSocket. Active only while auth.lua is on.
--
--   login(req)  a GET or HEAD for a sandbox (path or host routing) whose query string carries
--               the credential in `query_param` (default "sp_token"): the credential is checked
--               like a header's (auth.identify_credential, then the owner check) and the answer
--               is 302 to the same URL without that parameter (other parameters kept, in order),
--               `Cache-Control: no-store`, with the cookie
--                 {cookie_name}={credential}; Path={prefix}; HttpOnly; Secure; SameSite=Lax
--               scoped to exactly that sandbox: Path is the prefix as the client wrote it
--               ("/alice/sb1", "/alice/sb1:3000") for path routing, "/" on the sandbox's own
--               host (no Domain: host-only) for host routing. A bad credential: 401; another
--               user's sandbox: 403; the parameter on another method or on an upgrade: 400, and
--               a credential that is not cookie-safe: 400. Whatever the answer, the request is
--               never forwarded and its query string is left out of the access log
--               (req.ctx.secret_query), so the credential reaches neither the sandbox nor a log.
--   cookie_credential(req)  the credential of the proxy's cookie in any Cookie header, or nil
--               (auth.lua reads it
--               when the request has no credential header; req.ctx.via_cookie is then set)
--   strip_cookie(req)  removes the proxy's cookie from every Cookie header sent upstream (the
--               sandbox's own cookies pass); auth.lua calls it for every authenticated request
--   origin_ok(req)  a cookie-authenticated request that may change state (any method but GET,
--               HEAD and OPTIONS) or that upgrades (WebSocket) needs an Origin whose host is the
--               request's Host, or one listed in allowed_origins (cross-site request forgery and
--               cross-site WebSocket hijacking); auth.lua answers 403 otherwise. Requests with a
--               credential header are not checked (a browser never adds one on its own).
-- Config (section `browser`; defaults shown):
--   enabled = true,              -- (with auth on)
--   query_param = "sp_token",    -- not "token": Jupyter reads that one itself
--   cookie_name = "sp_token",
--   cookie_secure = true,        -- false only for plain-HTTP tests (browsers refuse Secure
--                                -- cookies over http except on localhost)
--   cookie_same_site = "Lax",    -- "Strict" | "Lax" | "None"
--   cookie_max_age = nil,        -- seconds; nil: a session cookie
--   allowed_origins = {},        -- more Origins accepted, e.g. "https://ide.example.com"
local config = require "sp.config"
local sandbox_path = require "sandbox_path"

local type = type
local find = string.find
local sub = string.sub
local lower = string.lower
local gsub = string.gsub
local char = string.char
local tonumber = tonumber
local concat = table.concat

local cfg = config.browser or {}
local M = {}

M.enabled = cfg.enabled ~= false
local PARAM = cfg.query_param or "sp_token"
local COOKIE = cfg.cookie_name or "sp_token"
assert(type(PARAM) == "string" and PARAM:match("^[%w%-_.]+$"),
    "browser.query_param must be a parameter name")
assert(type(COOKIE) == "string" and COOKIE:match("^[%w%-_.]+$"),
    "browser.cookie_name must be a cookie name (letters, digits, - _ .)")
local SECURE = cfg.cookie_secure ~= false
local SAME_SITE = cfg.cookie_same_site or "Lax"
assert(SAME_SITE == "Strict" or SAME_SITE == "Lax" or SAME_SITE == "None",
    "browser.cookie_same_site must be \"Strict\", \"Lax\" or \"None\"")
local MAX_AGE = cfg.cookie_max_age
assert(MAX_AGE == nil or (type(MAX_AGE) == "number" and MAX_AGE > 0 and MAX_AGE % 1 == 0),
    "browser.cookie_max_age must be a whole number of seconds")
local ALLOWED = {}
for _, o in ipairs(cfg.allowed_origins or {}) do
    ALLOWED[lower(o)] = true
end
M.config = { query_param = PARAM, cookie_name = COOKIE, cookie_secure = SECURE,
    cookie_same_site = SAME_SITE, cookie_max_age = MAX_AGE }

local COOKIE_EQ = COOKIE .. "="
local PARAM_EQ = PARAM .. "="

-- ------------------------------------------------------------------ the cookie

-- Every Cookie header of the request as one text (nil: none). A browser sends one header
-- (RFC 6265 5.4) but HTTP/2 clients send one field per cookie, and a crafted request may repeat
-- it: all of them are read (req:headers() joins repeats with ", "; a cookie value never holds
-- "," or ";", RFC 6265 4.1.1, so pairs split on both). Kept in req.ctx for the next caller.
local function cookies(req)
    local ctx = req.ctx
    local c = ctx.cookie_text
    if c == nil then
        c = req:header("cookie") and req:headers().cookie or false
        ctx.cookie_text = c
    end
    return c or nil
end

-- The value of the proxy's cookie (the first one: a browser sends the most specific path
-- first), or nil.
function M.cookie_credential(req)
    local c = cookies(req)
    if not c or not find(c, COOKIE_EQ, 1, true) then
        return nil
    end
    for pair in c:gmatch("[^;,]+") do
        local name, value = pair:match("^%s*([^=%s]+)%s*=%s*(.-)%s*$")
        if name == COOKIE and value ~= "" then
            return value
        end
    end
    return nil
end

-- Removes the proxy's cookie from the Cookie header(s) the sandbox gets: when it is there,
-- the others go on in one Cookie header, in order (none left: no Cookie header).
function M.strip_cookie(req)
    local c = cookies(req)
    if not c or not find(c, COOKIE_EQ, 1, true) then
        return
    end
    local keep = {}
    for pair in c:gmatch("[^;,]+") do
        local name = pair:match("^%s*([^=%s]+)")
        if name and name ~= COOKIE then
            keep[#keep + 1] = pair:match("^%s*(.-)%s*$")
        end
    end
    if keep[1] then
        req:set_header("Cookie", concat(keep, "; "))
    else
        req:remove_header("Cookie")
    end
end

-- ------------------------------------------------------------------ Origin

local SAFE = { GET = true, HEAD = true, OPTIONS = true }

-- May this cookie-authenticated request go on (see the header)?
function M.origin_ok(req)
    if SAFE[req:method()] and not req:is_upgrade() then
        return true
    end
    local origin = req:header("origin")
    if not origin then
        return false
    end
    origin = lower(origin)
    if ALLOWED[origin] then
        return true
    end
    local authority = origin:match("^https?://([^/]+)$")
    local host = req:header("host")
    return authority ~= nil and host ~= nil and authority == lower(host)
end

-- ------------------------------------------------------------------ login

local function hex_to_char(h)
    return char(tonumber(h, 16))
end

-- The credential of the query parameter and the query without it; nil when absent.
function M.split_query(q)
    if q == "" or not find(q, PARAM_EQ, 1, true) then
        return nil
    end
    local cred
    local keep = {}
    for item in q:gmatch("[^&]+") do
        local eq = find(item, "=", 1, true)
        if eq and sub(item, 1, eq - 1) == PARAM then
            cred = cred or gsub(sub(item, eq + 1), "%%(%x%x)", hex_to_char)
        else
            keep[#keep + 1] = item
        end
    end
    if cred == nil then
        return nil
    end
    return cred, concat(keep, "&")
end

-- The Set-Cookie value for credential `cred` scoped to `path`.
function M.cookie(cred, path)
    return COOKIE_EQ .. cred .. "; Path=" .. path .. "; HttpOnly" .. (SECURE and "; Secure" or "")
        .. "; SameSite=" .. SAME_SITE .. (MAX_AGE and ("; Max-Age=" .. MAX_AGE) or "")
end

local NOT_GET = { error = "a credential in the query string is accepted only on GET and HEAD "
    .. "(not on WebSocket upgrades): send it in the Authorization header" }
local NOT_COOKIE_SAFE = { error = "this credential cannot be kept in a cookie: send it in the "
    .. "Authorization header" }
local UNAUTHORIZED = { ["WWW-Authenticate"] = 'Bearer realm="sandbox-proxy"' }

-- Answers a login (see the header) and returns true, or returns false (no credential in the
-- query string, not a sandbox request, or browser auth off).
function M.login(req)
    if not M.enabled then
        return false
    end
    local q = req:query()
    if q == "" then
        return false
    end
    local cred, rest = M.split_query(q)
    if not cred then
        return false
    end
    local user, name = sandbox_path.of(req)
    if not user or req:header("x-sandbox-id") then
        return false
    end
    local ctx = req.ctx
    ctx.secret_query = true
    local method = req:method()
    if (method ~= "GET" and method ~= "HEAD") or req:is_upgrade() then
        req:respond(400, NOT_GET)
        return true
    end
    if not cred:match("^[%w%-%._~+/=]+$") then
        req:respond(400, NOT_COOKIE_SAFE)
        return true
    end
    local auth = M.auth -- (auth.lua, which requires this module, registers itself here)
    local id, why, code = auth.identify_credential(cred)
    if not id then
        if code == 503 then
            req:respond(503, { error = "authentication unavailable" }, { ["Retry-After"] = "2" })
        else
            req:respond(401, { error = why }, UNAUTHORIZED)
        end
        return true
    end
    ctx.identity = id
    ctx.auth_checked = true
    if not auth.may_access(req, user, name) then
        return true
    end
    local path = req:path()
    req:respond(302, nil, {
        Location = rest ~= "" and (path .. "?" .. rest) or path,
        ["Set-Cookie"] = M.cookie(cred, ctx.target_host and "/" or ctx.target_prefix),
        ["Cache-Control"] = "no-store",
    })
    return true
end

return M
