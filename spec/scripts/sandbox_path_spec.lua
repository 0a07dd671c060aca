-- sandbox_path.lua: the one parser of /{user}/{sandbox}/{rest}, shared by router.lua and
-- ratelimit.lua. Edge cases of split() and of the percent-decoding of one name segment.
local sandbox_path = require "sandbox_path"

local split = sandbox_path.split
local decode = sandbox_path.decode_segment

-- split(target) as a list, so that a nil result compares cleanly
local function S(target)
    return { split(target) }
end

describe("sandbox_path.decode_segment", function()
    it("keeps a plain segment as it is", function()
        assert.are.equal("alice", decode("alice"))
        assert.are.equal("python-pool-x7k2p", decode("python-pool-x7k2p"))
        assert.are.equal("a.b", decode("a.b"))
        assert.are.equal("...", decode("..."))
        assert.are.equal(".hidden", decode(".hidden"))
        assert.are.equal("a+b", decode("a+b")) -- '+' is not a space in a path
        assert.are.equal("~user", decode("~user"))
    end)

    it("percent-decodes escapes in upper and lower case", function()
        assert.are.equal("A", decode("%41"))
        assert.are.equal("alice", decode("%61lic%65"))
        assert.are.equal("a b", decode("a%20b"))
        assert.are.equal("s-b", decode("s%2Db"))
        assert.are.equal("s-b", decode("s%2db"))
        assert.are.equal("\xc3\xa9t\xc3\xa9", decode("%C3%A9t%c3%a9"))
        assert.are.equal("a?b", decode("a%3Fb"))
        assert.are.equal("a\\b", decode("a%5Cb"))
    end)

    it("refuses the empty segment and dot segments, also when encoded", function()
        for _, s in ipairs({ "", ".", "..", "%2e", "%2E", "%2e%2e", "%2E%2e", ".%2e", "%2e." }) do
            assert.is_nil(decode(s), s)
        end
    end)

    it("refuses a segment that decodes to a slash", function()
        for _, s in ipairs({ "%2F", "%2f", "a%2Fb", "..%2F..", "%2F%2F" }) do
            assert.is_nil(decode(s), s)
        end
    end)

    it("refuses NUL bytes", function()
        assert.is_nil(decode("%00"))
        assert.is_nil(decode("a%00b"))
        assert.is_nil(decode("a\0b"))
    end)

    it("refuses bad and incomplete escapes", function()
        for _, s in ipairs({ "%", "%4", "a%", "%zz", "%g1", "%%41", "a%2", "%-1" }) do
            assert.is_nil(decode(s), s)
        end
    end)

    it("decodes only once: an encoded '%' is refused, so no double decoding", function()
        assert.is_nil(decode("%25"))
        assert.is_nil(decode("%2541"))   -- would be 'A' if decoded twice
        assert.is_nil(decode("%252F"))   -- would be '/' if decoded twice
        assert.is_nil(decode("%252e%252e"))
    end)
end)

