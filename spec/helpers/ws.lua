-- Minimal RFC 6455 WebSocket client for specs, on top of spec.helpers.http.
--
--   local ws = require "spec.helpers.ws"
--   local c, err, resp = ws.connect{ port = port, path = "/ws" }
--   c:send_text("hi")
--   local kind, payload = c:receive(2)   --> "text", "hi"
--   c:close(1000)
--
-- Frames sent by the client are masked (random key); frames from the server
-- must not be masked. Fragmented messages are reassembled; control frames
-- that arrive in the middle of a fragmented message are returned on their
-- own and the reassembly continues on the next receive().
--
-- Error convention: nil, "message" (ws.connect adds the HTTP response as a
-- 3rd value when the server did not answer 101).

local bit = require "bit"
local socket = require "socket"

local modname = ... or "spec.helpers.ws"
local prefix = modname:match("^(.-)[^%.]+$") or ""
local http = require(prefix .. "http")
local sha1 = require(prefix .. "sha1")
local b64 = require(prefix .. "b64")

local band, bor, bxor, rshift, lshift = bit.band, bit.bor, bit.bxor, bit.rshift, bit.lshift
local sbyte, schar, ssub, sformat, slower = string.byte, string.char, string.sub, string.format, string.lower
local tconcat = table.concat
local floor, mmin = math.floor, math.min
local now = socket.gettime
local unpack = unpack or table.unpack

local M = {}

M.GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

M.OP = { continuation = 0, text = 1, binary = 2, close = 8, ping = 9, pong = 10 }
local OPNAME = { [0] = "continuation", [1] = "text", [2] = "binary", [8] = "close", [9] = "ping", [10] = "pong" }
M.OPNAME = OPNAME

local function random_bytes(n)
    local f = io.open("/dev/urandom", "rb")
    if f then
        local s = f:read(n)
        f:close()
        if s and #s == n then return s end
    end
    local t = {}
    for i = 1, n do t[i] = math.random(0, 255) end
    return schar(unpack(t))
end
M.random_bytes = random_bytes

--- Sec-WebSocket-Accept value for a key.
function M.accept_key(key)
    return b64.encode(sha1.binary(key .. M.GUID))
end

