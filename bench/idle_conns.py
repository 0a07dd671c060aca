#!/usr/bin/env python3
"""Idle keep-alive client connections for bench.py (Python 3 stdlib only).

Started by bench.py pinned to the load CPU (taskset), driven over stdin/stdout, one JSON
object per line each way:

  {"cmd": "open", "port": P, "count": N, "paths": ["/u0/sb0/small", ...], "timeout": S}
      opens N connections to 127.0.0.1:P; each sends one complete GET (paths taken round-robin)
      and reads the whole response (200, keep-alive) so it is a real keep-alive connection,
      then stays idle. At most 256 connects/requests in flight.
      -> {"opened": n, "failed": k, "errors": {...}, "seconds": s}
  {"cmd": "check", "sample": M, "timeout": S}
      every held connection: recv(MSG_PEEK | MSG_DONTWAIT) tells open-and-idle (EAGAIN) from
      closed (EOF / reset) or "unexpected bytes" (e.g. a 408 the server sent); then M of the
      open ones, spread evenly, send a second request and must get a 200 back.
      -> {"held": n, "open": n, "closed": n, "reset": n, "unexpected": n,
          "sample": m, "sample_ok": k, "sample_errors": {...}, "seconds": s}
  {"cmd": "close"}  -> {"closed": n}
  EOF on stdin: close everything and exit.

Every operation is bounded in count and in time (the "timeout" of each command).
"""
import errno
import json
import resource
import select
import socket
import sys
import time

IN_FLIGHT = 256


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def request_bytes(path, port):
    return ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: bench-idle\r\n\r\n"
            % (path, port)).encode()


