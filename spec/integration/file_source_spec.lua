-- The local sandbox source (--sandboxes-file): routes follow the file as it changes (in-place
-- writes, atomic renames, ConfigMap-style symlink swaps), a broken file keeps the last good
-- routes, and /health, /ready and /sandboxes report it.
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local cjson = require "cjson"

local function status_of(px, path)
    local r = px:get(path)
    return r and r.status
end

describe("the sandboxes file", function()
    local up, px, file

    setup(function()
        up = H.upstream{ name = "f" }
        px = H.start{ sandboxes = { H.sandbox("alice", "one", up.port) } }
        file = px.sandboxes_file
    end)

    teardown(function()
        H.stop_all()
    end)

    it("is reported by /health, /ready and /sandboxes", function()
        local h = px:json("/health")
        assert.are.equal("ok", h.status)
        assert.are.equal(1, h.sandboxes)
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", h.timestamp)
        assert.are.equal("file", h.source.type)
        assert.is_true(h.source.synced)
        assert.are.equal(200, status_of(px, "/ready"))
        assert.are.equal(200, status_of(px, "/live"))
        local s = px:json("/sandboxes")
        assert.are.equal(1, s.count)
        assert.are.equal("alice/one", s.sandboxes[1].path)
        assert.are.equal("default", s.sandboxes[1].namespace)
        assert.is_true(s.sandboxes[1].ready)
    end)

    it("adds, updates and removes routes when the file is replaced", function()
        H.write_sandboxes(file, {
            H.sandbox("alice", "one", up.port, { ready = false, reason = "SandboxSuspended" }),
            H.sandbox("bob", "two", up.port),
        })
        H.net.wait_until(function() return status_of(px, "/bob/two/echo") == 200 end, 10)
        assert.are.equal(503, status_of(px, "/alice/one/echo"))
        H.write_sandboxes(file, { H.sandbox("bob", "two", up.port) })
        H.net.wait_until(function() return status_of(px, "/alice/one/echo") == 404 end, 10)
        local s = px:json("/sandboxes")
        assert.are.equal(1, s.count)
    end)

    it("follows an in-place write", function()
        local f = assert(io.open(file, "w"))
        f:write(cjson.encode(H.sandbox_list({ H.sandbox("carol", "three", up.port) })))
        f:close()
        H.net.wait_until(function() return status_of(px, "/carol/three/echo") == 200 end, 10)
    end)

    it("keeps the last good routes when the file becomes invalid", function()
        local f = assert(io.open(file, "w"))
        f:write("{ this is not json")
        f:close()
        px:wait_log(function(l) return l.msg == "bad sandboxes file: keeping the previous routes" end)
        assert.are.equal(200, status_of(px, "/carol/three/echo"))
        local h = px:json("/health")
        assert.is_truthy(h.source.error)
        assert.is_true(h.source.synced)
    end)

    it("skips objects without a name and logs them", function()
        H.write_sandboxes(file, { H.sandbox("carol", "three", up.port), { metadata = {} } })
        px:wait_log(function(l) return l.msg == "sandbox skipped" end)
        assert.are.equal(200, status_of(px, "/carol/three/echo"))
    end)
end)

describe("a ConfigMap-style sandboxes file", function()
    teardown(function()
        H.stop_all()
    end)

    it("is re-read when the ..data symlink is swapped", function()
        local up = H.upstream{ name = "cm" }
        local dir = H.tmpdir()
        -- the layout kubelet writes: dir/..2026_1/sandboxes.json, dir/..data -> ..2026_1,
        -- dir/sandboxes.json -> ..data/sandboxes.json
        assert(os.execute("mkdir " .. dir .. "/..v1 " .. dir .. "/..v2") == 0)
        H.write_sandboxes(dir .. "/..v1/sandboxes.json", { H.sandbox("a", "v1", up.port) })
        H.write_sandboxes(dir .. "/..v2/sandboxes.json", { H.sandbox("a", "v2", up.port) })
        assert(os.execute("ln -s ..v1 " .. dir .. "/..data && ln -s ..data/sandboxes.json "
            .. dir .. "/sandboxes.json") == 0)
        local px = H.start{ sandboxes_file = dir .. "/sandboxes.json" }
        assert.are.equal(200, status_of(px, "/a/v1/echo"))
        -- atomic swap of ..data, as kubelet does
        assert(os.execute("ln -s ..v2 " .. dir .. "/..data_tmp && mv -T " .. dir .. "/..data_tmp "
            .. dir .. "/..data") == 0)
        H.net.wait_until(function() return status_of(px, "/a/v2/echo") == 200 end, 10)
        assert.are.equal(404, status_of(px, "/a/v1/echo"))
    end)

    it("starts with no routes but stays up when the file is missing", function()
        local dir = H.tmpdir()
        local px = H.start{ sandboxes_file = dir .. "/missing.json" }
        local h = px:json("/health")
        assert.are.equal(0, h.sandboxes)
        assert.are.equal(503, status_of(px, "/ready"))
        local up = H.upstream{ name = "late" }
        H.write_sandboxes(dir .. "/missing.json", { H.sandbox("a", "late", up.port) })
        H.net.wait_until(function() return status_of(px, "/a/late/echo") == 200 end, 10)
        assert.are.equal(200, status_of(px, "/ready"))
    end)
end)

