-- sp.lint: the warnings `sandbox-proxy --check` prints about loops that end only by break or
-- return (script_time_budget cannot stop them once the JIT compiles them). A loop whose line
-- says `sp.lint: ok` (and why) is left out, and the built-in scripts pass clean, so a
-- `--check` of the shipped defaults prints no warning a user cannot act on.
local lint = require "sp.lint"

local SOURCE_DIR = os.getenv("SP_SOURCE_DIR") or "."

describe("sp.lint", function()
    it("warns about loops that end only by break or return", function()
        local w = lint.scan_source("x.lua", table.concat({
            "local a = 1",
            "while true do",
            "repeat a = a + 1 until false",
            "for i = 1, math.huge do end",
            "while a < 10 do a = a + 1 end",
            "-- while true do (a comment)",
        }, "\n"))
        assert.are.equal(3, #w)
        assert.matches("^x%.lua:2: `while true do` ends only by break or return", w[1])
        assert.matches("^x%.lua:3: `repeat %.%.%. until false`", w[2])
        assert.matches("^x%.lua:4: a loop up to math%.huge", w[3])
    end)

    it("leaves out a loop whose line says sp.lint: ok", function()
        assert.are.same({}, lint.scan_source("y.lua",
            "while true do -- sp.lint: ok, yields in core.wait\nend"))
        -- the marker must be in a comment on that line
        assert.are.equal(1, #lint.scan_source("z.lua",
            'local s = "sp.lint: ok" while true do end'))
    end)

    it("finds nothing to warn about in the built-in scripts", function()
        assert.are.same({}, lint.scan_dirs({ SOURCE_DIR .. "/scripts" }))
    end)
end)
