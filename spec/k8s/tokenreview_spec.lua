-- Kubernetes ServiceAccount tokens as the proxy's credential (auth.tokenreview, issue 12 4b):
-- the proxy reviews a token with a TokenReview made with its own credentials against the API
-- stand-in (which knows a few tokens and can revoke them), maps the identity to a user (here
-- the service account's namespace), and the usual owner rule applies: user A's token cannot
-- reach user B's sandbox. The token never reaches the sandbox; a revoked token stops working
-- within the cache bound; without the RBAC for tokenreviews the answer is 503 and one log line.
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local process = require "spec.helpers.process"
local cjson = require "cjson"

local CACHE_TTL = 1

local function bearer(t)
    return { { "Authorization", "Bearer " .. t } }
end

local function status_with(px, path, token)
    local r = px:get(path, token and bearer(token) or nil)
    return r and r.status, r
end

describe("TokenReview authentication", function()
    local up, api, px

    setup(function()
        up = H.upstream{ name = "tr" }
        local dir = H.tmpdir()
        -- the proxy's own credential: the stand-in accepts only this token on its API
        local tok = dir .. "/proxy-token"
        assert(process.write_file(tok, "proxy-sa-token\n"))
        api = K.start{ token_file = tok }
        api:add_token{ token = "sa-alice", username = "system:serviceaccount:alice:agent",
            groups = { "system:serviceaccounts", "system:serviceaccounts:alice" } }
        api:add_token{ token = "sa-bob", username = "system:serviceaccount:bob:agent" }
        api:add_token{ token = "oidc-carol", username = "carol@example.com" }
        api:add_token{ token = "sa-ops", username = "system:serviceaccount:ops:admin",
            groups = { "sandbox-admins" } }
        api:put_all{ H.sandbox("alice", "a1", up.port), H.sandbox("bob", "b1", up.port) }
        px = api:proxy{ token_file = tok, config = ([[
            return { auth = { tokenreview = { enabled = true, cache_ttl = %d,
                admin_groups = { "sandbox-admins" } } } }]]):format(CACHE_TTL) }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("lets a service account's token reach its namespace's user's sandbox, stripped", function()
        local status, r = status_with(px, "/alice/a1/echo", "sa-alice")
        assert.are.equal(200, status)
        for _, h in ipairs(cjson.decode(r.body).headers) do
            assert.are_not.equal("authorization", h[1]:lower())
            assert.is_nil(h[2]:find("sa-alice", 1, true))
        end
        -- the review went to the API server with the proxy's own credential
        local reviews = api:log_of("tokenreview")
        assert.is_true(#reviews >= 1)
        for _, e in ipairs(reviews) do
            assert.are.equal("proxy-sa-token", e.token)
            assert.are.equal(201, e.status)
        end
    end)

    it("refuses user A's token for user B's sandbox", function()
        assert.are.equal(403, status_with(px, "/bob/b1/echo", "sa-alice"))
        assert.are.equal(403, status_with(px, "/alice/a1/echo", "sa-bob"))
        assert.are.equal(200, status_with(px, "/bob/b1/echo", "sa-bob"))
        -- a token whose identity is no service account maps to no user (user_from namespace)
        assert.are.equal(401, status_with(px, "/alice/a1/echo", "oidc-carol"))
        -- unknown and missing tokens
        assert.are.equal(401, status_with(px, "/alice/a1/echo", "not-a-token"))
        assert.are.equal(401, status_with(px, "/alice/a1/echo", nil))
        -- an admin group reaches any sandbox
        assert.are.equal(200, status_with(px, "/bob/b1/echo", "sa-ops"))
    end)

    it("lists only the caller's sandboxes in /sandboxes", function()
        local r = assert(px:get("/sandboxes", bearer("sa-bob")))
        local doc = cjson.decode(r.body)
        assert.are.equal(1, doc.count)
        assert.are.equal("bob/b1", doc.sandboxes[1].path)
    end)

    it("caches a review: repeated requests within the cache bound cost one review", function()
        api:add_token{ token = "sa-alice-2", username = "system:serviceaccount:alice:other" }
        local before = #api:log_of("tokenreview")
        for _ = 1, 5 do
            assert.are.equal(200, status_with(px, "/alice/a1/echo", "sa-alice-2"))
        end
        local n = #api:log_of("tokenreview") - before
        -- one review, or two if the cache bound passed during the five requests
        assert.is_true(n >= 1 and n <= 2, n .. " reviews for 5 requests")
    end)

    it("stops accepting a revoked token within the cache bound", function()
        api:add_token{ token = "sa-alice-3", username = "system:serviceaccount:alice:short" }
        assert.are.equal(200, status_with(px, "/alice/a1/echo", "sa-alice-3"))
        api:revoke_token("sa-alice-3")
        -- bounded wait: the cache bound plus a generous margin for a loaded machine
        H.net.wait_until(function()
            return status_with(px, "/alice/a1/echo", "sa-alice-3") == 401
        end, CACHE_TTL + 10, 0.05, "revoked token refused")
    end)

    it("answers 503 and logs once when the proxy may not create tokenreviews", function()
        api:deny{ "create tokenreviews" }
        api:add_token{ token = "sa-bob-2", username = "system:serviceaccount:bob:new" }
        local status, r = status_with(px, "/bob/b1/echo", "sa-bob-2")
        assert.are.equal(503, status)
        assert.are.equal("authentication unavailable", cjson.decode(r.body).error)
        assert.are.equal(503, status_with(px, "/bob/b1/echo", "sa-bob-2"))
        local l = px:wait_log(function(line)
            return line.msg == "cannot review a token (TokenReview)"
        end)
        assert.are.equal(403, l.status)
        assert.matches("rbac%-tokenreview%.yaml", l.hint)
        local n = 0
        for _, line in ipairs(px:log_lines()) do
            if line.msg == "cannot review a token (TokenReview)" then
                n = n + 1
            end
        end
        assert.are.equal(1, n, "one log line per failure streak")
        api:deny{}
        H.net.wait_until(function()
            return status_with(px, "/bob/b1/echo", "sa-bob-2") == 200
        end, 10)
    end)
end)
