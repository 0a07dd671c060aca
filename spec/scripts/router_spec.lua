-- router.lua: the /{user}/{sandbox}/{rest} mapping, percent-decoding of the name segments and
-- the decisions router.handle makes over the real shared route table (sp.routes).
local testkit = require "sp.testkit"
local routes = require "sp.routes"
local router = require "router"
local sandbox_path = require "sandbox_path"

-- split(target) as a list, so that a nil result compares cleanly
local function split(target)
    return { sandbox_path.split(target) }
end

describe("sandbox_path.split (the router's parser)", function()
    it("splits user, sandbox and the rest with its query", function()
        assert.are.same({ "a", "b", "/c?x=1" }, split("/a/b/c?x=1"))
    end)

    it("forwards / when there is nothing after the sandbox", function()
        assert.are.same({ "a", "b", "/" }, split("/a/b"))
        assert.are.same({ "a", "b", "/" }, split("/a/b/"))
    end)

    it("keeps the query when there is nothing after the sandbox", function()
        assert.are.same({ "a", "b", "/?q" }, split("/a/b?q"))
        assert.are.same({ "a", "b", "/?x=1&y=2" }, split("/a/b?x=1&y=2"))
    end)

    it("keeps a bare '?' (empty query) byte for byte", function()
        assert.are.same({ "a", "b", "/?" }, split("/a/b?"))
        assert.are.same({ "a", "b", "/c?" }, split("/a/b/c?"))
        assert.are.same({ "a", "b", "/?" }, split("/a/b/?"))
    end)

    it("does not take slashes inside the query as path separators", function()
        assert.are.same({ "a", "b", "/?next=/c/d" }, split("/a/b?next=/c/d"))
        assert.are.same({ "a", "b", "/x?u=/y/z?w" }, split("/a/b/x?u=/y/z?w"))
        assert.is_nil(sandbox_path.split("/a?x=/b/c"))
    end)

    it("preserves escapes, repeated slashes and odd bytes in the rest exactly", function()
        assert.are.same({ "a", "b", "/x%2Fy?q=%2F" }, split("/a/b/x%2Fy?q=%2F"))
        assert.are.same({ "a", "b", "/download/%2Ftmp%2Fout%20file.txt" },
            split("/a/b/download/%2Ftmp%2Fout%20file.txt"))
        assert.are.same({ "a", "b", "//c" }, split("/a/b//c"))
        assert.are.same({ "a", "b", "/c//d/" }, split("/a/b/c//d/"))
        assert.are.same({ "a", "b", "/c/../d" }, split("/a/b/c/../d"))
        assert.are.same({ "a", "b", "/%zz?%41=%" }, split("/a/b/%zz?%41=%"))
        assert.are.same({ "a", "b", "/c?a=1&a=2&b=%26;c" }, split("/a/b/c?a=1&a=2&b=%26;c"))
    end)

    it("keeps longer real-world names intact", function()
        assert.are.same({ "alice", "python-pool-x7k2p", "/execute" },
            split("/alice/python-pool-x7k2p/execute"))
        assert.are.same({ "default", "my-sandbox.v2", "/" }, split("/default/my-sandbox.v2"))
    end)

    it("percent-decodes the user and sandbox segments (upper and lower case hex)", function()
        assert.are.same({ "alice", "sb", "/" }, split("/al%69ce/sb"))
        assert.are.same({ "alice", "sb", "/x" }, split("/%61lice/%73%62/x"))
        assert.are.same({ "a b", "s-b", "/%20" }, split("/a%20b/s%2Db/%20"))
        assert.are.same({ "aliCe", "sb", "/" }, split("/al%69Ce/sb"))
        assert.are.same({ "a~b", "sb", "/" }, split("/a%7eb/sb"))
        assert.are.same({ "a~b", "sb", "/" }, split("/a%7Eb/sb"))
    end)

    it("does not decode the rest", function()
        local _, _, rest = sandbox_path.split("/al%69ce/sb/%69?%69")
        assert.are.equal("/%69?%69", rest)
    end)

    it("rejects targets without both a user and a sandbox segment", function()
        for _, t in ipairs({ "/", "", "/a", "/a/", "/a?x", "/a/?x", "//", "//b", "//b/c",
            "/a//x", "/a//", "?/a/b" }) do
            assert.is_nil(sandbox_path.split(t), "expected nil for " .. t)
        end
    end)

    it("rejects segments that decode to '/'", function()
        for _, t in ipairs({ "/a%2Fb/sb", "/a/b%2fc", "/%2F/sb", "/a/%2F", "/a/%2F/x" }) do
            assert.is_nil(sandbox_path.split(t), "expected nil for " .. t)
        end
    end)

    it("rejects segments that are or decode to '.', '..' or ''", function()
        for _, t in ipairs({ "/./sb", "/../sb", "/a/.", "/a/..", "/a/../x", "/%2e/sb",
            "/%2E%2E/sb", "/a/%2e%2e/x", "/a/.%2e", "/a/%2E" }) do
            assert.is_nil(sandbox_path.split(t), "expected nil for " .. t)
        end
    end)

    it("accepts names that merely contain dots", function()
        assert.are.same({ "a", "...", "/" }, split("/a/..."))
        assert.are.same({ "a.b", ".x", "/" }, split("/a.b/.x"))
    end)

    it("rejects segments containing NUL, raw or encoded", function()
        assert.is_nil(sandbox_path.split("/a%00/sb"))
        assert.is_nil(sandbox_path.split("/a/s%00b/x"))
        assert.is_nil(sandbox_path.split("/a\0/sb"))
    end)

    it("rejects bad or double escapes in the name segments", function()
        for _, t in ipairs({ "/a%/sb", "/a%2/sb", "/a%zz/sb", "/a/sb%G1", "/a/%",
            "/a%252F/sb", "/a/%2525", "/a%%41/sb" }) do
            assert.is_nil(sandbox_path.split(t), "expected nil for " .. t)
        end
    end)
end)

