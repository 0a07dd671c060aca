-- discovery.lua: Sandbox objects (as the API server returns them) -> routes in the real shared
-- table; the applied set (upsert/remove/replace_all, key conflicts); the file source.
local testkit = require "sp.testkit"
local routes = require "sp.routes"
local shared = require "sp.shared"
local cjson = require "cjson"
local discovery = require "discovery"

local sp_dict = assert(shared.dict("sp"))

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end

local function fixture(name)
    return cjson.decode(read(SPEC_DIR .. "fixtures/" .. name .. ".json"))
end

local function keys()
    local out = {}
    for _, r in ipairs(routes.list()) do
        out[#out + 1] = r.key
    end
    return out
end

-- A temp file with the given text; removed by cleanup().
local temp_files = {}
local function temp_file(text)
    local path = os.tmpname()
    temp_files[#temp_files + 1] = path
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
    return path
end

local function cleanup()
    for _, p in ipairs(temp_files) do
        os.remove(p)
    end
    temp_files = {}
end

local function list_json(items)
    return cjson.encode({ apiVersion = "agents.x-k8s.io/v1beta1", kind = "SandboxList",
        metadata = { resourceVersion = "1" }, items = items })
end

local function source_state()
    local s = sp_dict:get("source")
    return s and cjson.decode(s)
end

local function reset()
    discovery.reset()
    discovery.default_port = nil
    testkit.clear_routes()
    sp_dict:delete("source")
end

describe("discovery.to_route", function()
    before_each(reset)

    it("maps a ready v1beta1 sandbox with a Service to podIPs[0]", function()
        local r = assert(discovery.to_route(fixture("v1beta1-ready-with-service")))
        assert.are.equal("alice/my-sandbox", r.key)
        assert.are.equal("default", r.namespace)
        assert.are.equal("my-sandbox", r.name)
        assert.are.equal("alice", r.user)
        assert.are.equal("10.8.1.23", r.address)
        assert.are.equal(8888, r.port)
        assert.is_true(r.ready)
        assert.are.equal("DependenciesReady", r.reason)
        assert.are.equal("my-sandbox.default.svc.cluster.local", r.service)
        assert.are.equal("Running", r.mode)
        assert.are.equal("2026-08-20T10:00:00Z", r.created)
        assert.are.equal("agents.x-k8s.io/v1beta1", r.api_version)
    end)

    it("maps a warm-pool sandbox with no Service to its pod IP, service nil", function()
        local r = assert(discovery.to_route(fixture("v1beta1-warm-pool-no-service")))
        assert.are.equal("default/python-pool-x7k2p", r.key) -- no user label
        assert.is_nil(r.user) -- unowned
        assert.are.equal("python-pool-x7k2p", r.name)
        assert.are.equal("10.8.2.41", r.address)
        assert.is_nil(r.service)
        assert.is_true(r.ready)
        assert.are.equal(8888, r.port)
        assert.are.equal("Running", r.mode)
    end)

    it("maps a starting sandbox: not ready, DependenciesNotReady, no address", function()
        local r = assert(discovery.to_route(fixture("v1beta1-starting")))
        assert.are.equal("alice/fresh", r.key)
        assert.is_false(r.ready)
        assert.are.equal("DependenciesNotReady", r.reason)
        assert.is_nil(r.address)
        assert.is_nil(r.service)
        assert.are.equal("Running", r.mode)
    end)

    it("maps a suspended sandbox: not ready, SandboxSuspended, mode Suspended", function()
        local r = assert(discovery.to_route(fixture("v1beta1-suspended")))
        assert.are.equal("bob/nightly", r.key)
        assert.are.equal("team-b", r.namespace)
        assert.is_false(r.ready)
        assert.are.equal("SandboxSuspended", r.reason)
        assert.are.equal("Suspended", r.mode)
        assert.is_nil(r.address)
        assert.is_nil(r.service)
    end)

    it("maps a v1alpha1 object: serviceFQDN address (no podIPs), mode from replicas", function()
        local r = assert(discovery.to_route(fixture("v1alpha1-2025")))
        assert.are.equal("alice/my-sandbox", r.key)
        assert.is_true(r.ready)
        assert.are.equal("my-sandbox.default.svc.cluster.local", r.address)
        assert.are.equal("my-sandbox.default.svc.cluster.local", r.service)
        assert.are.equal("Running", r.mode)
        assert.are.equal(8888, r.port)
        assert.are.equal("agents.x-k8s.io/v1alpha1", r.api_version)
    end)

    it("maps v1alpha1 replicas 0 to Suspended", function()
        local obj = fixture("v1alpha1-2025")
        obj.spec.replicas = 0
        assert.are.equal("Suspended", discovery.to_route(obj).mode)
        obj.spec.replicas = 1
        assert.are.equal("Running", discovery.to_route(obj).mode)
    end)

    it("defaults the mode to Running when the spec says nothing", function()
        local obj = fixture("v1beta1-starting")
        obj.spec.operatingMode = nil
        assert.are.equal("Running", discovery.to_route(obj).mode)
        obj.spec = nil
        assert.are.equal("Running", discovery.to_route(obj).mode)
    end)

    it("uses labels.user for the key and owner, else 'default' and no owner", function()
        local obj = fixture("v1beta1-ready-with-service")
        obj.metadata.labels.user = "carol"
        assert.are.equal("carol/my-sandbox", discovery.to_route(obj).key)
        assert.are.equal("carol", discovery.to_route(obj).user)
        obj.metadata.labels.user = ""
        assert.are.equal("default/my-sandbox", discovery.to_route(obj).key)
        assert.is_nil(discovery.to_route(obj).user)
        obj.metadata.labels.user = cjson.null
        assert.are.equal("default/my-sandbox", discovery.to_route(obj).key)
        assert.is_nil(discovery.to_route(obj).user)
        obj.metadata.labels = nil
        assert.are.equal("default/my-sandbox", discovery.to_route(obj).key)
        -- unowned: not the user literally named "default" (auth.lua: admins only)
        assert.is_nil(discovery.to_route(obj).user)
        obj.metadata.labels = { user = "default" }
        assert.are.equal("default/my-sandbox", discovery.to_route(obj).key)
        assert.are.equal("default", discovery.to_route(obj).user) -- owned by "default"
    end)

    it("defaults the namespace to 'default'", function()
        local obj = fixture("v1beta1-suspended")
        obj.metadata.namespace = nil
        assert.are.equal("default", discovery.to_route(obj).namespace)
    end)

    it("honours the sandbox-proxy.dev/port annotation", function()
        local obj = fixture("v1beta1-ready-with-service")
        obj.metadata.annotations["sandbox-proxy.dev/port"] = "9000"
        assert.are.equal(9000, discovery.to_route(obj).port)
        obj.metadata.annotations["sandbox-proxy.dev/port"] = "1"
        assert.are.equal(1, discovery.to_route(obj).port)
        obj.metadata.annotations["sandbox-proxy.dev/port"] = "65535"
        assert.are.equal(65535, discovery.to_route(obj).port)
    end)

    it("ignores invalid port annotations", function()
        local obj = fixture("v1beta1-ready-with-service")
        for _, bad in ipairs({ "abc", "", "0", "-1", "65536", "80.5", "99999999", "8080abc" }) do
            obj.metadata.annotations["sandbox-proxy.dev/port"] = bad
            assert.are.equal(8888, discovery.to_route(obj).port, "annotation " .. bad)
        end
        obj.metadata.annotations = nil
        assert.are.equal(8888, discovery.to_route(obj).port)
    end)

    it("reads the ports and prefix annotations (browser apps, router.lua)", function()
        local obj = fixture("v1beta1-ready-with-service")
        assert.is_nil(discovery.to_route(obj).ports)
        assert.is_nil(discovery.to_route(obj).prefix)
        obj.metadata.annotations["sandbox-proxy.dev/ports"] = " 3000, 5173 8080,0,65536,x,08 "
        assert.are.equal("3000,5173,8080,8", discovery.to_route(obj).ports)
        obj.metadata.annotations["sandbox-proxy.dev/ports"] = "none"
        assert.is_nil(discovery.to_route(obj).ports)
        for v, want in pairs({ keep = "keep", strip = "strip", KEEP = false, [""] = false }) do
            obj.metadata.annotations["sandbox-proxy.dev/prefix"] = v
            assert.are.equal(want or nil, discovery.to_route(obj).prefix, v)
        end
    end)

    it("uses discovery.default_port when set (demo mode)", function()
        discovery.default_port = 18888
        local obj = fixture("v1beta1-ready-with-service")
        assert.are.equal(18888, discovery.to_route(obj).port)
        obj.metadata.annotations["sandbox-proxy.dev/port"] = "9000"
        assert.are.equal(9000, discovery.to_route(obj).port)
    end)

    it("never invents a <name>.<ns>.svc address", function()
        for _, name in ipairs({ "v1beta1-ready-with-service", "v1beta1-warm-pool-no-service",
            "v1beta1-starting", "v1beta1-suspended" }) do
            local obj = fixture(name)
            obj.status.serviceFQDN = nil
            obj.status.service = nil
            local r = discovery.to_route(obj)
            assert.is_nil(r.service, name)
            if r.address then
                assert.is_nil(r.address:find("svc", 1, true), name)
            end
        end
        -- ready, but neither pod IP nor Service: no address at all
        local warm = fixture("v1beta1-warm-pool-no-service")
        warm.status.podIPs = nil
        assert.is_nil(discovery.to_route(warm).address)
        warm.status.podIPs = {}
        assert.is_nil(discovery.to_route(warm).address)
        warm.status.podIPs = { "" }
        assert.is_nil(discovery.to_route(warm).address)
    end)

    it("uses podIPs only when Ready=True, otherwise serviceFQDN", function()
        local obj = fixture("v1beta1-ready-with-service")
        obj.status.conditions[3].status = "False"
        obj.status.conditions[3].reason = "PodFailed"
        local r = discovery.to_route(obj)
        assert.is_false(r.ready)
        assert.are.equal("PodFailed", r.reason)
        assert.are.equal("my-sandbox.default.svc.cluster.local", r.address)
        obj.status.serviceFQDN = ""
        r = discovery.to_route(obj)
        assert.is_nil(r.address)
        assert.is_nil(r.service)
    end)

    it("refuses a name in podIPs (a pod IP is an IP); a serviceFQDN name stays legit", function()
        for _, bad in ipairs({ "evil.example.com", "localhost", "10.0.0.1.nip.io", "10.0.0.256",
            "[::1]x" }) do
            local obj = fixture("v1beta1-ready-with-service")
            obj.status.podIPs = { bad }
            local r = discovery.to_route(obj)
            assert.is_true(r.ready, bad)
            assert.is_nil(r.address, bad)
            assert.are.equal("status.podIPs[0] is not an IP address: " .. bad, r.reason)
            assert.are.equal(r.reason, r.refused)
        end
        for _, good in ipairs({ "10.8.1.23", "fd00::17", "2001:db8::1" }) do
            local obj = fixture("v1beta1-ready-with-service")
            obj.status.podIPs = { good }
            local r = discovery.to_route(obj)
            assert.are.equal(good, r.address)
            assert.is_nil(r.refused)
            assert.are.equal("DependenciesReady", r.reason)
        end
        -- not ready: the Service name is the address, resolved (and checked) by the core
        local obj = fixture("v1beta1-ready-with-service")
        obj.status.conditions[3].status = "False"
        obj.status.podIPs = { "evil.example.com" }
        local r = discovery.to_route(obj)
        assert.are.equal("my-sandbox.default.svc.cluster.local", r.address)
        assert.is_nil(r.refused)
    end)

    it("takes readiness only from the Ready condition", function()
        local obj = fixture("v1beta1-ready-with-service")
        obj.status.conditions = { { type = "PodScheduled", status = "True", reason = "X" } }
        local r = discovery.to_route(obj)
        assert.is_false(r.ready)
        assert.are.equal("Unknown", r.reason)
        obj.status.conditions = { { type = "Ready", status = "Unknown" } }
        r = discovery.to_route(obj)
        assert.is_false(r.ready)
        assert.are.equal("Unknown", r.reason)
        obj.status = nil
        r = discovery.to_route(obj)
        assert.is_false(r.ready)
        assert.is_nil(r.address)
    end)

    it("tolerates JSON nulls in status and metadata", function()
        local obj = fixture("v1beta1-ready-with-service")
        obj.status.conditions = cjson.null
        obj.status.podIPs = cjson.null
        obj.status.serviceFQDN = cjson.null
        obj.metadata.labels = cjson.null
        obj.metadata.annotations = cjson.null
        local r = assert(discovery.to_route(obj))
        assert.are.equal("default/my-sandbox", r.key)
        assert.is_false(r.ready)
        assert.is_nil(r.address)
        assert.are.equal(8888, r.port)
    end)

    it("returns nil and a reason when metadata.name is missing", function()
        local obj = fixture("v1beta1-ready-with-service")
        obj.metadata.name = nil
        local r, err = discovery.to_route(obj)
        assert.is_nil(r)
        assert.are.equal("metadata.name is missing", err)
        obj.metadata.name = ""
        r, err = discovery.to_route(obj)
        assert.is_nil(r)
        assert.are.equal("metadata.name is missing", err)
        r, err = discovery.to_route({ kind = "Sandbox" })
        assert.is_nil(r)
        assert.are.equal("metadata.name is missing", err)
        r, err = discovery.to_route("x")
        assert.is_nil(r)
        assert.are.equal("not an object", err)
        r, err = discovery.to_route(cjson.null)
        assert.is_nil(r)
        assert.are.equal("not an object", err)
    end)
end)

describe("discovery applied set", function()
    before_each(reset)
    after_each(reset)

    it("upsert publishes the route in the shared table", function()
        assert.is_true(discovery.upsert(fixture("v1beta1-ready-with-service")))
        assert.are.equal(1, routes.count())
        assert.are.equal(1, routes.count_ready())
        local r = routes.get("alice/my-sandbox")
        assert.are.equal("alice/my-sandbox", r.key)
        assert.are.equal("default", r.namespace)
        assert.are.equal("my-sandbox", r.name)
        assert.are.equal("alice", r.user)
        assert.are.equal("10.8.1.23", r.address)
        assert.are.equal(8888, r.port)
        assert.is_true(r.ready)
        assert.are.equal("DependenciesReady", r.reason)
        assert.are.equal("my-sandbox.default.svc.cluster.local", r.service)
        assert.are.equal("Running", r.mode)
        assert.is_nil(r.conflict)
        assert.are.equal("agents.x-k8s.io/v1beta1", r.api_version)
        assert.are.equal("discovery", r.meta)
        assert.are.equal(1, discovery.object_count())
    end)

    it("upsert of a name in podIPs stores no address, the refusal as reason, and logs", function()
        local warn = spy.on(require("sp.log"), "warn")
        local obj = fixture("v1beta1-ready-with-service")
        obj.status.podIPs = { "metadata.google.internal" }
        assert.is_true(discovery.upsert(obj))
        local r = routes.get("alice/my-sandbox")
        assert.is_true(r.ready)
        assert.is_nil(r.address)
        assert.are.equal("status.podIPs[0] is not an IP address: metadata.google.internal",
            r.reason)
        assert.spy(warn).was.called_with("sandbox address refused", { sandbox = "default/my-sandbox",
            path = "alice/my-sandbox",
            reason = "status.podIPs[0] is not an IP address: metadata.google.internal" })
        warn:revert()
    end)

    it("upsert of a not-ready object stores it as not ready, without address", function()
        assert.is_true(discovery.upsert(fixture("v1beta1-suspended")))
        local r = routes.get("bob/nightly")
        assert.is_false(r.ready)
        assert.are.equal("SandboxSuspended", r.reason)
        assert.are.equal("Suspended", r.mode)
        assert.is_nil(r.address)
        assert.are.equal(1, routes.count())
        assert.are.equal(0, routes.count_ready())
    end)

    it("upsert updates in place (MODIFIED)", function()
        local obj = fixture("v1beta1-starting")
        discovery.upsert(obj)
        assert.is_false(routes.get("alice/fresh").ready)
        obj.status.conditions[1].status = "True"
        obj.status.conditions[1].reason = "DependenciesReady"
        obj.status.podIPs = { "10.9.9.9" }
        discovery.upsert(obj)
        local r = routes.get("alice/fresh")
        assert.is_true(r.ready)
        assert.are.equal("10.9.9.9", r.address)
        assert.are.equal(1, routes.count())
        assert.are.equal(1, discovery.object_count())
    end)

    it("upsert rejects an object without a name and changes nothing", function()
        local ok, err = discovery.upsert({ metadata = {} })
        assert.is_nil(ok)
        assert.are.equal("metadata.name is missing", err)
        assert.are.equal(0, routes.count())
    end)

    it("moves the key when the user label changes", function()
        local obj = fixture("v1beta1-ready-with-service")
        discovery.upsert(obj)
        obj.metadata.labels.user = "carol"
        discovery.upsert(obj)
        assert.is_nil(routes.get("alice/my-sandbox"))
        assert.are.equal("10.8.1.23", routes.get("carol/my-sandbox").address)
        assert.are.equal(1, routes.count())
        obj.metadata.labels = nil
        discovery.upsert(obj)
        assert.are.same({ "default/my-sandbox" }, keys())
    end)

    it("remove deletes the route (DELETED with the last state)", function()
        local obj = fixture("v1beta1-ready-with-service")
        discovery.upsert(obj)
        discovery.upsert(fixture("v1beta1-suspended"))
        assert.are.equal(2, routes.count())
        assert.is_true(discovery.remove(obj))
        assert.is_nil(routes.get("alice/my-sandbox"))
        assert.are.same({ "bob/nightly" }, keys())
        assert.are.equal(1, discovery.object_count())
    end)

    it("remove finds the object by namespace/name even if the label changed since", function()
        discovery.upsert(fixture("v1beta1-ready-with-service"))
        assert.is_true(discovery.remove({ metadata = { namespace = "default", name = "my-sandbox" } }))
        assert.are.equal(0, routes.count())
    end)

    it("remove of an unknown object is a no-op; a nameless one is an error", function()
        discovery.upsert(fixture("v1beta1-suspended"))
        assert.is_true(discovery.remove(fixture("v1beta1-starting")))
        assert.are.same({ "bob/nightly" }, keys())
        local ok, err = discovery.remove({ metadata = {} })
        assert.is_nil(ok)
        assert.are.equal("metadata.name is missing", err)
        ok, err = discovery.remove("x")
        assert.is_nil(ok)
        assert.are.equal("metadata.name is missing", err)
    end)

    it("replace_all applies a full list and deletes what vanished", function()
        discovery.upsert(fixture("v1beta1-starting"))
        discovery.upsert(fixture("v1beta1-suspended"))
        local applied, problems, removed = discovery.replace_all({
            fixture("v1beta1-ready-with-service"),
            fixture("v1beta1-warm-pool-no-service"),
            fixture("v1beta1-suspended"),
        })
        assert.are.equal(3, applied)
        assert.are.same({}, problems)
        assert.are.equal(1, removed)
        assert.are.same({ "alice/my-sandbox", "bob/nightly", "default/python-pool-x7k2p" }, keys())
        assert.is_nil(routes.get("alice/fresh"))
        assert.are.equal(3, routes.count())
        assert.are.equal(2, routes.count_ready())
    end)

    it("replace_all with an empty list removes everything", function()
        discovery.upsert(fixture("v1beta1-starting"))
        discovery.upsert(fixture("v1beta1-suspended"))
        local applied, problems, removed = discovery.replace_all({})
        assert.are.equal(0, applied)
        assert.are.same({}, problems)
        assert.are.equal(2, removed)
        assert.are.equal(0, routes.count())
        assert.are.equal(0, discovery.object_count())
    end)

    it("replace_all reports bad items and applies the good ones", function()
        local applied, problems, removed = discovery.replace_all({
            fixture("v1beta1-suspended"),
            { metadata = { namespace = "x" } },
            "junk",
            fixture("v1beta1-starting"),
        })
        assert.are.equal(2, applied)
        assert.are.same({ "item 2: metadata.name is missing", "item 3: not an object" }, problems)
        assert.are.equal(0, removed)
        assert.are.same({ "alice/fresh", "bob/nightly" }, keys())
    end)

    it("replace_all moves a sandbox whose user label changed between lists", function()
        discovery.replace_all({ fixture("v1beta1-ready-with-service") })
        local obj = fixture("v1beta1-ready-with-service")
        obj.metadata.labels.user = "dave"
        local applied, _, removed = discovery.replace_all({ obj })
        assert.are.equal(1, applied)
        assert.are.equal(0, removed)
        assert.are.same({ "dave/my-sandbox" }, keys())
    end)

    describe("key conflicts between namespaces", function()
        local function pair()
            local old = testkit.sandbox("alice", "sb", { namespace = "team-z", ip = "10.0.0.1",
                created = "2026-01-01T00:00:00Z" })
            local new = testkit.sandbox("alice", "sb", { namespace = "team-a", ip = "10.0.0.2",
                created = "2026-06-01T00:00:00Z" })
            return old, new
        end

        it("serves the older one whatever the insertion order", function()
            local old, new = pair()
            discovery.upsert(old)
            discovery.upsert(new)
            local r1 = routes.get("alice/sb")
            reset()
            discovery.upsert(new)
            discovery.upsert(old)
            local r2 = routes.get("alice/sb")
            for _, r in ipairs({ r1, r2 }) do
                assert.are.equal("team-z", r.namespace)
                assert.are.equal("10.0.0.1", r.address)
                assert.are.equal("also in namespace team-a; serving team-z", r.conflict)
            end
            assert.are.equal(1, routes.count())
        end)

        it("breaks a creationTimestamp tie by namespace name", function()
            local a = testkit.sandbox("alice", "sb", { namespace = "ns-b", ip = "10.0.0.2" })
            local b = testkit.sandbox("alice", "sb", { namespace = "ns-a", ip = "10.0.0.1" })
            local c = testkit.sandbox("alice", "sb", { namespace = "ns-c", ip = "10.0.0.3" })
            for _, order in ipairs({ { a, b, c }, { c, b, a }, { b, c, a } }) do
                reset()
                for _, o in ipairs(order) do
                    discovery.upsert(o)
                end
                local r = routes.get("alice/sb")
                assert.are.equal("ns-a", r.namespace)
                assert.are.equal("10.0.0.1", r.address)
                assert.are.equal("also in namespace ns-b, ns-c; serving ns-a", r.conflict)
            end
        end)

        it("serves the other one, conflict cleared, when the winner is removed", function()
            local old, new = pair()
            discovery.upsert(old)
            discovery.upsert(new)
            discovery.remove(old)
            local r = routes.get("alice/sb")
            assert.are.equal("team-a", r.namespace)
            assert.are.equal("10.0.0.2", r.address)
            assert.is_nil(r.conflict)
        end)

        it("clears the conflict when the loser is removed", function()
            local old, new = pair()
            discovery.upsert(old)
            discovery.upsert(new)
            discovery.remove(new)
            local r = routes.get("alice/sb")
            assert.are.equal("team-z", r.namespace)
            assert.is_nil(r.conflict)
            discovery.remove(old)
            assert.is_nil(routes.get("alice/sb"))
            assert.are.equal(0, routes.count())
        end)

        it("clears the conflict when the loser moves to another user", function()
            local old, new = pair()
            discovery.upsert(old)
            discovery.upsert(new)
            new.metadata.labels.user = "bob"
            discovery.upsert(new)
            assert.is_nil(routes.get("alice/sb").conflict)
            assert.are.equal("team-z", routes.get("alice/sb").namespace)
            assert.are.equal("team-a", routes.get("bob/sb").namespace)
        end)

        it("resolves the same way through replace_all, in either order", function()
            local old, new = pair()
            discovery.replace_all({ new, old })
            assert.are.equal("team-z", routes.get("alice/sb").namespace)
            reset()
            discovery.replace_all({ old, new })
            assert.are.equal("team-z", routes.get("alice/sb").namespace)
            assert.are.equal("also in namespace team-a; serving team-z",
                routes.get("alice/sb").conflict)
            discovery.replace_all({ new })
            local r = routes.get("alice/sb")
            assert.are.equal("team-a", r.namespace)
            assert.is_nil(r.conflict)
        end)
    end)

    it("reset forgets everything and deletes its routes", function()
        discovery.upsert(fixture("v1beta1-starting"))
        discovery.upsert(fixture("v1beta1-suspended"))
        discovery.reset()
        assert.are.equal(0, routes.count())
        assert.are.equal(0, discovery.object_count())
    end)
end)

describe("discovery.parse_list", function()
    it("parses a SandboxList", function()
        local items = assert(discovery.parse_list(list_json({ fixture("v1beta1-starting"),
            fixture("v1beta1-suspended") })))
        assert.are.equal(2, #items)
        assert.are.equal("fresh", items[1].metadata.name)
        assert.are.equal("nightly", items[2].metadata.name)
    end)

    it("parses the demo file", function()
        local items = assert(discovery.parse_list(read(SPEC_DIR .. "../../scripts/demo/sandboxes.json")))
        assert.are.equal(2, #items)
    end)

    it("parses an empty SandboxList (items [] or omitted)", function()
        assert.are.same({}, discovery.parse_list('{"kind":"SandboxList","items":[]}'))
        assert.are.same({}, discovery.parse_list('{"kind":"SandboxList","metadata":{}}'))
    end)

    it("parses a bare array of objects", function()
        local items = assert(discovery.parse_list("[" .. cjson.encode(fixture("v1beta1-starting")) .. "]"))
        assert.are.equal(1, #items)
        assert.are.equal("fresh", items[1].metadata.name)
    end)

    -- cjson decodes [] and {} alike: an empty bare array must still mean "no sandboxes"
    it("parses an empty bare array as no sandboxes", function()
        local items, err = discovery.parse_list("[]")
        assert.is_nil(err)
        assert.are.same({}, items)
    end)

    it("rejects invalid JSON", function()
        local items, err = discovery.parse_list('{"items": [')
        assert.is_nil(items)
        assert.matches("^invalid JSON: ", err)
        items, err = discovery.parse_list("")
        assert.is_nil(items)
        assert.matches("^invalid JSON: ", err)
    end)

    it("rejects JSON that is not an object", function()
        for _, text in ipairs({ "null", "42", '"items"', "true" }) do
            local items, err = discovery.parse_list(text)
            assert.is_nil(items, text)
            assert.are.equal("expected a SandboxList object", err, text)
        end
    end)

    it("rejects an object without items", function()
        for _, text in ipairs({ "{}", '{"kind":"Sandbox","metadata":{"name":"x"}}',
            '{"items":null}', '{"items":"x"}', '{"items":5}' }) do
            local items, err = discovery.parse_list(text)
            assert.is_nil(items, text)
            assert.are.equal("expected a SandboxList with an items array", err, text)
        end
    end)
end)

-- The file source reads a file item by item (fs.json_list); it must accept and refuse exactly
-- what parse_list (the whole text decoded at once) does.
describe("discovery.open_list", function()
    after_each(cleanup)

    local function all(path)
        local nextf, err, kind = discovery.open_list(path)
        if not nextf then
            return nil, err, kind
        end
        local out = {}
        while true do
            local obj, why = nextf()
            if obj == nil then
                break
            end
            out[#out + 1] = obj == false and why or obj
        end
        return out
    end

    it("yields the objects of a SandboxList, of a bare array, and none of an empty list", function()
        local a, b = fixture("v1beta1-starting"), fixture("v1beta1-suspended")
        assert.are.same({ a, b }, all(temp_file(list_json({ a, b }))))
        assert.are.same({ a }, all(temp_file("[" .. cjson.encode(a) .. "]")))
        assert.are.same({}, all(temp_file("  []  ")))
        assert.are.same({}, all(temp_file('{"kind":"SandboxList","items":[]}')))
        assert.are.same({}, all(temp_file('{"kind":"SandboxList","metadata":{}}')))
        -- cjson encodes an empty Lua table as {}: parse_list takes it as no items, so must this
        assert.are.same({}, discovery.parse_list('{"kind":"SandboxList","items":{}}'))
        assert.are.same({}, all(temp_file('{"kind":"SandboxList","items":{ }}')))
        assert.are.same({ a }, all(temp_file('{"items":[' .. cjson.encode(a) .. '],"kind":"X"}')))
    end)

    it("refuses what parse_list refuses, with the same messages", function()
        for _, text in ipairs({ '{"items": [', "", "{ this is not json", '[1,]', '{"items":[]} x',
            "null", "42", '"items"', "true", "{}", '{"kind":"Sandbox","metadata":{"name":"x"}}',
            '{"items":null}', '{"items":"x"}', '{"items":5}' }) do
            local _, perr = discovery.parse_list(text)
            assert.is_string(perr, text)
            local items, err, kind = all(temp_file(text))
            assert.is_nil(items, text)
            assert.are.equal("parse", kind, text)
            if perr:match("^invalid JSON") then
                assert.matches("^invalid JSON", err, text)
            else
                assert.are.equal(perr, err, text)
            end
        end
    end)

    it("says a missing file cannot be read", function()
        local missing = os.tmpname()
        os.remove(missing)
        local items, err, kind = all(missing)
        assert.is_nil(items)
        assert.are.equal("read", kind)
        assert.matches("^ENOENT", err)
    end)
end)

describe("discovery.load_file", function()
    before_each(reset)
    after_each(function()
        reset()
        cleanup()
    end)

    it("loads a file, replaces the routes and publishes the source state", function()
        local path = temp_file(list_json({ fixture("v1beta1-ready-with-service"),
            fixture("v1beta1-starting"), fixture("v1beta1-warm-pool-no-service") }))
        assert.are.equal(3, discovery.load_file(path))
        assert.are.same({ "alice/fresh", "alice/my-sandbox", "default/python-pool-x7k2p" }, keys())
        local st = source_state()
        assert.is_table(st)
        assert.is_true(st.synced)
        assert.are.equal("file", st.type)
        assert.are.equal(3, st.items)
        assert.are.equal(0, st.skipped)
        assert.are.equal(path, st.path)
        assert.are.equal(cjson.null, st.error)
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", st.loaded_at)
        assert.are.same(st, cjson.decode(cjson.encode(discovery.state())))
    end)

    it("replaces the whole set on reload: what vanished is deleted", function()
        local path = temp_file(list_json({ fixture("v1beta1-ready-with-service"),
            fixture("v1beta1-starting") }))
        discovery.load_file(path)
        local path2 = temp_file(list_json({ fixture("v1beta1-suspended") }))
        assert.are.equal(1, discovery.load_file(path2))
        assert.are.same({ "bob/nightly" }, keys())
        assert.are.equal(1, source_state().items)
    end)

    it("counts skipped items in the source state", function()
        local path = temp_file(list_json({ fixture("v1beta1-suspended"), { metadata = {} } }))
        assert.are.equal(1, discovery.load_file(path))
        local st = source_state()
        assert.are.equal(1, st.items)
        assert.are.equal(1, st.skipped)
        assert.are.same({ "bob/nightly" }, keys())
    end)

    it("keeps the previous routes when the file is broken", function()
        local good = temp_file(list_json({ fixture("v1beta1-ready-with-service"),
            fixture("v1beta1-suspended") }))
        assert.are.equal(2, discovery.load_file(good))
        for _, text in ipairs({ '{"items": [', "", "{}", "null", '{"items":"x"}' }) do
            local bad = temp_file(text)
            local n, err = discovery.load_file(bad)
            assert.is_nil(n, text)
            assert.is_string(err)
            assert.are.same({ "alice/my-sandbox", "bob/nightly" }, keys())
            local st = source_state()
            assert.is_true(st.synced) -- still serving the last good table
            assert.are.equal(err, st.error)
            assert.is_string(st.error_at)
            assert.are.equal(2, st.items)
        end
    end)

    it("keeps the previous routes when the file cannot be read", function()
        local good = temp_file(list_json({ fixture("v1beta1-suspended") }))
        discovery.load_file(good)
        local missing = os.tmpname()
        os.remove(missing)
        local n, err = discovery.load_file(missing)
        assert.is_nil(n)
        assert.matches("^ENOENT", err)
        assert.are.same({ "bob/nightly" }, keys())
        assert.matches("^ENOENT", source_state().error)
    end)

    it("clears the error in the state after a good load", function()
        local bad = temp_file("{")
        discovery.load_file(bad)
        assert.is_string(source_state().error)
        local good = temp_file(list_json({ fixture("v1beta1-suspended") }))
        discovery.load_file(good)
        assert.are.equal(cjson.null, source_state().error)
        assert.is_true(source_state().synced)
    end)

    it("an empty SandboxList file removes every route", function()
        local good = temp_file(list_json({ fixture("v1beta1-suspended") }))
        discovery.load_file(good)
        local empty = temp_file('{"kind":"SandboxList","items":[]}')
        assert.are.equal(0, discovery.load_file(empty))
        assert.are.equal(0, routes.count())
    end)
end)

describe("discovery.publish_state", function()
    after_each(reset)

    it("merges changes into the state and writes JSON to the shared dict", function()
        discovery.publish_state({ type = "test", synced = false, items = 7 })
        local st = source_state()
        assert.are.equal("test", st.type)
        assert.is_false(st.synced)
        assert.are.equal(7, st.items)
        discovery.publish_state({ synced = true })
        st = source_state()
        assert.is_true(st.synced)
        assert.are.equal("test", st.type)
        assert.are.equal(7, st.items)
    end)
end)

describe("discovery.check", function()
    local core = require "sp.core"
    local real_settings = core.settings

    after_each(function()
        core.settings = real_settings
        reset()
        cleanup()
    end)

    local function with_file(path)
        core.settings = function()
            local s = real_settings()
            s.sandboxes_file = path
            return s
        end
    end

    it("has nothing to say without a sandboxes file (test mode has none)", function()
        assert.is_nil(core.settings().sandboxes_file)
        assert.are.same({}, discovery.check())
    end)

    it("accepts a good file without touching the routes", function()
        with_file(temp_file(list_json({ fixture("v1beta1-suspended") })))
        assert.are.same({}, discovery.check())
        assert.are.equal(0, routes.count())
    end)

    it("reports an unreadable file", function()
        local missing = os.tmpname()
        os.remove(missing)
        with_file(missing)
        local problems = discovery.check()
        assert.are.equal(1, #problems)
        assert.matches("^sandboxes file: ENOENT", problems[1])
    end)

    it("reports a file that is not a SandboxList", function()
        local path = temp_file("{ nope")
        with_file(path)
        local problems = discovery.check()
        assert.are.equal(1, #problems)
        assert.are.equal("sandboxes file " .. path .. ": invalid JSON: ",
            problems[1]:sub(1, #("sandboxes file " .. path .. ": invalid JSON: ")))
    end)

    it("reports each unusable item", function()
        with_file(temp_file(list_json({ fixture("v1beta1-suspended"), { metadata = {} }, 3 })))
        assert.are.same({ "sandboxes file item 2: metadata.name is missing",
            "sandboxes file item 3: not an object" }, discovery.check())
    end)
end)

-- SandboxClaims: the claim controller's objects (../shared/KUBERNETES.md, "agent-sandbox v1.0")
describe("discovery SandboxClaims", function()
    before_each(reset)

    -- A Sandbox the claim controller made or adopted: controller ownerReference to the claim,
    -- claim identity labels, the claim's additionalPodMetadata labels in the pod template.
    local function claimed(name, claim_name, claim_uid, opts)
        opts = opts or {}
        local sb = testkit.sandbox(nil, name, { namespace = opts.namespace, ip = opts.ip })
        sb.metadata.labels = { ["agents.x-k8s.io/claim-uid"] = claim_uid,
            ["agents.x-k8s.io/launch-type"] = opts.launch or "warm" }
        sb.metadata.ownerReferences = { { apiVersion = "extensions.agents.x-k8s.io/v1beta1",
            kind = "SandboxClaim", name = claim_name, uid = claim_uid, controller = true,
            blockOwnerDeletion = true } }
        sb.spec.podTemplate = { metadata = { labels = opts.pod_labels or { app = "python" } } }
        return sb
    end

    local function claim(name, uid, bound, opts)
        opts = opts or {}
        return { apiVersion = "extensions.agents.x-k8s.io/v1beta1", kind = "SandboxClaim",
            metadata = { name = name, namespace = opts.namespace or "default", uid = uid,
                labels = opts.labels, annotations = opts.annotations },
            spec = { warmPoolRef = { name = "pool" } },
            status = bound and { sandbox = { name = bound, podIPs = { "10.0.0.1" } } } or nil }
    end

    it("routes a warm-pool sandbox by its own name and by its claim's name (an alias)", function()
        assert(discovery.upsert(claimed("pool-x2k4d", "my-claim", "u-1",
            { pod_labels = { ["sandbox.users.io/user"] = "alice" } })))
        assert(discovery.claim_upsert(claim("my-claim", "u-1", "pool-x2k4d")))
        assert.are.same({ "alice/my-claim", "alice/pool-x2k4d" }, keys())
        local direct = routes.get("alice/pool-x2k4d")
        assert.are.equal("my-claim", direct.claim)
        assert.is_nil(direct.alias_of)
        local alias = routes.get("alice/my-claim")
        assert.are.equal("pool-x2k4d", alias.name)
        assert.are.equal("alice/pool-x2k4d", alias.alias_of)
        assert.are.equal("10.0.0.1", alias.address)
        assert.are.equal("alice", alias.user)
        -- the name index finds both names in their namespace, from any worker
        assert.are.equal("alice/my-claim", discovery.lookup("default", "my-claim").key)
        assert.are.equal("alice/pool-x2k4d", discovery.lookup("default", "pool-x2k4d").key)
        assert.is_nil(discovery.lookup("other", "my-claim"))
        assert.is_nil(discovery.lookup("default", "nope"))
    end)

    it("takes the owner from the claim's labels when the sandbox carries none", function()
        assert(discovery.claim_upsert(claim("c", "u-2", "pool-aaaaa",
            { labels = { ["sandbox.users.io/user"] = "bob" } })))
        assert(discovery.upsert(claimed("pool-aaaaa", "c", "u-2")))
        assert.are.same({ "bob/c", "bob/pool-aaaaa" }, keys())
        -- the claim goes away: the sandbox is unowned again, the alias gone
        assert(discovery.claim_remove(claim("c", "u-2")))
        assert.are.same({ "default/pool-aaaaa" }, keys())
        assert.is_nil(routes.get("default/pool-aaaaa").user)
        assert.is_nil(routes.get("default/pool-aaaaa").claim)
        assert.is_nil(discovery.lookup("default", "c"))
    end)

    it("a cold claim's sandbox has the claim's name: one route, no alias", function()
        assert(discovery.upsert(claimed("cold", "cold", "u-3", { launch = "cold",
            pod_labels = { ["sandbox.users.io/user"] = "carol" } })))
        assert(discovery.claim_upsert(claim("cold", "u-3", "cold")))
        assert.are.same({ "carol/cold" }, keys())
        assert.are.equal("cold", routes.get("carol/cold").claim)
        assert.are.equal("carol/cold", discovery.lookup("default", "cold").key)
    end)

    it("never aliases a sandbox its controller reference does not give to the claim", function()
        -- a claim annotated with someone else's sandbox: the annotation alone proves nothing
        assert(discovery.upsert(testkit.sandbox("victim", "their-sandbox")))
        assert(discovery.claim_upsert(claim("mine", "u-4", nil, {
            labels = { ["sandbox.users.io/user"] = "mallory" },
            annotations = { ["agents.x-k8s.io/sandbox-name"] = "their-sandbox" } })))
        assert.are.same({ "victim/their-sandbox" }, keys())
        assert.is_nil(routes.get("victim/their-sandbox").claim)
        -- a claim of the same name but another uid (deleted and re-created) does not bind either
        assert(discovery.upsert(claimed("pool-bbbbb", "c2", "old-uid",
            { pod_labels = { ["sandbox.users.io/user"] = "dan" } })))
        assert(discovery.claim_upsert(claim("c2", "new-uid", "pool-bbbbb")))
        assert.is_nil(routes.get("dan/c2"))
        assert.is_nil(routes.get("dan/pool-bbbbb").claim)
    end)

    it("a direct sandbox name wins over a claim's alias of the same key", function()
        assert(discovery.upsert(testkit.sandbox("erin", "shared", { ip = "10.9.9.9" })))
        assert(discovery.upsert(claimed("pool-ccccc", "shared", "u-5",
            { pod_labels = { ["sandbox.users.io/user"] = "erin" } })))
        assert(discovery.claim_upsert(claim("shared", "u-5", "pool-ccccc")))
        assert.are.equal("10.9.9.9", routes.get("erin/shared").address)
        assert.is_nil(routes.get("erin/shared").alias_of)
        -- the sandbox named "shared" goes: the alias takes the key over
        assert(discovery.remove(testkit.sandbox("erin", "shared")))
        assert.are.equal("erin/pool-ccccc", routes.get("erin/shared").alias_of)
        assert.are.equal("erin/shared", discovery.lookup("default", "shared").key)
    end)

    it("follows the sandbox: changes reach the alias, deletion removes both", function()
        assert(discovery.claim_upsert(claim("c3", "u-6", "pool-ddddd")))
        local sb = claimed("pool-ddddd", "c3", "u-6",
            { pod_labels = { ["sandbox.users.io/user"] = "fay" } })
        sb.status.conditions[1].status = "False"
        sb.status.conditions[1].reason = "DependenciesNotReady"
        assert(discovery.upsert(sb))
        assert.is_false(routes.get("fay/c3").ready)
        sb.status.conditions[1].status = "True"
        sb.status.conditions[1].reason = "DependenciesReady"
        assert(discovery.upsert(sb))
        assert.is_true(routes.get("fay/c3").ready)
        assert(discovery.remove(sb))
        assert.are.same({}, keys())
        assert.is_nil(discovery.lookup("default", "c3"))
        assert.is_nil(discovery.lookup("default", "pool-ddddd"))
    end)

    it("reads the bound name from the annotation until the status has it", function()
        assert(discovery.upsert(claimed("pool-eeeee", "c4", "u-7",
            { pod_labels = { ["sandbox.users.io/user"] = "gus" } })))
        assert(discovery.claim_upsert(claim("c4", "u-7", nil,
            { annotations = { ["agents.x-k8s.io/sandbox-name"] = "pool-eeeee" } })))
        assert.are.equal("gus/pool-eeeee", routes.get("gus/c4").alias_of)
    end)
end)
