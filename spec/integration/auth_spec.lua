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

local SECRET = "s3cret-for-hs256-at-least-32-bytes" -- 34 bytes (the minimum is 32)

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
        assert(process.write_file(dir .. "/hs.secret", SECRET .. "\n"))
        assert(process.write_file(dir .. "/keys.json", cjson.encode({ keys = {
            { user = "alice", sha256 = sha_hex("alice-key-1") },
            { user = "bob", sha256 = sha_hex("bob-key-1") },
            { user = "ops", sha256 = sha_hex("ops-key-1"), admin = true },
            { user = "alice2", sha256 = sha_hex("alice2-key-1") },
            { user = "default", sha256 = sha_hex("default-key-1") },
        } })))
        px = H.start{
            sandboxes = { H.sandbox("alice", "a1", up.port), H.sandbox("bob", "b1", up.port),
                H.sandbox("alice2", "c1", up.port), H.sandbox("ALICE", "d1", up.port),
                H.sandbox("alice ", "e1", up.port), H.sandbox(nil, "pool-1", up.port),
                H.sandbox("default", "own-1", up.port) },
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
        assert.are.equal(7, s.count)
    end)

    it("lists only the caller's sandboxes and refuses anonymous listing", function()
        local s = cjson.decode(px:get("/sandboxes", bearer("alice-key-1")).body)
        assert.are.equal(1, s.count)
        assert.are.equal("alice/a1", s.sandboxes[1].path)
        assert.are.equal(401, px:get("/sandboxes").status)
    end)

    it("never lets related user names stand for each other", function()
        -- exact comparison after percent-decoding: no case folding, prefix or trimming
        local cases = {
            { "alice-key-1", "/alice2/c1/echo", "alice reaching alice2" },
            { "alice-key-1", "/ALICE/d1/echo", "alice reaching ALICE" },
            { "alice-key-1", "/%41LICE/d1/echo", "alice reaching ALICE, encoded" },
            { "alice-key-1", "/alice%20/e1/echo", "alice reaching 'alice '" },
            { "alice2-key-1", "/alice/a1/echo", "alice2 reaching alice" },
            { "alice2-key-1", "/al%69ce/a1/echo", "alice2 reaching alice, encoded" },
        }
        for _, c in ipairs(cases) do
            local r = assert(px:get(c[2], bearer(c[1])))
            assert.are.equal(403, r.status, c[3])
        end
        assert.are.equal(200, px:get("/alice2/c1/echo", bearer("alice2-key-1")).status)
        local s = cjson.decode(px:get("/sandboxes", bearer("alice2-key-1")).body)
        assert.are.equal(1, s.count)
        assert.are.equal("alice2/c1", s.sandboxes[1].path)
    end)

    it("keeps unowned sandboxes for admins, not for a user named default", function()
        local r = assert(px:get("/default/pool-1/echo", bearer("default-key-1")))
        assert.are.equal(403, r.status)
        assert.matches("no owner", cjson.decode(r.body).error)
        assert.are.equal(403, px:get("/default/pool-1/echo", bearer("alice-key-1")).status)
        assert.are.equal(200, px:get("/default/pool-1/echo", bearer("ops-key-1")).status)
        -- a sandbox labelled user=default is that user's, as any other label
        assert.are.equal(200, px:get("/default/own-1/echo", bearer("default-key-1")).status)
        -- the listing agrees with access
        local s = cjson.decode(px:get("/sandboxes", bearer("default-key-1")).body)
        assert.are.equal(1, s.count)
        assert.are.equal("default/own-1", s.sandboxes[1].path)
        s = cjson.decode(px:get("/sandboxes", bearer("ops-key-1")).body)
        local unowned
        for _, e in ipairs(s.sandboxes) do
            if e.path == "default/pool-1" then
                unowned = e
            end
        end
        assert.are.equal(cjson.null, assert(unowned).user)
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
        assert.are.equal(200, px:get("/alice/a1/echo", bearer(hs256(SECRET, claims))).status)
        assert.are.equal(200, px:get("/alice/a1/echo", bearer(rs256(dir, claims))).status)
        assert.are.equal(403, px:get("/bob/b1/echo", bearer(rs256(dir, claims))).status)
        claims.aud = { "other", "sandbox-proxy" }
        assert.are.equal(200, px:get("/alice/a1/echo", bearer(hs256(SECRET, claims))).status)
        local admin = { sub = "carol", sandbox_admin = true, iss = "https://issuer.test",
            aud = "sandbox-proxy", exp = now + 600 }
        assert.are.equal(200, px:get("/bob/b1/echo", bearer(hs256(SECRET, admin))).status)
    end)

    it("refuses tokens that are forged, expired, early, or for someone else", function()
        local good = { sub = "alice", iss = "https://issuer.test", aud = "sandbox-proxy",
            exp = now + 600 }
        local cases = {
            { "a wrong secret", hs256("not-the-secret", good) },
            { "alg none", (hs256("x", good, "none"):gsub("%.[^.]*$", ".")) },
            { "expired", hs256(SECRET, { sub = "alice", iss = "https://issuer.test",
                aud = "sandbox-proxy", exp = now - 3600 }) },
            { "not yet valid", hs256(SECRET, { sub = "alice", iss = "https://issuer.test",
                aud = "sandbox-proxy", exp = now + 7200, nbf = now + 3600 }) },
            { "another issuer", hs256(SECRET, { sub = "alice", iss = "https://evil.test",
                aud = "sandbox-proxy", exp = now + 600 }) },
            { "another audience", hs256(SECRET, { sub = "alice", iss = "https://issuer.test",
                aud = "someone-else", exp = now + 600 }) },
            { "no expiry", hs256(SECRET, { sub = "alice", iss = "https://issuer.test",
                aud = "sandbox-proxy" }) },
            { "an HS256 token signed with the RSA public key (alg confusion)",
                hs256(process.read_file(dir .. "/rsa.pub"), good) },
            { "a tampered payload", (function()
                local t = hs256(SECRET, good)
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
    it("keeps the last good credentials when a re-read file is bad", function()
        -- the HS256 secret file emptied: the old secret stays, the empty key forges nothing
        local claims = { sub = "alice", iss = "https://issuer.test", aud = "sandbox-proxy",
            exp = now + 600 }
        assert(process.write_file(dir .. "/hs.secret.new", "  \n"))
        assert(os.rename(dir .. "/hs.secret.new", dir .. "/hs.secret"))
        px:wait_log(function(l)
            return l.msg == "cannot load the HS256 secret file: keeping the previous secret"
                and l.error:find("0 bytes", 1, true) ~= nil
        end)
        assert.are.equal(200, px:get("/alice/a1/echo", bearer(hs256(SECRET, claims))).status)
        assert.are.equal(401, px:get("/alice/a1/echo", bearer(hs256("", claims))).status)
        local forged = { sub = "bob", iss = "https://issuer.test", aud = "sandbox-proxy",
            exp = now + 600 }
        assert.are.equal(401, px:get("/bob/b1/echo", bearer(hs256("", forged))).status)
        -- the RS256 public key file replaced by garbage: the old key stays
        assert(process.write_file(dir .. "/rsa.pub.new", "not a key\n"))
        assert(os.rename(dir .. "/rsa.pub.new", dir .. "/rsa.pub"))
        px:wait_log(function(l)
            return l.msg == "cannot load the RS256 public key file: keeping the previous key"
        end)
        assert.are.equal(200, px:get("/alice/a1/echo", bearer(rs256(dir, claims))).status)
        -- a keys file with one key for two users: the previous keys stay
        assert(process.write_file(dir .. "/keys.json.new", cjson.encode({ keys = {
            { user = "alice", sha256 = sha_hex("alice-key-3") } } })))
        assert(os.rename(dir .. "/keys.json.new", dir .. "/keys.json"))
        H.net.wait_until(function()
            return px:get("/alice/a1/echo", bearer("alice-key-3")).status == 200
        end, 10)
        assert(process.write_file(dir .. "/keys.json.new", cjson.encode({ keys = {
            { user = "alice", sha256 = sha_hex("alice-key-4") },
            { user = "alice", sha256 = sha_hex("shared-key") },
            { user = "bob", sha256 = sha_hex("shared-key") } } })))
        assert(os.rename(dir .. "/keys.json.new", dir .. "/keys.json"))
        px:wait_log(function(l)
            return l.msg == "cannot load the API keys file: keeping the previous keys"
                and l.error:find("also listed for user alice", 1, true) ~= nil
        end)
        assert.are.equal(200, px:get("/alice/a1/echo", bearer("alice-key-3")).status)
        assert.are.equal(401, px:get("/alice/a1/echo", bearer("alice-key-4")).status)
        assert.are.equal(401, px:get("/bob/b1/echo", bearer("shared-key")).status)
    end)
end)

describe("credentials that cannot be trusted", function()
    local dir = H.tmpdir() -- named in the cases below

    setup(function()
        assert(os.execute("openssl genrsa -out " .. dir .. "/rsa.key 2048 >/dev/null 2>&1") == 0)
    end)

    teardown(function()
        H.stop_all()
    end)

    -- Runs the binary with an auth section (`files` written first); returns code, out, err.
    local function run(auth_lua, files, extra)
        for name, text in pairs(files or {}) do
            assert(process.write_file(dir .. "/" .. name, text))
        end
        assert(process.write_file(dir .. "/c.lua", "return { auth = " .. auth_lua .. " }"))
        local cmd = { H.BIN, "--config", dir .. "/c.lua", "--workers", "1", "--sandboxes-file",
            H.SOURCE_DIR .. "/scripts/demo/sandboxes.json" }
        for _, a in ipairs(extra or { "--check" }) do
            cmd[#cmd + 1] = a
        end
        local p = assert(process.spawn{ cmd = cmd, stdout = dir .. "/out", stderr = dir .. "/err" })
        local code = p:wait(20)
        return code, p:read_stdout(), p:read_stderr()
    end

    local function secret_file(text)
        return ("{ jwt = { hs256_secret_file = %q } }"):format(dir .. "/" .. text)
    end

    local refused = {
        { "an empty HS256 secret file", secret_file("empty"), { empty = "" }, "is 0 bytes" },
        { "a whitespace-only HS256 secret file", secret_file("blank"), { blank = " \n\t\n" },
            "is 0 bytes" },
        { "an empty inline HS256 secret", '{ jwt = { hs256_secret = "" } }', nil, "is 0 bytes" },
        { "a 31-byte HS256 secret", ('{ jwt = { hs256_secret = %q } }'):format(("x"):rep(31)), nil,
            "is 31 bytes, at least 32" },
        { "a 31-byte HS256 secret file", secret_file("short"), { short = ("y"):rep(31) .. "\n" },
            "is 31 bytes, at least 32" },
        { "a missing HS256 secret file", secret_file("nope"), nil, "ENOENT" },
        { "a missing RS256 public key file",
            ("{ jwt = { rs256_public_key_file = %q } }"):format(dir .. "/missing.pub"), nil, "ENOENT" },
        { "an RS256 public key file that is not a key",
            ("{ jwt = { rs256_public_key_file = %q } }"):format(dir .. "/garbage.pub"),
            { ["garbage.pub"] = "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n" },
            "not a usable PEM public key" },
        { "a private key as the RS256 public key file",
            ("{ jwt = { rs256_public_key_file = %q } }"):format(dir .. "/rsa.key"), nil,
            "not a PEM public key" },
        { "a keys file listing one key for two users",
            ("{ keys_file = %q }"):format(dir .. "/dup.json"),
            { ["dup.json"] = cjson.encode({ keys = {
                { user = "alice", sha256 = sha_hex("k1") },
                { user = "bob", sha256 = sha_hex("k1") } } }) },
            "also listed for user alice" },
        { "a keys file listing one key once as admin, once not",
            ("{ keys_file = %q }"):format(dir .. "/dup2.json"),
            { ["dup2.json"] = cjson.encode({ keys = {
                { user = "ops", sha256 = sha_hex("k1"), admin = true },
                { user = "ops", sha256 = sha_hex("k1") } } }) },
            "another admin flag" },
        { "a missing keys file", ("{ keys_file = %q }"):format(dir .. "/none.json"), nil, "ENOENT" },
    }
    for _, c in ipairs(refused) do
        it("fails --check on " .. c[1], function()
            local code, out, err = run(c[2], c[3])
            assert.are.equal(1, code, out .. err)
            assert.matches(c[4], err, 1, true)
            assert.matches('"level":"error","msg":"refusing to start: ', out .. err, 1, true)
        end)
    end

    it("refuses to serve with an empty HS256 secret, auth_required or not", function()
        for _, extra in ipairs({ {}, { "--set", "auth_required=true" } }) do
            local port = assert(H.net.free_port())
            extra[#extra + 1] = "--listen"
            extra[#extra + 1] = "127.0.0.1:" .. port
            local code, out, err = run(secret_file("empty"), { empty = "\n" }, extra)
            assert.are.equal(1, code, out .. err)
            assert.matches("the HS256 secret is 0 bytes", out .. err, 1, true)
        end
    end)

    it("accepts a 32-byte secret and one key listed twice for the same user", function()
        local code, out, err = run(secret_file("ok"), { ok = ("z"):rep(32) .. "\n" })
        assert.are.equal(0, code, out .. err)
        code, out, err = run(("{ keys_file = %q }"):format(dir .. "/twice.json"),
            { ["twice.json"] = cjson.encode({ keys = {
                { user = "alice", sha256 = sha_hex("k1") },
                { user = "alice", sha256 = sha_hex("k1") } } }) })
        assert.are.equal(0, code, out .. err)
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
