-- Browser apps over fake requests and the real shared route table: the ports of a sandbox
-- (router.lua: the /{user}/{sandbox}:{port}/ form, the allowed set), host routing
-- (sandbox_path.lua), the prefix modes (strip + X-Forwarded-Prefix + the response prefix the
-- runtime restores; keep) and browser authentication (browser.lua with auth.lua: the query
-- credential -> cookie + 302, the cookie as a credential, the Origin check, the cookie removed
-- before forwarding, the query kept out of the access log).
local testkit = require "sp.testkit"
local config = require "sp.config"
local crypto = require "sp.crypto"
local cjson = require "cjson"

-- Fresh instances of the chain's modules loaded with the given config sections; the previous
-- instances and config are put back, so no other spec sees them.
local MODS = { "sandbox_path", "browser", "auth", "router", "access_log" }
local function chain(sections)
    local saved_cfg, saved_mods = {}, {}
    for k, v in pairs(sections) do
        saved_cfg[k] = config[k]
        config[k] = v
    end
    for _, m in ipairs(MODS) do
        saved_mods[m] = package.loaded[m]
        package.loaded[m] = nil
    end
    local ok, res = pcall(function()
        local t = {}
        for _, m in ipairs(MODS) do
            t[m] = require(m)
        end
        return t
    end)
    for k in pairs(sections) do
        config[k] = saved_cfg[k]
    end
    for _, m in ipairs(MODS) do
        package.loaded[m] = saved_mods[m]
    end
    if not ok then
        error(res, 0)
    end
    return res
end

local keys_path = os.tmpname()
do
    local function entry(user, key)
        return { user = user, sha256 = crypto.hex(crypto.sha256(key)) }
    end
    local f = assert(io.open(keys_path, "wb"))
    f:write(cjson.encode({ keys = { entry("alice", "alice-key"), entry("bob", "bob-key") } }))
    f:close()
end
local AUTH = { keys_file = keys_path }

-- Runs the part of init.lua's chain a sandbox request goes through: login, authenticate, route.
local function run(c, opts)
    local req = testkit.request(opts)
    if c.auth.enabled and c.browser.login(req) then
        return req
    end
    if c.auth.authenticate(req) then
        c.router.handle(req)
    end
    return req
end

