-- sp.testkit: helpers for testing scripts with busted inside the runtime
-- (`sandbox-proxy test DIR`), without a network:
--
--   local testkit = require "sp.testkit"
--   local router = require "router"
--   testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7", port = 8888, ready = true } }
--   local req = testkit.request{ method = "GET", target = "/alice/sb/files?x=1" }
--   router.handle(req)
--   assert.are.equal("10.0.0.7", req.forwarded.host)
--   assert.are.equal("/files?x=1", req.forwarded.path)
--
-- testkit.request(opts) builds a fake request with the same methods as the real one
-- (sp.request). It records what the script decided:
--   req.response  = { status =, body = (string), json = (decoded, when JSON), headers = {} }
--   req.forwarded = { host =, port =, path =, set_headers = {}, add_headers = {},
--                     removed_headers = {}, timeouts = {} }
-- req:complete{ status =, bytes_in =, bytes_out =, duration =, upstream =, error = } fills the
-- record of the exchange that on_log(req) reads (the "fake upstream answer").
-- testkit.set_routes / testkit.clear_routes write the real shared route table (sp.routes).
local routes = require "sp.routes"
local cjson = require "cjson.safe"
local request_mod = require "sp.request"

local type = type
local pairs = pairs
local tostring = tostring
local lower = string.lower
local find = string.find
local sub = string.sub

local M = {}

local Fake = {}
local fake_mt = {
    __index = function(self, k)
        if k == "ctx" then
            local ctx = {}
            rawset(self, "ctx", ctx)
            return ctx
        end
        return Fake[k]
    end,
}

local counter = 0