--- XOR payload with a 4-byte mask (masking and unmasking are the same).
local function apply_mask(payload, key)
    local k1, k2, k3, k4 = sbyte(key, 1, 4)
    local k = { [0] = k1, k2, k3, k4 }
    local out, n = {}, #payload
    local STEP = 4096 -- multiple of 4, so the mask phase restarts at 0
    for i = 1, n, STEP do
        local bytes = { sbyte(payload, i, mmin(i + STEP - 1, n)) }
        for j = 1, #bytes do
            bytes[j] = bxor(bytes[j], k[(j - 1) % 4])
        end
        out[#out + 1] = schar(unpack(bytes))
    end
    return tconcat(out)
end
M.apply_mask = apply_mask

local WsConn = {}
WsConn.__index = WsConn
M.WsConn = WsConn

--- Open a WebSocket.
-- opts: host (default 127.0.0.1), port, path (default "/"), headers (list
-- or map, added to the upgrade request), protocols (list -> Sec-WebSocket-
-- Protocol), timeout (default 5), auto_pong (default true), origin.
-- Returns conn, resp (the 101 response) or nil, err[, resp].
function M.connect(opts)
    assert(type(opts) == "table" and opts.port, "ws.connect: opts.port is required")
    local host = opts.host or "127.0.0.1"
    local timeout = opts.timeout or 5
    local c, err = http.connect(host, opts.port, { timeout = timeout })
    if not c then return nil, err end
    local key = b64.encode(random_bytes(16))
    local headers = {
        { "Upgrade", "websocket" },
        { "Connection", "Upgrade" },
        { "Sec-WebSocket-Key", key },
        { "Sec-WebSocket-Version", "13" },
    }
    if opts.protocols then headers[#headers + 1] = { "Sec-WebSocket-Protocol", tconcat(opts.protocols, ", ") } end
    if opts.origin then headers[#headers + 1] = { "Origin", opts.origin } end
    local extra = opts.headers or {}
    if extra[1] == nil then
        local list = {}
        for k, v in pairs(extra) do list[#list + 1] = { k, v } end
        table.sort(list, function(a, b) return a[1] < b[1] end)
        extra = list
    end
    for _, h in ipairs(extra) do
        -- user headers replace the defaults with the same name
        local replaced = false
        for _, d in ipairs(headers) do
            if slower(d[1]) == slower(h[1]) then d[2] = h[2]; replaced = true end
        end
        if not replaced then headers[#headers + 1] = { h[1], h[2] } end
    end
    local resp, rerr = c:request{ method = "GET", path = opts.path or "/", headers = headers, timeout = timeout }
    if not resp then
        c:close()
        return nil, "websocket handshake: " .. tostring(rerr)
    end
    local function fail(msg)
        c:close()
        return nil, "websocket handshake: " .. msg, resp
    end
    if resp.status ~= 101 then
        return fail(sformat("expected status 101, got %d %s", resp.status, resp.reason))
    end
    if slower(resp.headers["upgrade"] or "") ~= "websocket" then
        return fail("bad Upgrade header: " .. tostring(resp.headers["upgrade"]))
    end
    if not http.token_set(resp.headers["connection"])["upgrade"] then
        return fail("Connection header lacks 'upgrade': " .. tostring(resp.headers["connection"]))
    end
    local expected = M.accept_key(key)
    if resp.headers["sec-websocket-accept"] ~= expected then
        return fail(sformat("bad Sec-WebSocket-Accept: got %s, expected %s",
                            tostring(resp.headers["sec-websocket-accept"]), expected))
    end
    local self = setmetatable({
        conn = c,
        resp = resp,
        timeout = timeout,
        auto_pong = opts.auto_pong ~= false,
        protocol = resp.headers["sec-websocket-protocol"],
        closed = false,       -- close frame received
        close_sent = false,
    }, WsConn)
    return self, resp
end

--- Send one frame. opcode: number or name; fin default true; opts.mask
-- default true (set false to test server strictness); opts.rsv (bits 1-7,
-- placed in the RSV1-3 positions) for negative tests.
function WsConn:send_frame(opcode, payload, fin, opts)
    opts = opts or {}
    if type(opcode) == "string" then opcode = assert(M.OP[opcode], "unknown opcode " .. opcode) end
    payload = payload or ""
    local n = #payload
    local b0 = bor(fin == false and 0 or 0x80, lshift(band(opts.rsv or 0, 7), 4), opcode)
    local masked = opts.mask ~= false
    local mbit = masked and 0x80 or 0
    local hdr
    if n < 126 then
        hdr = schar(b0, bor(mbit, n))
    elseif n < 65536 then
        hdr = schar(b0, bor(mbit, 126), rshift(n, 8), band(n, 255))
    else
        local hi, lo = floor(n / 4294967296), n % 4294967296
        hdr = schar(b0, bor(mbit, 127),
                    band(rshift(hi, 24), 255), band(rshift(hi, 16), 255), band(rshift(hi, 8), 255), band(hi, 255),
                    band(rshift(lo, 24), 255), band(rshift(lo, 16), 255), band(rshift(lo, 8), 255), band(lo, 255))
    end
    if masked then
        local key = random_bytes(4)
        hdr = hdr .. key
        payload = apply_mask(payload, key)
    end
    return self.conn:send_raw(hdr .. payload, opts.timeout or self.timeout)
end

function WsConn:send_text(s) return self:send_frame(1, s) end
function WsConn:send_binary(s) return self:send_frame(2, s) end
function WsConn:ping(s) return self:send_frame(9, s or "") end
function WsConn:pong(s) return self:send_frame(10, s or "") end

-- Read one frame. Returns fin, opcode, payload or nil, err. A frame whose
-- header was read but whose payload timed out is resumed on the next call.
function WsConn:_read_frame(deadline)
    local c = self.conn
    local hdr = self._pending
    if not hdr then
        local ok, err = c:_wait_readable(deadline)
        if not ok then return nil, err end
        local h, herr = c:_read_exact(2, deadline)
        if not h then return nil, herr end
        local b0, b1 = sbyte(h, 1, 2)
        hdr = { fin = band(b0, 0x80) ~= 0, rsv = band(rshift(b0, 4), 7), opcode = band(b0, 0x0F),
                masked = band(b1, 0x80) ~= 0, len = band(b1, 0x7F) }
        self._pending = hdr
        hdr.need_ext = hdr.len == 126 and 2 or hdr.len == 127 and 8 or 0
    end
    if hdr.need_ext > 0 then
        local e, err = c:_read_exact(hdr.need_ext, deadline)
        if not e then return nil, err end
        local len = 0
        for i = 1, #e do len = len * 256 + sbyte(e, i) end
        hdr.len = len
        hdr.need_ext = 0
    end
    if hdr.masked and not hdr.mask then
        local m, err = c:_read_exact(4, deadline)
        if not m then return nil, err end
        hdr.mask = m
    end
    local function protocol_error(msg)
        self.broken = msg
        return nil, "protocol error: " .. msg
    end
    if hdr.rsv ~= 0 then return protocol_error("RSV bits set without a negotiated extension") end
    if hdr.masked then return protocol_error("server frame is masked") end
    if not OPNAME[hdr.opcode] then return protocol_error("unknown opcode " .. hdr.opcode) end
    if hdr.opcode >= 8 and (not hdr.fin or hdr.len > 125) then
        return protocol_error("invalid control frame (fragmented or longer than 125 bytes)")
    end
    if hdr.len > 2 ^ 31 then return protocol_error("frame too large: " .. hdr.len) end
    local payload, err = c:_read_exact(hdr.len, deadline)
    if not payload then return nil, err end
    self._pending = nil
    return hdr.fin, hdr.opcode, payload
end

--- Receive the next message or control frame (waits up to timeout, default
-- the connection timeout).
-- Returns kind, payload[, code]:
--   "text" | "binary", message (fragments reassembled)
--   "ping" | "pong", payload  (a ping is answered automatically unless
--                              auto_pong = false)
--   "close", reason, code     (code is nil if the close frame was empty; the
--                              close is answered automatically)
-- or nil, "timeout" / nil, "closed" / nil, "protocol error: ...".
function WsConn:receive(timeout)
    if self.broken then return nil, "connection unusable: " .. self.broken end
    local deadline = now() + (timeout or self.timeout)
    while true do
        local fin, opcode, payload = self:_read_frame(deadline)
        if fin == nil then
            local err = opcode
            if err ~= "timeout" and self.conn.eof and err == self.conn.eof_err then err = "closed" end
            return nil, err
        end
        if opcode >= 8 then
            if opcode == 9 then
                if self.auto_pong and not self.close_sent then self:pong(payload) end
                return "ping", payload
            elseif opcode == 10 then
                return "pong", payload
            else
                self.closed = true
                local code, reason
                if #payload >= 2 then
                    code = sbyte(payload, 1) * 256 + sbyte(payload, 2)
                    reason = ssub(payload, 3)
                elseif #payload == 1 then
                    self.broken = "close frame with a 1-byte payload"
                    return nil, "protocol error: close frame with a 1-byte payload"
                else
                    reason = ""
                end
                self.close_code, self.close_reason = code, reason
                if not self.close_sent then
                    self.close_sent = true
                    self:send_frame(8, code and ssub(payload, 1, 2) or "")
                end
                return "close", reason, code
            end
        elseif opcode == 0 then
            if not self._frag then
                self.broken = "continuation frame without a message in progress"
                return nil, "protocol error: " .. self.broken
            end
            local f = self._frag
            f.parts[#f.parts + 1] = payload
            f.count = f.count + 1
            if fin then
                self._frag = nil
                self.last_fragments = f.count
                return OPNAME[f.opcode], tconcat(f.parts)
            end
        else
            if self._frag then
                self.broken = "new data frame while a fragmented message is in progress"
                return nil, "protocol error: " .. self.broken
            end
            if fin then
                self.last_fragments = 1
                return OPNAME[opcode], payload
            end
            self._frag = { opcode = opcode, parts = { payload }, count = 1 }
        end
    end
end

--- Close handshake: send a close frame (code default 1000, optional reason),
-- wait (timeout default 2 s) for the server's close frame, then close TCP.
-- Returns true, server_code, server_reason, or nil, err (the TCP connection
-- is closed either way).
function WsConn:close(code, reason, timeout)
    local deadline = now() + (timeout or 2)
    local ok, err = true, nil
    if not self.close_sent and self.conn.sock then
        self.close_sent = true
        local payload = ""
        if code ~= false then
            code = code or 1000
            payload = schar(rshift(code, 8), band(code, 255)) .. (reason or "")
        end
        ok, err = self:send_frame(8, payload)
    end
    if ok then
        while not self.closed do
            local kind, r = self:receive(math.max(0, deadline - now()))
            if not kind then ok, err = nil, r; break end
        end
    end
    self.conn:close()
    if not ok then return nil, err end
    return true, self.close_code, self.close_reason
end

--- The underlying TCP connection (spec.helpers.http Conn).
function WsConn:raw()
    return self.conn
end

return M
