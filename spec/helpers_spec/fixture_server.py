#!/usr/bin/env python3
"""Throwaway fixture server for spec/helpers_spec (stdlib only).

Usage: fixture_server.py PORT

Thread per connection, HTTP/1.1 keep-alive. Endpoints:
  /echo            JSON: method, path, version, headers, body, body_len,
                   chunk_sizes (chunked uploads), trailers, conn_id, req_index
  /chunked?n=&size=&trailer=1   chunked response, n chunks
  /sse?n=&interval=             text/event-stream, one event per chunk
  /slow?n=&interval=&size=      Content-Length body written in n pieces
  /eof                          body delimited by connection close
  /close                        Content-Length body + Connection: close
  /status/<code>                response with that status
  /hang?s=                      never answers for s seconds
  /expect-reject                answers 417 to Expect: 100-continue
  /bad/bare-lf, /bad/cl-te, /bad/chunk-crlf, /bad/truncated
                                deliberately broken responses
  /ws?fragment=N                WebSocket echo; text "please-ping" makes the
                                server send a ping and report the pong
"""
import base64
import hashlib
import itertools
import json
import os
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CONN_IDS = itertools.count(1)
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.conn_id = next(CONN_IDS)
        self.req_index = 0

    def log_message(self, fmt, *args):
        sys.stderr.write("fixture: %s\n" % (fmt % args))

    # -- helpers ---------------------------------------------------------
    def query(self):
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return parts.path, q

    def read_body(self):
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            chunks, sizes, trailers = [], [], []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:
                        t = self.rfile.readline()
                        if t in (b"\r\n", b"\n", b""):
                            break
                        trailers.append(t.decode("latin-1").rstrip("\r\n"))
                    break
                chunks.append(self.rfile.read(size))
                sizes.append(size)
                if self.rfile.read(2) != b"\r\n":
                    raise ValueError("bad chunk framing")
            return b"".join(chunks), sizes, trailers
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n), None, []

    def send_simple(self, status, body, ctype="text/plain", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_expect_100(self):
        if self.path.startswith("/expect-reject"):
            self.send_response(417)
            self.send_header("Content-Length", "8")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"rejected")
            self.close_connection = True
            return False
        return super().handle_expect_100()

    # -- dispatch --------------------------------------------------------
    def do_GET(self):
        self.req_index += 1
        path, q = self.query()
        if path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket(q)
        route = {
            "/echo": self.r_echo,
            "/chunked": self.r_chunked,
            "/sse": self.r_sse,
            "/slow": self.r_slow,
            "/eof": self.r_eof,
            "/close": self.r_close,
            "/hang": self.r_hang,
            "/expect-reject": self.r_echo,
            "/bad/bare-lf": self.r_bad_bare_lf,
            "/bad/cl-te": self.r_bad_cl_te,
            "/bad/chunk-crlf": self.r_bad_chunk_crlf,
            "/bad/truncated": self.r_bad_truncated,
        }.get(path)
        if route:
            return route(q)
        if path.startswith("/status/"):
            return self.r_status(int(path.split("/")[2]))
        self.send_simple(404, b"not found\n")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def r_echo(self, q):
        body, sizes, trailers = self.read_body()
        info = {
            "method": self.command,
            "path": self.path,
            "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
            "body_len": len(body),
            "body_sha1": hashlib.sha1(body).hexdigest(),
            "chunk_sizes": sizes,
            "trailers": trailers,
            "conn_id": self.conn_id,
            "req_index": self.req_index,
            "client_port": self.client_address[1],
        }
        self.send_simple(200, json.dumps(info).encode(), "application/json")

    def r_chunked(self, q):
        n, size = int(q.get("n", 3)), int(q.get("size", 5))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        if q.get("trailer"):
            self.send_header("Trailer", "X-Checksum")
        self.end_headers()
        if self.command == "HEAD":
            return
        digest = hashlib.sha1()
        for i in range(n):
            data = (b"%d:" % i) + b"x" * size
            digest.update(data)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        if q.get("trailer"):
            self.wfile.write(b"0\r\nX-Checksum: %s\r\n\r\n" % digest.hexdigest().encode())
        else:
            self.wfile.write(b"0\r\n\r\n")

    def r_sse(self, q):
        n, interval = int(q.get("n", 3)), float(q.get("interval", 0.1))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(b):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(b), b))

        chunk(b": hello\n\n")
        for i in range(1, n + 1):
            ev = b"id: %d\nevent: tick\ndata: event %d\n" % (i, i)
            if i == 2:
                ev += b"data: second line\n"
            chunk(ev + b"\n")
            if i < n:
                time.sleep(interval)
        self.wfile.write(b"0\r\n\r\n")

    def r_slow(self, q):
        n, interval, size = int(q.get("n", 3)), float(q.get("interval", 0.1)), int(q.get("size", 10))
        self.send_response(200)
        self.send_header("Content-Length", str(n * size))
        self.end_headers()
        for i in range(n):
            self.wfile.write(bytes([ord("a") + i % 26]) * size)
            if i < n - 1:
                time.sleep(interval)

    def r_eof(self, q):
        self.close_connection = True
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        self.wfile.write(b"body until eof\n" * 3)

    def r_close(self, q):
        self.close_connection = True
        self.send_simple(200, b"bye\n", extra=[("Connection", "close")])

    def r_status(self, code):
        if code in (204, 304) or code < 200:
            self.send_response(code)
            self.end_headers()
            return
        self.send_simple(code, b"status %d\n" % code)

    def r_hang(self, q):
        time.sleep(float(q.get("s", 3)))
        self.close_connection = True

    def raw(self, data):
        self.close_connection = True
        self.wfile.write(data)

    def r_bad_bare_lf(self, q):
        self.raw(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")

    def r_bad_cl_te(self, q):
        self.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")

    def r_bad_chunk_crlf(self, q):
        self.raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n")

    def r_bad_truncated(self, q):
        self.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a few bytes")

    # -- WebSocket ---------------------------------------------------------
    def ws_send(self, opcode, payload, fin=True):
        n = len(payload)
        b0 = (0x80 if fin else 0) | opcode
        if n < 126:
            hdr = struct.pack("!BB", b0, n)
        elif n < 65536:
            hdr = struct.pack("!BBH", b0, 126, n)
        else:
            hdr = struct.pack("!BBQ", b0, 127, n)
        self.wfile.write(hdr + payload)

    def ws_recv(self):
        hdr = self.rfile.read(2)
        if len(hdr) < 2:
            return None
        b0, b1 = hdr
        fin, opcode = bool(b0 & 0x80), b0 & 0x0F
        masked, n = bool(b1 & 0x80), b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.rfile.read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.rfile.read(8))[0]
        if not masked:
            raise ValueError("client frame not masked")
        mask = self.rfile.read(4)
        data = self.rfile.read(n)
        if n:
            m = (mask * (n // 4 + 1))[:n]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
        return fin, opcode, data

    def websocket(self, q):
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.close_connection = True
        frag = int(q.get("fragment", 0))
        msg_op, parts = None, []
        while True:
            r = self.ws_recv()
            if r is None:
                return
            fin, op, data = r
            if op == 0x8:
                self.ws_send(0x8, data[:2] if len(data) >= 2 else b"")
                return
            if op == 0x9:
                self.ws_send(0xA, data)
                continue
            if op == 0xA:
                self.ws_send(0x1, b"pong:" + data)
                continue
            if op in (0x1, 0x2):
                msg_op, parts = op, [data]
            elif op == 0x0:
                parts.append(data)
            if not fin:
                continue
            msg = b"".join(parts)
            if msg_op == 0x1 and msg == b"please-ping":
                self.ws_send(0x9, b"hello-ping")
                continue
            if frag and len(msg) > frag:
                pieces = [msg[i:i + frag] for i in range(0, len(msg), frag)]
                for i, p in enumerate(pieces):
                    self.ws_send(msg_op if i == 0 else 0x0, p, fin=(i == len(pieces) - 1))
                    if i == 0:
                        # a control frame in the middle of a fragmented message
                        self.ws_send(0x9, b"mid")
            else:
                self.ws_send(msg_op, msg)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    port = int(sys.argv[1])
    srv = Server(("127.0.0.1", port), Handler)
    print("listening on %d (pid %d)" % (port, os.getpid()), flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
