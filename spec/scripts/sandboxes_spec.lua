-- sandboxes.lua: GET /sandboxes lists the real route table, sorted by path, in pages
-- (limit, continue); a caller's walk costs what it may see, not the table's size.
local testkit = require "sp.testkit"
local cjson = require "cjson"
local sandboxes = require "sandboxes"

local handler = sandboxes.endpoints["/sandboxes"]

local EMPTY = '{"count":0,"sandboxes":[],"metadata":{}}'

local function get(method, query)
    local req = testkit.request{ method = method or "GET",
        target = "/sandboxes" .. (query and ("?" .. query) or "") }
    handler(req)
    return req
end

-- n routes "u<i % users>/sb<i>" written straight to the table (fast: no testkit defaults).
local function fill(n, users, from)
    local routes = require "sp.routes"
    for i = from or 1, (from or 1) + n - 1 do
        local u = "u" .. (i % users)
        routes.set(u .. "/sb" .. i, { namespace = "default", name = "sb" .. i, user = u,
            address = "10.0.0.1", port = 8888, ready = true, reason = "DependenciesReady",
            mode = "Running" })
    end
end

-- Walks every page with `limit`; between pages calls between(page_number). Returns the paths
-- in order and the number of pages.
local function walk(query, between)
    local paths, pages, token = {}, 0, nil
    repeat
        local q = query
        if token then
            q = (q and (q .. "&") or "") .. "continue=" .. token
        end
        local req = get("GET", q)
        assert.are.equal(200, req.response.status, req.response.body)
        local b = req.response.json
        pages = pages + 1
        assert.are.equal(#b.sandboxes, b.count)
        for _, e in ipairs(b.sandboxes) do
            paths[#paths + 1] = e.path
        end
        token = b.metadata.continue
        if token and between then
            between(pages)
        end
        assert(pages < 10000, "the walk does not end")
    until not token
    return paths, pages
end

local function sorted_keys()
    local out = {}
    for _, r in ipairs(require("sp.routes").list()) do
        out[#out + 1] = r.key
    end
    return out
end

describe("sandboxes listing", function()
    before_each(function()
        testkit.clear_routes()
    end)

    after_each(function()
        testkit.clear_routes()
    end)

    it("serves exactly /sandboxes", function()
        local paths = {}
        for p in pairs(sandboxes.endpoints) do
            paths[#paths + 1] = p
        end
        assert.are.same({ "/sandboxes" }, paths)
        assert.is_function(handler)
    end)

    it("answers an empty table with exactly {\"count\":0,\"sandboxes\":[],\"metadata\":{}}", function()
        local req = get()
        assert.are.equal(200, req.response.status)
        assert.are.equal(EMPTY, req.response.body)
        assert.are.equal("application/json", req.response.headers["Content-Type"])
        assert.are.equal(0, req.response.json.count)
    end)

    it("shows an unowned sandbox's user as null", function()
        testkit.set_routes{ ["default/pool"] = { address = "10.0.0.1", user = false },
            ["default/mine"] = { address = "10.0.0.2" } }
        local b = get().response.json
        assert.are.equal("default/mine", b.sandboxes[1].path)
        assert.are.equal("default", b.sandboxes[1].user)
        assert.are.equal("default/pool", b.sandboxes[2].path)
        assert.are.equal(cjson.null, b.sandboxes[2].user)
    end)

    it("lists every route sorted by path with its fields", function()
        testkit.set_routes{
            ["bob/nightly"] = { namespace = "team-b", ready = false, reason = "SandboxSuspended",
                mode = "Suspended" },
            ["alice/my-sandbox"] = { address = "10.8.1.23", port = 8888,
                service = "my-sandbox.default.svc.cluster.local" },
            ["alice-x/a"] = { address = "10.0.0.9", port = 9000,
                conflict = "also in namespace b; serving default" },
            ["alice/fresh"] = { ready = false },
        }
        local req = get()
        assert.are.equal(200, req.response.status)
        assert.are.equal("application/json", req.response.headers["Content-Type"])
        local b = req.response.json
        assert.are.equal(4, b.count)
        assert.are.equal(4, #b.sandboxes)
        local paths = {}
        for i, s in ipairs(b.sandboxes) do
            paths[i] = s.path
        end
        -- byte order: '-' (0x2d) sorts before '/' (0x2f)
        assert.are.same({ "alice-x/a", "alice/fresh", "alice/my-sandbox", "bob/nightly" }, paths)

        assert.are.same({
            path = "alice-x/a", namespace = "default", name = "a", user = "alice-x",
            service = cjson.null, address = "10.0.0.9", port = 9000, ready = true, claim = cjson.null,
            reason = "DependenciesReady", mode = "Running",
            conflict = "also in namespace b; serving default",
        }, b.sandboxes[1])
        assert.are.same({
            path = "alice/fresh", namespace = "default", name = "fresh", user = "alice",
            service = cjson.null, address = cjson.null, port = 8888, ready = false,
            reason = "DependenciesNotReady", mode = "Running", claim = cjson.null,
        }, b.sandboxes[2])
        assert.are.same({
            path = "alice/my-sandbox", namespace = "default", name = "my-sandbox", user = "alice",
            service = "my-sandbox.default.svc.cluster.local", address = "10.8.1.23", port = 8888,
            ready = true, reason = "DependenciesReady", mode = "Running", claim = cjson.null,
        }, b.sandboxes[3])
        assert.are.same({
            path = "bob/nightly", namespace = "team-b", name = "nightly", user = "bob",
            service = cjson.null, address = cjson.null, port = 8888, ready = false,
            reason = "SandboxSuspended", mode = "Suspended", claim = cjson.null,
        }, b.sandboxes[4])
    end)

    it("encodes a single sandbox as a one-element array", function()
        testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.1" } }
        local req = get()
        assert.matches('"sandboxes":%[{', req.response.body)
        assert.are.equal(1, req.response.json.count)
        assert.are.equal("alice/sb", req.response.json.sandboxes[1].path)
    end)

    it("reflects routes written by discovery", function()
        local discovery = require "discovery"
        discovery.reset()
        discovery.upsert(testkit.sandbox("alice", "sb", { ip = "10.1.2.3" }))
        local b = get().response.json
        assert.are.equal(1, b.count)
        assert.are.equal("alice/sb", b.sandboxes[1].path)
        assert.are.equal("10.1.2.3", b.sandboxes[1].address)
        discovery.reset()
        assert.are.equal(EMPTY, get().response.body)
    end)

    it("answers HEAD like GET", function()
        local req = get("HEAD")
        assert.are.equal(200, req.response.status)
        assert.are.equal(EMPTY, req.response.body)
    end)

    for _, m in ipairs({ "POST", "PUT", "DELETE", "PATCH" }) do
        it("answers " .. m .. " with 405 and Allow", function()
            testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.1" } }
            local req = get(m)
            assert.are.equal(405, req.response.status)
            assert.are.equal("GET, HEAD", req.response.headers.Allow)
            assert.are.same({ error = "method not allowed" }, req.response.json)
        end)
    end

    describe("listing(keep)", function()
        before_each(function()
            testkit.set_routes{
                ["alice/a"] = { address = "10.0.0.1" },
                ["alice/b"] = { ready = false },
                ["bob/c"] = { address = "10.0.0.3" },
            }
        end)

        it("returns everything without a filter", function()
            local l = sandboxes.listing()
            assert.are.equal(3, l.count)
            assert.are.equal(3, #l.sandboxes)
        end)

        it("keeps only what keep(route) accepts, in order, with the right count", function()
            local seen = {}
            local l = sandboxes.listing(function(r)
                seen[#seen + 1] = r.key
                return r.ready
            end)
            assert.are.same({ "alice/a", "alice/b", "bob/c" }, seen)
            assert.are.equal(2, l.count)
            assert.are.equal("alice/a", l.sandboxes[1].path)
            assert.are.equal("bob/c", l.sandboxes[2].path)
        end)

        it("filters by user", function()
            local l = sandboxes.listing(function(r) return r.user == "bob" end)
            assert.are.equal(1, l.count)
            assert.are.equal("bob/c", l.sandboxes[1].path)
        end)

        it("answers the exact empty body when the filter keeps nothing", function()
            local req = testkit.request{ target = "/sandboxes" }
            sandboxes.respond(req, sandboxes.listing(function() return false end))
            assert.are.equal(200, req.response.status)
            assert.are.equal('{"count":0,"sandboxes":[]}', req.response.body)
            assert.are.equal("application/json", req.response.headers["Content-Type"])
        end)

        it("answers a filtered listing as JSON", function()
            local req = testkit.request{ target = "/sandboxes" }
            sandboxes.respond(req, sandboxes.listing(function(r) return r.user == "alice" end))
            assert.are.equal(200, req.response.status)
            assert.are.equal("application/json", req.response.headers["Content-Type"])
            assert.are.equal(2, req.response.json.count)
        end)
    end)

    it("entry() maps a route to the listed fields", function()
        local e = sandboxes.entry({ key = "u/n", namespace = "ns", name = "n", user = "u",
            port = 1, ready = false, reason = "PodFailed", mode = "Running" })
        assert.are.same({ path = "u/n", namespace = "ns", name = "n", user = "u",
            service = cjson.null, address = cjson.null, port = 1, ready = false,
            reason = "PodFailed", mode = "Running", claim = cjson.null }, e)
    end)

    it("entry() names the claim of a claimed sandbox and the sandbox of a claim's alias",
        function()
        local e = sandboxes.entry({ key = "u/my-claim", namespace = "ns", name = "pool-x2k4d",
            user = "u", port = 1, ready = true, reason = "DependenciesReady", mode = "Running",
            claim = "my-claim", alias_of = "u/pool-x2k4d" })
        assert.are.equal("my-claim", e.claim)
        assert.are.equal("u/pool-x2k4d", e.alias_of)
        assert.are.equal("pool-x2k4d", e.name)
    end)
end)

describe("sandboxes pages", function()
    before_each(function()
        testkit.clear_routes()
    end)

    after_each(function()
        testkit.clear_routes()
    end)

    it("walk the whole table exactly once, in order, with no duplicates and no misses", function()
        fill(2503, 10)
        local paths, pages = walk("limit=100")
        assert.are.equal(26, pages)
        assert.are.same(sorted_keys(), paths)
        local seen = {}
        for _, p in ipairs(paths) do
            assert.is_nil(seen[p], p)
            seen[p] = true
        end
    end)

    it("end with a page that says nothing follows, also when the table divides evenly", function()
        fill(200, 3)
        local paths, pages = walk("limit=100")
        assert.are.equal(2, pages)
        assert.are.equal(200, #paths)
    end)

    it("list each route present for the whole walk once while routes change between pages", function()
        fill(1000, 7)
        local before = sorted_keys()
        local routes = require "sp.routes"
        local added_ahead, added_behind, deleted_ahead = {}, {}, {}
        local paths = walk("limit=50", function(page)
            -- ahead of the walk: the last keys in order ("u6/sb993" ...); behind: "u0/sb0..."
            local ahead = "zz/new" .. page
            routes.set(ahead, { name = "new" .. page, user = "zz", port = 1, ready = true })
            added_ahead[ahead] = true
            local behind = "a/new" .. page
            routes.set(behind, { name = "new" .. page, user = "a", port = 1, ready = true })
            added_behind[behind] = true
            local gone = before[#before - page + 1]
            routes.delete(gone)
            deleted_ahead[gone] = true
            -- and an update of a key already listed and of one ahead: listed once each
            routes.set(before[1], { name = "x", user = "u0", port = 2, ready = false })
            routes.set(before[#before - 100], { name = "y", user = "u6", port = 2, ready = false })
        end)
        local count = {}
        for _, p in ipairs(paths) do
            count[p] = (count[p] or 0) + 1
            assert.are.equal(1, count[p], "listed twice: " .. p)
        end
        for _, k in ipairs(before) do
            if not deleted_ahead[k] then
                assert.are.equal(1, count[k], "missed: " .. k)
            else
                assert.is_nil(count[k], "deleted before its page but listed: " .. k)
            end
        end
        for k in pairs(added_ahead) do
            assert.are.equal(1, count[k], "added ahead of the walk but missed: " .. k)
        end
        for k in pairs(added_behind) do
            assert.is_nil(count[k], "added behind the walk but listed: " .. k)
        end
    end)

    it("default to default_limit and cap limit at max_limit", function()
        fill(sandboxes.MAX_LIMIT + 300, 5)
        local b = get("GET").response.json
        assert.are.equal(sandboxes.DEFAULT_LIMIT, b.count)
        assert.is_string(b.metadata.continue)
        b = get("GET", "limit=1000000").response.json
        assert.are.equal(sandboxes.MAX_LIMIT, b.count)
        assert.is_string(b.metadata.continue)
        b = get("GET", "limit=1").response.json
        assert.are.equal(1, b.count)
        assert.are.equal(sorted_keys()[1], b.sandboxes[1].path)
    end)

    for _, v in ipairs({ "0", "-1", "abc", "1.5", "", "1e3", "%20" }) do
        it("answer limit=" .. v .. " with 400", function()
            fill(3, 1)
            local req = get("GET", "limit=" .. v)
            assert.are.equal(400, req.response.status)
            assert.are.same({ error = "limit must be a positive integer" }, req.response.json)
        end)
    end

    for _, v in ipairs({ "zz", "abc", "6331", sandboxes.token("k"):gsub("^63", "64"), "%ZZ", "" }) do
        it("answer continue=" .. v .. " with 400", function()
            fill(3, 1)
            local req = get("GET", "continue=" .. v)
            assert.are.equal(400, req.response.status)
            assert.are.same({ error = "invalid continue token" }, req.response.json)
        end)
    end

    it("continue after a token whose key is gone, from the next key in order", function()
        fill(10, 1)
        local keys = sorted_keys()
        require("sp.routes").delete(keys[4])
        local b = get("GET", "limit=2&continue=" .. sandboxes.token(keys[4])).response.json
        assert.are.same({ keys[5], keys[6] }, { b.sandboxes[1].path, b.sandboxes[2].path })
    end)

    describe("for one user (prefix)", function()
        local function user_page(user, query)
            local req = testkit.request{ target = "/sandboxes" .. (query and ("?" .. query) or "") }
            sandboxes.handle(req, function(r) return r.user == user end, user .. "/")
            return req
        end

        it("list only that user's sandboxes", function()
            fill(3000, 10)
            local routes = require "sp.routes"
            routes.set("alice/one", { name = "one", user = "alice", port = 1, ready = true })
            routes.set("alice/two", { name = "two", user = "alice", port = 1, ready = true })
            routes.set("alice-x/b", { name = "b", user = "alice-x", port = 1, ready = true })
            routes.set("alicf/c", { name = "c", user = "alicf", port = 1, ready = true })
            local b = user_page("alice").response.json
            assert.are.equal(2, b.count)
            assert.are.same({ "alice/one", "alice/two" }, { b.sandboxes[1].path, b.sandboxes[2].path })
            assert.is_nil(b.metadata.continue)
            b = user_page("nobody").response.json
            assert.are.equal(0, b.count)
        end)

        it("pages through that user's range only", function()
            fill(1000, 4) -- u0..u3, 250 each
            local paths, token = {}, nil
            repeat
                local b = user_page("u2", "limit=30" .. (token and ("&continue=" .. token) or ""))
                    .response.json
                for _, e in ipairs(b.sandboxes) do
                    assert.are.equal("u2", e.user)
                    paths[#paths + 1] = e.path
                end
                token = b.metadata.continue
            until not token
            assert.are.equal(250, #paths)
        end)

        -- The scaling property, by the work done rather than the time taken: a user's listing
        -- examines O(log n) index entries plus their own, whatever the others own.
        it("does not walk the other users' entries", function()
            local routes = require "sp.routes"
            routes.set("m-user/one", { name = "one", user = "m-user", port = 1, ready = true })
            fill(2000, 50)
            local e0 = sandboxes.stats.examined
            assert.are.equal(1, user_page("m-user").response.json.count)
            local small = sandboxes.stats.examined - e0
            fill(40000, 50, 2001)
            assert.are.equal(42001, routes.count())
            e0 = sandboxes.stats.examined
            assert.are.equal(1, user_page("m-user").response.json.count)
            local big = sandboxes.stats.examined - e0
            -- a skip list search: about 4 x log4(n) comparisons; a walk of the table: n
            assert.is_true(big < 200, "examined " .. big .. " entries of 42,001")
            assert.is_true(big < small + 100, ("examined %d, was %d with 2,001"):format(big, small))
        end)

        it("an admin's page examines about the page, not the table", function()
            fill(20000, 50)
            local e0 = sandboxes.stats.examined
            local b = get("GET", "limit=10").response.json
            assert.are.equal(10, b.count)
            local took = sandboxes.stats.examined - e0
            assert.is_true(took < 200, "examined " .. took .. " entries for a page of 10")
        end)
    end)
end)
