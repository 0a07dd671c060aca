-- Authentication bound to the user in the path, against the real binary: API keys from a
-- keys file (re-read on change), JWT HS256 and RS256 with issuer/audience/expiry/not-before,
-- 401 with WWW-Authenticate, 403 for another user's sandbox, admins, /sandboxes filtered,
-- /metrics admin-only, open probes, the credential stripped before forwarding (and a custom
-- credential header that leaves the sandbox's own Authorization alone), auth_required.
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local crypto = require "sp.crypto"
local cjson = require "cjson"

local function b64url(s)
    local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    local out = {}
    for i = 1, #s, 3 do
        local a, b, c = s:byte(i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local q = {
            chars:sub(math.floor(n / 262144) % 64 + 1, math.floor(n / 262144) % 64 + 1),
            chars:sub(math.floor(n / 4096) % 64 + 1, math.floor(n / 4096) % 64 + 1),
            chars:sub(math.floor(n / 64) % 64 + 1, math.floor(n / 64) % 64 + 1),
            chars:sub(n % 64 + 1, n % 64 + 1),
        }
        out[#out + 1] = table.concat(q, "", 1, (c and 4) or (b and 3) or 2)
    end
    return table.concat(out)
end

local function hs256(secret, claims, alg)
    local head = b64url(cjson.encode({ alg = alg or "HS256", typ = "JWT" }))
    local body = b64url(cjson.encode(claims))
    local sig = b64url(crypto.hmac_sha256(secret, head .. "." .. body))
    return head .. "." .. body .. "." .. sig
end

local function rs256(dir, claims)
    local head = b64url(cjson.encode({ alg = "RS256", typ = "JWT" }))
    local body = b64url(cjson.encode(claims))
    assert(process.write_file(dir .. "/signing-input", head .. "." .. body))
    assert(os.execute("openssl dgst -sha256 -sign " .. dir .. "/rsa.key -out " .. dir
        .. "/sig " .. dir .. "/signing-input") == 0)
    return head .. "." .. body .. "." .. b64url(process.read_file(dir .. "/sig"))
end

local function sha_hex(s)
    return crypto.hex(crypto.sha256(s))
end

local function bearer(t)
    return { { "Authorization", "Bearer " .. t } }
end

describe("auth", function()
    local up, px, dir
    local now = os.time()

    setup(function()
        up = H.upstream{ name = "auth" }
        dir = H.tmpdir()
        assert(os.execute("openssl genrsa -out " .. dir .. "/rsa.key 2048 >/dev/null 2>&1 && "
            .. "openssl rsa -in " .. dir .. "/rsa.key -pubout -out " .. dir .. "/rsa.pub >/dev/null 2>&1") == 0)
        assert(process.write_file(dir .. "/hs.secret", "s3cret-for-hs256\n"))
        assert(process.write_file(dir .. "/keys.json", cjson.encode({ keys = {
            { user = "alice", sha256 = sha_hex("alice-key-1") },
            { user = "bob", sha256 = sha_hex("bob-key-1") },
            { user = "ops", sha256 = sha_hex("ops-key-1"), admin = true },
        } })))
        px = H.start{
            sandboxes = { H.sandbox("alice", "a1", up.port), H.sandbox("bob", "b1", up.port) },
            set = { auth_required = true },
            config = ([[return { auth = {
                keys_file = %q,
                jwt = { hs256_secret_file = %q, rs256_public_key_file = %q, issuer = "https://issuer.test",
                        audience = "sandbox-proxy", user_claim = "sub", admin_claim = "sandbox_admin" } } }]])
                :format(dir .. "/keys.json", dir .. "/hs.secret", dir .. "/rsa.pub"),
        }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("keeps the probes open", function()
        assert.are.equal(200, px:get("/health").status)
        assert.are.equal(200, px:get("/ready").status)
        assert.are.equal(200, px:get("/live").status)
    end)

    it("answers 401 with WWW-Authenticate without or with a wrong credential", function()
        local before = up.stats().requests
        local r = assert(px:get("/alice/a1/echo"))
        assert.are.equal(401, r.status)
        assert.matches("^Bearer", r.headers["www-authenticate"])
        assert.are.equal("authentication required", cjson.decode(r.body).error)
        r = assert(px:get("/alice/a1/echo", bearer("wrong-key")))
        assert.are.equal(401, r.status)
        r = assert(px:get("/alice/a1/echo", { { "Authorization", "Basic YWxpY2U6eA==" } }))
        assert.are.equal(401, r.status)
        -- nothing reached the sandbox (the stats call itself is one request)
        assert.are.equal(before + 1, up.stats().requests)
    end)

    it("lets a key reach its own user's sandboxes only", function()
        local r = assert(px:get("/alice/a1/echo", bearer("alice-key-1")))
        assert.are.equal(200, r.status)
        r = assert(px:get("/bob/b1/echo", bearer("alice-key-1")))
        assert.are.equal(403, r.status)
        assert.are.equal("bob/b1", cjson.decode(r.body).path)
        -- encoded tricks are refused before they could reach another prefix
        r = assert(px:get("/alice/%2e%2e/bob/b1/echo", bearer("alice-key-1")))
        assert.are_not.equal(200, r.status)
        r = assert(px:get("/al%69ce/a1/echo", bearer("alice-key-1")))
        assert.are.equal(200, r.status)
    end)

    it("lets an admin key reach every sandbox and see every route", function()
        assert.are.equal(200, px:get("/bob/b1/echo", bearer("ops-key-1")).status)
        local s = cjson.decode(px:get("/sandboxes", bearer("ops-key-1")).body)
        assert.are.equal(2, s.count)
    end)

    it("lists only the caller's sandboxes and refuses anonymous listing", function()
        local s = cjson.decode(px:get("/sandboxes", bearer("alice-key-1")).body)
        assert.are.equal(1, s.count)
        assert.are.equal("alice/a1", s.sandboxes[1].path)
        assert.are.equal(401, px:get("/sandboxes").status)
    end)

    it("serves /metrics to admins only", function()
        assert.are.equal(401, px:get("/metrics").status)
        assert.are.equal(403, px:get("/metrics", bearer("alice-key-1")).status)
        local r = px:get("/metrics", bearer("ops-key-1"))
        assert.are.equal(200, r.status)
        assert.matches("sandbox_proxy_requests_total", r.body)
    end)

    it("strips the credential before forwarding and never logs it", function()
        local r = assert(px:get("/alice/a1/echo", bearer("alice-key-1")))
        for _, h in ipairs(cjson.decode(r.body).headers) do
            assert.are_not.equal("authorization", h[1]:lower())
        end
        local logs = px:stderr() .. px:stdout()
        assert.is_nil(logs:find("alice-key-1", 1, true))
        assert.is_nil(logs:find("ops-key-1", 1, true))
    end)

    it("accepts HS256 and RS256 tokens with the right claims", function()
        local claims = { sub = "alice", iss = "https://issuer.test", aud = "sandbox-proxy",
            exp = now + 600, nbf = now - 10 }
        assert.are.equal(200, px:get("/alice/a1/echo", bearer(hs256("s3cret-for-hs256", claims))).status)
        assert.are.equal(200, px:get("/alice/a1/echo", bearer(rs256(dir, claims))).status)
        assert.are.equal(403, px:get("/bob/b1/echo", bearer(rs256(dir, claims))).status)
        claims.aud = { "other", "sandbox-proxy" }
        assert.are.equal(200, px:get("/alice/a1/echo", bearer(hs256("s3cret-for-hs256", claims))).status)
        local admin = { sub = "carol", sandbox_admin = true, iss = "https://issuer.test",
            aud = "sandbox-proxy", exp = now + 600 }
        assert.are.equal(200, px:get("/bob/b1/echo", bearer(hs256("s3cret-for-hs256", admin))).status)
    end)

    it("refuses tokens that are forged, expired, early, or for someone else", function()
        local good = { sub = "alice", iss = "https://issuer.test", aud = "sandbox-proxy",
            exp = now + 600 }
        local cases = {
            { "a wrong secret", hs256("not-the-secret", good) },
            { "alg none", (hs256("x", good, "none"):gsub("%.[^.]*$", ".")) },
            { "expired", hs256("s3cret-for-hs256", { sub = "alice", iss = "https://issuer.test",
                aud = "sandbox-proxy", exp = now - 3600 }) },
            { "not yet valid", hs256("s3cret-for-hs256", { sub = "alice", iss = "https://issuer.test",
                aud = "sandbox-proxy", exp = now + 7200, nbf = now + 3600 }) },
            { "another issuer", hs256("s3cret-for-hs256", { sub = "alice", iss = "https://evil.test",
                aud = "sandbox-proxy", exp = now + 600 }) },
            { "another audience", hs256("s3cret-for-hs256", { sub = "alice", iss = "https://issuer.test",
                aud = "someone-else", exp = now + 600 }) },
            { "no expiry", hs256("s3cret-for-hs256", { sub = "alice", iss = "https://issuer.test",
                aud = "sandbox-proxy" }) },
            { "an HS256 token signed with the RSA public key (alg confusion)",
                hs256(process.read_file(dir .. "/rsa.pub"), good) },
            { "a tampered payload", (function()
                local t = hs256("s3cret-for-hs256", good)
                local h, _, s = t:match("^([^.]+)%.([^.]+)%.([^.]+)$")
                return h .. "." .. b64url(cjson.encode({ sub = "bob", iss = "https://issuer.test",
                    aud = "sandbox-proxy", exp = now + 600 })) .. "." .. s
            end)() },
        }
        for _, c in ipairs(cases) do
            local r = assert(px:get("/alice/a1/echo", bearer(c[2])))
            assert.are.equal(401, r.status, c[1])
        end
    end)

    it("re-reads the keys file when it changes", function()
        assert(process.write_file(dir .. "/keys.json.new", cjson.encode({ keys = {
            { user = "alice", sha256 = sha_hex("alice-key-2") },
        } })))
        assert(os.rename(dir .. "/keys.json.new", dir .. "/keys.json"))
        H.net.wait_until(function()
            return px:get("/alice/a1/echo", bearer("alice-key-2")).status == 200
        end, 10)
        assert.are.equal(401, px:get("/alice/a1/echo", bearer("alice-key-1")).status)
    end)
end)

describe("a custom credential header", function()
    teardown(function()
        H.stop_all()
    end)

    it("leaves the sandbox application's own Authorization header untouched", function()
        local up = H.upstream{ name = "app" }
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/keys.json", cjson.encode({ keys = {
            { user = "alice", sha256 = sha_hex("k-alice") } } })))
        local px = H.start{ sandboxes = { H.sandbox("alice", "a1", up.port) },
            config = ([[return { auth = { header = "X-Sandbox-Proxy-Key", keys_file = %q } }]])
                :format(dir .. "/keys.json") }
        local r = assert(px:get("/alice/a1/echo", {
            { "X-Sandbox-Proxy-Key", "k-alice" }, { "Authorization", "Token app-own-secret" } }))
        assert.are.equal(200, r.status)
        local seen = {}
        for _, h in ipairs(cjson.decode(r.body).headers) do
            seen[h[1]:lower()] = h[2]
        end
        assert.are.equal("Token app-own-secret", seen["authorization"])
        assert.is_nil(seen["x-sandbox-proxy-key"])
        assert.are.equal(401, px:get("/alice/a1/echo", { { "Authorization", "Bearer k-alice" } }).status)
    end)

    it("refuses to start with auth_required and no credentials configured", function()
        local port = assert(H.net.free_port())
        local dir = H.tmpdir()
        local p = assert(process.spawn{ cmd = { H.BIN, "--listen", "127.0.0.1:" .. port,
            "--workers", "1", "--set", "auth_required=true", "--sandboxes-file",
            H.SOURCE_DIR .. "/scripts/demo/sandboxes.json" }, stderr = dir .. "/err" })
        assert.are.equal(1, p:wait(20))
        assert.matches("authentication is required", p:read_stderr())
    end)

    it("warns loudly when authentication is off outside the demo", function()
        local up = H.upstream{}
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) } }
        px:wait_log(function(l) return l.msg:find("authentication is OFF", 1, true) end)
    end)
end)