def response_done(buf):
    """None while incomplete; else (status, keep_alive)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").split("\r\n")
    try:
        status = int(head[0].split()[1])
    except (IndexError, ValueError):
        return (0, False)
    length, chunked, close = None, False, False
    for line in head[1:]:
        k, _, v = line.partition(":")
        k, v = k.strip().lower(), v.strip().lower()
        if k == "content-length":
            length = int(v)
        elif k == "transfer-encoding" and "chunked" in v:
            chunked = True
        elif k == "connection" and "close" in v:
            close = True
    body = buf[end + 4:]
    if chunked:
        if not body.endswith(b"0\r\n\r\n"):
            return None
    elif length is not None:
        if len(body) < length:
            return None
    else:
        return None  # read until EOF: not a keep-alive answer; the caller sees EOF
    return (status, not close)


class Conn:
    __slots__ = ("sock", "state", "req", "buf", "sent")

    def __init__(self, sock, req):
        self.sock, self.req, self.buf, self.state, self.sent = sock, req, b"", "connect", 0


def exchange(conns, ep, deadline, errors):
    """Drives connect -> send -> read-response for conns (all registered on ep). Returns the
    list of conns that finished with a 200 keep-alive answer; the others are closed."""
    pending = {c.sock.fileno(): c for c in conns}
    ok = []

    def fail(c, why):
        errors[why] = errors.get(why, 0) + 1
        try:
            ep.unregister(c.sock.fileno())
        except (OSError, ValueError):
            pass
        pending.pop(c.sock.fileno(), None)
        c.sock.close()

    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            for c in list(pending.values()):
                fail(c, "timeout")
            break
        for fd, ev in ep.poll(min(left, 1.0)):
            c = pending.get(fd)
            if c is None:
                continue
            if c.state == "connect":
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(c, "connect: " + errno.errorcode.get(err, str(err)))
                    continue
                c.state = "send"
            if c.state == "send":
                try:
                    c.sent += c.sock.send(c.req[c.sent:])
                except BlockingIOError:
                    continue
                except OSError as e:
                    fail(c, "send: " + (errno.errorcode.get(e.errno, str(e))))
                    continue
                if c.sent == len(c.req):
                    c.state = "read"
                    ep.modify(fd, select.EPOLLIN)
                continue
            if c.state == "read":
                try:
                    data = c.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    fail(c, "recv: " + (errno.errorcode.get(e.errno, str(e))))
                    continue
                if not data:
                    fail(c, "closed before the response ended")
                    continue
                c.buf += data
                done = response_done(c.buf)
                if done is None:
                    continue
                status, keep = done
                if status != 200:
                    fail(c, "HTTP %d" % status)
                elif not keep:
                    fail(c, "Connection: close")
                else:
                    ep.unregister(fd)
                    pending.pop(fd)
                    c.buf, c.state = b"", "idle"
                    ok.append(c)
    return ok


def cmd_open(held, msg):
    port, count, paths = int(msg["port"]), int(msg["count"]), msg["paths"]
    deadline = time.monotonic() + float(msg.get("timeout", 60))
    errors = {}
    t0 = time.monotonic()
    reqs = [request_bytes(p, port) for p in paths]
    ep = select.epoll()
    opened = 0
    try:
        i = 0
        while i < count and time.monotonic() < deadline:
            batch = []
            for _ in range(min(IN_FLIGHT, count - i)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c = Conn(s, reqs[i % len(reqs)])
                i += 1
                rc = s.connect_ex(("127.0.0.1", port))
                if rc not in (0, errno.EINPROGRESS):
                    errors["connect: " + errno.errorcode.get(rc, str(rc))] = errors.get(
                        "connect: " + errno.errorcode.get(rc, str(rc)), 0) + 1
                    s.close()
                    continue
                ep.register(s.fileno(), select.EPOLLOUT)
                batch.append(c)
            done = exchange(batch, ep, deadline, errors)
            held.extend(done)
            opened += len(done)
        if i < count:
            errors["not attempted (time limit)"] = count - i
    finally:
        ep.close()
    return {"opened": opened, "failed": count - opened, "errors": errors,
            "held": len(held), "seconds": round(time.monotonic() - t0, 2)}


def cmd_check(held, msg):
    t0 = time.monotonic()
    deadline = t0 + float(msg.get("timeout", 30))
    res = {"held": len(held), "open": 0, "closed": 0, "reset": 0, "unexpected": 0}
    still = []
    for c in held:
        try:
            data = c.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            res["open"] += 1
            still.append(c)
            continue
        except OSError:
            res["reset"] += 1
            continue
        if data:
            res["unexpected"] += 1
        else:
            res["closed"] += 1
    # a second request on a sample of the open ones, spread over the whole set
    m = min(int(msg.get("sample", 0)), len(still))
    sample = [still[(k * len(still)) // m] for k in range(m)] if m else []
    errors = {}
    ok = 0
    if sample:
        ep = select.epoll()
        for c in sample:
            c.state, c.sent, c.buf = "send", 0, b""
            ep.register(c.sock.fileno(), select.EPOLLOUT)
        good = exchange(sample, ep, deadline, errors)
        ep.close()
        ok = len(good)
        bad = set(id(c) for c in sample) - set(id(c) for c in good)
        if bad:  # closed by exchange(): drop them from the held set
            held[:] = [c for c in held if id(c) not in bad]
    res.update({"sample": m, "sample_ok": ok, "sample_errors": errors,
                "seconds": round(time.monotonic() - t0, 2)})
    return res


def cmd_close(held):
    n = len(held)
    for c in held:
        try:
            c.sock.close()
        except OSError:
            pass
    held.clear()
    return {"closed": n}


def main():
    limit = raise_nofile(int(sys.argv[1]) if len(sys.argv) > 1 else 65536)
    held = []
    out = sys.stdout
    out.write(json.dumps({"ready": True, "nofile": limit}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "open":
                res = cmd_open(held, msg)
            elif cmd == "check":
                res = cmd_check(held, msg)
            elif cmd == "close":
                res = cmd_close(held)
            else:
                res = {"error": "unknown command %r" % cmd}
        except Exception as e:  # answer, never hang the caller
            res = {"error": "%s: %s" % (type(e).__name__, e)}
        out.write(json.dumps(res) + "\n")
        out.flush()
    cmd_close(held)


if __name__ == "__main__":
    main()
