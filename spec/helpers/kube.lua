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
-- seed_file, rv_step_max, start_rv, listen_port (a fixed API port: restart on the same port),
-- no_claims (a cluster without the SandboxClaim CRD)
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
    if opts.no_claims then
        cmd[#cmd + 1] = "--no-claims"
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

-- SandboxClaims and warm pools (the stand-in's claim controller binds them; README-kube.md).
function Api:claim_config(c)
    return self:call("POST", "/claim-config", c)
end

-- A warm pool: { name, namespace, replicas, ready } -> { members = { names } }
function Api:pool(p)
    return self:call("POST", "/warmpools", p)
end

-- Creates or replaces a SandboxClaim as given (the controller reconciles it).
function Api:put_claim(obj)
    return self:call("POST", "/claims", obj)
end

function Api:get_claim(ns, name)
    return self:call("GET", "/claims/" .. ns .. "/" .. name)
end

function Api:delete_claim(ns, name)
    return self:call("DELETE", "/claims/" .. ns .. "/" .. name)
end

-- A SandboxClaim object. opts: namespace, pool ("pool"), labels, pod_labels
-- (spec.additionalPodMetadata.labels)
function M.claim(name, opts)
    opts = opts or {}
    local spec = { warmPoolRef = { name = opts.pool or "pool" } }
    if opts.pod_labels then
        spec.additionalPodMetadata = { labels = opts.pod_labels }
    end
    return { apiVersion = "extensions.agents.x-k8s.io/v1beta1", kind = "SandboxClaim",
        metadata = { name = name, namespace = opts.namespace or "default", labels = opts.labels },
        spec = spec }
end

-- Tokens TokenReview knows: { token, username, groups, extra, audiences }
function Api:add_token(t)
    return self:call("POST", "/tokens", t)
end

function Api:revoke_token(token)
    return self:call("POST", "/tokens/revoke", { token = token })
end

-- RBAC denials: { "create tokenreviews", "list sandboxclaims", ... }; {} clears
function Api:deny(rules)
    if #rules == 0 then
        return self:call("DELETE", "/rbac")
    end
    return self:call("POST", "/rbac", { deny = rules })
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
