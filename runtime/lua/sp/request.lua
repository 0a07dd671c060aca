-- sp.request: the request object handed to on_request(req) and on_log(req).
--
-- One object exists per request slot and is reused; `req._g` is the slot's generation when
-- the hook started, so a script that keeps `req` after its request ended gets an error
-- instead of another request's data. Everything reaches C through the LuaJIT FFI with plain
-- arguments, so the routing path compiles under the JIT. Headers are read on demand.
local ffi = require "ffi"
local cjson = require "cjson"
local core = require "sp.core"

local C = ffi.C
local ffi_string = ffi.string
local type = type
local error = error
local pairs = pairs
local tostring = tostring
local tonumber = tonumber
local rawset = rawset
local lower = string.lower
local floor = math.floor
local gsub = string.gsub
local cjson_encode = cjson.encode

local CDEF = [[
typedef struct sp_request sp_request_t;
uint32_t sp_req_gen(const sp_request_t *r);
const char *sp_req_method(const sp_request_t *r);
const char *sp_req_target(const sp_request_t *r, size_t *len);
size_t sp_req_path_len(const sp_request_t *r);
const char *sp_req_header(const sp_request_t *r, const char *name, size_t nlen, size_t *vlen);
int sp_req_header_count(const sp_request_t *r);
const char *sp_req_header_at(const sp_request_t *r, int i, size_t *nlen, const char **val,
                             size_t *vlen);
const char *sp_req_client_ip(const sp_request_t *r);
int sp_req_client_port(const sp_request_t *r);
const char *sp_req_id(const sp_request_t *r, size_t *len);
const char *sp_req_listener(const sp_request_t *r);
int sp_req_http_version(const sp_request_t *r);
int sp_req_body_info(const sp_request_t *r, double *length);
int sp_req_is_upgrade(const sp_request_t *r);
int sp_req_connected(const sp_request_t *r);
int sp_req_respond(sp_request_t *r, int status, const char *ct, size_t ctlen, const char *body,
                   size_t blen);
int sp_req_add_header(sp_request_t *r, const char *n, size_t nl, const char *v, size_t vl);
int sp_req_add_header_u(sp_request_t *r, const char *n, size_t nl, double v);
int sp_req_edit_header(sp_request_t *r, int op, const char *n, size_t nl, const char *v, size_t vl);
int sp_req_forward(sp_request_t *r, const char *host, size_t hl, int port, const char *path,
                   size_t pl);
void sp_req_set_timeouts(sp_request_t *r, double connect, double first_byte, double idle);
int sp_req_decision(const sp_request_t *r);
void sp_req_set_error_detail(sp_request_t *r, const char *s, size_t len);
int sp_req_set_response_prefix(sp_request_t *r, const char *p, size_t len);
int sp_req_delivered(const sp_request_t *r);
int sp_req_status(const sp_request_t *r);
double sp_req_bytes_in(const sp_request_t *r);
double sp_req_bytes_out(const sp_request_t *r);
double sp_req_duration(const sp_request_t *r);
double sp_req_connect_time(const sp_request_t *r);
double sp_req_first_byte_time(const sp_request_t *r);
const char *sp_req_upstream_addr(const sp_request_t *r);
const char *sp_req_error(const sp_request_t *r);
int sp_req_worker(const sp_request_t *r);
int sp_req_trace_id(sp_request_t *r, char *out);
void sp_req_wake_mark(sp_request_t *r, int phase, const char *outcome, size_t olen, int patched,
                      int status);
int sp_req_access_log(const sp_request_t *r, uint32_t mask, const char *k1, const char *v1,
                      const char *k2, const char *v2, const char *k3, const char *v3,
                      const char *k4, const char *v4, const char *k5, const char *v5,
                      const char *k6, const char *v6);
int sp_req_log_field(int i, const char **name, uint32_t *bit);
]]
ffi.cdef(CDEF)
-- Resolve every symbol now: the first lookup of a C function inside a trace aborts it
-- ("symbol not in cache"), and the routing path should compile on its first hot pass.
for name in CDEF:gmatch("([%w_]+)%(") do
    local _ = C[name]
