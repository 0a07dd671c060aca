-- A real Jupyter (Debian's jupyter-notebook 6.4, run by its own /usr/bin/python3 shebang with
-- Debian's python3-notebook and ipykernel; token and password off, on loopback ports, started
-- and stopped here) behind the proxy, driven the way a browser drives it: browser auth on (the
-- credential in the query string -> the proxy's cookie -> 302), then only cookies, Jupyter's
-- own _xsrf cookie echoed in X-XSRFToken, an Origin on every POST and on the WebSocket. In each
-- routing style the tree page and its static assets load (200, right content types), a kernel
-- starts through the REST API and `1+1` runs over the kernel's WebSocket channel:
--   (a) host routing:  Host nb--alice.sbx.test, Jupyter unaware of any prefix
--   (b) keep prefix:   /alice/kept/..., Jupyter told base_url=/alice/kept/
--   (c) strip prefix:  /alice/nb/..., Jupyter unaware; its redirect to /tree and its _xsrf
--                      cookie's Path come back under /alice/nb (the runtime's rewrite)
-- In (c) the page's links stay absolute (/static/...): bodies are never rewritten, so a real
-- browser needs (a) or (b) for Jupyter's pages (the README's "Browser apps" says so); the spec
-- fetches those assets under the prefix, as a prefix-relative app would reference them.
-- Bounded: Jupyter's start 30 s, each kernel reply 30 s, Chromium's page 90 s (a loaded machine
-- needs far more than the ~8 s it takes on a quiet one). The file runs in ~20 s here.
local H = require "spec.helpers.proxy"
local ws = require "spec.helpers.ws"
local net = require "spec.helpers.net"
local process = require "spec.helpers.process"
local crypto = require "sp.crypto"
local cjson = require "cjson"

local BASE = "sbx.test"

-- ------------------------------------------------------------------ a browser's cookie jar
-- One host per session; RFC 6265 path matching, the default path from the request's path.
local Jar = {}
Jar.__index = Jar

local function new_jar()
    return setmetatable({ cookies = {} }, Jar)
end