-- opts: method ("GET"), target ("/"), headers (map or list of pairs), client ("127.0.0.1"),
-- client_port, listener ("main"), http_version ("1.1"), body (string), id, upgrade (bool),
-- trace_id (what req:trace_id() returns; nil: tracing off)
function M.request(opts)
    opts = opts or {}
    counter = counter + 1
    local list = {}
    if opts.headers then
        if opts.headers[1] then
            for _, h in ipairs(opts.headers) do
                list[#list + 1] = { h[1], tostring(h[2]) }
            end
        else
            for k, v in pairs(opts.headers) do
                list[#list + 1] = { k, tostring(v) }
            end
        end
    end
    return setmetatable({
        _method = opts.method or "GET",
        _target = opts.target or "/",
        _headers = list,
        _client = opts.client or "127.0.0.1",
        _client_port = opts.client_port or 40000,
        _listener = opts.listener or "main",
        _version = opts.http_version or "1.1",
        _body = opts.body,
        _id = opts.id or ("test" .. counter),
        _upgrade = opts.upgrade or false,
        _trace_id = opts.trace_id,
        _connected = true,
        _record = {},
    }, fake_mt)
end

local function decided(self)
    if self.response or self.forwarded then
        error("the request is already decided", 3)
    end
end

function Fake:method() return self._method end
function Fake:target() return self._target end

function Fake:path()
    local q = find(self._target, "?", 1, true)
    return q and sub(self._target, 1, q - 1) or self._target
end

function Fake:query()
    local q = find(self._target, "?", 1, true)
    return q and sub(self._target, q + 1) or ""
end

function Fake:header(name)
    name = lower(name)
    for _, h in ipairs(self._headers) do
        if lower(h[1]) == name then
            return h[2]
        end
    end
    return nil
end

function Fake:headers()
    local t = {}
    for _, h in ipairs(self._headers) do
        local n = lower(h[1])
        t[n] = t[n] and (t[n] .. ", " .. h[2]) or h[2]
    end
    return t
end

function Fake:client_addr() return self._client end
function Fake:client_port() return self._client_port end
function Fake:id() return self._id end
function Fake:listener() return self._listener end
function Fake:http_version() return self._version end
function Fake:is_upgrade() return self._upgrade end
function Fake:connected() return self._connected end
function Fake:worker() return 0 end

function Fake:body_info()
    local b = self._body
    if b == nil or b == "" then
        return false, 0
    end
    return true, #b
end

function Fake:read_body(limit)
    local b = self._body or ""
    if #b > (limit or 1048576) then
        return nil, "E2BIG: request body larger than the limit"
    end
    return b
end

function Fake:respond(status, body, headers)
    decided(self)
    if type(status) ~= "number" or status < 200 or status > 599 then
        error("respond: status must be a number from 200 to 599", 2)
    end
    local h = {}
    local text = body
    if type(body) == "table" then
        text = (cjson.encode(body):gsub("\\/", "/")) -- as the real request object does
        h["Content-Type"] = "application/json"
    elseif body == nil then
        text = ""
    else
        h["Content-Type"] = "text/plain; charset=utf-8"
    end
    for k, v in pairs(headers or {}) do
        if lower(k) == "content-type" then
            h["Content-Type"] = tostring(v)
        else
            h[k] = tostring(v)
        end
    end
    local json
    if h["Content-Type"] and find(h["Content-Type"], "json", 1, true) then
        json = cjson.decode(text)
    end
    for k, v in pairs(self.response_headers or {}) do
        h[k] = v
    end
    self.response = { status = status, body = text, json = json, headers = h }
    self._record.status = status
end

function Fake:forward(host, port, path)
    decided(self)
    if type(host) ~= "string" or type(port) ~= "number" or type(path) ~= "string"
        or sub(path, 1, 1) ~= "/" then
        error("forward(host, port, path): invalid arguments", 2)
    end
    local pending = self._pending_edits or {}
    self.forwarded = { host = host, port = port, path = path,
        set_headers = pending.set or {}, add_headers = pending.add or {},
        removed_headers = pending.remove or {}, timeouts = pending.timeouts or {} }
    self._pending_edits = nil
end

local function edits(self)
    if self.forwarded then
        return { set = self.forwarded.set_headers, add = self.forwarded.add_headers,
            remove = self.forwarded.removed_headers, timeouts = self.forwarded.timeouts }
    end
    self._pending_edits = self._pending_edits or { set = {}, add = {}, remove = {}, timeouts = {} }
    return self._pending_edits
end

function Fake:set_header(name, value) edits(self).set[name] = tostring(value) end
function Fake:add_header(name, value)
    local e = edits(self).add
    e[#e + 1] = { name, tostring(value) }
end
function Fake:remove_header(name)
    local e = edits(self).remove
    e[#e + 1] = name
end
function Fake:set_error_detail(subject)
    if type(subject) ~= "string" then
        error("set_error_detail(subject): subject must be a string", 2)
    end
    self.error_detail = subject ~= "" and subject or nil
end
-- req:set_response_prefix: recorded in req.response_prefix (nil: off).
function Fake:set_response_prefix(prefix)
    if type(prefix) ~= "string" then
        error("set_response_prefix(prefix): prefix must be a string", 2)
    end
    if prefix ~= "" and (prefix:sub(1, 1) ~= "/" or prefix:sub(-1) == "/"
        or prefix:find("[%c%s;,]")) then
        error("set_response_prefix: not a prefix", 2)
    end
    self.response_prefix = prefix ~= "" and prefix or nil
end
function Fake:set_timeouts(t)
    local to = edits(self).timeouts
    for k, v in pairs(t) do
        to[k] = v
    end
end

-- Response headers a script adds (RateLimit-*): recorded in req.response_headers and merged
-- into req.response.headers when the script answers.
function Fake:add_response_header(name, value)
    self.response_headers = self.response_headers or {}
    self.response_headers[name] = tostring(value)
    if self.response then
        self.response.headers[name] = tostring(value)
    end
end

-- Counters held for the exchange (like the real req:hold, over the real shared dict); the
-- fake gives them back in req:complete().
function Fake:hold(dict, key, limit)
    local d = require("sp.shared").dict(dict)
    if not d then
        return nil, "ENOENT: no shared dict '" .. tostring(dict) .. "'"
    end
    local cur = d:get(key) or 0
    if cur + 1 > limit then
        return false
    end
    d:incr(key, 1, 0)
    self._holds = self._holds or {}
    self._holds[#self._holds + 1] = { d, key }
    return true
end

function Fake:decision()
    if self.response then return "respond" end
    if self.forwarded then return "forward" end
    return "none"
end

-- The record of the exchange (log phase); also gives back held counters, as the runtime does
-- when an exchange ends.
function Fake:complete(rec)
    for k, v in pairs(rec or {}) do
        self._record[k] = v
    end
    for _, h in ipairs(self._holds or {}) do
        h[1]:incr(h[2], -1)
    end
    self._holds = nil
    return self
end

function Fake:status() return self._record.status or 0 end
function Fake:bytes_in() return self._record.bytes_in or 0 end
function Fake:bytes_out() return self._record.bytes_out or 0 end
function Fake:duration() return self._record.duration or 0 end
function Fake:upstream_addr()
    if self._record.upstream then
        return self._record.upstream
    end
    return self.forwarded and (self.forwarded.host .. ":" .. self.forwarded.port) or nil
end
function Fake:error() return self._record.error end
function Fake:delivered()
    if self._record.delivered ~= nil then
        return self._record.delivered
    end
    return nil
end
-- opts.trace_id, or nil (as the real request while tracing is off)
function Fake:trace_id() return self._trace_id end

-- The wake span's marks, kept for specs: req.wake = { begun = true, outcome =, patched =,
-- patch_status = } (outcome nil while held).
function Fake:wake_begin()
    self.wake = self.wake or { begun = true }
end
function Fake:wake_end(outcome, patched, patch_status)
    self.wake = self.wake or { begun = false }
    self.wake.outcome = tostring(outcome or "")
    self.wake.patched = patched and true or false
    self.wake.patch_status = tonumber(patch_status) or 0
end

function Fake:record()
    return {
        request_id = self:id(), method = self:method(), path = self:path(), query = self:query(),
        client = self:client_addr(), status = self:status(), bytes_in = self:bytes_in(),
        bytes_out = self:bytes_out(), duration = self:duration(), upstream = self:upstream_addr(),
        upstream_connect = self._record.upstream_connect,
        upstream_first_byte = self._record.upstream_first_byte, error = self:error(),
        delivered = self:delivered(), worker = 0, trace_id = self:trace_id(),
    }
end

-- The access-log line, as the runtime writes it (sp.request Req:access_log), handed to
-- core.access_log (looked up on each call, so a spec can capture lines by replacing it).
local function json_str(v)
    return (cjson.encode(v):gsub("\\/", "/"))
end

function Fake:access_log(mask, ...)
    local extra, n = { ... }, select("#", ...)
    if n > 12 then
        error("access_log: at most 6 name/value pairs", 2)
    end
    local F = request_mod.LOG_FIELDS
    local rec = self:record()
    local parts = {}
    local function put(name, json)
        parts[#parts + 1] = json_str(name) .. ":" .. json
    end
    local function seconds(v)
        return v and v >= 0 and string.format("%.6f", v) or nil
    end
    local values = {
        time = json_str(require("sp.core").iso8601()),
        request_id = json_str(rec.request_id), client = json_str(rec.client),
        method = json_str(rec.method), path = json_str(rec.path),
        query = rec.query ~= "" and json_str(rec.query) or nil,
        status = string.format("%d", rec.status or 0),
        bytes_in = string.format("%d", rec.bytes_in or 0),
        bytes_out = string.format("%d", rec.bytes_out or 0),
        duration = seconds(rec.duration), upstream_connect = seconds(rec.upstream_connect),
        upstream_first_byte = seconds(rec.upstream_first_byte),
        upstream = rec.upstream and json_str(rec.upstream) or nil,
        trace_id = rec.trace_id and json_str(rec.trace_id) or nil,
        error = rec.error and json_str(rec.error) or nil,
        worker = "0",
    }
    for _, name in ipairs(request_mod.LOG_ORDER) do
        if name == "worker" then
            for i = 1, (n or 0) - 1, 2 do
                local k, v = extra[i], extra[i + 1]
                if (k ~= nil and type(k) ~= "string") or (v ~= nil and type(v) ~= "string") then
                    error("access_log: names and values must be strings (as the runtime's)", 3)
                end
                if k ~= nil and v ~= nil then
                    put(k, json_str(v))
                end
            end
        end
        if bit.band(mask, F[name]) ~= 0 and values[name] then
            put(name, values[name])
            if name == "error" and rec.delivered ~= nil then
                put("delivered", rec.delivered and "true" or "false")
            end
        end
    end
    require("sp.core").access_log("{" .. table.concat(parts, ",") .. "}")
end

-- Names of request methods the fake lacks (should be empty: keeps the kit honest).
function M.missing_methods()
    local missing = {}
    for name in pairs(request_mod.methods) do
        if Fake[name] == nil then
            missing[#missing + 1] = name
        end
    end
    table.sort(missing)
    return missing
end

-- Scripts -----------------------------------------------------------------------------

-- A fresh instance of script module `name` loaded with config section `key` set to `section`
-- (nil: the script's defaults). Scripts read their config section when loaded; the config is
-- restored and the module dropped from package.loaded afterwards, so every call loads anew.
function M.load(name, key, section)
    local config = require "sp.config"
    local saved = config[key]
    config[key] = section
    package.loaded[name] = nil
    local ok, m = pcall(require, name)
    config[key] = saved
    package.loaded[name] = nil
    if not ok then
        error(m, 0)
    end
    return m
end

-- Routes ------------------------------------------------------------------------------

function M.clear_routes()
    for _, r in ipairs(routes.list()) do
        routes.delete(r.key)
    end
end

-- Replaces the route table with the given map key -> route fields (defaults filled in; the
-- user from the key unless given, `user = false` for an unowned route).
function M.set_routes(map)
    M.clear_routes()
    for key, r in pairs(map) do
        local user, name = key:match("^([^/]+)/(.+)$")
        routes.set(key, {
            namespace = r.namespace or "default",
            name = r.name or name,
            user = r.user == nil and user or r.user or nil,
            address = r.address,
            port = r.port or 8888,
            ready = r.ready ~= false,
            reason = r.reason or (r.ready == false and "DependenciesNotReady" or "DependenciesReady"),
            service = r.service,
            conflict = r.conflict,
            mode = r.mode or "Running",
            ports = r.ports,
            prefix = r.prefix,
        })
    end
end

-- A Sandbox object (v1beta1) for mapping tests. opts: namespace, ready (true), ip, service,
-- reason, labels, annotations, created, mode, api_version.
function M.sandbox(user, name, opts)
    opts = opts or {}
    local ready = opts.ready ~= false
    local labels = opts.labels or {}
    if user and labels.user == nil then
        labels.user = user
    end
    return {
        apiVersion = opts.api_version or "agents.x-k8s.io/v1beta1",
        kind = "Sandbox",
        metadata = {
            name = name, namespace = opts.namespace or "default", labels = labels,
            annotations = opts.annotations or {},
            creationTimestamp = opts.created or "2026-08-20T10:00:00Z",
        },
        spec = { operatingMode = opts.mode or "Running" },
        status = {
            conditions = { { type = "Ready", status = ready and "True" or "False",
                reason = opts.reason or (ready and "DependenciesReady" or "DependenciesNotReady") } },
            podIPs = (ready and opts.ip ~= false) and { opts.ip or "10.0.0.1" } or nil,
            serviceFQDN = opts.service,
        },
    }
end

return M
