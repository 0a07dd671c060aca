-- tokenreview.lua: how a reviewed Kubernetes identity maps to a user (user_from namespace,
-- username with a pattern, extra), admins by username or group, and refused configurations.
-- The reviews themselves run against the API stand-in: spec/k8s/tokenreview_spec.lua.
local testkit = require "sp.testkit"

local function load(tr)
    return testkit.load("tokenreview", "auth", { tokenreview = tr })
end

local SA = { username = "system:serviceaccount:team-a:agent-7", uid = "u",
    groups = { "system:serviceaccounts", "system:serviceaccounts:team-a" },
    extra = { ["authentication.kubernetes.io/pod-name"] = { "agent-7-pod" } } }

describe("tokenreview.map", function()
    it("maps a service account to its namespace by default", function()
        local m = load{ enabled = true }
        assert.is_true(m.enabled)
        local id = assert(m.map(SA))
        assert.are.equal("team-a", id.user)
        assert.is_false(id.admin)
        assert.are.equal("tokenreview", id.method)
        -- not a service account: no user
        local none, why = m.map({ username = "alice@example.com" })
        assert.is_nil(none)
        assert.matches("maps to no user", why)
    end)

    it("maps the username through a pattern (default: the service account's name)", function()
        local m = load{ enabled = true, user_from = "username" }
        assert.are.equal("agent-7", m.map(SA).user)
        local oidc = load{ enabled = true, user_from = "username", username_pattern = "^(.-)@example%.com$" }
        assert.are.equal("alice", oidc.map({ username = "alice@example.com" }).user)
        assert.is_nil(oidc.map({ username = "mallory@evil.example" }))
    end)

    it("maps an extra value", function()
        local m = load{ enabled = true, user_from = "extra",
            extra_key = "authentication.kubernetes.io/pod-name" }
        assert.are.equal("agent-7-pod", m.map(SA).user)
        assert.is_nil(m.map({ username = "system:serviceaccount:x:y" }))
    end)

    it("makes admins by username or group", function()
        local m = load{ enabled = true, admin_users = { "system:serviceaccount:team-a:agent-7" } }
        assert.is_true(m.map(SA).admin)
        m = load{ enabled = true, admin_groups = { "system:serviceaccounts:team-a" } }
        assert.is_true(m.map(SA).admin)
    end)

    it("refuses a bad configuration at load", function()
        assert.has_error(function() load{ enabled = true, user_from = "label" } end)
        assert.has_error(function() load{ enabled = true, user_from = "extra" } end)
        assert.has_error(function() load{ enabled = true, audiences = "x" } end)
    end)

    it("is off without its section or with enabled = false", function()
        assert.is_false(load(nil).enabled)
        assert.is_false(load{ enabled = false }.enabled)
    end)
end)
