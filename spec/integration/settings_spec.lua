-- core.settings() is built from the C knob table (runtime/config.c), the same rows that
-- `sandbox-proxy --help` prints: a knob added to the table must reach the scripts without a
-- second list to update. This runs the real binary twice: --help for the knob names, and
-- --check with an override init.lua that prints the keys of core.settings() (every knob that
-- is unset by default is given a value with --set, since an unset string knob is absent).
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"

local function run(dir, cmd)
    local p = assert(process.spawn{ cmd = cmd, stdout = dir .. "/out", stderr = dir .. "/err" })
    local code = p:wait(20)
    return code, p:read_stdout() or "", p:read_stderr() or ""
end

describe("core.settings()", function()
    it("has every knob that --help lists", function()
        local dir = H.tmpdir()
        local code, help = run(dir, { H.BIN, "--help" })
        assert.are.equal(0, code)
        local knobs, unset = {}, {}
        local in_knobs = false
        for line in help:gmatch("[^\n]+") do
            if line:match("^Knobs") then
                in_knobs = true
            elseif in_knobs and not line:match("^ ") then
                break -- the next section (the script defaults) lists no knobs
            elseif in_knobs then
                local name = line:match("^  ([%w_]+)  ")
                if name then
                    knobs[#knobs + 1] = name
                    if line:match("%(default: unset%)$") then
                        unset[#unset + 1] = name
                    end
                end
            end
        end
        assert.is_true(#knobs >= 40, "knob list not found in --help")

        assert(process.write_file(dir .. "/init.lua", [[
local keys = {}
for k in pairs(require("sp.core").settings()) do keys[#keys + 1] = k end
table.sort(keys)
io.stderr:write("SETTINGS ", table.concat(keys, ","), "\n")
return { on_request = function() end, check = function() return {} end }
]]))
        local cmd = { H.BIN, "--check", "--scripts", dir, "--sandboxes-file",
            H.SOURCE_DIR .. "/scripts/demo/sandboxes.json" }
        for _, name in ipairs(unset) do
            cmd[#cmd + 1] = "--set"
            local value = name:match("listen$") and "127.0.0.1:1"
                or name == "kube_api_version" and "v1beta1"
                or name == "kube_api" and "http://127.0.0.1:1"
                or name == "trusted_proxies" and "10.0.0.0/8" or "x"
            cmd[#cmd + 1] = name .. "=" .. value
        end
        local err
        code, _, err = run(dir, cmd)
        assert.are.equal(0, code, err)
        local list = assert(err:match("SETTINGS ([^\n]*)"), err)
        local have = {}
        for k in list:gmatch("[^,]+") do
            have[k] = true
        end
        local missing = {}
        for _, name in ipairs(knobs) do
            if not have[name] then
                missing[#missing + 1] = name
            end
        end
        assert.are.same({}, missing)
        -- and what the process was started with, beyond the knobs
        for _, k in ipairs({ "scripts_dir", "builtin_dir", "sandboxes_file", "version", "demo",
            "check_only", "source", "workers" }) do
            assert.is_true(have[k], k)
        end
    end)
end)
