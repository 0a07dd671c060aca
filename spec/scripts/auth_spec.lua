-- auth.lua on its own, with fake requests and files in a temp directory: API keys (user
-- binding, admins, one key for two users refused, the constant-time comparison), the
-- credential header (Bearer, a custom header), JWT HS256 and RS256 (signatures, alg none, alg
-- confusion, exp/nbf/iss/aud with the clock skew), untrusted secrets and keys refused at load,
-- a bad re-read keeping the last good credentials, the owner rules (unowned sandboxes,
-- related user names) and the credential header stripped before forwarding.
-- The RS256 tokens in fixtures/auth were signed once with the private key of rs256.pub (not
-- kept); their claims: iss https://issuer.test, aud sandbox-proxy, exp 1800003600, and for
-- alice nbf 1800000000 (carol: sandbox_admin = true, no nbf).
local testkit = require "sp.testkit"
local crypto = require "sp.crypto"
local cjson = require "cjson"

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local RS_TIME = 1800001000 -- a time at which the RS256 fixture tokens are valid

local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end

local function fixture(name)
    return read(SPEC_DIR .. "fixtures/auth/" .. name)
end

local RS_PUB = SPEC_DIR .. "fixtures/auth/rs256.pub"
local RS_ALICE = fixture("rs256-alice.jwt"):gsub("%s+$", "")
local RS_CAROL = fixture("rs256-carol-admin.jwt"):gsub("%s+$", "")

local SECRET = string.rep("k", 40)

-- Temp files, removed after each test.
local temp_files = {}
local function write(path, text)
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
    return path