describe("a sandboxes file of 100,000 sandboxes", function()
    teardown(function()
        H.stop_all()
    end)

    -- The load yields to the loop every 1,000 objects: it must complete with the default
    -- script_time_budget (a load that ran without yielding would be stopped by the budget
    -- part-way, leaving a partial table), and the worker keeps answering meanwhile.
    it("loads completely with the default settings", function()
        local up = H.upstream{ name = "big" }
        local items = {}
        for i = 1, 100000 do
            items[i] = H.sandbox("u" .. (i % 100), "sb" .. i, up.port)
        end
        local px = H.start{ sandboxes = items, wait = false }
        local answered = 0
        local h = H.net.wait_until(function()
            local r = H.http.request{ port = px.port, path = "/health", timeout = 2 }
            if r and r.status == 200 then
                answered = answered + 1
                local doc = cjson.decode(r.body)
                return doc.source and doc.source.synced and doc.sandboxes == 100000 and doc
            end
            return false
        end, 120, 0.05, "100,000 sandboxes loaded")
        assert.are.equal(100000, h.source.items)
        assert.is_true(answered >= 1)
        assert.are.equal(200, status_of(px, "/ready"))
        assert.are.equal(200, status_of(px, "/u0/sb100000/echo"))
        assert.are.equal(200, status_of(px, "/u1/sb1/echo"))
        assert.is_nil(px:stderr():find("budget exceeded", 1, true))
    end)

    -- Memory, by a generous bound (not time): the file is read item by item (fs.json_list),
    -- never decoded into one Lua table. Measured on x86-64 (bench/README.md, "memory by
    -- route count"): 86 MiB RSS, 123 MiB peak for 100,000 sandboxes (the Kubernetes source:
    -- 84); decoding the whole file at once cost 296 MiB, and the allocator kept it.
    it("stays within the memory the manifests allow (RSS < 160 MiB, peak < 200 MiB)", function()
        -- A sanitizer build's allocator does not give the release figure: this bound is checked
        -- in the release build only (the load itself is checked in both, by the test above).
        -- The spec runs inside the binary under test, so its own maps tell which build it is.
        local maps = process.read_file("/proc/self/maps") or ""
        if maps:find("libasan", 1, true) then
            pending("the memory bound is a release-build figure (ASan build: not checked here)")
            return
        end
        local items = {}
        for i = 1, 100000 do
            items[i] = H.sandbox("u" .. (i % 100), "sb" .. i, 8888)
        end
        local px = H.start{ sandboxes = items, wait = false }
        H.net.wait_until(function()
            local r = H.http.request{ port = px.port, path = "/health", timeout = 2 }
            return r and r.status == 200 and cjson.decode(r.body).sandboxes == 100000
        end, 120, 0.05, "100,000 sandboxes loaded")
        local st = process.read_file("/proc/" .. px:pid() .. "/status")
        local rss = tonumber(st:match("VmRSS:%s*(%d+)")) / 1024
        local hwm = tonumber(st:match("VmHWM:%s*(%d+)")) / 1024
        assert.is_true(rss < 160, ("RSS %.0f MiB after loading 100,000 sandboxes"):format(rss))
        assert.is_true(hwm < 200, ("peak RSS %.0f MiB while loading 100,000 sandboxes"):format(hwm))
    end)
end)
