#!/usr/bin/env python3
"""bench/trace_cost.py: what tracing costs sandbox-proxy per request (Python 3 stdlib only).

    bench/trace_cost.py [--duration S] [--repeat N] [--connections N]

Runs, on loopback, an nginx backend (`return 200` of a small body), sandbox-proxy with one
worker pinned to CPU 0 (wrk and the backend on CPU 1), and the OTLP receiver of the test suite
(spec/fixtures/otlp_receiver.py), then for each mode, in turn and `--repeat` times:
  off          --set trace_propagation=false            (nothing computed)
  propagation  the default                              (traceparent to the sandbox, trace_id logged)
  export       + otlp_endpoint=<the receiver>            (two spans per request, POSTed every 1 s)
a wrk run of `--duration` seconds (default 5) with `--connections` (default 50). It prints
req/s and the proxy's CPU time per request (user + system, from /proc) per mode: medians of
the repeats. The access log is on (to a file), the rate limiter is raised out of reach as in
bench/run, and loopback sandboxes are allowed (the backend is on 127.0.0.1). Needs nginx, wrk,
taskset and build/sandbox-proxy. Every process is stopped on exit.
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
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(url, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    raise SystemExit("not ready: " + url)


def spawn(cmd, log, cpus=None):
    if cpus:
        cmd = ["taskset", "-c", cpus] + cmd
    p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
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


def proxy_pid(p):
    # taskset execs the proxy: same pid
    return p.pid


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck


def run_wrk(port, duration, conns):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c%d" % conns, "-d%ds" % duration,
                          "http://127.0.0.1:%d/u0/sb0/small" % port],
                         capture_output=True, text=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, total, int(non2xx.group(1)) if non2xx else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--proxy-bin", default=os.path.join(ROOT, "build", "sandbox-proxy"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="trace-cost-")
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
        spawn([sys.executable, "-u", os.path.join(ROOT, "spec/fixtures/otlp_receiver.py"),
               "--listen", "127.0.0.1:%d" % rport], os.path.join(tmp, "otlp.log"), "1")
        sfile = os.path.join(tmp, "sandboxes.json")
        with open(sfile, "w") as f:
            json.dump({"apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "SandboxList", "items": [{
                "apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "sb0", "namespace": "ns", "labels": {"user": "u0"},
                             "annotations": {"sandbox-proxy.dev/port": str(bport)}},
                "status": {"podIPs": ["127.0.0.1"],
                           "conditions": [{"type": "Ready", "status": "True"}]}}]}, f)
        cfile = os.path.join(tmp, "config.lua")
        with open(cfile, "w") as f:
            # the backend is on 127.0.0.1: a guard refuses loopback sandboxes unless allowed
            f.write('return { allow_loopback_sandboxes = true, ratelimit = { limits = { {'
                    ' name = "client", key = "unauthenticated", rate = 1e9, burst = 1e9 } } } }\n')
        modes = [("off", ["--set", "trace_propagation=false"]), ("propagation", []),
                 ("export", ["--set", "otlp_endpoint=http://127.0.0.1:%d/v1/traces" % rport])]
        results = {m: [] for m, _ in modes}
        wait_http("http://127.0.0.1:%d/" % bport)
        for rep in range(a.repeat):
            for mode, extra in modes:
                port = free_port()
                p = spawn([a.proxy_bin, "--workers", "1", "--listen", "127.0.0.1:%d" % port,
                           "--sandboxes-file", sfile, "--config", cfile,
                           "--set", "demo_listen=127.0.0.1:0"] + extra,
                          os.path.join(tmp, "proxy-%s-%d.log" % (mode, rep)), "0")
                wait_http("http://127.0.0.1:%d/health" % port)
                run_wrk(port, 1, a.connections)  # warm-up
                c0 = cpu_seconds(proxy_pid(p))
                rps, total, bad = run_wrk(port, a.duration, a.connections)
                c1 = cpu_seconds(proxy_pid(p))
                stop(p)
                if bad:
                    raise SystemExit("%s: %d non-2xx responses" % (mode, bad))
                us = (c1 - c0) / total * 1e6
                results[mode].append((rps, us))
                print("repeat %d %-12s %9.0f req/s  %5.1f us CPU/request" % (rep + 1, mode, rps, us),
                      flush=True)
        print("\nmode          req/s (median)  CPU us/request (median)")
        for mode, _ in modes:
            rs = results[mode]
            print("%-12s  %14.0f  %23.1f" % (mode, statistics.median(x[0] for x in rs),
                                             statistics.median(x[1] for x in rs)))
        try:  # the receiver keeps every span: on a busy machine listing them takes a while
            with urllib.request.urlopen("http://127.0.0.1:%d/__spans" % rport, timeout=60) as r:
                got = json.load(r)
            print("\nreceiver: %d POSTs, %d spans" % (got["posts"], len(got["spans"])))
        except OSError as e:
            print("\nreceiver: could not list its spans (%s)" % e)
    finally:
        for p in list(PROCS):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
