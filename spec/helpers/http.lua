-- A strict HTTP/1.1 client for integration specs, built on LuaSocket.
--
--   local http = require "spec.helpers.http"
--   local resp, err = http.request{ port = port, path = "/x?y=1" }
--   local c = assert(http.connect("127.0.0.1", port, { timeout = 5 }))
--   local r1 = assert(c:request{ path = "/a" })
--   local r2 = assert(c:request{ path = "/b" })   -- same TCP connection
--
-- Strictness: header lines and chunk framing must use CRLF, chunk sizes must
-- be valid hex, CRLF must follow chunk data, a response may not carry both
-- Transfer-Encoding and Content-Length (nor conflicting Content-Length
-- values), Content-Length bodies must not be truncated. Violations are
-- returned as errors starting with "protocol error:" (pass strict=false to
-- relax the header-level checks).
--
-- Error convention: every function that talks to the network returns
-- nil, "message" (sometimes with a partial result as 3rd value) and never
-- blocks longer than its timeout (default 5 s, whole exchange).

local socket = require "socket"

local now = socket.gettime
local sfind, ssub, slower, supper, sformat, srep = string.find, string.sub, string.lower, string.upper,
    string.format, string.rep
local tconcat, tinsert, tsort = table.concat, table.insert, table.sort
local mmin, mmax = math.min, math.max

local M = {}

M.DEFAULT_TIMEOUT = 5
local MAX_HEAD = 256 * 1024
local MAX_LINE = 64 * 1024
local RECV_SIZE = 65536 -- >= LuaSocket's internal buffer size, so it never keeps bytes

local function quote(s)
    s = tostring(s)
    if #s > 200 then s = ssub(s, 1, 200) .. "..." end
    return sformat("%q", s):gsub("\\\n", "\\n"):gsub("\r", "\\r")
end

local function eof_desc(err)
    if err == "closed" then return "connection closed by peer" end
    return "connection error (" .. tostring(err) .. ")"
end

local function token_set(value)
    local set = {}
    if value then
        for tok in value:gmatch("[^,%s]+") do set[slower(tok)] = true end
    end
    return set
end
M.token_set = token_set

---------------------------------------------------------------------------
-- Connection object: buffered, deadline-driven reads on a LuaSocket socket.
-- All buffer operations are atomic: on timeout nothing is consumed.
---------------------------------------------------------------------------

local Conn = {}
Conn.__index = Conn
M.Conn = Conn

--- Open a TCP connection. opts.timeout: default timeout for operations on
-- this connection (default 5). Returns a connection or nil, "message".
function M.connect(host, port, opts)
    opts = opts or {}
    host = host or "127.0.0.1"
    local timeout = opts.timeout or M.DEFAULT_TIMEOUT
    local sock, err
    if sfind(host, ":", 1, true) then sock, err = socket.tcp6() else sock, err = socket.tcp() end
    if not sock then return nil, "socket: " .. tostring(err) end
    sock:settimeout(opts.connect_timeout or timeout)
    local ok, cerr = sock:connect(host, port)
    if not ok then
        sock:close()
        return nil, sformat("connect %s:%s: %s", host, tostring(port), tostring(cerr))
    end
    sock:setoption("tcp-nodelay", true)
    sock:settimeout(0)
    return setmetatable({
        sock = sock,
        host = host,
        port = port,
        timeout = timeout,
        buf = "",
        pos = 1,
        eof = false,        -- peer closed (or reset) the connection
        eof_err = nil,      -- "closed" for a clean FIN, else the socket error
        broken = nil,       -- set after an error that leaves the stream unusable
        requests = 0,
    }, Conn)
end

function Conn:_deadline(timeout)
    return now() + (timeout or self.timeout)
end

-- Receive whatever is available (waiting until deadline). Returns data, or
-- nil, "timeout" / nil, <eof error> ("closed" for clean EOF).
function Conn:_recv(deadline)
    if self.eof then return nil, self.eof_err end
    if not self.sock then return nil, "closed" end
    while true do
        local data, err, partial = self.sock:receive(RECV_SIZE)
        data = data or partial
        if err and err ~= "timeout" then
            self.eof = true
            self.eof_err = err
            self.eof_at = now()
        end
        if data and #data > 0 then return data end
        if self.eof then return nil, self.eof_err end
        local remaining = deadline - now()
        if remaining <= 0 then return nil, "timeout" end
        socket.select({ self.sock }, nil, remaining)
    end
