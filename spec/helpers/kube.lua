-- Harness for the Kubernetes API stand-in (spec/fixtures/kube_apiserver.py): starts it on
-- loopback, waits until it is listening (its --port-file), and wraps its control API.
--
--   local K = require "spec.helpers.kube"
--   local api = K.start{ versions = "v1beta1,v1alpha1", token_file = path }
--   api:put(H.sandbox("alice", "sb", port))     -- ADDED / MODIFIED
--   api:delete("default", "sb")                  -- DELETED
--   api:faults{ status = 500, count = 3 }        -- fault injection
--   api:stats()                                  -- request counts, tokens seen, request log
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local net = require "spec.helpers.net"
local http = require "spec.helpers.http"
local cjson = require "cjson"

local M = {}

local Api = {}
Api.__index = Api

-- opts: versions, token_file, tls_cert, tls_key, bookmark_interval (default 1), history,
-- seed_file, rv_step_max, start_rv, listen_port (a fixed API port: restart on the same port)
function M.start(opts)
    opts = opts or {}
    local dir = H.tmpdir()
    local port_file = dir .. "/ports.json"
    local cmd = { H.PYTHON, "-u", H.SOURCE_DIR .. "/spec/fixtures/kube_apiserver.py",
        "--listen", "127.0.0.1:" .. (opts.listen_port or 0), "--control", "127.0.0.1:0",
        "--port-file", port_file,
        "--bookmark-interval", tostring(opts.bookmark_interval or 1),
        "--history", tostring(opts.history or 1000) }
    if opts.versions then
        cmd[#cmd + 1] = "--versions"
        cmd[#cmd + 1] = opts.versions
    end
    if opts.token_file then
        cmd[#cmd + 1] = "--token-file"
        cmd[#cmd + 1] = opts.token_file
    end
    if opts.tls_cert then
        cmd[#cmd + 1] = "--tls-cert"
        cmd[#cmd + 1] = opts.tls_cert
        cmd[#cmd + 1] = "--tls-key"
        cmd[#cmd + 1] = opts.tls_key
    end
    if opts.seed_file then
        cmd[#cmd + 1] = "--seed-file"
        cmd[#cmd + 1] = opts.seed_file
    end
    if opts.start_rv then
        cmd[#cmd + 1] = "--start-rv"
        cmd[#cmd + 1] = tostring(opts.start_rv)
    end
    if opts.rv_step_max then
        cmd[#cmd + 1] = "--rv-step-max"
        cmd[#cmd + 1] = tostring(opts.rv_step_max)
    end
    local p = assert(process.spawn{ cmd = cmd, stdout = dir .. "/stdout.log",
        stderr = dir .. "/stderr.log" })
    local ports = net.wait_until(function()
        assert(p:alive(), "kube_apiserver exited: " .. tostring(p:read_stderr()))
        local text = process.read_file(port_file)
        return text and cjson.decode(text)
    end, 20, 0.02, "kube_apiserver port file")
    local self = setmetatable({ proc = p, port = ports.api, control = ports.control, dir = dir,
        scheme = opts.tls_cert and "https" or "http", opts = opts }, Api)
    self.url = self.scheme .. "://127.0.0.1:" .. self.port
    return self
end

-- Calls the control API; returns the decoded JSON answer (raises on a transport error or a
-- status >= 400).
function Api:call(method, path, body)
    local r, err = http.request{ port = self.control, method = method, path = path,
        body = body and cjson.encode(body) or nil,
        headers = body and { { "Content-Type", "application/json" } } or nil, timeout = 30 }
    assert(r, "control " .. method .. " " .. path .. ": " .. tostring(err))
    assert(r.status < 400, "control " .. method .. " " .. path .. " -> " .. r.status .. " " .. r.body)
    if r.body == "" then
        return nil
    end
    return cjson.decode(r.body)
end

function Api:put(obj)
    return self:call("POST", "/objects", obj)
end

function Api:put_all(items)
    return self:call("POST", "/objects", { items = items })
end

function Api:delete(ns, name)
    return self:call("DELETE", "/objects/" .. ns .. "/" .. name)
end

function Api:patch(ns, name, patch)
    return self:call("PATCH", "/objects/" .. ns .. "/" .. name, patch)
end

function Api:bulk(spec)
    return self:call("POST", "/bulk", spec)
end

function Api:compact(keep)
    return self:call("POST", "/compact", keep and { keep = keep } or {})
end

function Api:drop_watches()
    return self:call("POST", "/drop-watches", {})
end

function Api:end_watches()
    return self:call("POST", "/end-watches", {})
end

function Api:bookmark()
    return self:call("POST", "/bookmark", { force = true })
end

function Api:faults(f)
    return self:call("POST", "/faults", f)
end

function Api:clear_faults()
    return self:call("DELETE", "/faults")
end

function Api:stats()
    return self:call("GET", "/stats")
end

function Api:reset_stats()
    return self:call("POST", "/stats/reset", {})
end

function Api:watches()
    return self:call("GET", "/watches")
end

function Api:wake_config(c)
    return self:call("POST", "/wake-config", c)
end

-- The request log entries (from /stats) whose kind matches (list, watch, patch, ...).
function Api:log_of(kind)
    local out = {}
    for _, e in ipairs(self:stats().log or {}) do
        if e.kind == kind then
            out[#out + 1] = e
        end
    end
    return out
end

function Api:stop()
    return self.proc:stop(5)
end

-- Starts the proxy against this API server (flags source). opts as H.start, plus
-- token_file / ca_file / api_version / insecure.
function Api:proxy(opts)
    opts = opts or {}
    local args = opts.args or {}
    args[#args + 1] = "--kube-api"
    args[#args + 1] = self.url
    if opts.token_file then
        args[#args + 1] = "--kube-token-file"
        args[#args + 1] = opts.token_file
    end
    if opts.ca_file then
        args[#args + 1] = "--kube-ca-file"
        args[#args + 1] = opts.ca_file
    end
    if opts.api_version then
        args[#args + 1] = "--kube-api-version"
        args[#args + 1] = opts.api_version
    end
    if opts.insecure then
        args[#args + 1] = "--kube-insecure-skip-verify"
    end
    opts.args = args
    opts.ready_path = opts.ready_path or "/ready"
    return H.start(opts)
end

return M
