#!/usr/bin/env python3
"""bench/ratelimit_cost.py: what the cluster-wide rate limits (ratelimit.redis) cost sandbox-proxy
per request, next to the per-replica limits and no limits (Python 3 stdlib only).

    bench/ratelimit_cost.py [--duration S] [--repeat N] [--connections N]

Runs, on loopback only, an nginx backend (`return 200` of a small body), a redis-server (no
persistence) and sandbox-proxy with one worker pinned to CPU 0 (wrk, the backend and Redis on
CPU 1), then for each mode, in turn and `--repeat` times, a wrk run of `--duration` seconds
(default 5, bounded) with `--connections` (default 50):
  off    ratelimit = { enabled = false }                 (no limit: the floor)
  local  one limit per client address, out of reach       (the default mode: the shared dict)
  redis  the same limit with redis = { enabled = true }   (one EVALSHA per request)
It prints req/s, p99 latency and the CPU time per request (user + system, from /proc) of the
proxy and of redis-server per mode: medians of the repeats. The access log is on (to a file).
Needs nginx, redis-server, wrk, taskset and build/sandbox-proxy. Every process is stopped on
exit.
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
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCS = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(check, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("not ready: " + what)


def http_ok(url):
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


def tcp_ok(port):
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def spawn(cmd, log, cpus):
    p = subprocess.Popen(["taskset", "-c", cpus] + cmd, stdout=open(log, "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p in PROCS:
        PROCS.remove(p)


def cpu_seconds(pid):
    """user + system CPU seconds of pid (taskset execs its command: the same pid)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(port, duration, conns):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c%d" % conns, "-d%ds" % duration,
                          "--latency", "http://127.0.0.1:%d/u0/sb0/small" % port],
                         capture_output=True, text=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)] if m else None
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, total, p99, int(non2xx.group(1)) if non2xx else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--proxy-bin", default=os.path.join(ROOT, "build", "sandbox-proxy"))
    a = ap.parse_args()
    if not 1 <= a.duration <= 60 or not 1 <= a.repeat <= 10:
        raise SystemExit("--duration 1..60, --repeat 1..10")
    tmp = tempfile.mkdtemp(prefix="ratelimit-cost-")
    try:
        bport = free_port()
        with open(os.path.join(tmp, "nginx.conf"), "w") as f:
            f.write("""worker_processes 1; pid %(t)s/nginx.pid; error_log %(t)s/nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path %(t)s; proxy_temp_path %(t)s; fastcgi_temp_path %(t)s;
  uwsgi_temp_path %(t)s; scgi_temp_path %(t)s;
  server { listen 127.0.0.1:%(p)d; location / { return 200 "hello from the bench backend\\n"; } } }
""" % {"t": tmp, "p": bport})
        spawn(["nginx", "-p", tmp, "-c", os.path.join(tmp, "nginx.conf"), "-g", "daemon off;"],
              os.path.join(tmp, "nginx.log"), "1")
        rport = free_port()
        redis = spawn(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no", "--dir", tmp], os.path.join(tmp, "redis.log"), "1")
        sfile = os.path.join(tmp, "sandboxes.json")
        with open(sfile, "w") as f:
            json.dump({"apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "SandboxList", "items": [{
                "apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "sb0", "namespace": "ns", "labels": {"user": "u0"},
                             "annotations": {"sandbox-proxy.dev/port": str(bport)}},
                "status": {"podIPs": ["127.0.0.1"],
                           "conditions": [{"type": "Ready", "status": "True"}]}}]}, f)
        limit = '{ { name = "client", key = "unauthenticated", rate = 1e9, burst = 1e9 } }'
        sections = {
            "off": "{ enabled = false }",
            "local": "{ limits = %s }" % limit,
            "redis": "{ limits = %s, redis = { enabled = true, port = %d } }" % (limit, rport),
        }
        modes = ["off", "local", "redis"]
        results = {m: [] for m in modes}
        wait_ready(lambda: http_ok("http://127.0.0.1:%d/" % bport), "nginx")
        wait_ready(lambda: tcp_ok(rport), "redis-server")
        for rep in range(a.repeat):
            for mode in modes:
                cfile = os.path.join(tmp, "config-%s.lua" % mode)
                with open(cfile, "w") as f:
                    # the backend is on 127.0.0.1: a guard refuses loopback sandboxes unless allowed
                    f.write("return { allow_loopback_sandboxes = true, ratelimit = %s }\n"
                            % sections[mode])
                port = free_port()
                p = spawn([a.proxy_bin, "--workers", "1", "--listen", "127.0.0.1:%d" % port,
                           "--sandboxes-file", sfile, "--config", cfile,
                           "--set", "demo_listen=127.0.0.1:0"],
                          os.path.join(tmp, "proxy-%s-%d.log" % (mode, rep)), "0")
                wait_ready(lambda: http_ok("http://127.0.0.1:%d/health" % port), "proxy")
                run_wrk(port, 1, a.connections)  # warm-up
                c0, r0 = cpu_seconds(p.pid), cpu_seconds(redis.pid)
                rps, total, p99, bad = run_wrk(port, a.duration, a.connections)
                c1, r1 = cpu_seconds(p.pid), cpu_seconds(redis.pid)
                stop(p)
                if bad:
                    raise SystemExit("%s: %d non-2xx responses" % (mode, bad))
                us, rus = (c1 - c0) / total * 1e6, (r1 - r0) / total * 1e6
                results[mode].append((rps, us, rus, p99))
                print("repeat %d %-6s %9.0f req/s  p99 %6.2f ms  proxy %5.1f us/request  "
                      "redis %4.1f us/request" % (rep + 1, mode, rps, p99, us, rus), flush=True)
        print("\nmode    req/s  p99 ms  proxy CPU us/request  redis-server CPU us/request  (medians)")
        for mode in modes:
            rs = results[mode]
            print("%-6s %6.0f  %6.2f  %20.1f  %27.1f" % (
                mode, statistics.median(x[0] for x in rs), statistics.median(x[3] for x in rs),
                statistics.median(x[1] for x in rs), statistics.median(x[2] for x in rs)))
    finally:
        for p in list(PROCS):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