describe("sandbox_path.decode_segment", function()
    it("decodes escapes and returns plain names unchanged", function()
        assert.are.equal("alice", sandbox_path.decode_segment("alice"))
        assert.are.equal("alice", sandbox_path.decode_segment("al%69ce"))
        assert.are.equal("a~b", sandbox_path.decode_segment("a%7Eb"))
        assert.are.equal("a~b", sandbox_path.decode_segment("a%7eb"))
    end)

    it("returns nil for unsafe results", function()
        for _, s in ipairs({ "", ".", "..", "%2e", "%2E%2e", "a%2fb", "%00", "a%", "%4" }) do
            assert.is_nil(sandbox_path.decode_segment(s), "expected nil for " .. s)
        end
    end)
end)

describe("router.handle", function()
    before_each(function()
        testkit.clear_routes()
    end)

    after_each(function()
        testkit.clear_routes()
    end)

    local function handle(target, method)
        local req = testkit.request{ method = method or "GET", target = target }
        router.handle(req)
        return req
    end

    it("answers 404 with the decoded path for an unknown sandbox", function()
        local req = handle("/user/sb/x?y=1")
        assert.are.equal("respond", req:decision())
        assert.is_nil(req.forwarded)
        assert.are.equal(404, req.response.status)
        assert.are.equal("application/json", req.response.headers["Content-Type"])
        assert.are.same({ error = "sandbox not found", path = "user/sb" }, req.response.json)
        assert.is_nil(req.response.headers["Retry-After"])
    end)

    it("uses the decoded segments in the 404 path", function()
        local req = handle("/al%69ce/s%62")
        assert.are.equal(404, req.response.status)
        assert.are.same({ error = "sandbox not found", path = "alice/sb" }, req.response.json)
    end)

    it("answers 400 with the expected form when the path has no user/sandbox", function()
        for _, t in ipairs({ "/", "/alice", "/alice/", "//sb/x", "/a%2Fb/sb", "/a/..", "/a%00/b" }) do
            local req = handle(t)
            assert.are.equal(400, req.response.status, t)
            assert.are.equal("application/json", req.response.headers["Content-Type"])
            assert.are.same({ error = "bad request path",
                expected = "/{user}/{sandbox}/{path} or /{user}/{sandbox}:{port}/{path}" },
                req.response.json, t)
            assert.is_nil(req.forwarded)
        end
    end)

    it("answers 503 with the reason and Retry-After 2 when the sandbox is not ready", function()
        testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7", ready = false,
            reason = "SandboxSuspended", mode = "Suspended" } }
        local req = handle("/alice/sb/execute", "POST")
        assert.are.equal(503, req.response.status)
        assert.are.same({ error = "sandbox not ready", path = "alice/sb",
            reason = "SandboxSuspended" }, req.response.json)
        assert.are.equal("2", req.response.headers["Retry-After"])
        assert.is_nil(req.forwarded)
        assert.is_nil(req.ctx.route)
    end)

    it("answers 503 not ready with the default reason from the route", function()
        testkit.set_routes{ ["bob/starting"] = { ready = false } }
        local req = handle("/bob/starting")
        assert.are.equal(503, req.response.status)
        assert.are.same({ error = "sandbox not ready", path = "bob/starting",
            reason = "DependenciesNotReady" }, req.response.json)
        assert.are.equal("2", req.response.headers["Retry-After"])
    end)

    it("answers 503 when the sandbox is ready but has no address", function()
        testkit.set_routes{ ["alice/sb"] = { ready = true } }
        local req = handle("/alice/sb/")
        assert.are.equal(503, req.response.status)
        assert.are.same({ error = "sandbox has no address", path = "alice/sb",
            reason = "DependenciesReady" }, req.response.json)
        assert.are.equal("2", req.response.headers["Retry-After"])
        assert.is_nil(req.forwarded)
    end)

    it("says why a ready sandbox has no address (a refused pod IP)", function()
        testkit.set_routes{ ["alice/sb"] = { ready = true,
            reason = "status.podIPs[0] is not an IP address: evil.example.com" } }
        local req = handle("/alice/sb/")
        assert.are.equal(503, req.response.status)
        assert.are.same({ error = "sandbox has no address", path = "alice/sb",
            reason = "status.podIPs[0] is not an IP address: evil.example.com" },
            req.response.json)
        assert.is_nil(req.forwarded)
    end)

    it("answers 503 when the sandbox is ready but its port is 0", function()
        testkit.set_routes{ ["alice/sb"] = { ready = true, address = "10.0.0.7", port = 0 } }
        local req = handle("/alice/sb/")
        assert.are.equal(503, req.response.status)
        assert.are.same({ error = "sandbox has no address", path = "alice/sb",
            reason = "DependenciesReady" }, req.response.json)
        assert.are.equal("2", req.response.headers["Retry-After"])
    end)

    it("forwards to the route's address and port with the rest and query", function()
        testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7", port = 9000 } }
        local req = handle("/alice/sb/files/a%2Fb?x=1&y=%2F")
        assert.are.equal("forward", req:decision())
        assert.is_nil(req.response)
        assert.are.equal("10.0.0.7", req.forwarded.host)
        assert.are.equal(9000, req.forwarded.port)
        assert.are.equal("/files/a%2Fb?x=1&y=%2F", req.forwarded.path)
        -- strip mode (the default): the prefix goes along, and comes back in the response
        assert.are.same({}, req.forwarded.set_headers)
        assert.are.same({ { "X-Forwarded-Prefix", "/alice/sb" } }, req.forwarded.add_headers)
        assert.are.equal("/alice/sb", req.response_prefix)
        assert.are.same({}, req.forwarded.removed_headers)
    end)

    it("forwards / and /?query for the bare sandbox path", function()
        testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7" } }
        local req = handle("/alice/sb")
        assert.are.equal("/", req.forwarded.path)
        assert.are.equal(8888, req.forwarded.port)
        req = handle("/alice/sb?token=abc")
        assert.are.equal("/?token=abc", req.forwarded.path)
        req = handle("/alice/sb?")
        assert.are.equal("/?", req.forwarded.path)
    end)

    it("finds a route through percent-encoded segments", function()
        testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7", port = 8888 } }
        local req = handle("/al%69ce/sb/x")
        assert.are.equal("10.0.0.7", req.forwarded.host)
        assert.are.equal("/x", req.forwarded.path)
    end)

    it("forwards to a DNS name address (serviceFQDN) as is", function()
        testkit.set_routes{ ["alice/my-sandbox"] = {
            address = "my-sandbox.default.svc.cluster.local", port = 8888 } }
        local req = handle("/alice/my-sandbox/list/tmp")
        assert.are.equal("my-sandbox.default.svc.cluster.local", req.forwarded.host)
        assert.are.equal(8888, req.forwarded.port)
        assert.are.equal("/list/tmp", req.forwarded.path)
    end)

    it("sets req.ctx.route to the route it forwarded to", function()
        testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7", port = 9000,
            namespace = "team-a" } }
        local req = handle("/alice/sb/x")
        local r = req.ctx.route
        assert.is_table(r)
        assert.are.equal("alice/sb", r.key)
        assert.are.equal("10.0.0.7", r.address)
        assert.are.equal(9000, r.port)
        assert.are.equal("team-a", r.namespace)
        assert.are.equal("sb", r.name)
        assert.are.equal("alice", r.user)
        assert.is_true(r.ready)
    end)

    it("picks the right one among several routes", function()
        testkit.set_routes{
            ["alice/sb"] = { address = "10.0.0.1", port = 8001 },
            ["alice/sb2"] = { address = "10.0.0.2", port = 8002 },
            ["bob/sb"] = { address = "10.0.0.3", port = 8003 },
        }
        local req = handle("/bob/sb/z")
        assert.are.equal("10.0.0.3", req.forwarded.host)
        assert.are.equal(8003, req.forwarded.port)
        req = handle("/alice/sb2")
        assert.are.equal("10.0.0.2", req.forwarded.host)
        req = handle("/alice/sb3")
        assert.are.equal(404, req.response.status)
    end)

    it("sees route changes made through sp.routes immediately", function()
        testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7" } }
        assert.are.equal("forward", handle("/alice/sb/"):decision())
        routes.delete("alice/sb")
        assert.are.equal(404, handle("/alice/sb/").response.status)
    end)

    it("works for every method (the method is not part of the mapping)", function()
        testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7" } }
        for _, m in ipairs({ "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD" }) do
            local req = handle("/alice/sb/upload", m)
            assert.are.equal("/upload", req.forwarded.path, m)
        end
    end)