end

-- The receive buffer is self.buf with a read offset self.pos (bytes before
-- pos are consumed), so consuming many small pieces stays linear.

function Conn:_avail()
    return #self.buf - self.pos + 1
end

-- Unconsumed bytes (without consuming them).
function Conn:_peek()
    if self.pos == 1 then return self.buf end
    return ssub(self.buf, self.pos)
end

function Conn:_set_buf(s)
    self.buf, self.pos = s, 1
end

function Conn:_fill(deadline)
    local data, err = self:_recv(deadline)
    if not data then return nil, err end
    if self.pos > #self.buf then
        self.buf = data
    else
        self.buf = ssub(self.buf, self.pos) .. data
    end
    self.pos = 1
    return true
end

-- Wait until some data is buffered or EOF; true, or nil, "timeout".
function Conn:_wait_readable(deadline)
    if self:_avail() > 0 or self.eof then return true end
    local ok, err = self:_fill(deadline)
    if ok or (err ~= "timeout") then return true end
    return nil, err
end

-- Read a line. strict: the line must end with CRLF. Returns the line without
-- its terminator.
function Conn:_read_line(deadline, strict)
    local from = self.pos
    while true do
        local i = sfind(self.buf, "\n", from, true)
        if i then
            local line = ssub(self.buf, self.pos, i - 1)
            if ssub(line, -1) == "\r" then
                line = ssub(line, 1, -2)
            elseif strict then
                return nil, "protocol error: line not terminated by CRLF: " .. quote(line)
            end
            self.pos = i + 1
            return line
        end
        if self:_avail() > MAX_LINE then return nil, "protocol error: line too long" end
        from = self:_avail() + 1 -- relative to the compacted buffer after _fill
        local ok, err = self:_fill(deadline)
        if not ok then return nil, err end
    end
end