describe("sandbox_path.split", function()
    it("reads user, sandbox and rest", function()
        assert.are.same({ "alice", "sb", "/files/a.txt" }, S("/alice/sb/files/a.txt"))
        assert.are.same({ "alice", "sb", "/x?y=1" }, S("/alice/sb/x?y=1"))
    end)

    it("gives '/' (plus the query) when the target names only the sandbox", function()
        assert.are.same({ "a", "b", "/" }, S("/a/b"))
        assert.are.same({ "a", "b", "/" }, S("/a/b/"))
        assert.are.same({ "a", "b", "/?q=1" }, S("/a/b?q=1"))
        assert.are.same({ "a", "b", "/?" }, S("/a/b?"))
    end)

    it("keeps the rest exactly as received (still encoded, slashes and dots kept)", function()
        assert.are.same({ "a", "b", "/%2e%2e/%2F?x=%20" }, S("/a/b/%2e%2e/%2F?x=%20"))
        assert.are.same({ "a", "b", "//c//" }, S("/a/b//c//"))
        assert.are.same({ "a", "b", "/../../etc/passwd" }, S("/a/b/../../etc/passwd"))
        assert.are.same({ "a", "b", "/%zz" }, S("/a/b/%zz"))
    end)

    it("decodes the user and sandbox segments", function()
        assert.are.same({ "alice", "sb", "/" }, S("/al%69ce/%73b"))
        assert.are.same({ "a b", "c?d", "/e" }, S("/a%20b/c%3Fd/e"))
    end)

    it("keeps the user's name byte for byte: no case folding, trimming or prefix", function()
        -- auth.lua compares these names with the caller's exactly; related names stay apart
        assert.are.same({ "ALICE", "sb", "/" }, S("/ALICE/sb"))
        assert.are.same({ "ALICE", "sb", "/" }, S("/%41LICE/sb"))
        assert.are.same({ "alIce", "sb", "/" }, S("/al%49ce/sb"))
        assert.are.same({ "alice ", "sb", "/" }, S("/alice%20/sb"))
        assert.are.same({ " alice", "sb", "/" }, S("/%20alice/sb"))
        assert.are.same({ "alice\t", "sb", "/" }, S("/alice%09/sb"))
        assert.are.same({ "alice2", "sb", "/" }, S("/alice2/sb"))
        assert.are.same({ "al", "sb", "/" }, S("/al/sb"))
        assert.are.same({ "alice", "sb", "/" }, S("/al%69ce/sb")) -- the same name, encoded
    end)

    it("finds the segments in the path only, never in the query", function()
        assert.is_nil(split("/a?b/c"))
        assert.is_nil(split("/a?/b/c"))
        assert.are.same({ "a", "b", "/?next=/c/d" }, S("/a/b?next=/c/d"))
        assert.are.same({ "a", "b", "/?/" }, S("/a/b?/"))
    end)

    it("refuses targets without two non-empty segments", function()
        for _, t in ipairs({ "", "/", "//", "///", "/a", "/a/", "/a//", "/a//c", "//b", "//b/c",
            "/?a/b", "/a?", "*", "a/b/c", "http://host/a/b" }) do
            assert.is_nil(split(t), t)
        end
    end)

    it("refuses unsafe user or sandbox segments, whatever follows", function()
        for _, t in ipairs({ "/./b/c", "/../b/c", "/a/./c", "/a/../c", "/%2e%2e/b/c", "/a/%2E/c",
            "/a%2Fb/c/d", "/a/b%2fc/d", "/%00/b", "/a/%00", "/a/b%00c/d", "/%/b", "/a/%zz",
            "/a/b%", "/%25/b", "/a/%2541" }) do
            assert.is_nil(split(t), t)
        end
    end)

    it("cannot be steered into another user's prefix by encoding", function()
        -- every spelling that reaches user 'bob' names bob; none reaches 'bob' via 'alice'
        local user = split("/alice%2F..%2Fbob/sb/x")
        assert.is_nil(user)
        assert.are.same({ "bob", "sb", "/x" }, S("/%62ob/sb/x"))
        assert.are.same({ "alice", "..bob", "/" }, S("/alice/..bob"))
    end)
end)

describe("sandbox_path.of", function()
    local testkit = require "sp.testkit"

    it("reads the request's target once and gives user, sandbox, rest and key", function()
        local req = testkit.request{ target = "/al%69ce/sb1/x/y?q=1" }
        local calls = 0
        local target = req.target
        req.target = function(self)
            calls = calls + 1
            return target(self)
        end
        for _ = 1, 3 do
            local user, name, rest, key = sandbox_path.of(req)
            assert.are.equal("alice", user)
            assert.are.equal("sb1", name)
            assert.are.equal("/x/y?q=1", rest)
            assert.are.equal("alice/sb1", key)
        end
        assert.are.equal(1, calls)
        assert.are.equal("alice/sb1", req.ctx.target_key)
    end)

    it("remembers a target without a sandbox path too", function()
        local req = testkit.request{ target = "/health" }
        assert.is_nil(sandbox_path.of(req))
        assert.is_false(req.ctx.target_user)
        assert.is_nil(sandbox_path.of(req))
    end)
end)
