#!/usr/bin/env python3
"""bench/grpc.py: gRPC (unary calls over h2c) through sandbox-proxy vs nginx's grpc_pass vs the
backend directly, with h2load (Debian nghttp2-client). Python 3 stdlib only.

    bench/grpc.py [--requests N] [--clients C] [--streams M] [--repeat R]

The backend is an nginx speaking h2c that answers every call as a gRPC server does: a POST to
/spx.Proc/Run gets 200, content-type application/grpc, one length-prefixed message (a 17-byte
file) and the trailers grpc-status 0 and grpc-message (`add_trailer`; a stock grpcio client
accepts the answer). h2load sends unary calls: POST with a 12-byte length-prefixed message
(`-d`), `content-type: application/grpc`, `te: trailers`; through sandbox-proxy it adds the
official router's metadata (`x-sandbox-id`, `x-sandbox-port`), which routes the call.

Targets (each proxy on CPU 0, one worker, access log to a file; the backend and h2load on CPU 1):
  sandbox-proxy      the default scripts, rate limiter off; relays each call to the backend over
                     h2c (calls share its connections to the backend, as streams)
  nginx grpc_pass    `grpc_pass grpc://backend` with `keepalive 64` (upstream connections reused)
  direct             h2load straight at the backend (its CPU is the backend's)
Each run sends N calls over C connections with M concurrent streams each; the CPU a target
used (utime + stime of its processes, /proc/PID/stat) divided by N is its CPU per call. The
targets alternate within each repeat, the order rotating from one repeat to the next (the
machine may be shared: interleaving spreads other jobs' load over all targets); medians of R
repeats, the spread (min-max) and the 1-minute load average around the runs are printed.
Everything listens on 127.0.0.1 and is stopped by its process id at the end.
"""
import argparse
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("h2bench", os.path.join(HERE, "h2.py"))
h2b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h2b)