end

local len_out = ffi.new("size_t[1]")
local len_out2 = ffi.new("size_t[1]")
local str_out = ffi.new("const char *[1]")
local num_out = ffi.new("double[1]")

local Req = {}
local M = {}

-- Methods end with `local s = ffi_string(..); return s`, never `return ffi_string(..)`: a tail
-- call of a builtin from the first frame of a trace aborts that trace in LuaJIT 2.1.

-- req.ctx is made on first use, sized for the fields the default scripts set (target_*,
-- route, ratelimit, identity) so it never rehashes while a request runs.
local new_table = require "table.new"

local mt = {
    __index = function(self, k)
        if k == "ctx" then
            local ctx = new_table(0, 8)
            rawset(self, "ctx", ctx)
            return ctx
        end
        return Req[k]
    end,
    __tostring = function(self)
        return "request " .. tostring(self._g)
    end,
}

-- Creates the object of one request slot (called by the runtime once per slot).
function M.new(ptr)
    return setmetatable({ _r = ffi.cast("sp_request_t *", ptr), _p = ptr, _g = -1 }, mt)
end

-- Raises unless self is the live request it was handed out as.
local function live(self)
    local r = self._r
    if self._g ~= C.sp_req_gen(r) then
        error("this request has ended (a request object must not be kept after its hooks)", 3)
    end
    return r
end

function Req:method()
    local s = ffi_string(C.sp_req_method(live(self)))
    return s
end

-- The request target exactly as received (path and query, still percent-encoded).
function Req:target()
    local r = live(self)
    local p = C.sp_req_target(r, len_out)
    local s = ffi_string(p, len_out[0])
    return s
end

-- The raw path (no query string), still percent-encoded.
function Req:path()
    local r = live(self)
    local p = C.sp_req_target(r, len_out)
    local s = ffi_string(p, C.sp_req_path_len(r))
    return s
end

-- The raw query string without '?', or "" when there is none.
function Req:query()
    local r = live(self)
    local p = C.sp_req_target(r, len_out)
    local plen = C.sp_req_path_len(r)
    local total = len_out[0]
    if plen >= total then
        return ""
    end
    local s = ffi_string(p + plen + 1, total - plen - 1)
    return s
end