end
local function temp_file(text)
    local path = os.tmpname()
    temp_files[#temp_files + 1] = path
    return write(path, text)
end

local function b64url(s)
    local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    local out = {}
    for i = 1, #s, 3 do
        local a, b, c = s:byte(i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local q = {}
        for k = 3, 0, -1 do
            local v = math.floor(n / 64 ^ k) % 64
            q[#q + 1] = chars:sub(v + 1, v + 1)
        end
        out[#out + 1] = table.concat(q, "", 1, (c and 4) or (b and 3) or 2)
    end
    return table.concat(out)
end

local function hs256(secret, claims, alg)
    local head = b64url(cjson.encode({ alg = alg or "HS256", typ = "JWT" }))
    local body = b64url(cjson.encode(claims))
    return head .. "." .. body .. "." .. b64url(crypto.hmac_sha256(secret, head .. "." .. body))
end

local function sha_hex(s)
    return crypto.hex(crypto.sha256(s))
end

local function keys_json(list)
    local keys = {}
    for _, k in ipairs(list) do
        keys[#keys + 1] = { user = k[1], sha256 = sha_hex(k[2]), admin = k[3] }
    end
    return cjson.encode({ keys = keys })
end

-- A fresh auth.lua with the given `auth` section.
local function load(section)
    return testkit.load("auth", "auth", section)
end

local function request(target, headers)
    return testkit.request{ target = target or "/alice/sb/x", headers = headers }
end

local function bearer(credential)
    return { Authorization = "Bearer " .. credential }
end

local NOW = 1700000000
local function claims(extra)
    local c = { sub = "alice", iss = "https://issuer.test", aud = "sandbox-proxy", exp = NOW + 600 }
    for k, v in pairs(extra or {}) do
        c[k] = v
    end
    return c
end

local JWT = { hs256_secret = SECRET, issuer = "https://issuer.test", audience = "sandbox-proxy",
    admin_claim = "sandbox_admin", admin_users = { "ops" } }

after_each(function()
    for _, p in ipairs(temp_files) do
        os.remove(p)
    end
    temp_files = {}
    testkit.clear_routes()
end)

describe("auth.lua API keys", function()
    local auth, path

    before_each(function()
        path = temp_file(keys_json{
            { "alice", "alice-key" }, { "alice2", "alice2-key" }, { "ops", "ops-key", true } })
        auth = load{ keys_file = path }
    end)

    it("binds a key to its user, and marks admin keys", function()
        assert.are.same({ user = "alice", admin = false, method = "key" },
            auth.identify(request(nil, bearer("alice-key"))))
        assert.are.same({ user = "ops", admin = true, method = "key" },
            auth.identify(request(nil, bearer("ops-key"))))
        local id, why = auth.identify(request(nil, bearer("alice-key ")))
        assert.is_truthy(id) -- trailing whitespace of the header value is not the key
        id, why = auth.identify(request(nil, bearer("alice-keyx")))
        assert.is_nil(id)
        assert.are.equal("invalid credentials", why)
        id, why = auth.identify(request(nil, bearer("ALICE-KEY")))
        assert.is_nil(id)
        assert.are.equal("invalid credentials", why)
    end)

    it("compares the key's digest in constant time (crypto.equal)", function()
        local real = crypto.equal
        local calls = {}
        crypto.equal = function(a, b)
            calls[#calls + 1] = { a, b }
            return real(a, b)
        end
        local ok, id = pcall(auth.identify, request(nil, bearer("alice-key")))
        crypto.equal = real
        assert.is_true(ok)
        assert.are.equal("alice", id.user)
        assert.are.equal(1, #calls)
        assert.are.equal(crypto.sha256("alice-key"), calls[1][1])
        assert.are.equal(crypto.sha256("alice-key"), calls[1][2])
    end)

    it("refuses one key listed for two users, or once as admin and once not", function()
        local keys, err = auth.parse_keys(keys_json{ { "alice", "k" }, { "bob", "k" } })
        assert.is_nil(keys)
        assert.matches("keys[2]: the same key is also listed for user alice (keys[1])", err, 1, true)
        keys, err = auth.parse_keys(keys_json{ { "ops", "k", true }, { "ops", "k" } })
        assert.is_nil(keys)
        assert.matches("another admin flag", err, 1, true)
        -- the same entry twice is harmless
        keys = assert(auth.parse_keys(keys_json{ { "alice", "k" }, { "alice", "k" } }))
        assert.are.equal("alice", keys[sha_hex("k")].user)
        -- and the hex digest's case does not make two keys of one
        local upper = cjson.encode({ keys = { { user = "alice", sha256 = sha_hex("k") },
            { user = "bob", sha256 = sha_hex("k"):upper() } } })
        assert.is_nil(auth.parse_keys(upper))
    end)

    it("refuses to load a keys file with one key for two users, or that is unusable", function()
        local dup = temp_file(keys_json{ { "alice", "k" }, { "bob", "k" } })
        assert.has_error(function() load{ keys_file = dup } end,
            "auth: bad auth.keys_file (" .. dup .. "): keys[2]: the same key is also listed for "
            .. "user alice (keys[1])")
        assert.has_error(function() load{ keys_file = temp_file("{nope") } end)
        assert.has_error(function() load{ keys_file = temp_file('{"keys":[{"user":"a"}]}') } end)
        local missing = os.tmpname()
        os.remove(missing)
        assert.has_error(function() load{ keys_file = missing } end)
    end)

    it("keeps the previous keys when a re-read keys file is bad, takes a good one", function()
        write(path, keys_json{ { "alice", "new-key" }, { "bob", "new-key" } })
        local ok, err = auth.reload_keys()
        assert.is_nil(ok)
        assert.matches("also listed for user alice", err, 1, true)
        assert.are.equal("alice", auth.identify(request(nil, bearer("alice-key"))).user)
        assert.is_nil(auth.identify(request(nil, bearer("new-key"))))
        write(path, "")
        assert.is_nil(auth.reload_keys())
        assert.are.equal("alice", auth.identify(request(nil, bearer("alice-key"))).user)
        write(path, keys_json{ { "bob", "new-key" } })
        assert.is_true(auth.reload_keys())
        assert.are.equal("bob", auth.identify(request(nil, bearer("new-key"))).user)
        assert.is_nil(auth.identify(request(nil, bearer("alice-key"))))
    end)
end)

describe("auth.lua credential header", function()
    it("reads 'Bearer <credential>' from Authorization (scheme case-insensitive)", function()
        local auth = load{ keys_file = temp_file(keys_json{ { "alice", "alice-key" } }) }
        local function user(headers)
            local id = auth.identify(testkit.request{ headers = headers })
            return id and id.user
        end
        assert.are.equal("alice", user{ Authorization = "Bearer alice-key" })
        assert.are.equal("alice", user{ Authorization = "bearer alice-key" })
        assert.are.equal("alice", user{ Authorization = "Bearer   alice-key  " })
        assert.is_nil(user{ Authorization = "alice-key" })
        assert.is_nil(user{ Authorization = "Bearer" })
        assert.is_nil(user{ Authorization = "Bearer alice-key extra" })
        assert.is_nil(user{ Authorization = "Bearealice-key" })
        assert.is_nil(user{ ["X-Other"] = "Bearer alice-key" })
        local _, why = auth.identify(testkit.request{})
        assert.are.equal("authentication required", why)
    end)

    it("reads HTTP Basic from Authorization: the password is the credential, any user name", function()
        -- what requests sends for http://user:KEY@host/ (the agent-sandbox SDK's api_url)
        local auth = load{ keys_file = temp_file(keys_json{ { "alice", "alice-key" } }) }
        local b64 = require("spec.helpers.b64").encode
        local function user(headers)
            local id = auth.identify(testkit.request{ headers = headers })
            return id and id.user
        end
        for _, name in ipairs({ "alice", "anything", "", "bob" }) do
            assert.are.equal("alice", user{ Authorization = "Basic " .. b64(name .. ":alice-key") }, name)
        end
        assert.are.equal("alice", user{ Authorization = "basic " .. b64("x:alice-key") })
        assert.is_nil(user{ Authorization = "Basic " .. b64("alice-key") })      -- no colon
        assert.is_nil(user{ Authorization = "Basic " .. b64("alice-key:") })     -- no password
        assert.is_nil(user{ Authorization = "Basic " .. b64("alice:wrong-key") })
        assert.is_nil(user{ Authorization = "Basic " .. b64("alice:alice-key x") })
        assert.is_nil(user{ Authorization = "Basic !!!" })
        assert.is_nil(user{ Authorization = "Basic" })
    end)

    it("takes HTTP Basic only from Authorization, not from a custom credential header", function()
        local auth = load{ header = "X-Sandbox-Proxy-Key",
            keys_file = temp_file(keys_json{ { "alice", "alice-key" } }) }
        local v = "Basic " .. require("spec.helpers.b64").encode("u:alice-key")
        assert.is_nil(auth.identify(testkit.request{ headers = { Authorization = v } }))
        assert.is_nil(auth.identify(testkit.request{ headers = { ["X-Sandbox-Proxy-Key"] = v } }))
    end)

    it("reads the bare credential from a custom header, never from Authorization", function()
        local auth = load{ header = "X-Sandbox-Proxy-Key",
            keys_file = temp_file(keys_json{ { "alice", "alice-key" } }) }
        local function user(headers)
            local id = auth.identify(testkit.request{ headers = headers })
            return id and id.user
        end
        assert.are.equal("alice", user{ ["X-Sandbox-Proxy-Key"] = " alice-key " })
        assert.is_nil(user{ ["X-Sandbox-Proxy-Key"] = "Bearer alice-key" })
        assert.is_nil(user{ Authorization = "Bearer alice-key" })
    end)

    it("answers 401 with WWW-Authenticate and strips the credential when it succeeds", function()
        local auth = load{ keys_file = temp_file(keys_json{ { "alice", "alice-key" } }) }
        local req = request("/alice/sb/x")
        assert.is_false(auth.authenticate(req))
        assert.are.equal(401, req.response.status)
        assert.are.equal("authentication required", req.response.json.error)
        assert.matches("^Bearer realm=", req.response.headers["WWW-Authenticate"])
        req = request("/alice/sb/x", bearer("alice-key"))
        assert.is_true(auth.authenticate(req))
        assert.are.equal("alice", req.ctx.identity.user)
        req:forward("10.0.0.1", 8888, "/x")
        assert.are.same({ "Authorization" }, req.forwarded.removed_headers)
        -- a custom header is the one stripped; the application's Authorization stays
        auth = load{ header = "X-Sandbox-Proxy-Key",
            keys_file = temp_file(keys_json{ { "alice", "alice-key" } }) }
        req = request("/alice/sb/x", { ["X-Sandbox-Proxy-Key"] = "alice-key",
            Authorization = "Token app" })
        assert.is_true(auth.authenticate(req))
        req:forward("10.0.0.1", 8888, "/x")
        assert.are.same({ "X-Sandbox-Proxy-Key" }, req.forwarded.removed_headers)
    end)
end)

describe("auth.lua JWT HS256", function()
    local auth

    before_each(function()
        auth = load{ jwt = JWT }
    end)

    it("accepts a token signed with the secret, with the user and admin from the claims", function()
        assert.are.same({ user = "alice", admin = false, method = "jwt" },
            auth.verify_jwt(hs256(SECRET, claims()), NOW))
        assert.is_true(auth.verify_jwt(hs256(SECRET, claims{ sandbox_admin = true }), NOW).admin)
        assert.is_false(auth.verify_jwt(hs256(SECRET, claims{ sandbox_admin = "yes" }), NOW).admin)
        assert.is_true(auth.verify_jwt(hs256(SECRET, claims{ sub = "ops" }), NOW).admin)
        assert.is_truthy(auth.verify_jwt(hs256(SECRET, claims{ aud = { "x", "sandbox-proxy" } }), NOW))
    end)

    it("refuses a wrong signature, a tampered body, alg none and other algorithms", function()
        local function why(token)
            local id, err = auth.verify_jwt(token, NOW)
            assert.is_nil(id)
            return err
        end
        assert.are.equal("bad signature", why(hs256(SECRET .. "x", claims())))
        assert.are.equal("bad signature", why(hs256("", claims())))
        local t = hs256(SECRET, claims())
        local h, _, s = t:match("^([^.]+)%.([^.]+)%.([^.]+)$")
        assert.are.equal("bad signature",
            why(h .. "." .. b64url(cjson.encode(claims{ sub = "bob" })) .. "." .. s))
        local unsigned = hs256(SECRET, claims(), "none"):gsub("%.[^.]*$", ".")
        assert.are.equal("unsupported algorithm", why(unsigned))
        assert.are.equal("unsupported algorithm", why(hs256(SECRET, claims(), "none")))
        assert.are.equal("unsupported algorithm", why(hs256(SECRET, claims(), "HS512")))
        assert.are.equal("unsupported algorithm", why(hs256(SECRET, claims(), "hs256")))
        -- RS256 is not configured here: an RS256 token is refused whatever its signature
        assert.are.equal("unsupported algorithm", why(RS_ALICE))
        assert.are.equal("malformed token", why("a.b"))
        assert.are.equal("malformed token", why("a.b.c.d"))
        assert.are.equal("malformed token", why("!!.!!.!!"))
    end)

    it("checks exp and nbf with the clock skew (leeway, 30 s by default)", function()
        local exp = claims{ exp = NOW }
        assert.is_truthy(auth.verify_jwt(hs256(SECRET, exp), NOW + 30))
        assert.are.same({ nil, "token expired" }, { auth.verify_jwt(hs256(SECRET, exp), NOW + 31) })
        assert.are.same({ nil, "token expired" },
            { auth.verify_jwt(hs256(SECRET, claims{ exp = cjson.null }), NOW) })
        assert.are.same({ nil, "token expired" },
            { auth.verify_jwt(hs256(SECRET, claims{ exp = tostring(NOW + 600) }), NOW) })
        local nbf = claims{ nbf = NOW }
        assert.is_truthy(auth.verify_jwt(hs256(SECRET, nbf), NOW - 30))
        assert.are.same({ nil, "token not yet valid" },
            { auth.verify_jwt(hs256(SECRET, nbf), NOW - 31) })
        assert.are.same({ nil, "token not yet valid" },
            { auth.verify_jwt(hs256(SECRET, claims{ nbf = "0" }), NOW) })
        local strict = load{ jwt = { hs256_secret = SECRET, leeway = 0 } }
        assert.are.same({ nil, "token expired" }, { strict.verify_jwt(hs256(SECRET, exp), NOW + 1) })
        assert.is_truthy(strict.verify_jwt(hs256(SECRET, exp), NOW))
    end)

    it("checks the issuer, the audience and the user claim", function()
        local function why(c)
            return select(2, auth.verify_jwt(hs256(SECRET, c), NOW))
        end
        assert.are.equal("wrong issuer", why(claims{ iss = "https://evil.test" }))
        assert.are.equal("wrong issuer", why(claims{ iss = cjson.null }))
        assert.are.equal("wrong audience", why(claims{ aud = "other" }))
        assert.are.equal("wrong audience", why(claims{ aud = { "other" } }))
        assert.are.equal("wrong audience", why(claims{ aud = cjson.null }))
        assert.are.equal("no user claim", why(claims{ sub = "" }))
        assert.are.equal("no user claim", why(claims{ sub = 7 }))
        local other = load{ jwt = { hs256_secret = SECRET, user_claim = "email" } }
        assert.are.equal("a@b", other.verify_jwt(hs256(SECRET, claims{ email = "a@b" }), NOW).user)
    end)

    it("reports an invalid token through identify without leaking it", function()
        local token = hs256("wrong-secret-wrong-secret-wrong-secret", claims{ exp = os.time() + 600 })
        local id, why = auth.identify(request(nil, bearer(token)))
        assert.is_nil(id)
        assert.are.equal("invalid token: bad signature", why)
    end)
end)

describe("auth.lua JWT RS256", function()
    it("accepts a token signed by the key's owner and refuses a tampered one", function()
        local auth = load{ jwt = { rs256_public_key_file = RS_PUB, issuer = "https://issuer.test",
            audience = "sandbox-proxy", admin_claim = "sandbox_admin" } }
        assert.are.same({ user = "alice", admin = false, method = "jwt" },
            auth.verify_jwt(RS_ALICE, RS_TIME))
        assert.is_true(auth.verify_jwt(RS_CAROL, RS_TIME).admin)
        local h, _, s = RS_ALICE:match("^([^.]+)%.([^.]+)%.([^.]+)$")
        local forged = h .. "." .. b64url(cjson.encode({ sub = "bob", iss = "https://issuer.test",
            aud = "sandbox-proxy", exp = 1800003600 })) .. "." .. s
        assert.are.same({ nil, "bad signature" }, { auth.verify_jwt(forged, RS_TIME) })
        assert.are.same({ nil, "token not yet valid" }, { auth.verify_jwt(RS_ALICE, 1800000000 - 31) })
        assert.are.same({ nil, "token expired" }, { auth.verify_jwt(RS_ALICE, 1800003600 + 31) })
    end)

    it("refuses alg confusion: an HS256 token keyed with the RSA public key", function()
        local pem = read(RS_PUB)
        -- only RS256 configured: HS256 is not an accepted algorithm at all
        local auth = load{ jwt = { rs256_public_key_file = RS_PUB } }
        assert.are.same({ nil, "unsupported algorithm" },
            { auth.verify_jwt(hs256(pem, claims()), NOW) })
        -- both configured: HS256 verifies with the HS256 secret, never with the public key
        auth = load{ jwt = { rs256_public_key_file = RS_PUB, hs256_secret = SECRET } }
        assert.are.same({ nil, "bad signature" }, { auth.verify_jwt(hs256(pem, claims()), NOW) })
        -- and an RS256 header over an HMAC signature does not verify
        local t = hs256(SECRET, claims(), "RS256")
        assert.are.same({ nil, "bad signature" }, { auth.verify_jwt(t, NOW) })
    end)
end)

describe("auth.lua untrusted secrets and keys", function()
    it("refuses an HS256 secret shorter than 32 bytes, empty included", function()
        assert.are.equal(32, load{ jwt = JWT }.MIN_SECRET)
        for _, secret in ipairs({ "", " ", string.rep("s", 31) }) do
            assert.has_error(function() load{ jwt = { hs256_secret = secret } } end,
                "auth: bad auth.jwt.hs256_secret: the HS256 secret is " .. #secret
                .. " bytes, at least 32 are required (RFC 7518 3.2)")
        end
        assert.has_error(function() load{ jwt = { hs256_secret = 12345678 } } end)
        assert.is_truthy(load{ jwt = { hs256_secret = string.rep("s", 32) } })
    end)

    it("refuses an empty, blank or short secret file; trailing whitespace is no secret", function()
        for _, text in ipairs({ "", "\n", "  \t\r\n", string.rep("s", 31) .. "\n\n" }) do
            local path = temp_file(text)
            assert.has_error(function() load{ jwt = { hs256_secret_file = path } } end)
        end
        local auth = load{ jwt = { hs256_secret_file = temp_file(SECRET .. "\n") } }
        assert.is_truthy(auth.verify_jwt(hs256(SECRET, claims()), NOW))
        assert.is_nil(auth.verify_jwt(hs256(SECRET .. "\n", claims()), NOW))
    end)

    it("refuses a missing, invalid, private or non-RSA public key file", function()
        local missing = os.tmpname()
        os.remove(missing)
        local bad = {
            missing,
            temp_file(""),
            temp_file("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"),
            temp_file(read(RS_PUB):gsub("BEGIN PUBLIC KEY", "BEGIN CERTIFICATE")),
            SPEC_DIR .. "fixtures/auth/ed25519.pub",
        }
        for _, path in ipairs(bad) do
            assert.has_error(function() load{ jwt = { rs256_public_key_file = path } } end, nil, path)
        end
        assert.has_error(function()
            load{ jwt = { rs256_public_key_file = SPEC_DIR .. "fixtures/auth/ed25519.pub" } }
        end, "auth: bad auth.jwt.rs256_public_key_file (" .. SPEC_DIR
            .. "fixtures/auth/ed25519.pub): not an RSA public key")
    end)

    it("refuses a jwt section without a secret or key, and checks nothing when disabled", function()
        assert.has_error(function() load{ jwt = { issuer = "x" } } end,
            "auth: auth.jwt needs hs256_secret(_file) or rs256_public_key_file")
        local auth = load{ enabled = false, jwt = { hs256_secret = "" } }
        assert.is_false(auth.enabled)
    end)

    it("keeps the previous secret and public key when a re-read file is bad", function()
        local secret_path = temp_file(SECRET)
        local key_path = temp_file(read(RS_PUB))
        local auth = load{ jwt = { hs256_secret_file = secret_path, rs256_public_key_file = key_path } }
        for _, text in ipairs({ "", "\n", "short" }) do
            write(secret_path, text)
            local ok, err = auth.reload_secret()
            assert.is_nil(ok)
            assert.matches("at least 32", err, 1, true)
            assert.is_truthy(auth.verify_jwt(hs256(SECRET, claims()), NOW))
            assert.are.same({ nil, "bad signature" }, { auth.verify_jwt(hs256(text, claims()), NOW) })
        end
        os.remove(secret_path)
        assert.is_nil(auth.reload_secret())
        assert.is_truthy(auth.verify_jwt(hs256(SECRET, claims()), NOW))
        local new = string.rep("n", 32)
        write(secret_path, new .. "\n")
        assert.is_true(auth.reload_secret())
        assert.is_truthy(auth.verify_jwt(hs256(new, claims()), NOW))
        assert.is_nil(auth.verify_jwt(hs256(SECRET, claims()), NOW))

        write(key_path, "garbage")
        assert.is_nil(auth.reload_public_key())
        assert.is_truthy(auth.verify_jwt(RS_ALICE, RS_TIME))
        write(key_path, read(SPEC_DIR .. "fixtures/auth/ed25519.pub"))
        assert.is_nil(auth.reload_public_key())
        assert.is_truthy(auth.verify_jwt(RS_ALICE, RS_TIME))
    end)
end)

describe("auth.lua owners", function()
    local KEYS

    before_each(function()
        KEYS = temp_file(keys_json{ { "alice", "a" } })
        testkit.set_routes{
            ["alice/sb"] = { address = "10.0.0.1" },
            ["alice2/sb"] = { address = "10.0.0.2" },
            ["ALICE/sb"] = { address = "10.0.0.3" },
            ["alice /sb"] = { address = "10.0.0.4" },
            ["al/sb"] = { address = "10.0.0.5" },
            ["default/pool"] = { address = "10.0.0.6", user = false },
            ["default/mine"] = { address = "10.0.0.7" },
        }
    end)

    -- may_access for identity id on the target; returns true or the 403 answer's error.
    local function access(auth, id, target)
        local req = request(target)
        req.ctx.identity = id
        local user, name = require("sandbox_path").of(req)
        if auth.may_access(req, user, name) then
            return true
        end
        assert.are.equal(403, req.response.status)
        return req.response.json.error
    end

    it("compares user names exactly: no case folding, prefix or trimming", function()
        local auth = load{ keys_file = KEYS }
        local alice, alice2 = { user = "alice" }, { user = "alice2" }
        assert.is_true(access(auth, alice, "/alice/sb/x"))
        assert.is_true(access(auth, alice, "/al%69ce/sb/x")) -- the same name, encoded
        assert.is_true(access(auth, alice, "/alice/ghost/x")) -- own prefix, no route: the router's 404
        local denied = {
            { alice, "/alice2/sb/x" }, { alice, "/ALICE/sb/x" }, { alice, "/%41LICE/sb/x" },
            { alice, "/alice%20/sb/x" }, { alice, "/al/sb/x" }, { alice2, "/alice/sb/x" },
            { alice2, "/al%69ce/sb/x" }, { alice, "/alice2/ghost/x" }, { alice, "/Alice/ghost/x" },
            { alice, "/alic/ghost/x" }, { alice2, "/alice/ghost/x" }, { alice, "/alice%20/ghost" },
            { { user = "alice " }, "/alice/sb/x" }, { { user = "ALICE" }, "/alice/sb/x" },
        }
        for _, c in ipairs(denied) do
            assert.are.equal("forbidden: this sandbox belongs to another user",
                access(auth, c[1], c[2]), c[1].user .. " -> " .. c[2])
        end
        local routes = require("sp.routes")
        for _, c in ipairs({ { alice, "alice2/sb" }, { alice, "ALICE/sb" }, { alice, "al/sb" },
            { alice, "alice /sb" }, { alice2, "alice/sb" } }) do
            assert.is_false(auth.can_see(c[1], routes.get(c[2])), c[1].user .. " sees " .. c[2])
        end
        assert.is_true(auth.can_see(alice, routes.get("alice/sb")))
    end)

    it("keeps an unowned sandbox for admins, not for a user named default", function()
        local auth = load{ keys_file = KEYS }
        local routes = require("sp.routes")
        assert.is_nil(auth.unowned_owner)
        assert.are.equal("forbidden: this sandbox has no owner (admins only)",
            access(auth, { user = "default" }, "/default/pool/x"))
        assert.are.equal("forbidden: this sandbox has no owner (admins only)",
            access(auth, { user = "alice" }, "/default/pool/x"))
        assert.is_true(access(auth, { user = "ops", admin = true }, "/default/pool/x"))
        assert.is_true(access(auth, { user = "default" }, "/default/mine/x")) -- labelled default
        assert.is_false(auth.can_see({ user = "default" }, routes.get("default/pool")))
        assert.is_true(auth.can_see({ user = "default" }, routes.get("default/mine")))
        assert.is_true(auth.can_see({ user = "x", admin = true }, routes.get("default/pool")))
        assert.is_false(auth.can_see(nil, routes.get("default/pool")))
        assert.is_nil(auth.owner_of(routes.get("default/pool")))
    end)

    it("gives unowned sandboxes to auth.unowned_owner when set", function()
        local auth = load{ keys_file = KEYS, unowned_owner = "carol" }
        local routes = require("sp.routes")
        assert.are.equal("carol", auth.owner_of(routes.get("default/pool")))
        assert.is_true(access(auth, { user = "carol" }, "/default/pool/x"))
        assert.is_true(auth.can_see({ user = "carol" }, routes.get("default/pool")))
        assert.are.equal("forbidden: this sandbox belongs to another user",
            access(auth, { user = "default" }, "/default/pool/x"))
        assert.is_false(auth.can_see({ user = "default" }, routes.get("default/pool")))
        -- carol does not get labelled sandboxes
        assert.is_false(auth.can_see({ user = "carol" }, routes.get("default/mine")))
        assert.has_error(function() load{ keys_file = KEYS, unowned_owner = "" } end)
        assert.has_error(function() load{ keys_file = KEYS, unowned_owner = true } end)
    end)

    it("fails closed without an identity, and checks nothing when auth is off", function()
        local auth = load{ keys_file = KEYS }
        assert.are.equal("forbidden: this sandbox belongs to another user",
            access(auth, nil, "/alice/sb/x"))
        local off = load{}
        assert.is_false(off.enabled)
        assert.is_true(access(off, nil, "/default/pool/x"))
        assert.is_true(off.can_see(nil, require("sp.routes").get("default/pool")))
    end)

    it("guard() authenticates, then applies the owner rule to the path", function()
        local auth = load{ keys_file = KEYS }
        assert.are.equal(auth.guard, auth.check) -- the name before 0.2 keeps working
        local req = request("/alice/sb/x", bearer("a"))
        assert.is_true(auth.guard(req))
        req = request("/alice2/sb/x", bearer("a"))
        assert.is_false(auth.guard(req))
        assert.are.equal(403, req.response.status)
        req = request("/default/pool/x", bearer("a"))
        assert.is_false(auth.guard(req))
        assert.are.equal(403, req.response.status)
    end)
end)
