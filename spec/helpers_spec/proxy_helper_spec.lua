-- Specs for spec/helpers/proxy.lua's guarantees that every integration spec relies on: a proxy
-- that dies during a spec fails that spec (at the request that finds it dead, and at teardown),
-- a deliberate stop does not, and a missing tool fails in CI instead of passing as pending.
local H = require "spec.helpers.proxy"
local psignal = require "posix.signal"
local stdlib = require "posix.stdlib"

describe("proxy helper", function()
    after_each(function()
        pcall(H.stop_all)
    end)

    it("fails a request and the teardown when the proxy died without being told to", function()
        local px = H.start{}
        assert.are.equal(200, px:get("/health").status)
        -- a crash: a signal from outside the helper, as a segfault would end it
        assert(psignal.kill(px:pid(), psignal.SIGKILL))
        assert(H.net.wait_until(function() return not px.proc:alive() end, 10))
        local ok, err = pcall(px.get, px, "/health")
        assert.is_false(ok)
        assert.matches("died during the spec", err)
        ok, err = pcall(H.stop_all)
        assert.is_false(ok)
        assert.matches("died during the spec", err)
    end)

    it("accepts a proxy the spec stopped or signalled on purpose", function()
        local a = H.start{}
        a:stop()
        local b = H.start{}
        assert(b.proc:signal("TERM"))
        assert(b.proc:wait(10))
        assert.has_no.errors(H.stop_all)
    end)

    it("need_tool: present tools pass, a missing one fails in CI and is loudly skipped outside", function()
        assert.is_true(H.need_tool("sh"))
        local saved = os.getenv("CI")
        stdlib.setenv("CI", "true")
        local ok, err = pcall(H.need_tool, "no-such-tool-sp", "spec")
        stdlib.setenv("CI", saved)
        assert.is_false(ok)
        assert.matches("no%-such%-tool%-sp is not installed", err)
        stdlib.setenv("CI", nil)
        local have, why = H.need_tool("no-such-tool-sp", "spec")
        stdlib.setenv("CI", saved)
        assert.is_false(have)
        assert.matches("SKIPPED", why)
    end)
end)