-- The first value of a header (case-insensitive name), or nil.
function Req:header(name)
    local r = live(self)
    local v = C.sp_req_header(r, name, #name, len_out)
    if v == nil then
        return nil
    end
    local s = ffi_string(v, len_out[0])
    return s
end

-- All headers as a table of lowercase name -> value (repeated headers joined by ", ").
-- Built on each call: prefer req:header(name) on hot paths.
function Req:headers()
    local r = live(self)
    local t = {}
    for i = 0, C.sp_req_header_count(r) - 1 do
        local n = C.sp_req_header_at(r, i, len_out, str_out, len_out2)
        local name = lower(ffi_string(n, len_out[0]))
        local value = ffi_string(str_out[0], len_out2[0])
        local prev = t[name]
        t[name] = prev and (prev .. ", " .. value) or value
    end
    return t
end

function Req:client_addr()
    local s = ffi_string(C.sp_req_client_ip(live(self)))
    return s
end

function Req:client_port()
    return C.sp_req_client_port(live(self))
end

function Req:id()
    local p = C.sp_req_id(live(self), len_out)
    local s = ffi_string(p, len_out[0])
    return s
end

-- The name of the listener the request came in on: "main", "demo" or "metrics".
function Req:listener()
    local s = ffi_string(C.sp_req_listener(live(self)))
    return s
end

-- "1.1" or "1.0".
function Req:http_version()
    local v = C.sp_req_http_version(live(self))
    return v == 11 and "1.1" or (v == 10 and "1.0" or tostring(v / 10))
end

-- has_body, length (nil when chunked).
function Req:body_info()
    local has = C.sp_req_body_info(live(self), num_out) ~= 0
    local n = num_out[0]
    return has, n >= 0 and n or nil
end

function Req:is_upgrade()
    return C.sp_req_is_upgrade(live(self)) ~= 0
end

-- False once the client connection has gone away.
function Req:connected()
    return C.sp_req_connected(live(self)) ~= 0
end

-- Reads the whole request body (at most `limit` bytes, default 1 MiB) and returns it as a
-- string; yields until it has arrived. Returns nil, "E2BIG: ..." when the body is larger (the
-- connection is then closed after the response). Opt-in: bodies otherwise stream to the
-- sandbox untouched, and a body read here is forwarded from memory if the request is forwarded.
local read_body = core.read_body
function Req:read_body(limit)
    live(self)
    return read_body(self._p, limit or 1048576)
end

-- Takes one unit of counter `key` in shared dict `dict`, capped at `limit`, for as long as
-- this exchange lasts: the runtime gives it back however the exchange ends (response sent,
-- client gone, upstream error, timeout, WebSocket closed). Returns true when taken, false at
-- the limit, or nil, err.
local hold = core.hold
function Req:hold(dict, key, limit)
    live(self)
    return hold(self._p, dict, key, limit)
end

local function check_rc(rc, what)
    if rc ~= 0 then
        error(what, 3)
    end
end

-- Answers the request. body: a table (sent as JSON) or a string (content type from
-- headers["Content-Type"], default text/plain) or nil. headers: a table name -> value.
function Req:respond(status, body, headers)
    local r = live(self)
    if type(status) ~= "number" or status < 200 or status > 599 then
        error("respond: status must be a number from 200 to 599", 2)
    end
    local ct
    local btype = type(body)
    if btype == "table" then
        -- cjson escapes every '/' as '\/'; undo it (safe: cjson never emits a bare '/')
        body = gsub(cjson_encode(body), "\\/", "/")
        ct = "application/json"
    elseif btype == "nil" then
        body = ""
    elseif btype ~= "string" then
        error("respond: body must be a table, a string or nil", 2)
    else
        ct = "text/plain; charset=utf-8"
    end
    if headers then
        for name, value in pairs(headers) do
            if type(name) ~= "string" then
                error("respond: header names must be strings", 2)
            end
            value = tostring(value)
            if lower(name) == "content-type" then
                ct = value
            else
                check_rc(C.sp_req_add_header(r, name, #name, value, #value),
                    "respond: invalid header " .. name)
            end
        end
    end
    ct = ct or ""
    check_rc(C.sp_req_respond(r, status, ct, #ct, body, #body),
        "respond: the request is already decided, or the status/content type is invalid")
end

-- Forwards the request to host:port with the given path (path and query, starting with '/').
function Req:forward(host, port, path)
    local r = live(self)
    if type(host) ~= "string" or type(port) ~= "number" or type(path) ~= "string" then
        error("forward(host, port, path): expected string, number, string", 2)
    end
    check_rc(C.sp_req_forward(r, host, #host, port, path, #path),
        "forward: already decided, or invalid host/port/path")
end

-- Sets a header on the request sent upstream (replacing the client's value).
function Req:set_header(name, value)
    value = tostring(value)
    check_rc(C.sp_req_edit_header(live(self), 61 --[[ '=' ]], name, #name, value, #value),
        "set_header: invalid header name or value")
end

-- Adds a header to the request sent upstream (keeping the client's values).
function Req:add_header(name, value)
    value = tostring(value)
    check_rc(C.sp_req_edit_header(live(self), 43 --[[ '+' ]], name, #name, value, #value),
        "add_header: invalid header name or value")
end

-- Adds a header to the response the client gets (local or proxied), e.g. RateLimit-*. A value
-- that is a whole number (0 <= n < 1e14) is written in digits by the runtime (as tostring
-- would), without formatting a double here.
function Req:add_response_header(name, value)
    local r = live(self)
    if type(value) == "number" and value >= 0 and value < 1e14 and value == floor(value) then
        check_rc(C.sp_req_add_header_u(r, name, #name, value),
            "add_response_header: invalid header, or the response head has gone out")
        return
    end
    value = tostring(value)
    check_rc(C.sp_req_add_header(r, name, #name, value, #value),
        "add_response_header: invalid header, or the response head has gone out")
end

-- Removes a client header from the request sent upstream.
function Req:remove_header(name)
    check_rc(C.sp_req_edit_header(live(self), 45 --[[ '-' ]], name, #name, "", 0),
        "remove_header: invalid header name")
end

-- Per-request upstream timeouts in seconds: { connect =, first_byte =, idle = }.
function Req:set_timeouts(t)
    local r = live(self)
    C.sp_req_set_timeouts(r, tonumber(t.connect) or 0, tonumber(t.first_byte) or 0,
        tonumber(t.idle) or 0)
end

-- Upstream failures of this request (502/504 answered by the runtime) get the agent-sandbox
-- router's error shape: {"detail": "Could not connect to the backend sandbox: <subject>", ...}
-- ("Timed out waiting for ..." on a timeout, "Lost the connection to ..." when the sandbox
-- closed or broke the exchange) besides "error", "delivered" and "request_id". "" undoes it.
function Req:set_error_detail(subject)
    if type(subject) ~= "string" then
        error("set_error_detail(subject): subject must be a string", 2)
    end
    C.sp_req_set_error_detail(live(self), subject, #subject)
end

-- Asks the runtime to put the proxied response's `Location` and `Set-Cookie` Path back under
-- `prefix` (path routing that strips the prefix: the sandbox answers as if served at "/"). A
-- path-absolute Location ("/tree", not "//host") and an absolute http(s) URL on the request's
-- own Host get the prefix in front of their path; a Set-Cookie `Path=/x` becomes
-- `Path=<prefix>/x` (`Path=/`: `Path=<prefix>`); values already under the prefix, relative
-- Locations and other hosts are left alone; bodies never. `prefix` starts with "/", does not
-- end with one, holds no space, control byte, ";" or ","; "" turns it off. Call it before
-- forward. Nothing runs per response unless a script asked.
function Req:set_response_prefix(prefix)
    if type(prefix) ~= "string" then
        error("set_response_prefix(prefix): prefix must be a string", 2)
    end
    check_rc(C.sp_req_set_response_prefix(live(self), prefix, #prefix),
        "set_response_prefix: already decided, or not a prefix (\"/a/b\": a leading \"/\", "
            .. "no trailing one, no space, control byte, ';' or ',')")
end

-- Whether request bytes were handed to the sandbox's connection: false when the request was
-- forwarded but nothing of it can have reached the sandbox (connect refused or timed out),
-- true when the sandbox may have received it; nil when it was never forwarded.
function Req:delivered()
    local d = C.sp_req_delivered(live(self))
    if d < 0 then
        return nil
    end
    return d == 1
end

-- "none", "respond" or "forward".
local DECISIONS = { [0] = "none", "respond", "forward" }
function Req:decision()
    return DECISIONS[C.sp_req_decision(live(self))]
end

-- Log phase: the record of the exchange.
function Req:status()
    return C.sp_req_status(live(self))
end

function Req:bytes_in()
    return C.sp_req_bytes_in(live(self))
end

function Req:bytes_out()
    return C.sp_req_bytes_out(live(self))
end

-- Seconds from the first byte of the request to the end of the response.
function Req:duration()
    return C.sp_req_duration(live(self))
end

function Req:upstream_addr()
    local s = ffi_string(C.sp_req_upstream_addr(live(self)))
    return s ~= "" and s or nil
end

function Req:error()
    local s = ffi_string(C.sp_req_error(live(self)))
    return s ~= "" and s or nil
end

-- The request's W3C trace id (32 hex digits: the client's, or the one the proxy started), or
-- nil while tracing is off (trace_propagation=false and no otlp_endpoint).
local trace_buf = ffi.new("char[32]")
function Req:trace_id()
    if C.sp_req_trace_id(live(self), trace_buf) == 0 then
        return nil
    end
    return ffi_string(trace_buf, 32)
end

function Req:worker()
    return C.sp_req_worker(live(self))
end

-- The wake span (exported with otlp_endpoint: a child of the request span, named "wake"):
-- req:wake_begin() when the request starts being held for its sandbox's start (later calls
-- keep the first start), req:wake_end(outcome, patched, patch_status) when the hold ends:
-- outcome a short word ("ready" when the request goes on to the sandbox; anything else marks
-- the span as an error), patched whether this request's wake sent the PATCH, patch_status the
-- refused PATCH's HTTP status (0 or nil: none). wake.lua calls them; cheap, no allocation.
function Req:wake_begin()
    C.sp_req_wake_mark(live(self), 0, "", 0, 0, 0)
end

function Req:wake_end(outcome, patched, patch_status)
    outcome = tostring(outcome or "")
    C.sp_req_wake_mark(live(self), 1, outcome, #outcome, patched and 1 or 0,
        tonumber(patch_status) or 0)
end

-- The access-log line's fields in line order (access_log.lua, the test kit's formatter and the
-- specs read it), from the runtime's one table (lua_request.c LOG_LINE): { name, bit } for a
-- field the runtime writes itself, selected by req:access_log's mask; in the place the runtime
-- keeps for the scripts' name/value pairs (after "error", before "worker"), { name } for each
-- field only the scripts know.
local SCRIPT_FIELDS = { "user", "sandbox", "ratelimit" }
M.LOG_LINE = {}
do
    local name, bit = ffi.new("const char *[1]"), ffi.new("uint32_t[1]")
    local i = 0
    while C.sp_req_log_field(i, name, bit) == 1 do
        if name[0] == nil then
            for _, f in ipairs(SCRIPT_FIELDS) do
                M.LOG_LINE[#M.LOG_LINE + 1] = { f }
            end
        else
            M.LOG_LINE[#M.LOG_LINE + 1] = { ffi_string(name[0]), tonumber(bit[0]) }
        end
        i = i + 1
    end
end
-- Derived from it: the runtime's fields as bits, and their order.
M.LOG_FIELDS, M.LOG_ORDER = {}, {}
for _, f in ipairs(M.LOG_LINE) do
    if f[2] then
        M.LOG_FIELDS[f[1]] = f[2]
        M.LOG_ORDER[#M.LOG_ORDER + 1] = f[1]
    end
end

-- Log phase: writes the exchange's access-log line (one JSON object) without building it in
-- Lua. mask: the sum of M.LOG_FIELDS bits to write; then up to 6 name, value pairs of strings
-- the script adds (a nil value leaves its pair out), e.g.
--   req:access_log(mask, "user", route.user, "sandbox", route.name)
-- Absent values (no query, no upstream, no error, no timing) are left out. No loop and no
-- table here: the log hook stays one compiled trace.
function Req:access_log(mask, k1, v1, k2, v2, k3, v3, k4, v4, k5, v5, k6, v6)
    C.sp_req_access_log(live(self), mask, k1, v1, k2, v2, k3, v3, k4, v4, k5, v5, k6, v6)
end

-- Everything about the exchange in one table (built on each call).
function Req:record()
    local r = live(self)
    local connect = C.sp_req_connect_time(r)
    local first = C.sp_req_first_byte_time(r)
    local path = self:path()
    return {
        request_id = self:id(),
        method = self:method(),
        path = path,
        query = self:query(),
        client = self:client_addr(),
        status = C.sp_req_status(r),
        bytes_in = C.sp_req_bytes_in(r),
        bytes_out = C.sp_req_bytes_out(r),
        duration = C.sp_req_duration(r),
        upstream = self:upstream_addr(),
        upstream_connect = connect >= 0 and connect or nil,
        upstream_first_byte = first >= 0 and first or nil,
        error = self:error(),
        delivered = self:delivered(),
        worker = C.sp_req_worker(r),
        trace_id = self:trace_id(),
    }
end

-- The method table, for tools that need the list of request methods (the test kit).
M.methods = Req
return M