local function path_matches(cookie_path, path)
    if path == cookie_path then
        return true
    end
    if path:sub(1, #cookie_path) ~= cookie_path then
        return false
    end
    return cookie_path:sub(-1) == "/" or path:sub(#cookie_path + 1, #cookie_path + 1) == "/"
end

function Jar:store(resp, request_path)
    for _, h in ipairs(resp.header_list) do
        if h[1]:lower() == "set-cookie" then
            local name, value = h[2]:match("^%s*([^=;%s]+)=([^;]*)")
            local path = h[2]:match(";%s*[Pp]ath%s*=%s*([^;%s]+)")
            if not path then
                path = request_path:match("^([^?]*)/") or "/"
                if path == "" then
                    path = "/"
                end
            end
            self.cookies[name .. "\0" .. path] = { name = name, value = value, path = path }
        end
    end
end

function Jar:header(path)
    path = path:match("^[^?]*")
    local out = {}
    for _, c in pairs(self.cookies) do
        if path_matches(c.path, path) then
            out[#out + 1] = c.name .. "=" .. c.value
        end
    end
    table.sort(out)
    return out[1] and table.concat(out, "; ") or nil
end

function Jar:get(name)
    for _, c in pairs(self.cookies) do
        if c.name == name then
            return c.value, c.path
        end
    end
end

-- ------------------------------------------------------------------ the spec

describe("Jupyter through the proxy", function()
    local px, plain_port, kept_port

    local function start_jupyter(base_url)
        local dir = H.tmpdir()
        local port = assert(net.free_port())
        local cmd = { "jupyter-notebook", "--no-browser", "--allow-root", "--ip=127.0.0.1",
            "--port=" .. port, "--port-retries=0", "--NotebookApp.token=",
            "--NotebookApp.password=", "--NotebookApp.allow_remote_access=True",
            "--notebook-dir=" .. dir }
        if base_url then
            cmd[#cmd + 1] = "--NotebookApp.base_url=" .. base_url
        end
        local p = assert(process.spawn{ cmd = cmd, stdout = dir .. "/jupyter.log", stderr = dir .. "/jupyter.log",
            env = { HOME = dir, JUPYTER_RUNTIME_DIR = dir .. "/rt", JUPYTER_DATA_DIR = dir .. "/data",
                JUPYTER_CONFIG_DIR = dir .. "/cfg", IPYTHONDIR = dir .. "/ipy",
                PYDEVD_DISABLE_FILE_VALIDATION = "1" } })
        return port, p
    end

    setup(function()
        local ok = H.need_tool("jupyter-notebook", "Debian jupyter-notebook: the Jupyter behind the proxy")
        if not ok then
            return
        end
        local p1, p2
        plain_port, p1 = start_jupyter(nil)
        kept_port, p2 = start_jupyter("/alice/kept/")
        assert(net.wait_port("127.0.0.1", plain_port, 30, p1))
        assert(net.wait_port("127.0.0.1", kept_port, 30, p2))
        local keys = H.tmpdir() .. "/keys.json"
        assert(process.write_file(keys, cjson.encode({ keys = {
            { user = "alice", sha256 = crypto.hex(crypto.sha256("alice-key")) } } })))
        local nb = H.sandbox("alice", "nb", plain_port)
        local kept = H.sandbox("alice", "kept", kept_port)
        kept.metadata.annotations["sandbox-proxy.dev/prefix"] = "keep"
        px = H.start{ sandboxes = { nb, kept }, config = ([[return {
            auth = { keys_file = %q },
            sandbox_path = { base_domain = %q },
            browser = { cookie_secure = false },
        }]]):format(keys, BASE) }
    end)

    teardown(function()
        H.stop_all()
    end)

    -- A browser session on one host; prefix "" for host routing.
    local function session(host, prefix)
        local jar = new_jar()
        local s = {}
        function s.request(method, path, body, headers)
            local h = { Host = host, Cookie = jar:header(path) }
            for k, v in pairs(headers or {}) do
                h[k] = v
            end
            if not h.Cookie then
                h.Cookie = false
            end
            local r = assert(px:request{ method = method, path = path, body = body, headers = h, timeout = 30 })
            jar:store(r, path)
            return r
        end
        function s.state_changing(method, path, body)
            return s.request(method, path, body, { ["X-XSRFToken"] = jar:get("_xsrf"),
                Origin = "http://" .. host, ["Content-Type"] = "application/json" })
        end
        s.jar, s.host, s.prefix = jar, host, prefix
        return s
    end

    -- What every mode checks; `assets_prefix`: what to put before the page's /static links.
    local function check(s, opts)
        -- browser auth: the credential in the query string becomes the proxy's cookie
        local r = s.request("GET", s.prefix .. "/?sp_token=alice-key")
        assert.are.equal(302, r.status)
        assert.are.equal(s.prefix .. "/", r.headers["location"])
        assert.are.equal(opts.cookie_path, select(2, s.jar:get("sp_token")))
        -- Jupyter's own redirect to its tree, under the prefix
        r = s.request("GET", s.prefix .. "/")
        assert.are.equal(302, r.status)
        assert.are.equal(s.prefix .. "/tree?", r.headers["location"])
        r = s.request("GET", r.headers["location"])
        assert.are.equal(200, r.status)
        assert.matches("^text/html", r.headers["content-type"])
        assert.truthy(r.body:find('data-base-url="' .. opts.base_url .. '"', 1, true))
        local xsrf, xsrf_path = s.jar:get("_xsrf")
        assert.truthy(xsrf, "Jupyter's _xsrf cookie")
        assert.are.equal(opts.xsrf_path, xsrf_path)
        -- the page's stylesheet and scripts
        local css = r.body:match('href="([^"]*/static/style/style%.min%.css[^"]*)"')
        local js = r.body:match('src="([^"]*/static/components/requirejs/require%.js[^"]*)"')
        assert.truthy(css and js, "static links in the tree page")
        for link, ctype in pairs({ [css] = "^text/css", [js] = "javascript" }) do
            local a = s.request("GET", opts.assets_prefix .. link)
            assert.are.equal(200, a.status, link)
            assert.matches(ctype, a.headers["content-type"], nil, nil)
            assert.truthy(#a.body > 1000, link)
        end
        -- a kernel through the REST API (Origin and X-XSRFToken as Jupyter's JavaScript sends)
        r = s.state_changing("POST", s.prefix .. "/api/kernels", '{"name":"python3"}')
        assert.are.equal(201, r.status, r.body)
        local kernel = cjson.decode(r.body).id
        -- `1+1` over the kernel's WebSocket channel
        local session_id = crypto.hex(crypto.random(16))
        local chan = s.prefix .. "/api/kernels/" .. kernel .. "/channels?session_id=" .. session_id
        local c = assert(ws.connect{ port = px.port, path = chan, origin = "http://" .. s.host,
            headers = { Host = s.host, Cookie = s.jar:header(chan) }, timeout = 30 })
        local msg_id = crypto.hex(crypto.random(16))
        assert(c:send_text(cjson.encode({
            header = { msg_id = msg_id, username = "spec", session = session_id,
                msg_type = "execute_request", version = "5.3", date = "2026-12-02T00:00:00Z" },
            parent_header = {}, metadata = {}, channel = "shell", buffers = {},
            content = { code = "1+1", silent = false, store_history = true, user_expressions = {},
                allow_stdin = false, stop_on_error = true },
        })))
        local result
        local ok = pcall(net.wait_until, function()
            local op, text = c:receive(30)
            assert(op, "the kernel's channel closed: " .. tostring(text))
            if op == "text" then
                local m = cjson.decode(text)
                if m.msg_type == "execute_result" and m.parent_header.msg_id == msg_id then
                    result = m.content.data["text/plain"]
                    return true
                end
            end
        end, 30, 0, "the kernel's execute_result")
        c:close()
        assert.is_true(ok, "no execute_result for 1+1")
        assert.are.equal("2", result)
        r = s.state_changing("DELETE", s.prefix .. "/api/kernels/" .. kernel)
        assert.are.equal(204, r.status)
    end

    it("(a) host routing: Jupyter unaware of any prefix", function()
        if not px then
            pending("SKIPPED: jupyter-notebook is not installed")
            return
        end
        local s = session("nb--alice." .. BASE .. ":" .. px.port, "")
        check(s, { cookie_path = "/", base_url = "/", xsrf_path = "/", assets_prefix = "" })
    end)

    it("(b) keep prefix: Jupyter told base_url=/alice/kept/", function()
        if not px then
            pending("SKIPPED: jupyter-notebook is not installed")
            return
        end
        local s = session("127.0.0.1:" .. px.port, "/alice/kept")
        -- (Jupyter 6.4 sets its _xsrf cookie with Path=/ whatever its base_url; keep mode
        -- relays it as it is)
        check(s, { cookie_path = "/alice/kept", base_url = "/alice/kept/",
            xsrf_path = "/", assets_prefix = "" })
    end)

    it("(c) strip prefix: Jupyter unaware; Location and Set-Cookie Path restored", function()
        if not px then
            pending("SKIPPED: jupyter-notebook is not installed")
            return
        end
        local s = session("127.0.0.1:" .. px.port, "/alice/nb")
        check(s, { cookie_path = "/alice/nb", base_url = "/", xsrf_path = "/alice/nb",
            assets_prefix = "/alice/nb" })
    end)

    -- (d) a real browser: headless Chromium (Debian `chromium`, run with --no-sandbox: CI runs
    -- as root) opens a notebook through the proxy in mode (a), logging in with the credential in
    -- the URL; driven over the DevTools protocol (its WebSocket, with the spec's own client):
    -- the page is styled (Jupyter's style.min.css is loaded and parsed) and its kernel reports
    -- idle (the kernel indicator in the DOM, which needs the kernel's WebSocket through the
    -- proxy). *.sbx.test resolves to 127.0.0.1 inside Chromium (--host-resolver-rules).
    it("(d) headless Chromium: the notebook page is styled and its kernel idle", function()
        if not px then
            pending("SKIPPED: jupyter-notebook is not installed")
            return
        end
        local ok, why = H.need_tool("chromium", "Debian chromium: the browser of the Jupyter spec")
        if not ok then
            pending(why)
            return
        end
        local host = "nb--alice." .. BASE .. ":" .. px.port
        -- a notebook to open (Jupyter's REST API, as in (a))
        local s = session(host, "")
        assert.are.equal(302, s.request("GET", "/?sp_token=alice-key").status)
        s.request("GET", "/tree")
        local r = s.state_changing("PUT", "/api/contents/browser.ipynb", '{"type":"notebook"}')
        assert.are.equal(201, r.status, r.body)

        local dir = H.tmpdir()
        local dport = assert(net.free_port())
        local chrome = assert(process.spawn{ cmd = { "chromium", "--headless", "--no-sandbox",
            "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
            "--user-data-dir=" .. dir .. "/profile", "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=" .. dport,
            "--host-resolver-rules=MAP *." .. BASE .. " 127.0.0.1", "about:blank" },
            stdout = dir .. "/chromium.log", stderr = dir .. "/chromium.log", env = { HOME = dir } })
        assert(net.wait_port("127.0.0.1", dport, 30, chrome))
        local page
        net.wait_until(function()
            local l = H.http.request{ port = dport, path = "/json/list", timeout = 5 }
            for _, t in ipairs(l and l.status == 200 and cjson.decode(l.body) or {}) do
                if t.type == "page" then
                    page = t.webSocketDebuggerUrl:match("^ws://[^/]+(/.*)$")
                    return true
                end
            end
        end, 30, 0.05, "Chromium's page target")
        local cdp = assert(ws.connect{ port = dport, path = page, timeout = 30 })
        local next_id = 0
        local function call(method, params)
            next_id = next_id + 1
            assert(cdp:send_text(cjson.encode({ id = next_id, method = method, params = params or {} })))
            while true do
                local op, text = cdp:receive(30)
                assert(op == "text", "DevTools: " .. tostring(text))
                local m = cjson.decode(text)
                if m.id == next_id then
                    assert(not m.error, text)
                    return m.result
                end
            end
        end
        call("Page.navigate", { url = "http://" .. host .. "/notebooks/browser.ipynb?sp_token=alice-key" })
        local state
        local done = pcall(net.wait_until, function()
            local res = call("Runtime.evaluate", { returnByValue = true, expression = [[(function () {
                var styled = Array.prototype.some.call(document.styleSheets, function (s) {
                    try { return /style\.min\.css/.test(s.href || "") && s.cssRules.length > 100; }
                    catch (e) { return false; }
                });
                var k = document.querySelector("#kernel_indicator_icon");
                return location.pathname + location.search + "|" + (styled ? "styled" : "unstyled")
                    + "|" + (k ? k.className : "no indicator");
            })()]] })
            state = res.result and res.result.value
            return state and state:find("|styled|", 1, true) and state:find("kernel_idle_icon", 1, true)
        end, 90, 0.2, "the notebook page styled, its kernel idle")
        cdp:close()
        chrome:stop(5)
        assert.is_true(done, "Chromium's page: " .. tostring(state))
        -- the login's 302 took the credential out of the URL the page shows
        assert.are.equal("/notebooks/browser.ipynb|styled|kernel_idle_icon", state)
    end)
end)