end)

describe("router.handle with auth.lua on", function()
    local saved_auth, r, auth
    local keys_path = os.tmpname()

    setup(function()
        local f = assert(io.open(keys_path, "wb"))
        f:write('{"keys":[]}')
        f:close()
        saved_auth = package.loaded.auth
        auth = testkit.load("auth", "auth", { keys_file = keys_path })
        package.loaded.auth = auth
        r = testkit.load("router", "router", nil)
    end)

    teardown(function()
        package.loaded.auth = saved_auth
        os.remove(keys_path)
        testkit.clear_routes()
    end)

    before_each(function()
        testkit.set_routes{
            ["alice/sb"] = { address = "10.0.0.1" },
            ["alice2/sb"] = { address = "10.0.0.2" },
            ["ALICE/sb"] = { address = "10.0.0.3" },
            ["alice /sb"] = { address = "10.0.0.4" },
            ["al/sb"] = { address = "10.0.0.5" },
            ["default/pool"] = { address = "10.0.0.6", user = false },
            ["default/mine"] = { address = "10.0.0.7" },
            ["bob/sleepy"] = { address = "10.0.0.8", ready = false },
        }
    end)

    local function as(user, target, admin)
        local req = testkit.request{ target = target }
        req.ctx.identity = user and { user = user, admin = admin == true }
        r.handle(req)
        return req
    end

    it("uses the auth module it was given", function()
        assert.is_true(auth.enabled)
        assert.are.equal("10.0.0.1", as("alice", "/alice/sb/x").forwarded.host)
    end)

    it("never lets related user names stand for each other (403, nothing forwarded)", function()
        local cases = {
            { "alice", "/alice2/sb/x" }, { "alice", "/ALICE/sb/x" }, { "alice", "/%41LICE/sb/x" },
            { "alice", "/alice%20/sb/x" }, { "alice", "/al/sb/x" }, { "alice2", "/alice/sb/x" },
            { "alice2", "/al%69ce/sb/x" }, { "ALICE", "/alice/sb/x" }, { "alice ", "/alice/sb/x" },
            { "al", "/alice/sb/x" },
            -- no route: still 403 (not 404), so names cannot be probed
            { "alice", "/alice2/ghost/x" }, { "alice", "/Alice/ghost/x" }, { "alice2", "/alice/ghost" },
        }
        for _, c in ipairs(cases) do
            local req = as(c[1], c[2])
            assert.is_nil(req.forwarded, c[1] .. " -> " .. c[2])
            assert.are.equal(403, req.response.status, c[1] .. " -> " .. c[2])
        end
        assert.are.equal("10.0.0.1", as("alice", "/al%69ce/sb/x").forwarded.host)
        assert.are.equal(404, as("alice", "/alice/ghost/x").response.status)
    end)

    it("answers 403 before revealing another user's sandbox state", function()
        local req = as("alice", "/bob/sleepy/x")
        assert.are.equal(403, req.response.status)
        assert.are.equal("bob/sleepy", req.response.json.path)
        assert.are.equal(503, as("bob", "/bob/sleepy/x").response.status)
    end)

    it("keeps an unowned sandbox for admins, not for a user named default", function()
        local req = as("default", "/default/pool/x")
        assert.are.equal(403, req.response.status)
        assert.are.equal("forbidden: this sandbox has no owner (admins only)", req.response.json.error)
        assert.is_nil(req.forwarded)
        assert.are.equal("10.0.0.6", as("ops", "/default/pool/x", true).forwarded.host)
        assert.are.equal("10.0.0.7", as("default", "/default/mine/x").forwarded.host)
        assert.are.equal(403, as(nil, "/default/pool/x").response.status)
    end)
end)
