-- SandboxClaims against the API stand-in's claim controller (spec/fixtures/kube_apiserver.py):
-- a warm-pool claim reaches its adopted <pool>-xxxxx sandbox under the claim's name, a cold
-- claim its sandbox of the same name; the owner comes from the claim's pod labels or its own
-- labels; a claim with refused pod labels (InvalidMetadata) routes nothing; deleting a claim
-- removes both routes; /sandboxes shows the claim; a cluster without the claim CRD, or without
-- RBAC for claims, routes Sandboxes as before (one log line).
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local cjson = require "cjson"

local function status_of(px, path)
    local r = px:get(path)
    return r and r.status
end

local function wait_status(px, path, want, timeout)
    return H.net.wait_until(function()
        return status_of(px, path) == want
    end, timeout or 10, 0.02, path .. " -> " .. want)
end

local function entry(px, path)
    for _, s in ipairs(px:json("/sandboxes").sandboxes) do
        if s.path == path then
            return s
        end
    end
end

describe("SandboxClaims", function()
    local up, api, px

    setup(function()
        up = H.upstream{ name = "claimed" }
        api = K.start{}
        api:claim_config{ bind_delay_ms = 20, start_delay_ms = 50, ready_delay_ms = 100,
            replenish = false }
        api:pool{ name = "warm", replicas = 1 }
        api:pool{ name = "cold", replicas = 0 }
        px = api:proxy{ config = "return { discovery = { port = " .. up.port .. " } }" }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("a warm-pool claim reaches the adopted sandbox by the claim's name and its own", function()
        api:put_claim(K.claim("my-claim", { pool = "warm",
            pod_labels = { ["sandbox.users.io/user"] = "alice" } }))
        local c = H.net.wait_until(function()
            local o = api:get_claim("default", "my-claim")
            return o.status and o.status.sandbox and o.status.sandbox.name and o
        end, 10)
        local sb = c.status.sandbox.name
        assert.matches("^warm%-%w%w%w%w%w$", sb)
        wait_status(px, "/alice/my-claim/echo", 200)
        assert.are.equal(200, status_of(px, "/alice/" .. sb .. "/echo"))
        local direct = entry(px, "alice/" .. sb)
        assert.are.equal("my-claim", direct.claim)
        local alias = entry(px, "alice/my-claim")
        assert.are.equal(sb, alias.name)
        assert.are.equal("alice/" .. sb, alias.alias_of)
        assert.are.equal("my-claim", alias.claim)
        -- the agent-sandbox SDK's header contract names the claim too (X-Sandbox-ID: {claim})
        local hr = assert(px:request{ path = "/echo", headers = { ["X-Sandbox-ID"] = "my-claim",
            ["X-Sandbox-Port"] = tostring(up.port) } })
        assert.are.equal(200, hr.status)
        assert.are.equal("claimed", hr.headers["x-upstream-name"])
        hr = assert(px:request{ path = "/echo", headers = { ["X-Sandbox-ID"] = "my-claim",
            ["X-Sandbox-Namespace"] = "other", ["X-Sandbox-Port"] = tostring(up.port) } })
        assert.are.equal(404, hr.status)
        -- deleting the claim: the garbage collector deletes its sandbox; both routes go
        api:delete_claim("default", "my-claim")
        wait_status(px, "/alice/my-claim/echo", 404)
        wait_status(px, "/alice/" .. sb .. "/echo", 404)
    end)

    it("a cold claim's sandbox has the claim's name; the owner from the claim's labels", function()
        api:put_claim(K.claim("cold-one", { pool = "cold",
            labels = { ["sandbox.users.io/user"] = "bob" } }))
        -- pending (503) while the pod starts, then ready
        wait_status(px, "/bob/cold-one/echo", 200)
        local e = entry(px, "bob/cold-one")
        assert.are.equal("cold-one", e.name)
        assert.are.equal("cold-one", e.claim)
        assert.are.equal(cjson.null, e.alias_of or cjson.null)
        assert.are.equal("bob", e.user)
    end)

    it("a claim whose pod labels lack an allowed domain gets InvalidMetadata and no route", function()
        api:put_claim(K.claim("bad", { pool = "cold", pod_labels = { user = "carol" } }))
        local c = H.net.wait_until(function()
            local o = api:get_claim("default", "bad")
            return o.status and o.status.conditions and o
        end, 10)
        assert.are.equal("InvalidMetadata", c.status.conditions[1].reason)
        assert.is_nil(c.status.sandbox)
        assert.are.equal(404, status_of(px, "/carol/bad/echo"))
        assert.are.equal(404, status_of(px, "/default/bad/echo"))
    end)

    it("/health reports the claims watch", function()
        local h = px:json("/health")
        assert.are.equal("watching", h.source.claims.state)
        assert.is_true(h.source.claims.synced)
    end)

    it("watches claims without a script error (the claims' on_synced publishes the state)",
        function()
        px:wait_log(function(l) return l.msg == "sandbox claims synced" end)
        for _, l in ipairs(px:log_lines()) do
            assert.are_not.equal("script error", l.msg, cjson.encode(l))
        end
    end)
end)

describe("a cluster without SandboxClaims", function()
    local up

    setup(function()
        up = H.upstream{ name = "plain" }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("routes Sandboxes as before and says once that claims are not served", function()
        local api = K.start{ no_claims = true }
        api:put(H.sandbox("dave", "plain", up.port))
        local px = api:proxy{}
        assert.are.equal(200, status_of(px, "/dave/plain/echo"))
        local lines = {}
        for _, l in ipairs(px:log_lines()) do
            if l.msg == "SandboxClaims are not served: routing Sandboxes by their own names" then
                lines[#lines + 1] = l
            end
        end
        assert.are.equal(1, #lines)
        assert.matches("not installed", lines[1].reason)
        assert.are.equal("not served", px:json("/health").source.claims.state)
        assert.are.equal(0, api:stats().requests.claim_list)
    end)

    it("without RBAC for claims: one error line, ready, Sandboxes routed", function()
        local api = K.start{}
        api:deny{ "list sandboxclaims", "watch sandboxclaims" }
        api:put(H.sandbox("erin", "plain", up.port))
        local px = api:proxy{}
        assert.are.equal(200, status_of(px, "/erin/plain/echo"))
        px:wait_log(function(l)
            return l.level == "error" and l.msg:find("cannot watch SandboxClaims: forbidden", 1, true)
        end)
        assert.are.equal("forbidden", px:json("/health").source.claims.state)
        assert.are.equal(200, status_of(px, "/ready"))
    end)

    it("a failing claim discovery delays neither the Sandboxes nor readiness; claims join later",
        function()
        local api = K.start{}
        api:claim_config{ bind_delay_ms = 20, replenish = false }
        api:pool{ name = "warm", replicas = 1 }
        api:faults{ status = 503, count = -1, paths = "/apis/extensions.agents.x-k8s.io" }
        api:put(H.sandbox("gil", "plain", up.port))
        local px = api:proxy{ config = "return { discovery = { port = " .. up.port .. " } }" }
        assert.are.equal(200, status_of(px, "/gil/plain/echo"))
        px:wait_log(function(l)
            return l.msg:find("cannot discover the SandboxClaim API", 1, true) ~= nil
        end)
        api:clear_faults()
        api:put_claim(K.claim("late", { pool = "warm",
            pod_labels = { ["sandbox.users.io/user"] = "gil" } }))
        wait_status(px, "/gil/late/echo", 200, 20)
        assert.are.equal("watching", px:json("/health").source.claims.state)
    end)

    it("a v1alpha1-only cluster (older than v1.0) is the legacy fallback, said in the log", function()
        local api = K.start{ versions = "v1alpha1" }
        local px = api:proxy{}
        px:wait_log(function(l)
            return l.msg:find("legacy fallback", 1, true) ~= nil
        end)
        assert.are.equal("not served", px:json("/health").source.claims.state)
    end)
end)
