-- The Kubernetes source against the project's API server stand-in (a separate process on
-- loopback): paginated LIST then WATCH, routes following ADDED/MODIFIED/DELETED, resuming a
-- dropped watch from the last resourceVersion without a relist, a relist after compaction that
-- removes what was deleted meanwhile, serving the last good routes while the API server is
-- down, token rotation, 403 with a slow backoff, v1alpha1-only clusters, events split byte by
-- byte, and readiness.
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local process = require "spec.helpers.process"
local cjson = require "cjson"

local function status_of(px, path)
    local r = px:get(path)
    return r and r.status
end

local function wait_status(px, path, want, timeout)
    return H.net.wait_until(function()
        return status_of(px, path) == want
    end, timeout or 10, 0.01, path .. " -> " .. want)
end

describe("kubernetes source", function()
    local up

    setup(function()
        up = H.upstream{ name = "k8s" }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("lists 1,000 sandboxes in pages, then routes them", function()
        local api = K.start{}
        api:bulk{ count = 1000, namespace = "default", user_label_prefix = "u", ready = true,
            pod_ip = "127.0.0.1" }
        -- the bulk objects use port 8888: point them at the fixture with the port annotation
        local px = api:proxy{ set = { kube_page_size = 100 }, config = "return { discovery = { port = "
            .. up.port .. " } }" }
        local h = px:json("/health")
        assert.are.equal(1000, h.sandboxes)
        assert.are.equal("kubernetes", h.source.type)
        assert.is_true(h.source.synced)
        local lists = api:log_of("list")
        assert.is_true(#lists >= 10, "expected 10 pages, saw " .. #lists)
        for _, e in ipairs(lists) do
            assert.matches("limit=100", e.query)
        end
        assert.are.equal(200, status_of(px, "/u00000/sb-00000/echo"))
        assert.are.equal(200, status_of(px, "/u00999/sb-00999/echo"))
        assert.are.equal(404, status_of(px, "/u01000/sb-01000/echo"))
        -- the watch started from the list's resourceVersion
        local watches = api:log_of("watch")
        assert.is_true(#watches >= 1)
        local q = watches[1].query
        assert.matches("allowWatchBookmarks=true", q)
        assert.matches("resourceVersion=" .. h.source.resource_version, q, 1, true)
        assert.matches("timeoutSeconds=%d+", q)
    end)

    it("follows ADDED, MODIFIED (not ready -> ready) and DELETED within moments", function()
        local api = K.start{}
        local px = api:proxy{}
        assert.are.equal(404, status_of(px, "/alice/sb/echo"))
        api:put(H.sandbox("alice", "sb", up.port, { ready = false }))
        wait_status(px, "/alice/sb/echo", 503)
        api:put(H.sandbox("alice", "sb", up.port))
        wait_status(px, "/alice/sb/echo", 200)
        api:delete("default", "sb")
        wait_status(px, "/alice/sb/echo", 404)
        -- /health publishes the watch state about once a second
        local h = H.net.wait_until(function()
            local doc = px:json("/health")
            return doc.source.events >= 3 and doc
        end, 5)
        assert.are.equal(1, h.source.lists)
    end)

    it("resumes a dropped watch from the last resourceVersion without relisting", function()
        local api = K.start{}
        api:put(H.sandbox("alice", "a", up.port))
        local px = api:proxy{}
        api:put(H.sandbox("alice", "b", up.port))
        wait_status(px, "/alice/b/echo", 200)
        local rv_before = px:json("/health").source.resource_version
        api:reset_stats()
        api:drop_watches()
        api:put(H.sandbox("alice", "c", up.port))
        wait_status(px, "/alice/c/echo", 200)
        local st = api:stats()
        assert.are.equal(0, st.requests.list, "a dropped watch must not cause a relist")
        local watches = api:log_of("watch")
        assert.is_true(#watches >= 1)
        -- the resumed watch starts at or after the last RV the proxy had seen
        local rv = tonumber(watches[1].query:match("resourceVersion=(%d+)"))
        assert.is_true(rv >= tonumber(rv_before))
    end)

    it("watches again after a clean end of the stream, without relisting", function()
        local api = K.start{}
        local px = api:proxy{}
        api:reset_stats()
        api:end_watches()
        api:put(H.sandbox("bob", "x", up.port))
        wait_status(px, "/bob/x/echo", 200)
        assert.are.equal(0, api:stats().requests.list)
    end)

    it("relists after compaction and drops a sandbox deleted meanwhile", function()
        local api = K.start{}
        api:put_all{ H.sandbox("alice", "stay", up.port), H.sandbox("alice", "gone", up.port) }
        local px = api:proxy{}
        assert.are.equal(200, status_of(px, "/alice/gone/echo"))
        -- an outage: watches fail, meanwhile a sandbox is deleted and history is compacted
        api:faults{ status = 503, count = -1, paths = "watch" }
        api:drop_watches()
        api:delete("default", "gone")
        api:put(H.sandbox("alice", "new", up.port))
        api:compact()
        assert.are.equal(200, status_of(px, "/alice/gone/echo"), "last good routes keep serving")
        api:clear_faults()
        wait_status(px, "/alice/gone/echo", 404, 40)
        wait_status(px, "/alice/new/echo", 200, 10)
        assert.are.equal(200, status_of(px, "/alice/stay/echo"))
        local h = px:json("/health")
        assert.is_true(h.source.relists >= 1)
    end)

    it("relists on an HTTP 410 answer too", function()
        local api = K.start{}
        api:put(H.sandbox("alice", "a", up.port))
        local px = api:proxy{}
        api:faults{ watch_410_http = true, count = -1 }
        api:faults{ status = 503, count = -1, paths = "watch" }
        api:drop_watches()
        api:delete("default", "a")
        api:compact()
        api:clear_faults()
        api:faults{ watch_410_http = true, count = -1 }
        wait_status(px, "/alice/a/echo", 404, 40)
        assert.is_true(px:json("/health").source.relists >= 1)
    end)

    it("keeps serving while the API server does not answer, then catches up", function()
        local api = K.start{}
        api:put(H.sandbox("carol", "one", up.port))
        local px = api:proxy{}
        -- an outage: the API server accepts connections and never answers
        api:faults{ blackhole = true, count = -1 }
        api:drop_watches()
        api:put(H.sandbox("carol", "two", up.port))
        api:delete("default", "one")
        assert.are.equal(200, status_of(px, "/carol/one/echo"), "last good routes keep serving")
        assert.are.equal(404, status_of(px, "/carol/two/echo"))
        assert.are.equal(200, status_of(px, "/ready"))
        api:clear_faults()
        wait_status(px, "/carol/two/echo", 200, 60)
        wait_status(px, "/carol/one/echo", 404, 10)
    end)

    it("keeps serving while the API server is gone, and relists when a new one is behind", function()
        local api = K.start{}
        api:put(H.sandbox("carol", "one", up.port))
        local px = api:proxy{}
        local port = api.port
        api:stop()
        px:wait_log(function(l) return l.msg == "Kubernetes API error" end, 20)
        assert.are.equal(200, status_of(px, "/carol/one/echo"))
        assert.are.equal(200, status_of(px, "/ready"))
        -- a fresh API server on the same port (a restored etcd): its resourceVersions are
        -- behind ours, so the proxy must relist rather than wait for them forever
        local api2 = K.start{ listen_port = port, start_rv = 10 }
        api2:put(H.sandbox("carol", "two", up.port))
        wait_status(px, "/carol/two/echo", 200, 60)
        wait_status(px, "/carol/one/echo", 404, 10)
    end)

    it("re-reads a rotated token and retries a 401", function()
        local dir = H.tmpdir()
        local tok = dir .. "/token"
        assert(process.write_file(tok, "first-token\n"))
        local api = K.start{ token_file = tok }
        api:put(H.sandbox("dave", "a", up.port))
        local px = api:proxy{ token_file = tok }
        assert.are.equal(200, status_of(px, "/dave/a/echo"))
        -- rotate: the server accepts only the new token from now on
        assert(process.write_file(tok .. ".new", "second-token\n"))
        assert(os.rename(tok .. ".new", tok))
        api:drop_watches()
        api:put(H.sandbox("dave", "b", up.port))
        wait_status(px, "/dave/b/echo", 200, 20)
        local seen = api:stats().last_tokens
        assert.are.equal("second-token", seen[#seen])
    end)

    it("logs a clear error on 403 and backs off slowly", function()
        local api = K.start{}
        api:faults{ forbidden = true, count = -1 }
        local px = api:proxy{ wait = false }
        px:wait_log(function(l)
            return l.level == "error" and tostring(l.error or l.msg):find("forbids", 1, true)
        end, 20)
        local r = px:get("/ready")
        assert.are.equal(503, r and r.status)
        -- no tight loop: over two seconds only a couple of attempts
        local before = api:stats().requests
        require("socket").sleep(2) -- the measurement window itself
        local after = api:stats().requests
        local n = (after.list - before.list) + (after.discovery - before.discovery)
        assert.is_true(n <= 2, n .. " requests in 2 s while forbidden")
        api:clear_faults()
    end)

    it("works against a v1alpha1-only server", function()
        local api = K.start{ versions = "v1alpha1" }
        local obj = H.sandbox("erin", "old", nil)
        obj.apiVersion = "agents.x-k8s.io/v1alpha1"
        obj.spec = { replicas = 1 }
        obj.status.podIPs = nil
        obj.status.serviceFQDN = "127.0.0.1"
        obj.metadata.annotations = { ["sandbox-proxy.dev/port"] = tostring(up.port) }
        api:put(obj)
        local px = api:proxy{}
        assert.are.equal(200, status_of(px, "/erin/old/echo"))
        assert.are.equal("agents.x-k8s.io/v1alpha1", px:json("/health").source.api_version)
        for _, e in ipairs(api:log_of("list")) do
            assert.matches("/v1alpha1/", e.path, 1, true)
        end
    end)

    it("frames events split byte by byte across chunks", function()
        local api = K.start{}
        local px = api:proxy{}
        api:faults{ chunk_mode = "byte", count = -1 }
        api:drop_watches()
        api:put(H.sandbox("frank", "bytes", up.port))
        wait_status(px, "/frank/bytes/echo", 200, 20)
        api:put(H.sandbox("frank", "bytes", up.port, { ready = false }))
        wait_status(px, "/frank/bytes/echo", 503, 20)
    end)

    it("answers /ready 503 until the first list is applied, then 200", function()
        local api = K.start{}
        api:faults{ status = 500, count = 3, paths = "list", retry_after = 1 }
        local px = api:proxy{ wait = false }
        H.net.wait_until(function()
            local r = px:get("/ready")
            return r and r.status == 503
        end, 10)
        wait_status(px, "/ready", 200, 30)
        assert.are.equal(200, status_of(px, "/live"))
    end)
end)
