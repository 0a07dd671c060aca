#!/usr/bin/env python3
"""bench/h2.py: HTTP/2 (h2c, prior knowledge) through sandbox-proxy vs nginx's h2c proxying vs
the backend directly, with h2load (Debian nghttp2-client). Python 3 stdlib only.

    bench/h2.py [--requests N] [--clients C] [--streams M] [--repeat R]

The backend is an nginx answering a small body, over HTTP/1.1 to the proxies and over h2c to
h2load for "direct". sandbox-proxy (one worker) and the nginx proxy (one worker, `listen ...
http2`, an upstream keep-alive pool) run on CPU 0, the backend and h2load on CPU 1, access logs
on (to files) for both proxies, the proxy's rate limiter off. Each run sends N requests over C
connections with M concurrent streams each; the CPU a target used (utime + stime of its
processes, /proc/PID/stat) divided by N is its CPU per request. Medians of R repeats; the ratio
is sandbox-proxy's CPU per request over nginx's.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("SP_BIN", os.path.join(ROOT, "build", "sandbox-proxy"))
BODY = "hello from the sandbox backend\n"
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("port %d never opened" % port)


def nginx_conf(prefix, body):
    return """worker_processes 1;
daemon off;
pid %(p)s/nginx.pid;
error_log %(p)s/error.log warn;
events { worker_connections 8192; }
http {
    client_body_temp_path %(p)s/tmp; proxy_temp_path %(p)s/tmp; fastcgi_temp_path %(p)s/tmp;
    uwsgi_temp_path %(p)s/tmp; scgi_temp_path %(p)s/tmp;
    keepalive_requests 1000000;
    http2_max_requests 1000000;
%(body)s
}
""" % {"p": prefix, "body": body}


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def children(pid):
    out = [pid]
    try:
        for t in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, t)) as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def start_proxy(tmp, bport, pport):
    """Starts sandbox-proxy on CPU 0 (one worker, rate limiter off, access log to a file) on
    pport, with one sandbox a/b on 127.0.0.1:bport; returns its Popen."""
    sdir = os.path.join(tmp, "proxy")
    os.makedirs(sdir)
    with open(sdir + "/sandboxes.json", "w") as f:
        json.dump({"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "SandboxList", "items": [{
            "metadata": {"name": "b", "namespace": "default", "labels": {"user": "a"},
                         "annotations": {"sandbox-proxy.dev/port": str(bport)}},
            "status": {"podIPs": ["127.0.0.1"],
                       "conditions": [{"type": "Ready", "status": "True"}]}}]}, f)
    with open(sdir + "/config.lua", "w") as f:
        f.write("return { ratelimit = { enabled = false } }\n")
    return subprocess.Popen(["taskset", "-c", "0", BIN, "--listen", "127.0.0.1:%d" % pport,
                             "--workers", "1", "--sandboxes-file", sdir + "/sandboxes.json",
                             "--config", sdir + "/config.lua", "--set",
                             "allow_loopback_sandboxes=true", "--set", "demo_listen=127.0.0.1:0"],
                            stdout=open(sdir + "/access.log", "w"),
                            stderr=open(sdir + "/stderr.log", "w"))


def h2load(url, n, c, m, extra=()):
    """Runs h2load on CPU 1 (extra: more of its arguments, before the URL); returns req/s, or
    exits when not every request got a 2xx."""
    cmd = ["taskset", "-c", "1", "h2load", "-n", str(n), "-c", str(c), "-m", str(m)]
    cmd += list(extra) + [url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    ok = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    rps = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    if not ok or int(ok.group(1)) != n or not codes or int(codes.group(1)) != n:
        raise SystemExit("h2load against %s did not succeed:\n%s" % (url, out))
    return float(rps.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    for tool in ("nginx", "h2load", "taskset"):
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            raise SystemExit("bench/h2.py needs %s (Debian: nginx, nghttp2-client, util-linux)" % tool)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    tmp = tempfile.mkdtemp(prefix="sp-h2bench-")
    procs = []
    try:
        bport, dport, nport, pport = free_port(), free_port(), free_port(), free_port()
        # the backend: HTTP/1.1 for the proxies, h2c for "direct"
        bdir = os.path.join(tmp, "backend")
        os.makedirs(bdir + "/tmp")
        ret = 'location / { default_type text/plain; return 200 "%s"; }' % BODY.replace("\n", "\\n")
        with open(bdir + "/nginx.conf", "w") as f:
            f.write(nginx_conf(bdir, """    access_log off;
    server { listen 127.0.0.1:%d; %s }
    server { listen 127.0.0.1:%d http2; %s }""" % (bport, ret, dport, ret)))
        procs.append(subprocess.Popen(["taskset", "-c", "1", nginx, "-p", bdir, "-c",
                                       bdir + "/nginx.conf"], stderr=subprocess.DEVNULL))
        # nginx as an h2c proxy
        ndir = os.path.join(tmp, "nginx")
        os.makedirs(ndir + "/tmp")
        with open(ndir + "/nginx.conf", "w") as f:
            f.write(nginx_conf(ndir, """    access_log %s/access.log;
    upstream sandbox { server 127.0.0.1:%d; keepalive 64; }
    server { listen 127.0.0.1:%d http2;
        location /a/b/ { proxy_pass http://sandbox/; proxy_http_version 1.1;
                         proxy_set_header Connection ""; } }""" % (ndir, bport, nport)))
        ngx = subprocess.Popen(["taskset", "-c", "0", nginx, "-p", ndir, "-c", ndir + "/nginx.conf"],
                               stderr=subprocess.DEVNULL)
        procs.append(ngx)
        # sandbox-proxy
        spx = start_proxy(tmp, bport, pport)
        procs.append(spx)
        for p in (bport, dport, nport, pport):
            wait_port(p)
        time.sleep(0.5)
        targets = [
            ("sandbox-proxy", "http://127.0.0.1:%d/a/b/" % pport, lambda: children(spx.pid)),
            ("nginx (h2c proxy)", "http://127.0.0.1:%d/a/b/" % nport, lambda: children(ngx.pid)),
            ("direct (backend, h2c)", "http://127.0.0.1:%d/" % dport,
             lambda: children(procs[0].pid)),
        ]
        # warm-up
        for _, url, _ in targets:
            h2load(url, 2000, a.clients, a.streams)
        res = {name: {"rps": [], "us": []} for name, _, _ in targets}
        for _ in range(a.repeat):
            for name, url, pids in targets:
                ps = pids()
                t0 = cpu_ticks(ps)
                rps = h2load(url, a.requests, a.clients, a.streams)
                t1 = cpu_ticks(ps)
                res[name]["rps"].append(rps)
                res[name]["us"].append((t1 - t0) / TICK / a.requests * 1e6)
        print("h2load -n %d -c %d -m %d, medians of %d" % (a.requests, a.clients, a.streams, a.repeat))
        print("| target | req/s | CPU per request | vs nginx |")
        print("|---|---:|---:|---:|")
        ngx_us = statistics.median(res["nginx (h2c proxy)"]["us"])
        for name, _, _ in targets:
            us = statistics.median(res[name]["us"])
            print("| %s | %.0f | %.1f us | %.2fx |" % (name, statistics.median(res[name]["rps"]), us,
                                                    us / ngx_us if ngx_us else 0))
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM if p is procs[-1] else signal.SIGQUIT)
                p.wait(10)
            except Exception:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