-- The X-Forwarded-Prefix the sandbox gets (added, or set over a client's), or nil.
local function xfp(req)
    local set = req.forwarded.set_headers["X-Forwarded-Prefix"]
    local n, value = 0, set
    for _, h in ipairs(req.forwarded.add_headers) do
        if h[1] == "X-Forwarded-Prefix" then
            n, value = n + 1, h[2]
        end
    end
    assert(n + (set and 1 or 0) <= 1, "X-Forwarded-Prefix sent twice")
    return value
end

local ROUTES = {
    ["alice/sb"] = { address = "10.0.0.7", port = 8888, ports = "3000,5173" },
    ["alice/plain"] = { address = "10.0.0.8", port = 8888 },
    ["alice/kept"] = { address = "10.0.0.9", port = 8888, prefix = "keep" },
    ["alice/stripped"] = { address = "10.0.0.10", port = 8888, prefix = "strip" },
    ["alice/sleepy"] = { address = "", port = 8888, ready = false, reason = "DependenciesNotReady" },
    ["alice/3000-app"] = { address = "10.0.0.11", port = 8888 },
    ["bob/sb"] = { address = "10.0.0.12", port = 8888 },
}

describe("ports of a sandbox", function()
    local c
    before_each(function()
        testkit.set_routes(ROUTES)
        c = chain({ router = { ports = { 9090 } } })
    end)
    after_each(testkit.clear_routes)

    it("reads /{user}/{sandbox}:{port}/ as the port form, never as a name or a path", function()
        local sp = c.sandbox_path
        assert.are.same({ "a", "b", "/x?q", 3000, "/a/b:3000" }, { sp.parse("/a/b:3000/x?q") })
        assert.are.same({ "a", "b", "/", 3000, "/a/b:3000" }, { sp.parse("/a/b:3000") })
        assert.are.same({ "a", "b", "/c:1/d", nil, "/a/b" }, { sp.parse("/a/b/c:1/d") })
        for _, bad in ipairs({ "/a/b:0/", "/a/b:65536/", "/a/b:08/", "/a/b:/", "/a/b:x/",
            "/a/:3000/", "/a/b:3000:1/" }) do
            assert.is_nil(sp.parse(bad), bad)
        end
        -- an encoded colon is part of a name (which no sandbox has), not a port
        assert.are.same({ "a", "b:3000", "/", nil, "/a/b%3A3000" }, { sp.parse("/a/b%3A3000") })
    end)

    it("forwards to an allowed port of the sandbox's address, with the prefix as written", function()
        local req = run(c, { target = "/alice/sb:3000/app/x?y=1" })
        assert.are.same({ "10.0.0.7", 3000, "/app/x?y=1" },
            { req.forwarded.host, req.forwarded.port, req.forwarded.path })
        assert.are.equal("/alice/sb:3000", xfp(req))
        assert.are.equal("/alice/sb:3000", req.response_prefix)
        assert.are.equal(5173, run(c, { target = "/alice/sb:5173/" }).forwarded.port)
        assert.are.equal(8888, run(c, { target = "/alice/sb:8888/" }).forwarded.port)
        assert.are.equal(8888, run(c, { target = "/alice/sb/" }).forwarded.port)
        -- router.ports: every sandbox
        assert.are.equal(9090, run(c, { target = "/alice/plain:9090/" }).forwarded.port)
    end)

    it("refuses a port that is not allowed with 403 and never forwards it", function()
        local req = run(c, { target = "/alice/sb:22/" })
        assert.is_nil(req.forwarded)
        assert.are.equal(403, req.response.status)
        assert.are.same({ error = "port not allowed", path = "alice/sb", port = 22,
            allowed = { 3000, 5173, 8888, 9090 } }, req.response.json)
        -- the route's extra ports are its own, not another sandbox's
        req = run(c, { target = "/alice/plain:3000/" })
        assert.are.equal(403, req.response.status)
        assert.are.same({ 8888, 9090 }, req.response.json.allowed)
        -- refused before readiness: a sandbox that is not ready still answers 403 for it
        assert.are.equal(403, run(c, { target = "/alice/sleepy:22/" }).response.status)
        assert.are.equal(503, run(c, { target = "/alice/sleepy/" }).response.status)
        -- a bad port is a bad path
        assert.are.equal(400, run(c, { target = "/alice/sb:99999/" }).response.status)
    end)

    it("checks ports only with the default config (no router.ports)", function()
        local d = chain({})
        assert.are.equal(403, run(d, { target = "/alice/plain:9090/" }).response.status)
        assert.has_error(function() chain({ router = { ports = { 0 } } }) end)
        assert.has_error(function() chain({ router = { ports = "3000" } }) end)
    end)
end)

describe("host routing", function()
    local c
    before_each(function()
        testkit.set_routes(ROUTES)
        c = chain({ sandbox_path = { base_domain = "sbx.test" } })
    end)
    after_each(testkit.clear_routes)

    it("routes {port}-{sandbox}--{user}.{base_domain} with the target untouched", function()
        local req = run(c, { target = "/tree?x=1", headers = { Host = "3000-sb--alice.sbx.test" } })
        assert.are.same({ "10.0.0.7", 3000, "/tree?x=1" },
            { req.forwarded.host, req.forwarded.port, req.forwarded.path })
        assert.is_nil(xfp(req))
        assert.is_nil(req.response_prefix)
        assert.is_true(req.ctx.target_host)
    end)

    it("routes {sandbox}--{user} to the default port; any case; a :port ignored", function()
        local req = run(c, { target = "/alice/plain/x", headers = { Host = "SB--Alice.SBX.test:8443" } })
        assert.are.same({ "10.0.0.7", 8888, "/alice/plain/x" },
            { req.forwarded.host, req.forwarded.port, req.forwarded.path })
    end)

    it("refuses a port not allowed by host as by path", function()
        local req = run(c, { headers = { Host = "22-sb--alice.sbx.test" } })
        assert.are.equal(403, req.response.status)
        assert.are.equal(22, req.response.json.port)
    end)

    it("prefers a match whose sandbox exists (a sandbox named 3000-app)", function()
        local req = run(c, { headers = { Host = "3000-app--alice.sbx.test" } })
        assert.are.same({ "10.0.0.11", 8888 }, { req.forwarded.host, req.forwarded.port })
        req = run(c, { headers = { Host = "5173-sb--alice.sbx.test" } })
        assert.are.same({ "10.0.0.7", 5173 }, { req.forwarded.host, req.forwarded.port })
        -- neither exists: the first match, 404
        req = run(c, { headers = { Host = "3000-ghost--alice.sbx.test" } })
        assert.are.same({ error = "sandbox not found", path = "alice/ghost" }, req.response.json)
    end)

    it("leaves the bare domain and other hosts to path routing", function()
        for _, h in ipairs({ "sbx.test", "x.sbx.test.evil", "127.0.0.1:8080", "sb-alice.sbx.test",
            "a.sb--alice.sbx.test" }) do
            local req = run(c, { target = "/alice/plain/x", headers = { Host = h } })
            assert.are.equal("10.0.0.8", req.forwarded.host, h)
            assert.are.equal("/x", req.forwarded.path, h)
        end
    end)

    it("drops a client's X-Forwarded-Prefix", function()
        local req = run(c, { headers = { Host = "sb--alice.sbx.test", ["X-Forwarded-Prefix"] = "/x" } })
        assert.are.same({ "X-Forwarded-Prefix" }, req.forwarded.removed_headers)
    end)

    it("takes configurable patterns and refuses bad ones", function()
        local d = chain({ sandbox_path = { base_domain = "sbx.test",
            host_patterns = { "{user}-{sandbox}-p{port}" } } })
        local req = run(d, { headers = { Host = "alice-sb-p5173.sbx.test" } })
        assert.are.same({ "10.0.0.7", 5173 }, { req.forwarded.host, req.forwarded.port })
        assert.has_error(function()
            chain({ sandbox_path = { base_domain = "sbx.test", host_patterns = { "{port}-{sandbox}" } } })
        end)
        assert.has_error(function()
            chain({ sandbox_path = { base_domain = "sbx.test", host_patterns = { "{pod}-{sandbox}--{user}" } } })
        end)
        assert.has_error(function() chain({ sandbox_path = { base_domain = "http://x" } }) end)
    end)

    it("is off without base_domain (no Host is read)", function()
        local d = chain({})
        assert.is_false(d.sandbox_path.host_routing)
        local req = run(d, { target = "/alice/plain/x", headers = { Host = "3000-sb--alice.sbx.test" } })
        assert.are.equal("10.0.0.8", req.forwarded.host)
    end)
end)

describe("prefix modes", function()
    before_each(function() testkit.set_routes(ROUTES) end)
    after_each(testkit.clear_routes)

    it("strip (default): /{rest}, X-Forwarded-Prefix, the response prefix asked for", function()
        local c = chain({})
        local req = run(c, { target = "/alice/plain/tree?x=1", headers = { ["X-Forwarded-Prefix"] = "/evil" } })
        assert.are.equal("/tree?x=1", req.forwarded.path)
        assert.are.equal("/alice/plain", xfp(req))
        assert.are.equal("/alice/plain", req.response_prefix)
    end)

    it("keep (config): the whole target, no prefix header, nothing to restore", function()
        local c = chain({ router = { prefix = "keep" } })
        local req = run(c, { target = "/alice/plain/tree?x=1", headers = { ["X-Forwarded-Prefix"] = "/evil" } })
        assert.are.equal("/alice/plain/tree?x=1", req.forwarded.path)
        assert.is_nil(xfp(req))
        assert.are.same({ "X-Forwarded-Prefix" }, req.forwarded.removed_headers)
        assert.is_nil(req.response_prefix)
        -- the annotation wins over the config, both ways
        assert.are.equal("/tree", run(c, { target = "/alice/stripped/tree" }).forwarded.path)
        assert.are.equal("/alice/kept/tree", run(chain({}), { target = "/alice/kept/tree" }).forwarded.path)
        assert.are.equal("/alice/sb:3000/x", run(c, { target = "/alice/sb:3000/x" }).forwarded.path)
    end)

    it("rewrite_response_headers = false: the prefix header without the rewrite", function()
        local c = chain({ router = { rewrite_response_headers = false } })
        local req = run(c, { target = "/alice/plain/tree" })
        assert.are.equal("/alice/plain", xfp(req))
        assert.is_nil(req.response_prefix)
        assert.has_error(function() chain({ router = { prefix = "drop" } }) end)
    end)
end)

describe("browser authentication", function()
    local c
    before_each(function()
        testkit.set_routes(ROUTES)
        c = chain({ auth = AUTH })
    end)
    after_each(testkit.clear_routes)

    it("turns the query credential into a cookie scoped to the prefix and redirects without it", function()
        local req = run(c, { target = "/alice/sb/tree?a=1&sp_token=alice-key&b=%2F" })
        assert.is_nil(req.forwarded)
        assert.are.equal(302, req.response.status)
        local h = req.response.headers
        assert.are.equal("/alice/sb/tree?a=1&b=%2F", h.Location)
        assert.are.equal("sp_token=alice-key; Path=/alice/sb; HttpOnly; Secure; SameSite=Lax",
            h["Set-Cookie"])
        assert.are.equal("no-store", h["Cache-Control"])
        assert.is_true(req.ctx.secret_query)
        req = run(c, { target = "/alice/sb:3000?sp_token=alice-key", method = "HEAD" })
        assert.are.equal("/alice/sb:3000", req.response.headers.Location)
        assert.matches("; Path=/alice/sb:3000;", req.response.headers["Set-Cookie"], 1, true)
    end)

    it("scopes the cookie to the sandbox's host under host routing", function()
        local d = chain({ auth = AUTH, sandbox_path = { base_domain = "sbx.test" },
            browser = { cookie_secure = false, cookie_same_site = "Strict", cookie_max_age = 3600 } })
        local req = run(d, { target = "/lab?sp_token=alice-key", headers = { Host = "sb--alice.sbx.test" } })
        assert.are.equal("/lab", req.response.headers.Location)
        assert.are.equal("sp_token=alice-key; Path=/; HttpOnly; SameSite=Strict; Max-Age=3600",
            req.response.headers["Set-Cookie"])
    end)

    it("refuses bad, foreign, misplaced and cookie-unsafe query credentials", function()
        local req = run(c, { target = "/alice/sb/?sp_token=wrong" })
        assert.are.equal(401, req.response.status)
        assert.is_nil(req.response.headers["Set-Cookie"])
        assert.is_true(req.ctx.secret_query)
        req = run(c, { target = "/alice/sb/?sp_token=bob-key" })
        assert.are.equal(403, req.response.status)
        assert.is_nil(req.response.headers["Set-Cookie"])
        for _, o in ipairs({ { method = "POST" }, { method = "GET", upgrade = true } }) do
            o.target = "/alice/sb/api?sp_token=alice-key"
            req = run(c, o)
            assert.are.equal(400, req.response.status)
            assert.is_nil(req.forwarded)
            assert.is_true(req.ctx.secret_query)
        end
        req = run(c, { target = "/alice/sb/?sp_token=a%3Bb" })
        assert.are.equal(400, req.response.status)
    end)

    it("leaves other parameters and non-sandbox targets alone", function()
        local req = run(c, { target = "/alice/sb/?token=abc", headers = { Authorization = "Bearer alice-key" } })
        assert.are.equal("/?token=abc", req.forwarded.path)
        assert.is_nil(req.ctx.secret_query)
    end)

    it("takes the cookie as the credential and removes it from what the sandbox gets", function()
        local req = run(c, { target = "/alice/sb/tree",
            headers = { Cookie = "_xsrf=1; sp_token=alice-key; user=x" } })
        assert.are.equal("10.0.0.7", req.forwarded.host)
        assert.are.equal("alice", req.ctx.identity.user)
        assert.is_true(req.ctx.via_cookie)
        assert.are.equal("_xsrf=1; user=x", req.forwarded.set_headers.Cookie)
        req = run(c, { target = "/alice/sb/tree", headers = { Cookie = "sp_token=alice-key" } })
        assert.are.same({ "Authorization", "Cookie" }, req.forwarded.removed_headers)
        -- a header credential wins, and the cookie is removed all the same
        req = run(c, { target = "/alice/sb/tree", headers = { Authorization = "Bearer alice-key",
            Cookie = "sp_token=bob-key; a=1" } })
        assert.are.equal("a=1", req.forwarded.set_headers.Cookie)
        assert.is_nil(req.ctx.via_cookie)
        -- several Cookie headers (HTTP/2 sends one per cookie): every one is read and cleaned
        req = run(c, { target = "/alice/sb/tree",
            headers = { { "Cookie", "_xsrf=1" }, { "Cookie", "sp_token=alice-key" }, { "Cookie", "b=2" } } })
        assert.are.equal("alice", req.ctx.identity.user)
        assert.are.equal("_xsrf=1; b=2", req.forwarded.set_headers.Cookie)
        req = run(c, { target = "/alice/sb/tree", headers = { { "Authorization", "Bearer alice-key" },
            { "Cookie", "a=1" }, { "Cookie", "sp_token=bob-key" } } })
        assert.are.equal("a=1", req.forwarded.set_headers.Cookie)
        -- another user's cookie is no key to alice's sandbox
        req = run(c, { target = "/alice/sb/tree", headers = { Cookie = "sp_token=bob-key" } })
        assert.are.equal(403, req.response.status)
        req = run(c, { target = "/alice/sb/tree", headers = { Cookie = "sp_token=nope" } })
        assert.are.equal(401, req.response.status)
    end)

    it("needs a same-host or allowlisted Origin for cookie requests that change state or upgrade", function()
        local function cookie_req(method, origin, upgrade, host)
            return run(c, { method = method, target = "/alice/sb/api/x", upgrade = upgrade,
                headers = { Cookie = "sp_token=alice-key", Origin = origin, Host = host or "proxy.test:8080" } })
        end
        assert.is_table(cookie_req("GET").forwarded)
        assert.is_table(cookie_req("OPTIONS").forwarded)
        for _, m in ipairs({ "POST", "PUT", "PATCH", "DELETE" }) do
            assert.are.equal(403, cookie_req(m).response.status, m)
            assert.are.equal(403, cookie_req(m, "https://evil.test").response.status, m)
            assert.are.equal(403, cookie_req(m, "null").response.status, m)
            assert.is_table(cookie_req(m, "http://proxy.test:8080").forwarded, m)
            assert.is_table(cookie_req(m, "https://PROXY.test:8080").forwarded, m)
        end
        assert.are.equal(403, cookie_req("GET", nil, true).response.status)
        assert.are.equal(403, cookie_req("GET", "http://evil.test", true).response.status)
        assert.is_table(cookie_req("GET", "http://proxy.test:8080", true).forwarded)
        local d = chain({ auth = AUTH, browser = { allowed_origins = { "https://ide.example.com" } } })
        local req = run(d, { method = "POST", target = "/alice/sb/api",
            headers = { Cookie = "sp_token=alice-key", Origin = "https://ide.example.com", Host = "p" } })
        assert.is_table(req.forwarded)
        -- a header credential is not checked (a browser never adds one by itself)
        req = run(c, { method = "POST", target = "/alice/sb/api", headers = { Authorization = "Bearer alice-key" } })
        assert.is_table(req.forwarded)
    end)

    it("does nothing with enabled = false (the cookie is then no credential)", function()
        local d = chain({ auth = AUTH, browser = { enabled = false } })
        local req = run(d, { target = "/alice/sb/?sp_token=alice-key", headers = { Authorization = "Bearer alice-key" } })
        assert.are.equal("/?sp_token=alice-key", req.forwarded.path)
        assert.are.equal(401, run(d, { target = "/alice/sb/", headers = { Cookie = "sp_token=alice-key" } }).response.status)
    end)

    it("keeps the query of a login out of the access log even with access_log.query on", function()
        local d = chain({ auth = AUTH, access_log = { query = true } })
        local req = run(d, { target = "/alice/sb/?sp_token=alice-key&x=1" })
        req:complete{ status = 302 }
        assert.is_nil(d.access_log.record(req).query)
        local other = run(d, { target = "/alice/sb/?x=1", headers = { Authorization = "Bearer alice-key" } })
        other:complete{ status = 200 }
        assert.are.equal("x=1", d.access_log.record(other).query)
        -- the line the runtime writes (the test kit formats it the same way)
        local core = require "sp.core"
        local lines, saved = {}, core.access_log
        core.access_log = function(l) lines[#lines + 1] = l end
        d.access_log.write(req)
        d.access_log.write(other)
        core.access_log = saved
        assert.are.equal(2, #lines)
        assert.is_nil(lines[1]:find("alice-key", 1, true))
        assert.is_nil(lines[1]:find('"query"', 1, true))
        assert.is_truthy(lines[2]:find('"query":"x=1"', 1, true))
    end)

    it("refuses a bad configuration", function()
        assert.has_error(function() chain({ browser = { cookie_same_site = "lax" } }) end)
        assert.has_error(function() chain({ browser = { cookie_name = "a;b" } }) end)
        assert.has_error(function() chain({ browser = { cookie_max_age = -1 } }) end)
    end)
end)