TICK = os.sysconf("SC_CLK_TCK")
PATH = "/spx.Proc/Run"
# Cmd{command="hello"} (field 1, 5 bytes) and Out{text="helloworld"} (field 1, 10 bytes), each
# behind gRPC's 5-byte prefix (compressed flag 0, big-endian length)
REQ = b"\x00\x00\x00\x00\x07" + b"\x0a\x05hello"
RESP = b"\x00\x00\x00\x00\x0c" + b"\x0a\x0ahelloworld"


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def h2load(url, n, c, m, body, headers):
    extra = ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
    for h in headers:
        extra += ["-H", h]
    return h2b.h2load(url, n, c, m, extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep-tmp", action="store_true", help="keep the configs and logs")
    a = ap.parse_args()
    if a.requests < 1 or a.requests > 1000000 or a.repeat < 1 or a.repeat > 20:
        raise SystemExit("--requests 1..1000000, --repeat 1..20")
    for tool in ("nginx", "h2load", "taskset"):
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            raise SystemExit("bench/grpc.py needs %s (Debian: nginx, nghttp2-client, util-linux)"
                             % tool)
    if not os.path.exists(h2b.BIN):
        raise SystemExit("no %s: build first (cmake -B build && cmake --build build)" % h2b.BIN)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    tmp = tempfile.mkdtemp(prefix="sp-grpcbench-")
    procs = []
    spx = None
    try:
        bport, nport, pport = h2b.free_port(), h2b.free_port(), h2b.free_port()
        with open(tmp + "/req.bin", "wb") as f:
            f.write(REQ)
        # the backend: an h2c "gRPC server" (a POST to a static file is a 405 in nginx: the
        # error_page turns it into the file with 200)
        bdir = os.path.join(tmp, "backend")
        os.makedirs(bdir + "/tmp")
        with open(bdir + "/msg.bin", "wb") as f:
            f.write(RESP)
        # nginx's workers (nobody, when started as root) read the file: mkdtemp's 0700 would
        # make it a 404
        os.chmod(tmp, 0o755)
        os.chmod(bdir, 0o755)
        os.chmod(bdir + "/msg.bin", 0o644)
        with open(bdir + "/nginx.conf", "w") as f:
            f.write(h2b.nginx_conf(bdir, """    access_log off;
    server { listen 127.0.0.1:%d http2;
        location / { root %s; default_type application/grpc; try_files /msg.bin =404;
                     add_trailer grpc-status 0 always; add_trailer grpc-message "" always;
                     mirror /_read; mirror_request_body on;
                     error_page 405 =200 $uri; }
        location = /_read { internal; return 204; } }""" % (bport, bdir)))
        backend = subprocess.Popen(["taskset", "-c", "1", nginx, "-p", bdir, "-c",
                                    bdir + "/nginx.conf"], stderr=subprocess.DEVNULL)
        procs.append(backend)
        # nginx grpc_pass
        ndir = os.path.join(tmp, "nginx")
        os.makedirs(ndir + "/tmp")
        with open(ndir + "/nginx.conf", "w") as f:
            f.write(h2b.nginx_conf(ndir, """    log_format bench '$time_iso8601 $remote_addr "$request" $status $body_bytes_sent '
                     '$request_time $upstream_addr $upstream_connect_time '
                     '$upstream_header_time';
    access_log %s/access.log bench buffer=64k flush=200ms;
    upstream sandbox { server 127.0.0.1:%d; keepalive 64; }
    server { listen 127.0.0.1:%d http2;
        location / { grpc_pass grpc://sandbox; } }""" % (ndir, bport, nport)))
        ngx = subprocess.Popen(["taskset", "-c", "0", nginx, "-p", ndir, "-c",
                                ndir + "/nginx.conf"], stderr=subprocess.DEVNULL)
        procs.append(ngx)
        # sandbox-proxy
        spx = h2b.start_proxy(tmp, bport, pport)
        procs.append(spx)
        for p in (bport, nport, pport):
            h2b.wait_port(p)
        route = ["x-sandbox-id: b", "x-sandbox-port: %d" % bport]
        targets = [
            ("sandbox-proxy", "http://127.0.0.1:%d%s" % (pport, PATH), route,
             lambda: h2b.children(spx.pid)),
            ("nginx grpc_pass", "http://127.0.0.1:%d%s" % (nport, PATH), [],
             lambda: h2b.children(ngx.pid)),
            ("direct (backend)", "http://127.0.0.1:%d%s" % (bport, PATH), [],
             lambda: h2b.children(backend.pid)),
        ]
        body = tmp + "/req.bin"
        for _, url, hdrs, _ in targets:  # warm-up, and a check that every target answers
            h2load(url, 1000, a.clients, a.streams, body, hdrs)
        res = {t[0]: {"rps": [], "us": []} for t in targets}
        loads = [loadavg()]
        for i in range(a.repeat):
            order = targets[i % len(targets):] + targets[:i % len(targets)]
            for name, url, hdrs, pids in order:
                ps = pids()
                t0 = h2b.cpu_ticks(ps)
                rps = h2load(url, a.requests, a.clients, a.streams, body, hdrs)
                t1 = h2b.cpu_ticks(ps)
                res[name]["rps"].append(rps)
                res[name]["us"].append((t1 - t0) / TICK / a.requests * 1e6)
            loads.append(loadavg())
        print("gRPC unary calls, h2load -n %d -c %d -m %d, medians of %d interleaved repeats; "
              "1-min load average %.2f..%.2f" % (a.requests, a.clients, a.streams, a.repeat,
                                               min(loads), max(loads)))
        print("| target | calls/s | CPU per call (min-max) | vs nginx grpc_pass |")
        print("|---|---:|---:|---:|")
        ngx_us = statistics.median(res["nginx grpc_pass"]["us"])
        for name, _, _, _ in targets:
            us = res[name]["us"]
            med = statistics.median(us)
            print("| %s | %.0f | %.1f us (%.1f-%.1f) | %.2fx |" % (
                name, statistics.median(res[name]["rps"]), med, min(us), max(us),
                med / ngx_us if ngx_us else 0))
    finally:
        for p in reversed(procs):
            try:
                p.send_signal(signal.SIGTERM if p is spx else signal.SIGQUIT)
                p.wait(10)
            except Exception:
                p.kill()
        if a.keep_tmp:
            print("configs and logs kept in " + tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
