-- The runtime's layers (README "Architecture"): every file under runtime/<layer>/ may include
-- our headers only from the layers below it, and third-party headers only where that layer
-- owns them. The check reads the real tree; a second test runs it on a small tree with known
-- violations, so a checker that finds nothing cannot pass for a clean tree.
local process = require "spec.helpers.process"

-- layer -> the layers whose headers it may include (itself included)
local MAY_INCLUDE = {
    base = { base = true },
    state = { base = true, state = true },
    http = { base = true, state = true, http = true },
    kube = { base = true, kube = true },
    lua = { base = true, state = true, http = true, kube = true, lua = true },
    process = { base = true, state = true, http = true, kube = true, lua = true, process = true },
}

-- Third-party headers and the one layer that may include each (process may include anything).
local OWNED = {
    { pattern = "^lua%.h$", layer = "lua", what = "Lua" },
    { pattern = "^lauxlib%.h$", layer = "lua", what = "Lua" },
    { pattern = "^lualib%.h$", layer = "lua", what = "Lua" },
    { pattern = "^luajit%.h$", layer = "lua", what = "Lua" },
    { pattern = "^lua_cjson", layer = "lua", what = "Lua" },
    { pattern = "^yaml%.h$", layer = "lua", what = "libyaml (sp.yaml)" },
    { pattern = "^openssl/", layer = "lua", what = "OpenSSL (sp.crypto)" },
    { pattern = "^hiredis/", layer = "lua", what = "hiredis (sp.redis)" },
    { pattern = "^curl/", layer = "kube", what = "libcurl" },
    { pattern = "^llhttp%.h$", layer = "http", what = "llhttp" },
    { pattern = "^nghttp2/", layer = "http", what = "nghttp2" },
    { pattern = "^liburing", layer = "http", what = "liburing (wbatch.c)" },
}

local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end

local function files_of(dir)
    local out = {}
    local p = io.popen("find '" .. dir .. "' -type f \\( -name '*.c' -o -name '*.h' \\) | sort")
    for line in p:lines() do
        out[#out + 1] = line
    end
    p:close()
    return out
end

-- Every violation under root (a directory holding <layer>/ subdirectories), as text lines.
local function check(root)
    local bad = {}
    local function add(file, fmt, ...)
        bad[#bad + 1] = file:sub(#root + 2) .. ": " .. fmt:format(...)
    end
    for _, file in ipairs(files_of(root)) do
        local layer = file:sub(#root + 2):match("^([^/]+)/[^/]+$")
        if not layer or not MAY_INCLUDE[layer] then
            add(file, "not in a layer directory (%s)", table.concat({ "base", "state", "http",
                "kube", "lua", "process" }, ", "))
        else
            local n = 0
            for line in (read(file) .. "\n"):gmatch("([^\n]*)\n") do
                n = n + 1
                local quoted = line:match('^%s*#%s*include%s+"([^"]+)"')
                local angled = line:match("^%s*#%s*include%s+<([^>]+)>")
                if quoted then
                    local to = quoted:match("^([^/]+)/[^/]+$")
                    if not to or not MAY_INCLUDE[to] then
                        add(file, "line %d: \"%s\" is not a layer-qualified header", n, quoted)
                    elseif not MAY_INCLUDE[layer][to] then
                        add(file, "line %d: %s includes \"%s\": %s may not depend on %s", n,
                            layer, quoted, layer, to)
                    else
                        local f = io.open(root .. "/" .. quoted, "rb")
                        if f then
                            f:close()
                        else
                            add(file, "line %d: \"%s\" does not exist", n, quoted)
                        end
                    end
                elseif angled and layer ~= "process" then
                    for _, o in ipairs(OWNED) do
                        if angled:match(o.pattern) and o.layer ~= layer then
                            add(file, "line %d: <%s>: %s belongs to the %s layer", n, angled,
                                o.what, o.layer)
                        end
                    end
                end
            end
        end
    end
    return bad
end

describe("the runtime's layers", function()
    it("hold: no file includes across a forbidden direction", function()
        local root = (os.getenv("SP_SOURCE_DIR") or ".") .. "/runtime"
        local files = files_of(root)
        assert.is_true(#files > 40, "the runtime tree was not found under " .. root)
        assert.are.same({}, check(root))
    end)

    it("are checked: a tree with one violation of each kind is reported line by line", function()
        local root = process.tmpdir()
        local tree = {
            ["base/buf.h"] = '#include "base/sp.h"\n',
            ["base/sp.h"] = "#include <stdint.h>\n",
            ["base/up.c"] = '#include "http/http.h"\n',             -- base -> http
            ["http/http.h"] = '#include "base/sp.h"\n#include <llhttp.h>\n',
            ["http/server.c"] = '#include "kube/kube.h"\n#include <lua.h>\n', -- http -> kube, Lua
            ["http/bare.c"] = '#include "http.h"\n',                -- not layer-qualified
            ["kube/kube.h"] = "#include <curl/curl.h>\n",
            ["kube/gone.c"] = '#include "kube/nothere.h"\n',        -- a missing header
            ["lua/vm.c"] = '#include "process/workers.h"\n#include <lua.h>\n', -- lua -> process
            ["process/workers.h"] = '#include "http/http.h"\n#include <curl/curl.h>\n',
            ["stray.c"] = "",                                       -- outside any layer
        }
        for _, d in ipairs({ "base", "http", "kube", "lua", "process" }) do
            assert(os.execute("mkdir -p '" .. root .. "/" .. d .. "'"))
        end
        for name, text in pairs(tree) do
            assert(process.write_file(root .. "/" .. name, text))
        end
        local bad = check(root)
        table.sort(bad)
        assert.are.same({
            'base/up.c: line 1: base includes "http/http.h": base may not depend on http',
            'http/bare.c: line 1: "http.h" is not a layer-qualified header',
            'http/server.c: line 1: http includes "kube/kube.h": http may not depend on kube',
            "http/server.c: line 2: <lua.h>: Lua belongs to the lua layer",
            'kube/gone.c: line 1: "kube/nothere.h" does not exist',
            'lua/vm.c: line 1: lua includes "process/workers.h": lua may not depend on process',
            "stray.c: not in a layer directory (base, state, http, kube, lua, process)",
        }, bad)
    end)
end)