-- Read exactly n bytes.
function Conn:_read_exact(n, deadline)
    if self:_avail() >= n then
        local s = ssub(self.buf, self.pos, self.pos + n - 1)
        self.pos = self.pos + n
        return s
    end
    local parts = { self:_peek() }
    local got = #parts[1]
    self:_set_buf("")
    while got < n do
        local data, err = self:_recv(deadline)
        if not data then
            self:_set_buf(tconcat(parts))
            return nil, err
        end
        parts[#parts + 1] = data
        got = got + #data
    end
    local all = tconcat(parts)
    self:_set_buf(all)
    self.pos = n + 1
    return ssub(all, 1, n)
end

-- Read between 1 and max bytes, as soon as something is available.
function Conn:_read_some(max, deadline)
    if self:_avail() <= 0 then
        local data, err = self:_recv(deadline)
        if not data then return nil, err end
        self:_set_buf(data)
    end
    local s = ssub(self.buf, self.pos, self.pos + max - 1)
    self.pos = self.pos + #s
    return s
end

-- Read until the peer closes. Returns data (possibly "") or nil, err.
function Conn:_read_until_eof(deadline)
    local parts = { self:_peek() }
    self:_set_buf("")
    while true do
        local data, err = self:_recv(deadline)
        if data then
            parts[#parts + 1] = data
        elseif err == "closed" then
            return tconcat(parts)
        else
            self:_set_buf(tconcat(parts))
            return nil, err
        end
    end
end

-- Read a head block (status line + header lines + empty line) atomically.
-- Returns a list of lines (without CRLF; the final empty line excluded) and
-- the raw text. allow_empty: an immediate CRLF is an empty block (trailers).
function Conn:_read_block(deadline, strict, allow_empty)
    while true do
        local buf, pos = self.buf, self.pos
        if allow_empty and ssub(buf, pos, pos + 1) == "\r\n" then
            self.pos = pos + 2
            return {}, "\r\n"
        end
        if allow_empty and strict ~= false and ssub(buf, pos, pos) == "\n" then
            return nil, "protocol error: bare LF where CRLF expected"
        end
        local _, j = sfind(buf, "\n\r?\n", pos)
        if j then
            local raw = ssub(buf, pos, j)
            local lines = {}
            local p = 1
            while p <= #raw do
                local e = sfind(raw, "\n", p, true)
                local line = ssub(raw, p, e - 1)
                if ssub(line, -1) == "\r" then
                    line = ssub(line, 1, -2)
                elseif strict ~= false then
                    return nil, "protocol error: header line not terminated by CRLF: " .. quote(line)
                end
                lines[#lines + 1] = line
                p = e + 1
            end
            lines[#lines] = nil -- the terminating empty line
            self.pos = j + 1
            return lines, raw
        end
        if self:_avail() > MAX_HEAD then return nil, "protocol error: head too large" end
        local ok, err = self:_fill(deadline)
        if not ok then
            if err == "closed" and self:_avail() > 0 then
                return nil, "protocol error: connection closed in the middle of a head: " .. quote(self:_peek())
            end
            return nil, err
        end
    end
end

-- Parse header lines into (map, list). Names in the map are lowercase,
-- repeated headers joined with ", ".
local function parse_header_lines(lines, first, strict)
    local map, list = {}, {}
    for i = first, #lines do
        local line = lines[i]
        if strict ~= false and sfind(line, "^[ \t]") then
            return nil, "protocol error: obsolete line folding in header: " .. quote(line)
        end
        local name, value = line:match("^([^:]*):(.*)$")
        if not name then
            return nil, "protocol error: malformed header line: " .. quote(line)
        end
        if strict ~= false and not name:match("^[!#$%%&'*+%-.^_`|~%w]+$") then
            return nil, "protocol error: invalid header name: " .. quote(name)
        end
        value = value:match("^[ \t]*(.-)[ \t]*$")
        list[#list + 1] = { name, value }
        local lname = slower(name)
        if map[lname] then map[lname] = map[lname] .. ", " .. value else map[lname] = value end
    end
    return map, list
end
M.parse_header_lines = parse_header_lines

-- Read one message head and parse it.
function Conn:_read_head(deadline, strict)
    local lines, raw = self:_read_block(deadline, strict)
    if not lines then return nil, raw end
    local status_line = lines[1] or ""
    local version, status, reason = status_line:match("^HTTP/(%d%.%d) (%d%d%d) (.*)$")
    if not version then
        version, status = status_line:match("^HTTP/(%d%.%d) (%d%d%d)$")
        reason = ""
    end
    if not version then
        return nil, "protocol error: malformed status line: " .. quote(status_line)
    end
    local headers, list = parse_header_lines(lines, 2, strict)
    if not headers then return nil, list end
    return {
        version = version,
        status = tonumber(status),
        reason = reason,
        headers = headers,
        header_list = list,
        raw_head = raw,
    }
end

---------------------------------------------------------------------------
-- Response bodies
---------------------------------------------------------------------------

local Body = {}
Body.__index = Body

-- Decide how the body of `resp` is framed (RFC 9112 section 6.3).
local function body_framing(resp, method, strict)
    local st = resp.status
    local h = resp.headers
    if method == "HEAD" or (st >= 100 and st < 200) or st == 204 or st == 304 then
        return "none"
    end
    if method == "CONNECT" and st >= 200 and st < 300 then return "none" end
    local te, cl = h["transfer-encoding"], h["content-length"]
    if te then
        if cl and strict ~= false then
            return nil, "protocol error: response has both Transfer-Encoding and Content-Length"
        end
        local last
        for coding in te:gmatch("[^,%s]+") do last = slower(coding) end
        if last == "chunked" then return "chunked" end
        return "eof"
    end
    if cl then
        local value
        for v in cl:gmatch("[^,]+") do
            v = v:match("^%s*(.-)%s*$")
            if not v:match("^%d+$") then
                return nil, "protocol error: invalid Content-Length: " .. quote(cl)
            end
            if value and value ~= v then
                return nil, "protocol error: conflicting Content-Length values: " .. quote(cl)
            end
            value = v
        end
        if not value then return nil, "protocol error: empty Content-Length" end
        return "length", tonumber(value)
    end
    return "eof"
end

local function new_body(conn, resp, mode, length)
    return setmetatable({
        conn = conn, resp = resp, mode = mode,
        remaining = length, state = "size", done = (mode == "none"),
    }, Body)
end

-- Next piece of the body: data, or nil at the end, or nil, err.
-- For chunked bodies one call returns one whole (decoded) chunk.
function Body:next(deadline)
    if self.done then return nil end
    if self.err then return nil, self.err end
    local c, resp = self.conn, self.resp
    local function fail(err)
        if err ~= "timeout" then
            self.err = err
            c.broken = c.broken or err
        end
        return nil, err
    end
    if self.mode == "length" then
        if self.remaining == 0 then self.done = true; return nil end
        local data, err = c:_read_some(self.remaining, deadline)
        if not data then
            if c.eof and err == c.eof_err then
                err = sformat("protocol error: %s with %d body bytes still expected",
                              eof_desc(err), self.remaining)
            end
            return fail(err)
        end
        self.remaining = self.remaining - #data
        return data
    elseif self.mode == "eof" then
        local data, err = c:_read_some(RECV_SIZE, deadline)
        if data then return data end
        if err == "closed" then self.done = true; return nil end
        return fail(err)
    elseif self.mode == "chunked" then
        while true do
            if self.state == "size" then
                local line, err = c:_read_line(deadline, true)
                if not line then
                    if c.eof and err == c.eof_err then
                        err = "protocol error: " .. eof_desc(err) .. " inside chunked body"
                    end
                    return fail(err)
                end
                local hex, rest = line:match("^(%x+)(.*)$")
                if not hex or #hex > 15 or not (rest == "" or rest:match("^[ \t]*;")) then
                    return fail("protocol error: bad chunk size line: " .. quote(line))
                end
                if rest ~= "" then
                    resp.chunk_extensions = resp.chunk_extensions or {}
                    tinsert(resp.chunk_extensions, rest)
                end
                local size = tonumber(hex, 16)
                if size == 0 then
                    self.state = "trailers"
                else
                    self.chunk_size = size
                    self.state = "data"
                end
            elseif self.state == "data" then
                local data, err = c:_read_exact(self.chunk_size + 2, deadline)
                if not data then
                    if c.eof and err == c.eof_err then
                        err = "protocol error: " .. eof_desc(err) .. " inside a chunk"
                    end
                    return fail(err)
                end
                if ssub(data, -2) ~= "\r\n" then
                    return fail("protocol error: chunk data not followed by CRLF (got "
                                .. quote(ssub(data, -2)) .. ")")
                end
                self.state = "size"
                resp.chunk_sizes = resp.chunk_sizes or {}
                tinsert(resp.chunk_sizes, self.chunk_size)
                return ssub(data, 1, -3)
            elseif self.state == "trailers" then
                local lines, raw = c:_read_block(deadline, true, true)
                if not lines then
                    if c.eof and raw == c.eof_err then
                        raw = "protocol error: " .. eof_desc(raw) .. " before end of chunked body"
                    end
                    return fail(raw)
                end
                local map, list = parse_header_lines(lines, 1, true)
                if not map then return fail(list) end
                resp.trailers, resp.trailer_list = map, list
                self.done = true
                return nil
            end
        end
    end
    self.done = true
    return nil
end

---------------------------------------------------------------------------
-- Requests
---------------------------------------------------------------------------

local function normalize_headers(headers)
    local list = {}
    if not headers then return list end
    if headers[1] ~= nil then
        for _, h in ipairs(headers) do list[#list + 1] = { h[1], h[2] } end
    else
        local names = {}
        for k in pairs(headers) do names[#names + 1] = k end
        tsort(names)
        for _, k in ipairs(names) do
            local v = headers[k]
            if type(v) == "table" then
                for _, vv in ipairs(v) do list[#list + 1] = { k, vv } end
            elseif v ~= false then
                list[#list + 1] = { k, v }
            end
        end
    end
    return list
end

local function find_header(list, name)
    name = slower(name)
    for _, h in ipairs(list) do
        if slower(h[1]) == name then return h[2] end
    end
end

local BODY_METHODS = { POST = true, PUT = true, PATCH = true }

local function build_head(self, opts)
    local method = opts.method or "GET"
    local target = opts.path or "/"
    local version = opts.http_version or "1.1"
    local list = normalize_headers(opts.headers)
    local out = { sformat("%s %s HTTP/%s\r\n", method, target, version) }
    if not find_header(list, "host") and not opts.no_host then
        local host = opts.host or self.host
        if sfind(host, ":", 1, true) then host = "[" .. host .. "]" end
        out[#out + 1] = sformat("Host: %s:%s\r\n", host, tostring(opts.port or self.port))
    end
    for _, h in ipairs(list) do out[#out + 1] = sformat("%s: %s\r\n", h[1], tostring(h[2])) end
    local mode = "none"
    local has_cl = find_header(list, "content-length")
    local has_te = find_header(list, "transfer-encoding")
    if opts.body ~= nil then
        assert(type(opts.body) == "string", "http: body must be a string")
        assert(not opts.body_source, "http: body and body_source are exclusive")
        mode = "string"
        if not has_cl and not has_te then
            out[#out + 1] = sformat("Content-Length: %d\r\n", #opts.body)
        end
    elseif opts.body_source then
        if has_cl or has_te then
            mode = "raw"
        else
            mode = "chunked"
            out[#out + 1] = "Transfer-Encoding: chunked\r\n"
        end
    elseif BODY_METHODS[supper(method)] and not has_cl and not has_te then
        out[#out + 1] = "Content-Length: 0\r\n"
    end
    out[#out + 1] = "\r\n"
    local expect = find_header(list, "expect")
    expect = expect and slower(expect) == "100-continue" and mode ~= "none"
    return tconcat(out), mode, expect
end

function Conn:_send(data, deadline)
    if not self.sock then return nil, "connection is closed" end
    local i, n = 1, #data
    while i <= n do
        local remaining = deadline - now()
        if remaining <= 0 then return nil, "timeout" end
        self.sock:settimeout(remaining)
        local last, err, lastpart = self.sock:send(data, i)
        self.sock:settimeout(0)
        if last then return true end
        if err ~= "timeout" then return nil, err end
        i = (lastpart or (i - 1)) + 1
    end
    return true
end

function Conn:_send_body(opts, mode, deadline)
    if mode == "string" then
        return self:_send(opts.body, deadline)
    end
    local src = opts.body_source
    while true do
        local chunk = src()
        if chunk == nil then break end
        chunk = tostring(chunk)
        if #chunk > 0 then
            local ok, err
            if mode == "chunked" then
                ok, err = self:_send(sformat("%x\r\n", #chunk) .. chunk .. "\r\n", deadline)
            else
                ok, err = self:_send(chunk, deadline)
            end
            if not ok then return nil, err end
        end
    end
    if mode == "chunked" then
        local tail = { "0\r\n" }
        for _, h in ipairs(normalize_headers(opts.trailers)) do
            tail[#tail + 1] = sformat("%s: %s\r\n", h[1], tostring(h[2]))
        end
        tail[#tail + 1] = "\r\n"
        return self:_send(tconcat(tail), deadline)
    end
    return true
end

-- Read response heads until a final one (1xx other than 101 are collected
-- in resp.interim). Returns a resp table with framing set up, or nil, err.
function Conn:_read_response_head(opts, deadline, interim, first_head)
    interim = interim or {}
    local head = first_head
    while true do
        if not head then
            local err
            head, err = self:_read_head(deadline, opts.strict)
            if not head then
                if err == "closed" or (self.eof and err == self.eof_err) then
                    err = eof_desc(err) .. " before a response"
                end
                return nil, err
            end
        end
        if head.status >= 100 and head.status < 200 and head.status ~= 101 then
            interim[#interim + 1] = head
            head = nil
        else
            break
        end
    end
    local resp = head
    resp.interim = interim
    resp.conn = self
    local method = supper(opts.method or "GET")
    local mode, length = body_framing(resp, method, opts.strict)
    if not mode then return nil, length, resp end
    resp.framing = mode
    resp.content_length = length
    local tokens = token_set(resp.headers["connection"])
    if resp.version == "1.0" then
        resp.keep_alive = tokens["keep-alive"] == true and not tokens["close"]
    else
        resp.keep_alive = not tokens["close"]
    end
    if mode == "eof" or resp.status == 101 then resp.keep_alive = false end
    resp._body = new_body(self, resp, mode, length)
    return resp
end

-- After a complete response: figure out whether the peer closed.
function Conn:_finish(resp, opts, deadline)
    if resp.status == 101 then
        resp.closed = self.eof
        return
    end
    if not self.eof then
        if resp.keep_alive == false then
            -- The server announced it will close: give it a moment to do so.
            local grace = mmin(deadline, now() + (opts.close_grace or 1))
            while not self.eof do
                local ok, err = self:_fill(grace)
                if not ok and err == "timeout" then break end
            end
        else
            self:_fill(now()) -- non-blocking peek
        end
    end
    resp.closed = self.eof
    if resp.body_sent == false then
        self.broken = self.broken or "request body was not sent (final response before 100 Continue)"
    end
end

local Response = {}
Response.__index = Response
M.Response = Response

--- Streaming: next body piece (decoded chunk for chunked bodies, whatever
-- arrived for others), nil at the end, or nil, "timeout" / nil, err.
function Response:next_chunk(timeout)
    local deadline = now() + (timeout or self.conn.timeout)
    local data, err = self._body:next(deadline)
    if data == nil and err == nil and not self._finished then
        self._finished = true
        self.conn:_finish(self, self._opts, deadline)
    end
    return data, err
end

--- Streaming: read the rest of the body; sets and returns resp.body.
function Response:read_all(timeout)
    local deadline = now() + (timeout or self.conn.timeout)
    local parts = { self.body }
    while true do
        local data, err = self:next_chunk(mmax(0, deadline - now()))
        if data then
            parts[#parts + 1] = data
        elseif err then
            self.body = tconcat(parts)
            return nil, err
        else
            break
        end
    end
    self.body = tconcat(parts)
    self.body_length = #self.body
    return self.body
end

--- Streaming: close the underlying connection (for http.stream responses),
-- or mark a c:stream() response abandoned (its connection becomes unusable).
function Response:close()
    if self._owns_conn then
        self.conn:close()
    elseif not self._finished then
        self.conn.broken = self.conn.broken or "streaming response was abandoned"
    end
end

local function attach(resp, opts, streaming)
    setmetatable(resp, Response)
    resp._opts = opts
    if streaming then resp.body = "" end
    return resp
end

-- Core exchange: send a request, read the response head (and, unless
-- streaming, the body).
function Conn:_exchange(opts, streaming)
    if self.broken then return nil, "connection unusable after an earlier error: " .. tostring(self.broken) end
    if not self.sock then return nil, "connection is closed" end
    if self._stream and not self._stream._finished then
        return nil, "the previous streamed response on this connection was not fully read"
    end
    if self.eof and self:_avail() == 0 then
        return nil, "connection closed by peer (" .. tostring(self.eof_err) .. ")"
    end
    local deadline = now() + (opts.timeout or self.timeout)
    local head, mode, expect = build_head(self, opts)
    self.requests = self.requests + 1

    local function fail(err, partial)
        self.broken = self.broken or err
        return nil, err, partial
    end

    local send_err
    local interim, final_head = {}, nil
    local body_sent = true
    if mode == "string" and not expect then
        local ok, err = self:_send(head .. opts.body, deadline)
        if not ok then send_err = err end
    else
        local ok, err = self:_send(head, deadline)
        if not ok then return fail("send: " .. tostring(err)) end
        if expect then
            local wait_until = mmin(deadline, now() + (opts.expect_timeout or 1))
            while self:_wait_readable(wait_until) do
                local h, herr = self:_read_head(deadline, opts.strict)
                if not h then return fail(herr) end
                if h.status >= 100 and h.status < 200 and h.status ~= 101 then
                    interim[#interim + 1] = h
                    if h.status == 100 then break end
                else
                    final_head = h
                    break
                end
            end
        end
        if final_head then
            body_sent = false
        elseif mode ~= "none" then
            local bok, berr = self:_send_body(opts, mode, deadline)
            if not bok then send_err = berr end
        end
    end

    local resp, err, partial = self:_read_response_head(opts, deadline, interim, final_head)
    if not resp then
        if send_err then err = "send: " .. tostring(send_err) .. "; then " .. tostring(err) end
        return fail(err, partial)
    end
    resp.send_error = send_err
    resp.body_sent = body_sent
    resp.local_port = self:local_port()
    attach(resp, opts, streaming)
    if streaming then
        self._stream = resp
        if resp._body.done then -- no body at all (HEAD, 204, 304, 101...)
            resp._finished = true
            self:_finish(resp, opts, deadline)
        end
        return resp
    end

    local parts = {}
    while true do
        local data, berr = resp._body:next(deadline)
        if data then
            parts[#parts + 1] = data
        elseif berr then
            resp.body = tconcat(parts)
            return fail(berr, resp)
        else
            break
        end
    end
    resp.body = tconcat(parts)
    resp.body_length = #resp.body
    resp._finished = true
    self:_finish(resp, opts, deadline)
    return resp
end

--- Send a request on this connection and read the full response.
-- opts: method, path, headers, body, body_source, trailers, http_version,
-- timeout, strict, expect_timeout, close_grace, no_host.
function Conn:request(opts)
    return self:_exchange(opts or {}, false)
end

--- Like request(), but returns as soon as the response head is read; use
-- resp:next_chunk(timeout) / resp:read_all(timeout).
function Conn:stream(opts)
    return self:_exchange(opts or {}, true)
end

--- Read one response (e.g. after send_raw for pipelining).
-- opts.method: the request method it answers (HEAD => no body).
-- opts.stream: return a streaming response instead of reading the body.
function Conn:read_response(opts)
    opts = opts or {}
    if self.broken then return nil, "connection unusable after an earlier error: " .. tostring(self.broken) end
    if self._stream and not self._stream._finished then
        return nil, "the previous streamed response on this connection was not fully read"
    end
    local deadline = now() + (opts.timeout or self.timeout)
    local resp, err, partial = self:_read_response_head(opts, deadline)
    if not resp then
        self.broken = self.broken or err
        return nil, err, partial
    end
    resp.local_port = self:local_port()
    attach(resp, opts, opts.stream)
    if opts.stream then
        self._stream = resp
        return resp
    end
    local body, berr = resp:read_all(mmax(0, deadline - now()))
    if not body then
        self.broken = self.broken or berr
        return nil, berr, resp
    end
    return resp
end

--- Send raw bytes. Returns true or nil, err.
function Conn:send_raw(bytes, timeout)
    local ok, err = self:_send(bytes, self:_deadline(timeout))
    if not ok then return nil, err end
    return true
end

--- Receive raw bytes: a number n (exactly n bytes), "*l" (a line, CRLF or LF
-- stripped), "*a" (until EOF) or "*s" (whatever is available, >= 1 byte).
-- Returns data or nil, err.
function Conn:receive_raw(what, timeout)
    local deadline = self:_deadline(timeout)
    if type(what) == "number" then
        return self:_read_exact(what, deadline)
    elseif what == "*l" or what == "l" then
        return self:_read_line(deadline, false)
    elseif what == "*a" or what == "a" then
        return self:_read_until_eof(deadline)
    elseif what == "*s" or what == "s" or what == nil then
        return self:_read_some(RECV_SIZE, deadline)
    end
    error("receive_raw: bad pattern " .. tostring(what), 2)
end

--- true if the peer closed the connection (EOF or reset) within timeout
-- (default 1 s), else false. Data that arrives meanwhile stays buffered.
function Conn:closed_by_peer(timeout)
    local deadline = now() + (timeout or 1)
    while not self.eof do
        local ok, err = self:_fill(deadline)
        if not ok and err == "timeout" then return false end
    end
    return true
end

--- Bytes received but not consumed yet.
function Conn:buffered()
    return self:_peek()
end

--- Half-close: how = "send" (default), "receive" or "both".
function Conn:shutdown(how)
    if self.sock then return self.sock:shutdown(how or "send") end
end

function Conn:local_port()
    if not self.sock then return self._local_port end
    local _, port = self.sock:getsockname()
    self._local_port = tonumber(port)
    return self._local_port
end

function Conn:close()
    if self.sock then
        self:local_port()
        self.sock:close()
        self.sock = nil
    end
    return true
end

---------------------------------------------------------------------------
-- One-shot helpers
---------------------------------------------------------------------------

--- One request on a fresh connection, which is closed afterwards.
-- opts: host (default 127.0.0.1), port, plus everything Conn:request takes.
-- Returns resp or nil, err. resp.extra holds unexpected bytes received
-- after the response (if any).
function M.request(opts)
    assert(type(opts) == "table" and opts.port, "http.request: opts.port is required")
    local deadline = now() + (opts.timeout or M.DEFAULT_TIMEOUT)
    local c, err = M.connect(opts.host or "127.0.0.1", opts.port, { timeout = opts.timeout })
    if not c then return nil, err end
    local o = setmetatable({ timeout = mmax(0.001, deadline - now()) }, { __index = opts })
    local resp, rerr, partial = c:request(o)
    if resp and resp.status ~= 101 then
        if c:_avail() > 0 then resp.extra = c:_peek() end
    end
    c:close()
    if not resp then return nil, rerr, partial end
    return resp
end

--- Streaming one-shot request: returns resp after the head is read;
-- resp:next_chunk(timeout), resp:read_all(timeout), resp:close().
function M.stream(opts)
    assert(type(opts) == "table" and opts.port, "http.stream: opts.port is required")
    local c, err = M.connect(opts.host or "127.0.0.1", opts.port, { timeout = opts.timeout })
    if not c then return nil, err end
    local resp, rerr, partial = c:stream(opts)
    if not resp then c:close(); return nil, rerr, partial end
    resp._owns_conn = true
    return resp
end

---------------------------------------------------------------------------
-- Server-Sent Events
---------------------------------------------------------------------------

local function sse_next_line(st, final)
    local buf = st.buf
    local i = sfind(buf, "[\r\n]")
    if not i then
        if final and #buf > 0 then st.buf = ""; return buf end
        return nil
    end
    local j = i
    if ssub(buf, i, i) == "\r" then
        if i == #buf and not final then return nil end -- maybe CRLF split across reads
        if ssub(buf, i + 1, i + 1) == "\n" then j = i + 1 end
    end
    st.buf = ssub(buf, j + 1)
    return ssub(buf, 1, i - 1)
end

local function sse_process(st, events, n, final)
    while #events < n do
        local line = sse_next_line(st, final)
        if not line then return end
        if line == "" then
            if st.data or st.id or st.event then
                local ev = {
                    id = st.id, event = st.event, retry = st.retry,
                    data = st.data and tconcat(st.data, "\n") or "",
                    t = st.t,
                }
                events[#events + 1] = ev
            end
            st.id, st.event, st.retry, st.data = nil, nil, nil, nil
        elseif ssub(line, 1, 1) == ":" then
            st.comments[#st.comments + 1] = ssub(line, 2)
        else
            local field, value = line:match("^([^:]*):(.*)$")
            if not field then field, value = line, "" end
            if ssub(value, 1, 1) == " " then value = ssub(value, 2) end
            if field == "data" then
                st.data = st.data or {}
                st.data[#st.data + 1] = value
            elseif field == "id" then
                st.id = value
            elseif field == "event" then
                st.event = value
            elseif field == "retry" then
                st.retry = tonumber(value)
            end
        end
    end
end

--- Read up to n SSE events from a streaming response (http.stream or
-- c:stream). Returns a list of { id=, event=, data=, retry=, t= } where t is
-- the socket.gettime() at which the bytes completing the event arrived.
-- If fewer than n events arrive, returns the list plus "timeout" / "eof" /
-- an error message as 2nd value. Parser state is kept on resp, so it can be
-- called repeatedly. resp.sse_comments collects comment lines.
function M.sse_events(resp, n, timeout)
    local deadline = now() + (timeout or M.DEFAULT_TIMEOUT)
    local st = resp._sse
    if not st then
        st = { buf = "", comments = {} }
        resp._sse = st
        resp.sse_comments = st.comments
    end
    local events = {}
    sse_process(st, events, n, false)
    while #events < n do
        local remaining = deadline - now()
        if remaining <= 0 then return events, "timeout" end
        local data, err = resp:next_chunk(remaining)
        if data then
            st.t = now()
            st.buf = st.buf .. data
            sse_process(st, events, n, false)
        else
            if err == nil then
                sse_process(st, events, n, true)
                if #events < n then return events, "eof" end
            else
                return events, err
            end
        end
    end
    return events
end

return M
