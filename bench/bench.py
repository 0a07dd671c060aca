#!/usr/bin/env python3
"""Side-by-side HTTP benchmark of sandbox-proxy against nginx, nginx+Lua, HAProxy and the
backend itself. Started by bench/run (which installs the packages first); Python 3 stdlib only.

Everything runs on 127.0.0.1, every process is started in the foreground in its own process
group and stopped on exit (normal exit, exception, SIGINT, SIGTERM). See bench/README.md.
"""
import argparse
import atexit
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
WRK_SCRIPT = os.path.join(BENCH_DIR, "wrk_routes.lua")
IDLE_SCRIPT = os.path.join(BENCH_DIR, "idle_conns.py")
CHURN_DRIVER = os.path.join(BENCH_DIR, "churn_driver.py")
KUBE_STANDIN = os.path.join(ROOT, "spec", "fixtures", "kube_apiserver.py")
NOFILE_WANT = 200000
NOFILE = 65536  # RLIMIT_NOFILE in force (set by main(): NOFILE_WANT, or the hard limit if lower)
NGINX_MODULES = "/usr/lib/nginx/modules"

SMALL_BODY = "hello from the sandbox backend\n"
POST_BODY = "post ok\n"
POST_BYTES = 4096
ONE_MIB = 1 << 20

TARGETS = [
    # key, label
    ("sandbox-proxy", "sandbox-proxy"),
    ("nginx", "nginx (map)"),
    ("nginx-lua", "nginx + Lua"),
    ("haproxy", "HAProxy (map)"),
    ("direct", "direct backend"),
]
TARGET_LABEL = dict(TARGETS)
# the churn scenario's two rows: one sandbox-proxy on the Kubernetes stand-in, without and with churn
TARGET_LABEL["k8s"] = "sandbox-proxy (k8s), no churn"
TARGET_LABEL["k8s-decoy"] = "sandbox-proxy (k8s), decoy churn"
TARGET_LABEL["k8s-churn"] = "sandbox-proxy (k8s), churn"

SCENARIOS = [
    # key, title, rest, method, body bytes, connections (None: --connections)
    ("small-c50", "small GET, 50 connections", "/small", "GET", 0, None),
    ("small-c1", "small GET, 1 connection (latency)", "/small", "GET", 0, 1),
    ("get-1m", "1 MiB GET", "/1m", "GET", 0, None),
    ("get-1m-c10", "1 MiB GET, 10 connections", "/1m", "GET", 0, 10),
    ("post-4k", "4 KiB POST", "/post", "POST", POST_BYTES, None),
    ("idle-10k", "small GET, 50 connections, 10,000 idle keep-alive connections open", "/small", "GET", 0, None),
    ("churn", "small GET, 50 connections, sandbox-proxy on the Kubernetes stand-in, route updates",
     "/small", "GET", 0, None),
    ("memory", "sandbox-proxy memory (RSS)", None, None, 0, None),
]
LOAD_SCENARIOS = ("small-c50", "small-c1", "get-1m", "get-1m-c10", "post-4k", "idle-10k")  # need the targets

CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_PIDS = set()  # every process tree of the benchmark (filled once all are started)


def log(msg):
    print(msg, flush=True)


def warn(msg):
    print("WARNING: " + msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every process the benchmark starts: own session (process group), stopped by id."""

    def __init__(self):
        self.procs = []  # (name, Popen)

    def start(self, name, cmd, cpus, logdir, env=None, stdout=None, stdin=None):
        full = (["taskset", "-c", cpus] if cpus else []) + cmd
        # append mode: the access logs on stdout are truncated between runs (bench.py keeps the
        # disk use bounded); with O_APPEND the writer goes on at the new end, no sparse file
        out = open(stdout or os.path.join(logdir, name + ".stdout.log"), "ab")
        err = open(os.path.join(logdir, name + ".stderr.log"), "wb")
        p = subprocess.Popen(full, stdout=out, stderr=err,
                             stdin=subprocess.DEVNULL if stdin is None else stdin,
                             start_new_session=True, env=env)
        out.close()
        err.close()
        p.bench_name = name
        p.bench_stderr = os.path.join(logdir, name + ".stderr.log")
        self.procs.append((name, p))
        return p

    def stop(self, p, grace=5.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # the process group may still hold children (nginx workers) after the leader exited
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self):
        while self.procs:
            name, p = self.procs.pop()
            self.stop(p)


PROCS = Procs()
_cleaned = False


def cleanup():
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    PROCS.stop_all()


def on_signal(signum, frame):
    cleanup()
    sys.exit(128 + signum)


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(port, path, method="GET", body=None, headers=None, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_ready(p, port, path="/health", timeout=20.0, check=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError("%s exited with %s:\n%s" % (p.bench_name, p.returncode,
                                                           tail(p.bench_stderr)))
        try:
            status, body = http_get(port, path, timeout=1)
            last = (status, body[:200])
            if status == 200 and (check is None or check(body)):
                return
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError("%s not ready on port %d (%s): last %r\n%s" % (
        p.bench_name, port, path, last, tail(p.bench_stderr)))


def tail(path, n=20):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return ""


def proc_tree(pid):
    """pid and all its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        x = todo.pop()
        out.append(x)
        todo.extend(children.get(x, []))
    return out


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def all_proc_ticks():
    """{pid: utime+stime ticks} of every user-space process (kernel threads left out)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2:].split()
        if int(fields[1]) == 2 or int(d) == 2:  # children of kthreadd
            continue
        out[int(d)] = (int(fields[11]) + int(fields[12]), st[st.find("(") + 1:st.rfind(")")])
    return out


DISTURBED_PCT = 10.0  # other processes' CPU (% of one core) above which a run is run again
QUIET_PCT = 5.0       # machine-wide busy (% of all CPUs) below which the machine counts as quiet


def wait_quiet(limit):
    """Between runs the benchmark's own processes are idle, so whatever keeps the CPUs busy is
    someone else (a build, a test suite). Wait up to `limit` seconds for a quiet half second.
    Returns (seconds waited, busy % of the last sample)."""
    t0 = time.monotonic()
    while True:
        s0 = cpu_stat()
        time.sleep(0.5)
        s1 = cpu_stat()
        busy = busy_pct(s0, s1, list(s1))
        waited = time.monotonic() - t0
        if busy is None or busy < QUIET_PCT or waited >= limit:
            return round(waited, 1), busy


def cpu_list(spec):
    """'0', '1,3', '0-2' -> [0], [1, 3], [0, 1, 2]"""
    out = []
    for part in str(spec).split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def cpu_stat():
    """/proc/stat per CPU: {cpu: (busy_ticks, total_ticks)}; busy includes irq/softirq (loopback
    TCP work is largely done in softirq and not always charged to the process) and steal."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]]
                idle = v[3] + v[4]
                out[int(name[3:])] = (sum(v) - idle, sum(v))
    return out


def busy_pct(before, after, cpus):
    busy = sum(after[c][0] - before[c][0] for c in cpus if c in after)
    total = sum(after[c][1] - before[c][1] for c in cpus if c in after)
    return round(100.0 * busy / total, 1) if total else None


def affinity_of(pids):
    out = set()
    for pid in pids:
        try:
            out |= set(os.sched_getaffinity(pid))
        except OSError:
            pass
    return ",".join(str(c) for c in sorted(out))


# ----------------------------------------------------------------------------------------------
# configuration of the targets


def nginx_common(prefix, worker_cpu_note):
    for d in ("logs", "tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi", "conf"):
        os.makedirs(os.path.join(prefix, d), exist_ok=True)
    return """# %s
worker_processes 1;
pid %s/nginx.pid;
error_log %s/logs/error.log warn;
pcre_jit on;
worker_rlimit_nofile %d;
events { worker_connections %d; multi_accept off; }
""" % (worker_cpu_note, prefix, prefix, NOFILE, nginx_worker_connections())


def nginx_worker_connections():
    # clients + upstream connections; within the descriptor limit (nginx warns otherwise)
    return min(32768, NOFILE - 100)


def haproxy_maxconn():
    """HAProxy wants 2 descriptors per maxconn (client + server side). 30,000 when the limit
    allows it; else 12,000 (10,000 idle + the load) with 'no strict-limits' (HAProxy then warns
    and runs, instead of refusing to start, when it cannot raise RLIMIT_NOFILE to 2 x maxconn)."""
    if 2 * 30000 + 100 <= NOFILE:
        return 30000, False
    return 12000, 2 * 12000 + 100 > NOFILE


ACCESS_LOG = "on"  # set from --access-log
# Idle keep-alive connections are kept this long by every target (and the backend), so that the
# idle-10k scenario's connections outlive its runs even when quiet-machine waits stretch them.
KEEPALIVE_TIMEOUT = 600  # the nginx and HAProxy configs below say 600s literally


def nginx_http_common(prefix, proxy=True):
    if ACCESS_LOG == "on" and proxy:
        # about the fields sandbox-proxy's access_log.lua writes, JSON, buffered like it (64 KiB, 0.2 s),
        # to a real file (truncated by bench.py after each run, which counts its lines first)
        log = """    log_format bench escape=json '{"time":"$time_iso8601","request_id":"$request_id",'
        '"client":"$remote_addr","method":"$request_method","path":"$uri","status":$status,'
        '"bytes_in":$request_length,"bytes_out":$bytes_sent,"duration":$request_time,'
        '"upstream":"$upstream_addr","upstream_connect":"$upstream_connect_time",'
        '"upstream_first_byte":"$upstream_header_time","worker":$pid}';
    access_log %s/logs/access.log bench buffer=64k flush=200ms;
""" % prefix
    else:
        log = "    access_log off;\n"
    return log + """    server_tokens off;
    client_body_temp_path %(p)s/tmp/body;
    proxy_temp_path %(p)s/tmp/proxy;
    fastcgi_temp_path %(p)s/tmp/fastcgi;
    uwsgi_temp_path %(p)s/tmp/uwsgi;
    scgi_temp_path %(p)s/tmp/scgi;
""" % {"p": prefix}


# Proxy settings shared by the two nginx targets, chosen to match what sandbox-proxy does:
# HTTP/1.1 keep-alive to the upstream, the client's Host kept, X-Forwarded-For/-Proto/-Host and
# X-Request-Id added, responses streamed through a bounded set of memory buffers (never to disk).
NGINX_PROXY_SETTINGS = """            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id $request_id;
            proxy_buffering on;
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
            proxy_busy_buffers_size 32k;
            proxy_max_temp_file_size 0;
            proxy_connect_timeout 5s;
            proxy_read_timeout 180s;
"""


def backend_conf(prefix, port, data_dir):
    return nginx_common(prefix, "benchmark backend (the 'sandbox')") + """
http {
%s
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:%d backlog=4096;
        root %s;
        location = /health { default_type text/plain; return 200 "ok\\n"; }
        location = /small  { default_type text/plain; return 200 "%s"; }
        location = /1m     { }
        location = /post {
            if ($request_method != POST) { return 405; }
            default_type text/plain;
            return 200 "%s";
        }
        location = /echo   { default_type text/plain; return 200 "$request_uri\\n"; }
        location / { return 404; }
    }
}
""" % (nginx_http_common(prefix, proxy=False), port, data_dir, SMALL_BODY.replace("\n", "\\n"),
       POST_BODY.replace("\n", "\\n"))


def nginx_map_conf(prefix, port, backend_port, routes):
    os.makedirs(os.path.join(prefix, "conf"), exist_ok=True)
    with open(os.path.join(prefix, "conf", "routes.map"), "w") as f:
        for key in routes:
            f.write("%s sandbox_backend;\n" % key)
    return nginx_common(prefix, "target b: nginx reverse proxy, map route lookup") + """
http {
%(common)s
    keepalive_requests 10000;
    keepalive_timeout 600s;
    map_hash_max_size 4096;
    map_hash_bucket_size 64;

    # "{user}/{sandbox}" (named captures of the location regex) -> upstream group name
    map "$sb_user/$sb_name" $sb_upstream {
        default "";
        include %(p)s/conf/routes.map;
    }

    upstream sandbox_backend {
        server 127.0.0.1:%(bport)d;
        keepalive 64;
        keepalive_requests 10000;
        keepalive_timeout 60s;
    }

    server {
        listen 127.0.0.1:%(port)d backlog=4096;
        location = /health { default_type text/plain; return 200 "ok\\n"; }
        location ~ ^/(?<sb_user>[^/]+)/(?<sb_name>[^/]+)(?<sb_rest>/.*)$ {
            if ($sb_upstream = "") {
                return 404 '{"error":"sandbox not found"}\\n';
            }
            # prefix stripped: /{user}/{sandbox}/{rest}?{query} -> /{rest}?{query}
            proxy_pass http://$sb_upstream$sb_rest$is_args$args;
%(proxy)s        }
        location / { return 400 '{"error":"bad request path"}\\n'; }
    }
}
""" % {"common": nginx_http_common(prefix), "p": prefix, "bport": backend_port, "port": port,
       "proxy": NGINX_PROXY_SETTINGS}


NGINX_LUA_ROUTER = r"""
-- sb_router.lua (target c): the route lookup done in Lua, OpenResty style.
local routes = require "sb_routes"   -- { ["u0/sb0"] = { "127.0.0.1", port }, ... } (1,000)
local find, sub = string.find, string.sub
local ngx = ngx
local M = {}

function M.rewrite()
    local uri = ngx.var.uri
    local s1 = find(uri, "/", 2, true)
    if not s1 then return ngx.exit(400) end
    local s2 = find(uri, "/", s1 + 1, true)
    if not s2 then return ngx.exit(400) end
    local r = routes[sub(uri, 2, s2 - 1)]          -- "{user}/{sandbox}"
    if not r then return ngx.exit(404) end
    ngx.ctx.sb = r
    ngx.var.sb_rest = sub(uri, s2)                 -- prefix stripped
end

local balancer = require "ngx.balancer"
function M.balance()
    local r = ngx.ctx.sb
    local ok, err = balancer.set_current_peer(r[1], r[2])
    if not ok then
        ngx.log(ngx.ERR, "set_current_peer: ", err)
        return ngx.exit(500)
    end
end

return M
"""


def nginx_lua_conf(prefix, port, backend_port, routes):
    luadir = os.path.join(prefix, "lua")
    os.makedirs(luadir, exist_ok=True)
    with open(os.path.join(luadir, "sb_routes.lua"), "w") as f:
        f.write("-- generated: 1,000 routes {user}/{sandbox} -> { address, port }\nreturn {\n")
        for key in routes:
            f.write('    ["%s"] = { "127.0.0.1", %d },\n' % (key, backend_port))
        f.write("}\n")
    with open(os.path.join(luadir, "sb_router.lua"), "w") as f:
        f.write(NGINX_LUA_ROUTER)
    head = ("load_module %s/ndk_http_module.so;\nload_module %s/ngx_http_lua_module.so;\n"
            % (NGINX_MODULES, NGINX_MODULES))
    return head + nginx_common(prefix, "target c: nginx + lua (lua-nginx-module), route lookup in a Lua table") + """
http {
%(common)s
    keepalive_requests 10000;
    keepalive_timeout 600s;
    lua_package_path "%(lua)s/?.lua;/usr/share/lua/5.1/?.lua;;";
    lua_code_cache on;
    init_by_lua_block {
        require "resty.core"
        require "sb_router"
    }

    upstream sandbox_lua {
        server 0.0.0.1;   # placeholder: the peer is set by balancer_by_lua
        balancer_by_lua_block { require("sb_router").balance() }
        keepalive 64;     # after balancer_by_lua: pooled per peer address
        keepalive_requests 10000;
        keepalive_timeout 60s;
    }

    server {
        listen 127.0.0.1:%(port)d backlog=4096;
        location = /health { default_type text/plain; return 200 "ok\\n"; }
        location / {
            set $sb_rest "";
            rewrite_by_lua_block { require("sb_router").rewrite() }
            proxy_pass http://sandbox_lua$sb_rest$is_args$args;
%(proxy)s        }
    }
}
""" % {"common": nginx_http_common(prefix), "lua": luadir, "port": port,
       "proxy": NGINX_PROXY_SETTINGS}


def haproxy_conf(tmp, port, backend_port, routes):
    mapfile = os.path.join(tmp, "routes.map")
    with open(mapfile, "w") as f:
        for key in routes:
            f.write("%s sandbox\n" % key)
    if ACCESS_LOG == "on":
        # one line per request to stdout (HAProxy 2.6 cannot write a file itself; bench.py sends
        # its stdout to a file), HAProxy's own HTTP log format; one write() per line, unbuffered
        glog, dlog = "    log stdout format raw local0\n", "    log global\n    option httplog\n"
    else:
        glog, dlog = "", ""
    return """# target d: HAProxy, map-file route lookup
global
    nbthread 1
    maxconn %(maxconn)d
%(strict)s    tune.bufsize 16384
%(glog)s
defaults
    mode http
%(dlog)s    option http-keep-alive
    timeout connect 5s
    timeout client 600s
    timeout server 180s
    timeout http-keep-alive 600s
    timeout http-request 10s

frontend fe
    bind 127.0.0.1:%(port)d
    http-request return status 200 content-type text/plain string "ok" if { path /health }
    # "{user}/{sandbox}" from the first two path segments, looked up in the map (1,000 lines)
    http-request set-var(txn.sb_name) path,field(3,/)
    http-request set-var(txn.sb_key) path,field(2,/),concat(/,txn.sb_name)
    http-request set-var(txn.sb_backend) var(txn.sb_key),map(%(map)s)
    http-request return status 404 content-type application/json string "{\\"error\\":\\"sandbox not found\\"}" unless { var(txn.sb_backend) -m found }
    # prefix stripped (the query string is kept by set-path)
    http-request set-path %%[path,regsub(^/[^/]*/[^/]*,)]
    # the same request headers sandbox-proxy adds
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %%[req.hdr(host)]
    unique-id-format %%{+X}o%%ci:%%cp_%%fi:%%fp_%%Ts_%%rt:%%pid
    unique-id-header X-Request-Id
    use_backend %%[var(txn.sb_backend)]

backend sandbox
    http-reuse safe
    server s1 127.0.0.1:%(bport)d
""" % {"port": port, "bport": backend_port, "map": mapfile, "glog": glog, "dlog": dlog,
       "maxconn": haproxy_maxconn()[0], "strict": "    no strict-limits\n" if haproxy_maxconn()[1] else ""}


def sandbox_proxy_config(access_log):
    return """-- bench: sandbox-proxy runs its default (built-in) scripts; only these policy settings differ.
return {
    -- The default limit of callers without credentials (auth is off here, so every caller:
    -- 1,000 req/s, burst 2,000 per client address) would answer most of the benchmark's
    -- requests (all from 127.0.0.1) with 429. The limiter still runs on every request; the
    -- limit is simply out of reach (the default per-user limit needs auth, off here).
    ratelimit = { limits = { { name = "client", key = "unauthenticated", rate = 1e9, burst = 1e9 } } },
    -- The access log (one JSON line per request on stdout; bench.py sends stdout to a file).
    -- bench/run --access-log on|off switches it for every target alike (default on).
    access_log = { enabled = %s },
    -- The benchmark's sandbox is on 127.0.0.1, which the proxy refuses by default.
    allow_loopback_sandboxes = true,
    -- Every load connection comes from 127.0.0.1: the idle-10k scenario needs more than the
    -- default per-address cap (1,000).
    max_connections_per_ip = 0,
}
""" % ("true" if access_log == "on" else "false")


def proxy_cmd(a, port, cfile, source_args):
    """sandbox-proxy's command line for the benchmark: one worker (--workers), a source, the
    generated config, room for the idle-10k scenario (max_connections 20,000: 10,000 idle + the
    load; idle keep-alive connections kept KEEPALIVE_TIMEOUT s), then the user's --proxy-set."""
    cmd = [a.proxy_bin, "--listen", "127.0.0.1:%d" % port, "--workers", str(a.proxy_workers)]
    cmd += source_args + ["--config", cfile,
                          "--set", "max_connections=20000",
                          "--set", "keepalive_timeout=%d" % KEEPALIVE_TIMEOUT]
    for kv in a.proxy_set:
        cmd += ["--set", kv]
    return cmd


def proxy_env():
    env = dict(os.environ)
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.pop("KUBECONFIG", None)
    return env


def sandboxes_json(routes, backend_port):
    items = []
    for key in routes:
        user, name = key.split("/")
        items.append({
            "apiVersion": "agents.x-k8s.io/v1beta1",
            "kind": "Sandbox",
            "metadata": {
                "name": name,
                "namespace": "ns-" + user,
                "labels": {"user": user},
                "annotations": {"sandbox-proxy.dev/port": str(backend_port)},
                "creationTimestamp": "2026-08-20T10:00:00Z",
                "resourceVersion": "1",
            },
            "spec": {"operatingMode": "Running"},
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "DependenciesReady"}],
                "podIPs": ["127.0.0.1"],
            },
        })
    return {"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "SandboxList",
            "metadata": {"resourceVersion": "1"}, "items": items}


# ----------------------------------------------------------------------------------------------
# checks


def curl(url, out, data_file=None):
    cmd = ["curl", "-sS", "--max-time", "10", "-o", out, "-w", "%{http_code}", url]
    if data_file:
        cmd[1:1] = ["-X", "POST", "-H", "Content-Type: application/octet-stream",
                    "--data-binary", "@" + data_file]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError("curl %s: %s" % (url, r.stderr.strip()))
    return int(r.stdout.strip() or 0)


def verify_target(key, port, routed, routes, tmp, reference):
    """curl one routed URL per scenario, compare bodies with the backend's own answers; then
    every route once over a keep-alive connection; an unknown route must not reach the backend."""
    problems = []
    prefix = "/u3/sb42" if routed else ""
    body_file = os.path.join(tmp, "curl-%s.out" % key)
    post_file = os.path.join(tmp, "post.bin")
    checks = [
        ("small", prefix + "/small", None),
        ("1m", prefix + "/1m", None),
        ("post", prefix + "/post", post_file),
        ("echo", prefix + "/echo?a=1&b=two", None),
    ]
    for name, path, data in checks:
        url = "http://127.0.0.1:%d%s" % (port, path)
        status = curl(url, body_file, data)
        with open(body_file, "rb") as f:
            got = f.read()
        if status != 200:
            problems.append("curl %s -> HTTP %d" % (path, status))
        elif got != reference[name]:
            problems.append("curl %s: body differs from the backend's (%d bytes vs %d, sha256 %s vs %s)"
                            % (path, len(got), len(reference[name]), hashlib.sha256(got).hexdigest()[:12],
                               hashlib.sha256(reference[name]).hexdigest()[:12]))
    if routed:
        bad = 0
        first_bad = None
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            for rkey in routes:
                c.request("GET", "/%s/small" % rkey)
                r = c.getresponse()
                b = r.read()
                if r.status != 200 or b != reference["small"]:
                    bad += 1
                    first_bad = first_bad or (rkey, r.status, b[:80])
                if r.getheader("connection", "").lower() == "close":
                    c.close()
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        finally:
            c.close()
        if bad:
            problems.append("%d of %d routes failed (first: %r)" % (bad, len(routes), first_bad))
        status, b = http_get(port, "/u99/sb999/small")
        if status == 200:
            problems.append("unknown route /u99/sb999/small answered 200 (no route lookup?)")
    return problems


# ----------------------------------------------------------------------------------------------
# wrk

TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def parse_time_ms(s):
    m = re.match(r"^([\d.]+)(us|ms|s|m|h)$", s)
    if not m:
        return None
    return float(m.group(1)) * TIME_UNITS[m.group(2)]


def parse_wrk(text):
    res = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    res["rps"] = float(m.group(1)) if m else None
    dist = text.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pct, val in re.findall(r"^\s+(\d+)%\s+(\S+)", dist[1], re.M):
            res["p%s_ms" % pct] = parse_time_ms(val)
    m = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", text)
    if m:
        res["requests"] = int(m.group(1))
        res["read"] = m.group(3)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    res["socket_errors"] = ({"connect": int(m.group(1)), "read": int(m.group(2)),
                             "write": int(m.group(3)), "timeout": int(m.group(4))} if m else None)
    m = re.search(r"^BENCHJSON (\{.*\})$", text, re.M)
    res["wrk_json"] = json.loads(m.group(1)) if m else None
    return res


def run_wrk(port, routed, scen, conns, duration, cpus, tmp, pids_target, pids_load, hook=None):
    """One wrk run. hook (optional): hook.start() just before wrk starts, hook.stop() right after
    it ended (the churn driver); what stop() returns is kept as res["hook"]."""
    if hook is None:
        return _run_wrk(port, routed, scen, conns, duration, cpus, tmp, pids_target, pids_load)
    hook.start()
    try:
        res = _run_wrk(port, routed, scen, conns, duration, cpus, tmp, pids_target, pids_load)
    finally:
        stopped = hook.stop()
    res["hook"] = stopped
    return res


def _run_wrk(port, routed, scen, conns, duration, cpus, tmp, pids_target, pids_load):
    key, title, rest, method, body_bytes, _ = scen
    args = ["wrk", "-t1", "-c%d" % conns, "-d%ds" % duration, "--latency",
            "--timeout", "5s", "-s", WRK_SCRIPT, "http://127.0.0.1:%d" % port, "--",
            "routed" if routed else "direct", rest, method, str(body_bytes), "10", "100"]
    full = (["taskset", "-c", cpus] if cpus else []) + args
    outpath = os.path.join(tmp, "wrk.out")
    t_cpu0 = cpu_seconds(pids_target)
    l_cpu0 = cpu_seconds(pids_load)
    stat0 = cpu_stat()
    all0 = all_proc_ticks()
    t0 = time.monotonic()
    with open(outpath, "wb") as out:
        p = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        PROCS.procs.append(("wrk", p))
        deadline = time.monotonic() + duration + 30
        rusage = None
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                rusage = ru
                break
            if time.monotonic() > deadline:
                PROCS.stop(p)
                raise RuntimeError("wrk did not finish in time")
            time.sleep(0.05)
        PROCS.procs.remove(("wrk", p))
    wall = time.monotonic() - t0
    stat1 = cpu_stat()
    all1 = all_proc_ticks()
    t_cpu = cpu_seconds(pids_target) - t_cpu0
    l_cpu = cpu_seconds(pids_load) - l_cpu0
    with open(outpath, "r", errors="replace") as f:
        text = f.read()
    if p.returncode != 0:
        raise RuntimeError("wrk exited %s:\n%s" % (p.returncode, text))
    res = parse_wrk(text)
    res["raw"] = text
    res["wall_s"] = round(wall, 3)
    res["target_cpu_pct"] = round(100.0 * t_cpu / wall, 1)
    res["cpu_busy_pct"] = {str(c): busy_pct(stat0, stat1, [c]) for c in sorted(stat1)}
    # CPU used meanwhile by processes that are not part of the benchmark (other users of the
    # machine: builds, test suites); processes that started and exited within the run are missed
    ours = set(pids_target) | set(pids_load) | set(BENCH_PIDS) | {os.getpid(), p.pid}
    others = sorted(((t - all0.get(pid, (0, ""))[0], pid, comm) for pid, (t, comm) in all1.items()
                     if pid not in ours), reverse=True)
    other = sum(o[0] for o in others)
    res["other_cpu_pct"] = round(100.0 * other / CLK_TCK / wall, 1)
    res["other_top"] = ["%s[%d] %.0f%%" % (comm, pid, 100.0 * d / CLK_TCK / wall)
                        for d, pid, comm in others[:3] if d > 0]
    wrk_cpu = rusage.ru_utime + rusage.ru_stime
    res["wrk_cpu_pct"] = round(100.0 * wrk_cpu / wall, 1)
    # load CPU = backend (+ nothing else) + wrk; for "direct" the backend is the target
    res["load_cpu_pct"] = round(100.0 * (l_cpu + wrk_cpu) / wall, 1)
    if res["rps"] and res.get("requests"):
        res["target_cpu_us_per_req"] = round(1e6 * t_cpu / res["requests"], 1)
    return res


# ----------------------------------------------------------------------------------------------
# output


def fmt_rps(x):
    return "-" if x is None else "{:,.0f}".format(x)


def fmt_ms(x):
    if x is None:
        return "-"
    if x < 1:
        return "%.0fus" % (x * 1000)
    if x < 10:
        return "%.2fms" % x
    return "%.1fms" % x


def pct(x):
    return "-" if x is None else "%.0f%%" % x


def table_rows(summary, scen_key, targets):
    rows = []
    res = summary[scen_key]
    for t in targets:
        r = res.get(t)
        if not r:
            continue
        if r.get("error"):
            rows.append([TARGET_LABEL[t], "FAILED"] + [""] * (len(HEADERS) - 2))
            continue
        flag = " !" if r.get("problems") else ""
        rows.append([
            TARGET_LABEL[t] + flag,
            fmt_rps(r["rps"]),
            fmt_ms(r["p50_ms"]),
            fmt_ms(r["p99_ms"]),
            "-" if r.get("vs_nginx") is None else "%.2f" % r["vs_nginx"],
            "-" if r.get("vs_direct") is None else "%.2f" % r["vs_direct"],
            pct(r.get("target_cpu_pct")),
            "-" if r.get("target_cpu_us_per_req") is None else "%.0f" % r["target_cpu_us_per_req"],
            "-" if r.get("cpu_vs_nginx") is None else "%.2f" % r["cpu_vs_nginx"],
            pct(r.get("target_core_busy_pct")),
            pct(r.get("load_core_busy_pct")),
            pct(r.get("spread_pct")),
            bound_of(r),
            "-" if r.get("log_bytes_per_req") is None else "%.0f" % r["log_bytes_per_req"],
        ])
    return rows


HEADERS = ["target", "req/s", "p50", "p99", "vs nginx", "vs direct", "proc CPU", "us/req",
           "CPU vs nginx", "T busy", "L busy", "spread", "bound", "log B/req"]
BUSY_LIMIT = 90.0


def bound_of(r):
    """Which core limited the run: T (the targets' core), L (backend + wrk), both, or neither
    (latency-bound, e.g. one connection waiting on each round trip, or lost to the hypervisor)."""
    t = r.get("target_core_busy_pct") or 0
    l = r.get("load_core_busy_pct") or 0
    if r.get("is_direct"):
        t = 0  # the targets' core is idle when the backend is hit directly
    if t >= BUSY_LIMIT and l >= BUSY_LIMIT:
        return "T+L"
    if t >= BUSY_LIMIT:
        return "T"
    if l >= BUSY_LIMIT:
        return "L"
    return "neither"


def text_table(rows):
    widths = [max(len(str(x)) for x in col) for col in zip(HEADERS, *rows)]
    lines = []
    fmt = lambda r: "  ".join((str(c).ljust(w) if i == 0 else str(c).rjust(w))
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines.append(fmt(HEADERS))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(fmt(r))
    return "\n".join(lines)


def md_table(rows):
    out = ["| " + " | ".join(HEADERS) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def simple_table(headers, rows, md=False):
    if md:
        out = ["| " + " | ".join(headers) + " |",
               "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
        return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = lambda r: "  ".join((str(c).ljust(w) if i == 0 else str(c).rjust(w))
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def kib(x):
    return "-" if x is None else "%.1f" % x


IDLE_HEADERS = ["target", "opened", "open after", "2nd req ok", "RSS before", "RSS idle", "KiB/conn",
                "req/s no idle", "req/s idle", "vs no idle", "p99 no idle", "p99 idle", "us/req no idle"]


def idle_rows(info, summary_sk, targets):
    rows = []
    for t in targets:
        ti = info["targets"].get(t)
        if not ti:
            continue
        reps = ti.get("reps", [])
        opened = [x["open"]["opened"] for x in reps if x.get("open")]
        still = [x["check"]["open"] for x in reps if x.get("check")]
        s_ok = sum(x["check"]["sample_ok"] for x in reps if x.get("check"))
        s_all = sum(x["check"]["sample"] for x in reps if x.get("check"))
        m = summary_sk.get(t, {})
        rows.append([TARGET_LABEL[t] + (" !" if ti.get("problems") else ""),
                     "{:,}".format(min(opened)) if opened else "-",
                     "{:,}".format(min(still)) if still else "-",
                     "%d/%d" % (s_ok, s_all) if s_all else "-",
                     mib(ti.get("rss_before_kib")), mib(ti.get("rss_idle_kib")), kib(ti.get("kib_per_conn")),
                     fmt_rps(ti.get("base_rps")), fmt_rps(m.get("rps")),
                     "-" if ti.get("vs_no_idle") is None else "%.2f" % ti["vs_no_idle"],
                     fmt_ms(ti.get("base_p99_ms")), fmt_ms(m.get("p99_ms")),
                     "-" if ti.get("base_target_cpu_us_per_req") is None else "%.0f" % ti["base_target_cpu_us_per_req"]])
    return rows


CHURN_HEADERS = ["run", "req/s", "p50", "p99", "us/req", "updates/s", "proxy events/updates",
                 "last RV seen", "driver CPU", "stand-in CPU", "L busy"]


def churn_rows(runs_sk):
    rows = []
    for k in ("k8s", "k8s-decoy", "k8s-churn"):
        for i, r in enumerate(runs_sk.get(k, [])):
            if r.get("error"):
                rows.append(["%s #%d" % (TARGET_LABEL[k], i + 1), "FAILED"] + [""] * (len(CHURN_HEADERS) - 2))
                continue
            h = r.get("hook") or {}
            rows.append([
                "%s #%d" % (TARGET_LABEL[k], i + 1), fmt_rps(r.get("rps")), fmt_ms(r.get("p50_ms")),
                fmt_ms(r.get("p99_ms")),
                "-" if r.get("target_cpu_us_per_req") is None else "%.0f" % r["target_cpu_us_per_req"],
                fmt_rps(h.get("rate")) if h else "-",
                ("%d/%d" % (h["proxy_events"], h["applied"])) if h else "-",
                ("yes (%.1fs)" % h["proxy_rv_wait_s"] if h.get("proxy_rv_reached") else "NO")
                if h and k == "k8s-churn" else "-",
                pct(h.get("cpu_pct")) if h else "-", pct(h.get("standin_cpu_pct")) if h else "-",
                pct(r.get("load_core_busy_pct"))])
    return rows


def churn_verdict(summary_sk, runs_sk, rate, load_cpu):
    """The drop of req/s with churn (median of the paired per-repeat ratios), p99 both ways."""
    m0, md, m1 = (summary_sk.get(k, {}) for k in ("k8s", "k8s-decoy", "k8s-churn"))
    if m0.get("error") or m1.get("error") or m1.get("vs_k8s") is None:
        return None, ["churn: no comparison (a run failed)"]
    drop = 100.0 * (1 - m1["vs_k8s"])

    def us(m):
        return "-" if m.get("target_cpu_us_per_req") is None else "%.0f" % m["target_cpu_us_per_req"]
    lines = [
        "throughput with %s route updates/s vs without (same proxy, same k8s source, paired per repeat): "
        "%.3f -> drop %.1f%% (goal: <= 5%%: %s); per-repeat ratios %s" % (
            fmt_rps(rate), m1["vs_k8s"], drop, "met" if drop <= 5 else "NOT met",
            ", ".join("%.3f" % x for x in m1.get("vs_k8s_runs", []))),
        "req/s %s without, %s with; p99 %s without, %s with; proxy CPU per request %s us without, %s us with" % (
            fmt_rps(m0.get("rps")), fmt_rps(m1.get("rps")), fmt_ms(m0.get("p99_ms")), fmt_ms(m1.get("p99_ms")),
            us(m0), us(m1)),
    ]
    if not md.get("error") and md.get("vs_k8s") is not None and m1.get("vs_k8s-decoy") is not None:
        lines.append(
            "split: the driver + stand-in on the load core alone (decoy updates, no event reaches the proxy) "
            "cost %.1f%% (decoy vs none: %.3f, p99 %s, %s us/req); the proxy's own share (churn vs decoy, "
            "same load-core work): %.3f -> drop %.1f%%" % (
                100.0 * (1 - md["vs_k8s"]), md["vs_k8s"], fmt_ms(md.get("p99_ms")), us(md),
                m1["vs_k8s-decoy"], 100.0 * (1 - m1["vs_k8s-decoy"])))
    hooks = [r["hook"] for r in runs_sk.get("k8s-churn", []) if r.get("hook")]
    rates = [h["rate"] for h in hooks if h.get("rate")]
    if hooks:
        lines.append(
            "driver (pinned to CPU %s, like the stand-in): applied %s updates/s (median; target %s/s), %s of them "
            "seen by the proxy as watch events; the proxy reached the RV of the last update in %d of %d runs; "
            "driver CPU %s of a core, stand-in CPU %s of a core (both on the load core)" % (
                load_cpu, fmt_rps(statistics.median(rates)) if rates else "-", fmt_rps(rate),
                "all" if all(h["proxy_events"] >= h["applied"] for h in hooks) else "NOT all",
                sum(1 for h in hooks if h.get("proxy_rv_reached")), len(hooks),
                pct(statistics.median([h["cpu_pct"] for h in hooks])),
                pct(statistics.median([h["standin_cpu_pct"] for h in hooks]))))
    return drop, lines


def memory_rows(info, idle_info):
    rows = []
    n = info.get("count")
    s = info.get("sp_1k")
    if s:
        rows.append(["sandbox-proxy, 1,000 routes (file), at rest after start", mib(s["rss_start_kib"]),
                     mib(s["hwm_start_kib"])])
        rows.append(["  + %s idle keep-alive connections (%s opened)" % ("{:,}".format(n), "{:,}".format(s["open"]["opened"])),
                     mib(s["rss_idle_kib"]), mib(s["hwm_idle_kib"])])
        rows.append(["  = per idle connection", "%s KiB" % kib(s.get("kib_per_conn")), ""])
        rows.append(["  after closing them", mib(s["rss_closed_kib"]), mib(s["hwm_closed_kib"])])
        rows.append(["  2nd cycle: %s idle connections open again" % "{:,}".format(s["open2"]),
                     mib(s["rss_idle2_kib"]), ""])
        rows.append(["  2nd cycle: closed again", mib(s["rss_closed2_kib"]), mib(s["hwm_closed2_kib"])])
    if info.get("sp_big_rss_kib") is not None:
        rows.append(["sandbox-proxy, %s routes (Kubernetes stand-in), synced in %.1f s" % (
            "{:,}".format(info["big_routes"]), info["sp_big_ready_s"]),
            mib(info["sp_big_rss_kib"]), mib(info["sp_big_hwm_kib"])])
    if info.get("k8s_1k_rss_kib") is not None:
        rows.append(["sandbox-proxy, 1,000 routes (Kubernetes stand-in), after the churn runs",
                     mib(info["k8s_1k_rss_kib"]), mib(info["k8s_1k_hwm_kib"])])
    for t, label in (("nginx", "nginx (map)"), ("haproxy", "HAProxy (map)")):
        m = info.get(t)
        if m:
            rows.append(["%s, fresh: at rest -> %s idle connections" % (label, "{:,}".format(m["open"]["opened"])),
                         "%s -> %s" % (mib(m["rss_start_kib"]), mib(m["rss_idle_kib"])), mib(m["hwm_idle_kib"])])
            rows.append(["  = per idle connection", "%s KiB" % kib(m.get("kib_per_conn")), ""])
            rows.append(["  after closing them; after a 2nd open + close cycle",
                         "%s; %s" % (mib(m["rss_closed_kib"]), mib(m["rss_closed2_kib"])), mib(m["hwm_closed2_kib"])])
    return rows


def idle_per_conn_line(idle_info):
    if not idle_info:
        return None
    per = ", ".join("%s %s" % (TARGET_LABEL[t], kib(ti.get("kib_per_conn")))
                    for t, ti in idle_info["targets"].items() if ti.get("kib_per_conn") is not None)
    return ("idle-10k scenario (the same targets, already warm): KiB per idle connection: " + per) if per else None


def scan_logs(paths, offsets, t):
    """Warning and error lines of a target's logs, from the given offsets on."""
    found = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(offsets.get(path, 0))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        for line in text.splitlines():
            low = line.lower()
            if ('"level":"warn' in low or '"level":"error' in low or "[error]" in low
                    or "[crit]" in low or "[alert]" in low or "[emerg]" in low
                    or (t == "haproxy" and ("[warning]" in low or "[alert]" in low))):
                found.append(line.strip()[:300])
    return found


def machine_info():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = "%.1f GiB" % (int(line.split()[1]) / 1048576)
    except OSError:
        pass

    def ver(cmd, pat=None):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            s = (r.stdout + r.stderr).strip().splitlines()
            s = s[0] if s else ""
            if pat:
                m = re.search(pat, s)
                s = m.group(0) if m else s
            return s
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    def dpkg(pkg):
        try:
            r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                               text=True, timeout=10)
            return r.stdout.strip() or "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    return {
        "cpu_model": model,
        "cores_online": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "memory": mem,
        "kernel": platform.release(),
        "os": ver(["sh", "-c", ". /etc/os-release && echo \"$PRETTY_NAME\""]),
        "nginx": ver(["nginx", "-v"]),
        "nginx_lua_module": dpkg("libnginx-mod-http-lua"),
        "haproxy": ver(["haproxy", "-v"], r"HAProxy version \S+"),
        "wrk": ver(["wrk", "-v"], r"wrk \S+"),
    }


# ----------------------------------------------------------------------------------------------
# access-log files, memory, idle connections, the Kubernetes stand-in


def fsize(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def settle_files(paths, quiet=0.25, limit=3.0):
    """Waits until none of the files grew for `quiet` seconds (the buffered writers flush every
    0.2 s), at most `limit` seconds. Returns {path: size}."""
    sizes = {p: fsize(p) for p in paths}
    t0 = t_change = time.monotonic()
    while True:
        now = time.monotonic()
        if now - t_change >= quiet or now - t0 >= limit:
            return sizes
        time.sleep(0.05)
        new = {p: fsize(p) for p in paths}
        if new != sizes:
            sizes, t_change = new, time.monotonic()


def drain_logs(paths, count=True):
    """Once the access-log files stopped growing: their lines and bytes, then the files are
    truncated, which keeps the disk use bounded. nginx and sandbox-proxy write with O_APPEND and
    go on at offset 0; HAProxy clears O_APPEND on its stdout (it sets O_NONBLOCK with F_SETFL)
    and goes on at its own offset, leaving a hole: the holes are skipped (SEEK_DATA) and the
    bytes counted are the non-NUL ones."""
    settle_files(paths)
    lines = nbytes = 0
    for p in paths:
        if count:
            try:
                with open(p, "rb") as f:
                    try:
                        f.seek(os.lseek(f.fileno(), 0, os.SEEK_DATA))
                    except OSError:  # ENXIO: no data at all
                        f.seek(0, os.SEEK_END)
                    while True:
                        b = f.read(1 << 20)
                        if not b:
                            break
                        lines += b.count(b"\n")
                        nbytes += len(b) - b.count(b"\0")
            except OSError:
                pass
        try:
            os.truncate(p, 0)
        except OSError:
            pass
    return lines, nbytes


def mem_of(pids):
    """(VmRSS, VmHWM) summed over pids, in KiB (/proc/PID/status)."""
    rss = hwm = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        rss += int(m.group(1)) if m else 0
        m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
        hwm += int(m.group(1)) if m else 0
    return rss, hwm


def conn_count(pids):
    """Open sockets of the processes (from /proc/PID/fd)."""
    n = 0
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:"):
                    n += 1
            except OSError:
                pass
    return n


def mib(kib):
    return "-" if kib is None else "%.1f MiB" % (kib / 1024.0)


def raise_nofile(want):
    """RLIMIT_NOFILE of this process (inherited by every target): 10,000 idle connections need
    10,000 descriptors on the client side and as many in the target."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        except (ValueError, OSError):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class IdleClient:
    """bench/idle_conns.py, pinned to the load CPU: holds the idle keep-alive connections."""

    def __init__(self, cpus, logdir):
        cmd = (["taskset", "-c", cpus] if cpus else []) + [sys.executable, IDLE_SCRIPT, str(NOFILE_WANT)]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(os.path.join(logdir, "idle-client.stderr.log"), "ab"),
                                  start_new_session=True, text=True)
        self.p.bench_name = "idle-client"
        PROCS.procs.append(("idle-client", self.p))
        BENCH_PIDS.add(self.p.pid)
        hello = self._read(20)
        self.nofile = hello.get("nofile")

    def _read(self, timeout):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise RuntimeError("idle client: no answer in %gs" % timeout)
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("idle client exited (%s)" % self.p.poll())
        return json.loads(line)

    def call(self, msg, timeout):
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        res = self._read(timeout + 10)
        if res.get("error"):
            raise RuntimeError("idle client: " + res["error"])
        return res

    def stop(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        PROCS.stop(self.p)
        if ("idle-client", self.p) in PROCS.procs:
            PROCS.procs.remove(("idle-client", self.p))


def start_kube_standin(tmp, logdir, cpus, seed_file):
    """spec/fixtures/kube_apiserver.py seeded with the benchmark's SandboxList (no events at
    start, like a fresh watch cache), control API on its own port. Returns (proc, api, control)."""
    port_file = os.path.join(tmp, "kube-ports-%d.json" % time.monotonic_ns())  # one per stand-in
    cmd = [sys.executable, "-u", KUBE_STANDIN, "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0",
           "--port-file", port_file, "--bookmark-interval", "5", "--history", "200000",
           "--rv-step-max", "1", "--seed-file", seed_file]
    p = PROCS.start("kube-standin", cmd, cpus, logdir)
    BENCH_PIDS.add(p.pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError("kube stand-in exited:\n" + tail(p.bench_stderr))
        try:
            with open(port_file) as f:
                ports = json.load(f)
            return p, ports["api"], ports["control"]
        except (OSError, ValueError):
            time.sleep(0.02)
    raise RuntimeError("kube stand-in did not write its port file:\n" + tail(p.bench_stderr))


class ChurnHook:
    """Runs bench/churn_driver.py (pinned to the load CPU) for exactly the span of one wrk run,
    and afterwards checks that the proxy saw the updates: /health's source.events (the watch
    events the proxy applied) and source.resource_version, which must reach the RV of the
    driver's last update."""

    def __init__(self, cpus, logdir, control_port, sandboxes_file, rate, proxy_port, standin_pids,
                 decoy=False):
        self.cpus, self.logdir, self.control_port = cpus, logdir, control_port
        self.sandboxes_file, self.rate, self.proxy_port = sandboxes_file, rate, proxy_port
        self.standin_pids, self.decoy = standin_pids, decoy

    def source(self):
        status, body = http_get(self.proxy_port, "/health")
        return json.loads(body).get("source", {})

    def start(self):
        self.src0 = self.source()
        self.sc0 = cpu_seconds(self.standin_pids)
        cmd = (["taskset", "-c", self.cpus] if self.cpus else []) + [
            sys.executable, CHURN_DRIVER, "--control-port", str(self.control_port),
            "--sandboxes", self.sandboxes_file, "--rate", str(self.rate), "--max-seconds", "120"]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(os.path.join(self.logdir, "churn-driver.stderr.log"), "ab"),
                                  start_new_session=True, text=True)
        self.p.bench_name = "churn-driver"
        PROCS.procs.append(("churn-driver", self.p))
        BENCH_PIDS.add(self.p.pid)
        r, _, _ = select.select([self.p.stdout], [], [], 20)
        line = self.p.stdout.readline() if r else ""
        if not line:
            raise RuntimeError("churn driver did not start")
        self.t0 = time.monotonic()
        return self.p.pid

    def stop(self):
        wall = time.monotonic() - self.t0
        standin_cpu = cpu_seconds(self.standin_pids) - self.sc0
        self.p.stdin.close()
        r, _, _ = select.select([self.p.stdout], [], [], 20)
        line = self.p.stdout.readline() if r else ""
        PROCS.stop(self.p)
        PROCS.procs.remove(("churn-driver", self.p))
        if not line:
            raise RuntimeError("churn driver gave no summary")
        res = json.loads(line)
        res["standin_cpu_pct"] = round(100.0 * standin_cpu / wall, 1) if wall else None
        # the proxy publishes its watch state every second: wait until it reached the RV of the
        # last update (bounded), then count the events it applied meanwhile
        want = int(res["last_rv"]) if res.get("last_rv") and not self.decoy else None
        deadline = time.monotonic() + 5
        t_stop = time.monotonic()
        src = self.source()
        while want is not None and int(src.get("resource_version") or 0) < want \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            src = self.source()
        res["proxy_rv"] = src.get("resource_version")
        res["proxy_rv_reached"] = want is not None and int(src.get("resource_version") or 0) >= want
        res["proxy_rv_wait_s"] = round(time.monotonic() - t_stop, 2)
        res["proxy_events"] = (src.get("events") or 0) - (self.src0.get("events") or 0)
        res["proxy_relists"] = (src.get("relists") or 0) - (self.src0.get("relists") or 0)
        return res


# ----------------------------------------------------------------------------------------------
# main


def parse_args():
    ap = argparse.ArgumentParser(
        prog="bench/run",
        description="sandbox-proxy vs nginx / nginx+Lua / HAProxy / direct, side by side, on loopback.")
    ap.add_argument("--duration", type=int, default=5, help="whole seconds per measured run (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per target and scenario; the median is reported (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="whole seconds of untimed load per target and scenario before the first run (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: --duration 1 --repeat 1 --warmup 1")
    ap.add_argument("--connections", type=int, default=50, help="connections of the loaded scenarios (default 50)")
    ap.add_argument("--targets", default=",".join(k for k, _ in TARGETS),
                    help="comma-separated subset of: " + ", ".join(k for k, _ in TARGETS))
    ap.add_argument("--scenarios", default=",".join(s[0] for s in SCENARIOS),
                    help="comma-separated subset of: " + ", ".join(s[0] for s in SCENARIOS))
    ap.add_argument("--proxy-bin", default=os.path.join(ROOT, "build", "sandbox-proxy"),
                    help="the sandbox-proxy binary (default: build/sandbox-proxy)")
    ap.add_argument("--proxy-workers", type=int, default=1, help="sandbox-proxy --workers (default 1)")
    ap.add_argument("--access-log", choices=["off", "on", "both"], default="both",
                    help="access logs of every proxy target (sandbox-proxy's access_log.lua on stdout, nginx "
                         "access_log JSON buffered, HAProxy httplog on stdout), each written to a file "
                         "in the temp dir, counted and truncated after every run; both (the default): "
                         "the whole run with logs on, then the load scenarios (small-c50, small-c1, "
                         "get-1m, get-1m-c10, post-4k) again with logs off, then bench/goals.py prints "
                         "both side by side with the goal ratios of issue 16")
    ap.add_argument("--proxy-config", metavar="FILE",
                    help="sandbox-proxy --config file to use instead of the generated one "
                         "(which only lifts the client rate limit and sets the access log)")
    ap.add_argument("--proxy-set", action="append", default=[], metavar="KNOB=VALUE",
                    help="extra --set for sandbox-proxy (repeatable)")
    ap.add_argument("--target-cpus", help="CPU list for the targets (default: first allowed CPU)")
    ap.add_argument("--backend-cpus", help="CPU list for the backend nginx")
    ap.add_argument("--wrk-cpus", help="CPU list for wrk")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="before each run, wait up to this many seconds for the machine to be quiet "
                         "(other processes busy < %g%%%% of the CPUs) (default 30; 0: don't wait)" % QUIET_PCT)
    ap.add_argument("--retry-disturbed", type=int, default=2,
                    help="run a measurement again, up to N times, when other processes used more than "
                         "%g%%%% of a core during it; the least disturbed run is kept (default 2)" % DISTURBED_PCT)
    ap.add_argument("--idle-conns", type=int, default=10000,
                    help="idle keep-alive connections of the idle-10k and memory scenarios (default 10000)")
    ap.add_argument("--idle-sample", type=int, default=200,
                    help="idle connections that must answer a second request after the load (default 200)")
    ap.add_argument("--churn-rate", type=float, default=1000.0,
                    help="route updates per second of the churn scenario (default 1000)")
    ap.add_argument("--memory-routes", type=int, default=100000,
                    help="routes of the memory scenario's large sandboxes file (default 100000)")
    ap.add_argument("--memory-compare", default="nginx,haproxy",
                    help="fresh targets whose per-connection memory the memory scenario measures too "
                         "(subset of nginx,haproxy; empty: none) (default nginx,haproxy)")
    ap.add_argument("--time-budget", type=float, default=15.0,
                    help="minutes: quiet-machine waits and re-runs of disturbed runs are skipped once they "
                         "would push the whole run past this (the measurements are always made) (default 15)")
    ap.add_argument("--out-dir", default=os.path.join(BENCH_DIR, "results"),
                    help="where the JSON and Markdown results go (default: bench/results)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    a = ap.parse_args()
    global ACCESS_LOG
    ACCESS_LOG = a.access_log
    if a.quick:
        a.duration, a.repeat, a.warmup = 1, 1, 1
        a.quiet_wait, a.retry_disturbed = min(a.quiet_wait, 5.0), min(a.retry_disturbed, 1)
    if a.duration <= 0 or a.duration > 600 or a.repeat < 1 or a.repeat > 50:
        ap.error("--duration must be in (0, 600] and --repeat in [1, 50]")
    if not 1 <= a.idle_conns <= 50000 or not 0 <= a.idle_sample <= a.idle_conns:
        ap.error("--idle-conns must be in [1, 50000] and --idle-sample in [0, --idle-conns]")
    if not 0 < a.churn_rate <= 10000:
        ap.error("--churn-rate must be in (0, 10000]")
    if not 100 <= a.memory_routes <= 1000000:
        ap.error("--memory-routes must be in [100, 1000000]")
    a.memory_compare = [t.strip() for t in a.memory_compare.split(",") if t.strip()]
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in a.targets:
        if t not in TARGET_LABEL:
            ap.error("unknown target %r" % t)
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    known = {s[0] for s in SCENARIOS}
    for s in a.scenarios:
        if s not in known:
            ap.error("unknown scenario %r" % s)
    return a


def cpu_layout(a):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 3:
        d = (str(cpus[0]), str(cpus[1]), str(cpus[2]))
        note = "targets on CPU %s, backend on CPU %s, wrk on CPU %s" % d
    elif len(cpus) == 2:
        d = (str(cpus[0]), str(cpus[1]), str(cpus[1]))
        note = "targets on CPU %s; backend nginx + wrk share CPU %s" % (d[0], d[1])
    else:
        d = (str(cpus[0]),) * 3
        note = "only one CPU allowed (%s): targets, backend and wrk share it" % d[0]
    t = a.target_cpus or d[0]
    b = a.backend_cpus or d[1]
    w = a.wrk_cpus or d[2]
    if a.target_cpus or a.backend_cpus or a.wrk_cpus:
        note = "targets on CPU %s, backend on CPU %s, wrk on CPU %s (from the command line)" % (t, b, w)
    return t, b, w, note


def main_both(a):
    """--access-log both: this script twice (logs on: the whole selection; logs off: its load
    scenarios but idle-10k), then bench/goals.py over the two results."""
    argv = [x for x in sys.argv[1:]]
    # drop any --access-log / --scenarios given, set them per pass
    clean, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in ("--access-log", "--scenarios", "--out-dir"):
            skip = True
            continue
        if x.startswith(("--access-log=", "--scenarios=", "--out-dir=")):
            continue
        clean.append(x)
    me = os.path.abspath(__file__)
    paths, status = {}, 0
    off_scen = [s for s in a.scenarios if s in LOAD_SCENARIOS and s != "idle-10k"]
    for mode, scen in (("on", a.scenarios), ("off", off_scen)):
        if not scen:
            continue
        out = os.path.join(a.out_dir, "logs-" + mode)
        log("\n######## access logs %s: %s ########\n" % (mode, ",".join(scen)))
        rc = subprocess.call([sys.executable, me] + clean + ["--access-log", mode, "--scenarios", ",".join(scen),
                                                             "--out-dir", out])
        status = status or rc
        paths[mode] = os.path.join(out, "latest.json")
    if "on" in paths and "off" in paths:
        rc = subprocess.call([sys.executable, os.path.join(BENCH_DIR, "goals.py"), paths["on"], paths["off"],
                              "--out-dir", a.out_dir])
        status = status or rc
    return status


def main():
    a = parse_args()
    if a.access_log == "both":
        return main_both(a)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    atexit.register(cleanup)

    if not os.access(a.proxy_bin, os.X_OK):
        sys.exit("sandbox-proxy binary not found: %s (build it: cmake -B build && cmake --build build -j2)"
                 % a.proxy_bin)
    tcpu, bcpu, wcpu, layout_note = cpu_layout(a)
    tcpus = cpu_list(tcpu)
    lcpus = sorted(set(cpu_list(bcpu)) | set(cpu_list(wcpu)))
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    machine["sandbox_proxy"] = subprocess.run([a.proxy_bin, "--version"], capture_output=True,
                                              text=True, timeout=10).stdout.strip()
    cache = os.path.join(os.path.dirname(os.path.abspath(a.proxy_bin)), "CMakeCache.txt")
    try:
        with open(cache) as f:
            bt = re.search(r"^CMAKE_BUILD_TYPE:STRING=(.*)$", f.read(), re.M)
        machine["sandbox_proxy"] += " (%s build)" % (bt.group(1) or "default")
    except (OSError, AttributeError):
        pass
    tmp = tempfile.mkdtemp(prefix="sp-bench-")
    os.chmod(tmp, 0o755)  # nginx workers run as an unprivileged user when started as root
    logdir = os.path.join(tmp, "logs")
    os.makedirs(logdir)
    log("sandbox-proxy benchmark  %s" % started.strftime("%Y-%m-%d %H:%M:%S UTC"))
    log("machine: %s, %s cores online (allowed: %s), %s, kernel %s, %s" % (
        machine["cpu_model"], machine["cores_online"], ",".join(map(str, machine["cpus_allowed"])),
        machine["memory"], machine["kernel"], machine["os"]))
    log("versions: %s; %s; lua module %s; %s; %s" % (machine["sandbox_proxy"], machine["nginx"],
                                                     machine["nginx_lua_module"], machine["haproxy"], machine["wrk"]))
    log("CPU layout: %s (each target pinned with taskset to CPU %s = one core of budget)"
        % (layout_note, tcpu))
    log("runs: %gs each, %d repeat(s), median reported; warm-up %gs; temp dir %s"
        % (a.duration, a.repeat, a.warmup, tmp))
    global NOFILE
    nofile = NOFILE = raise_nofile(NOFILE_WANT)
    machine["nofile"] = nofile
    log("scenarios: %s; RLIMIT_NOFILE %d (inherited by every target)" % (", ".join(a.scenarios), nofile))

    # churn and memory start their own processes: the five targets only for the other scenarios
    started_targets = a.targets if any(s in LOAD_SCENARIOS for s in a.scenarios) else []

    # every access log goes to a file in the temp dir; bench.py counts its lines after each run
    # (lines per request, bytes per request) and truncates it
    def access_log_of(name):
        if name in ("nginx", "nginx-lua"):
            return os.path.join(tmp, name, "logs", "access.log")
        return os.path.join(logdir, name + ".access.log")
    access_logs = {}
    if a.access_log == "on":
        for t in ("sandbox-proxy", "nginx", "nginx-lua", "haproxy"):
            access_logs[t] = [access_log_of(t)]
    log_notes = {
        "sandbox-proxy": "access_log.lua (default script): JSON line per request on stdout (runtime buffered "
                         "writer, 64 KiB / 0.2 s) -> %s" % access_log_of("sandbox-proxy"),
        "nginx": "access_log JSON (same fields) buffer=64k flush=200ms -> %s" % access_log_of("nginx"),
        "nginx-lua": "access_log JSON (same fields) buffer=64k flush=200ms -> %s" % access_log_of("nginx-lua"),
        "haproxy": "option httplog, log stdout format raw (one write per line) -> stdout -> %s"
                   % access_log_of("haproxy"),
        "direct": "nothing (the backend has access_log off)",
    }
    if a.access_log == "off":
        log_notes = {t: "nothing (--access-log off)" for t in log_notes}
    if a.proxy_config:
        log_notes["sandbox-proxy"] = "as %s says; stdout -> %s" % (a.proxy_config, access_log_of("sandbox-proxy"))
    log_notes["k8s"] = log_notes["sandbox-proxy"].replace(access_log_of("sandbox-proxy"),
                                                          access_log_of("sandbox-proxy-k8s"))
    log("access logs:")
    for t in list(started_targets) + (["k8s"] if "churn" in a.scenarios else []):
        log("  %-15s %s" % (t, log_notes[t]))

    routes = ["u%d/sb%d" % (u, s) for u in range(10) for s in range(100)]

    # --- backend ----------------------------------------------------------------------------
    data_dir = os.path.join(tmp, "www")
    os.makedirs(data_dir)
    one_mib = os.urandom(ONE_MIB)
    with open(os.path.join(data_dir, "1m"), "wb") as f:
        f.write(one_mib)
    with open(os.path.join(tmp, "post.bin"), "wb") as f:
        f.write(b"x" * POST_BYTES)
    reference = {"small": SMALL_BODY.encode(), "1m": one_mib, "post": POST_BODY.encode(),
                 "echo": b"/echo?a=1&b=two\n"}

    ports = {}
    ports["direct"] = free_port()
    bprefix = os.path.join(tmp, "backend")
    os.makedirs(bprefix)
    conf = os.path.join(bprefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(backend_conf(bprefix, ports["direct"], data_dir))
    backend = PROCS.start("backend", ["nginx", "-p", bprefix, "-e", os.path.join(bprefix, "logs", "error.log"),
                                      "-c", conf, "-g", "daemon off;"], bcpu, logdir)
    wait_ready(backend, ports["direct"])
    backend_port = ports["direct"]
    # the backend must serve the reference bodies itself
    for name, path, data in (("small", "/small", None), ("1m", "/1m", None),
                             ("post", "/post", b"x" * POST_BYTES), ("echo", "/echo?a=1&b=two", None)):
        status, body = http_get(backend_port, path, "POST" if data else "GET", data)
        if status != 200 or body != reference[name]:
            sys.exit("backend self-check failed for %s: %d %r" % (path, status, body[:80]))

    # --- targets ------------------------------------------------------------------------------
    target_procs = {}
    target_notes = {}
    failed = {}
    configs = {}

    def target_log_files(t):
        files = [target_procs[t].bench_stderr]
        if t in ("nginx", "nginx-lua", "direct"):
            files.append(os.path.join(tmp, "backend" if t == "direct" else t, "logs", "error.log"))
        return files

    def start_target(t):
        if t == "direct":
            target_procs[t] = backend
            target_notes[t] = "the backend nginx itself (worker_processes 1), pinned to CPU %s" % bcpu
            return
        port = ports[t] = free_port()
        if t == "sandbox-proxy":
            sfile = os.path.join(tmp, "sandboxes.json")
            with open(sfile, "w") as f:
                json.dump(sandboxes_json(routes, backend_port), f)
            if a.proxy_config:
                cfile = os.path.abspath(a.proxy_config)
                with open(cfile) as f:
                    ctext = f.read()
            else:
                cfile = os.path.join(tmp, "sandbox-proxy-config.lua")
                ctext = sandbox_proxy_config(a.access_log)
                with open(cfile, "w") as f:
                    f.write(ctext)
            cmd = proxy_cmd(a, port, cfile, ["--sandboxes-file", sfile])
            # stdout carries the access log (when on): to a file in the temp dir
            p = PROCS.start(t, cmd, tcpu, logdir, env=proxy_env(), stdout=access_log_of(t))
            configs[t] = " ".join(cmd) + "\n\n" + ctext

            def all_routes(body):
                try:
                    return json.loads(body).get("ready") == len(routes)
                except ValueError:
                    return False
            wait_ready(p, port, "/health", check=all_routes)
            target_notes[t] = "default scripts, --workers %d, %s%s" % (
                a.proxy_workers,
                ("--config " + a.proxy_config) if a.proxy_config else
                "client rate limit raised out of reach, access log %s" % a.access_log,
                "".join(" --set " + kv for kv in a.proxy_set))
        elif t in ("nginx", "nginx-lua"):
            prefix = os.path.join(tmp, t)
            os.makedirs(prefix)
            conf = os.path.join(prefix, "nginx.conf")
            text = (nginx_map_conf if t == "nginx" else nginx_lua_conf)(prefix, port, backend_port, routes)
            with open(conf, "w") as f:
                f.write(text)
            configs[t] = text
            p = PROCS.start(t, ["nginx", "-p", prefix, "-e", os.path.join(prefix, "logs", "error.log"),
                                "-c", conf, "-g", "daemon off;"], tcpu, logdir)
            wait_ready(p, port)
            target_notes[t] = ("worker_processes 1, map of 1,000 routes -> upstream (keepalive 64)"
                               if t == "nginx" else
                               "worker_processes 1, Lua table of 1,000 routes, balancer_by_lua + keepalive 64")
        elif t == "haproxy":
            text = haproxy_conf(tmp, port, backend_port, routes)
            conf = os.path.join(tmp, "haproxy.cfg")
            with open(conf, "w") as f:
                f.write(text)
            configs[t] = text
            p = PROCS.start(t, ["haproxy", "-db", "-f", conf], tcpu, logdir,
                            stdout=access_log_of(t) if a.access_log == "on" else None)
            wait_ready(p, port)
            target_notes[t] = "nbthread 1, map file of 1,000 routes, http-reuse safe"
        target_procs[t] = p

    for t in started_targets:
        try:
            start_target(t)
            problems = verify_target(t, ports[t], t != "direct", routes, tmp, reference)
            if problems:
                failed[t] = problems
        except Exception as e:  # report and go on with the other targets
            failed[t] = [str(e)]
        pids = proc_tree(target_procs[t].pid) if t in target_procs else []
        status = "OK" if t not in failed else "FAILED: " + "; ".join(failed[t])
        log("  %-15s port %-5s pinned to CPU %-5s %s -- check %s" % (
            t, ports.get(t, "-"), affinity_of(pids) or "-", target_notes.get(t, ""), status))
    # where each target's logs stand now: only what is logged under load is reported later
    log_offsets, startup_warnings = {}, {}
    for t in target_procs:
        log_offsets[t] = {}
        for path in target_log_files(t):
            try:
                log_offsets[t][path] = os.path.getsize(path)
            except OSError:
                pass
        found = scan_logs(target_log_files(t), {}, t)
        if found:
            startup_warnings[t] = found[:5]
            log("  %-15s logged at start: %s" % (t, found[0][:200]))
    # the load side: backend nginx (+ wrk, measured separately)
    backend_pids = proc_tree(backend.pid)
    for _, p in PROCS.procs:
        BENCH_PIDS.update(proc_tree(p.pid))
    log("  %-15s port %-5s pinned to CPU %-5s (wrk -t1 pinned to CPU %s)" % (
        "backend", backend_port, affinity_of(backend_pids), wcpu))

    # --- measurements ---------------------------------------------------------------------------
    scen_by_key = {s[0]: s for s in SCENARIOS}
    runs = {}     # scen -> target -> [results]
    summary = {}  # scen -> target -> medians
    extras = {}   # scen -> what the idle-10k / churn / memory scenarios add
    active = [t for t in started_targets if t not in failed]

    # The time budget: quiet-machine waits and re-runs of disturbed runs are extras; they are
    # skipped once they would push the whole run past --time-budget minutes (what is left is
    # estimated from the runs still to do). The measurements themselves are always made.
    run_cost = a.duration + a.warmup / max(1, a.repeat) + 2.5  # s per run: settle, checks, wrk start
    budget = {"left_runs": 0, "skipped": 0}
    for sk in a.scenarios:
        if sk in LOAD_SCENARIOS:
            budget["left_runs"] += len(active) * a.repeat * (2 if sk == "idle-10k" else 1)
        elif sk == "churn":
            budget["left_runs"] += 3 * a.repeat
    fixed_cost = 4 * a.repeat * len(active) * ("idle-10k" in a.scenarios) + 15 * ("churn" in a.scenarios) \
        + 30 * ("memory" in a.scenarios)
    t_start = time.monotonic()

    def extras_allowed():
        left = budget["left_runs"] * run_cost + fixed_cost
        return time.monotonic() - t_start + left < a.time_budget * 60

    def measure(t, port, routed, scen, conns, rep, pids_t, pids_l, warm, hook=None, tag=None):
        """One measured run of target t (warm-up first if warm), retried when disturbed; the
        access-log files are drained before it and counted after it."""
        logs = access_logs.get(t, [])
        budget["left_runs"] -= 1
        try:
            if warm and a.warmup > 0:
                run_wrk(port, routed, scen, conns, a.warmup, wcpu, tmp, pids_t, pids_l)
            r = None
            for attempt in range(1 + a.retry_disturbed):
                if logs:
                    drain_logs(logs, count=False)  # the checks, the warm-up, the idle set, ...
                waited, idle = wait_quiet(a.quiet_wait if extras_allowed() else 0.0)
                ri = run_wrk(port, routed, scen, conns, a.duration, wcpu, tmp, pids_t, pids_l, hook=hook)
                ri["quiet_wait_s"], ri["machine_busy_before_pct"] = waited, idle
                ri["attempt"] = attempt + 1
                if logs:
                    ri["log_lines"], ri["log_bytes"] = drain_logs(logs)
                    if ri.get("requests"):
                        ri["log_bytes_per_req"] = round(ri["log_bytes"] / ri["requests"], 1)
                        ri["log_lines_per_req"] = round(ri["log_lines"] / ri["requests"], 4)
                if r is None or ri["other_cpu_pct"] < r["other_cpu_pct"]:
                    r = ri
                if ri["other_cpu_pct"] < DISTURBED_PCT:
                    break
                if not extras_allowed():
                    budget["skipped"] += 1
                    log("  [%d/%d] %-15s disturbed (other processes %s of a core), kept: --time-budget %g min "
                        "reached, no re-run" % (rep + 1, a.repeat, t, pct(ri["other_cpu_pct"]), a.time_budget))
                    break
                log("  [%d/%d] %-15s disturbed: other processes used %s of a core (%s), %s" % (
                    rep + 1, a.repeat, t, pct(ri["other_cpu_pct"]), ", ".join(ri["other_top"]),
                    "running it again" if attempt < a.retry_disturbed else "keeping the least disturbed run"))
        except Exception as e:
            r = {"error": str(e)}
        proc = target_procs.get(t)
        if proc is not None and proc.poll() is not None:
            r.setdefault("error", "target exited with %s" % proc.returncode)
        if "cpu_busy_pct" in r:
            for name, cl in (("target_core_busy_pct", tcpus), ("load_core_busy_pct", lcpus)):
                vals = [r["cpu_busy_pct"].get(str(c)) for c in cl]
                vals = [v for v in vals if v is not None]
                r[name] = round(sum(vals) / len(vals), 1) if vals else None
        if r.get("error"):
            log("  [%d/%d] %-15s ERROR %s" % (rep + 1, a.repeat, t, r["error"].strip()[-500:]))
            return r
        probs = []
        if r["non2xx"]:
            probs.append("%d non-2xx/3xx responses" % r["non2xx"])
        se = r.get("socket_errors")
        if se and any(se.values()):
            probs.append("socket errors %s" % se)
        if r["rps"] is None or r.get("p99_ms") is None:
            probs.append("could not parse wrk output")
        r["problems"] = probs
        log("  [%d/%d] %-15s %10s req/s  p50 %-8s p99 %-8s proc CPU %4s  T busy %4s  L busy %4s  log %s%s" % (
            rep + 1, a.repeat, t + (" (%s)" % tag if tag else ""), fmt_rps(r["rps"]), fmt_ms(r.get("p50_ms")), fmt_ms(r.get("p99_ms")),
            pct(r["target_cpu_pct"]), pct(r.get("target_core_busy_pct")),
            pct(r.get("load_core_busy_pct")),
            ("%s B/req, %.3f lines/req" % (r["log_bytes_per_req"], r["log_lines_per_req"]))
            if r.get("log_bytes_per_req") is not None else "none",
            ("  !! " + "; ".join(probs)) if probs else "")
            + ("  (other processes: %s of a core)" % pct(r["other_cpu_pct"])
               if r.get("other_cpu_pct", 0) >= DISTURBED_PCT else ""))
        return r

    def summarize(sk, keys, bases=("nginx", "direct")):
        summary[sk] = {}
        for t in keys:
            ok = [r for r in runs[sk][t] if not r.get("error")]
            if not ok:
                summary[sk][t] = {"error": runs[sk][t][-1].get("error") if runs[sk][t] else "no run"}
                continue

            def med(k):
                vals = [r[k] for r in ok if r.get(k) is not None]
                return statistics.median(vals) if vals else None
            rps_vals = [r["rps"] for r in ok if r.get("rps")]
            m = {
                "rps": med("rps"), "p50_ms": med("p50_ms"), "p75_ms": med("p75_ms"),
                "p90_ms": med("p90_ms"), "p99_ms": med("p99_ms"),
                "p99_max_ms": max((r["p99_ms"] for r in ok if r.get("p99_ms") is not None), default=None),
                "target_cpu_pct": med("target_cpu_pct"), "load_cpu_pct": med("load_cpu_pct"),
                "target_core_busy_pct": med("target_core_busy_pct"),
                "other_cpu_pct": med("other_cpu_pct"),
                "other_cpu_max_pct": max((r.get("other_cpu_pct") or 0 for r in ok), default=None),
                "load_core_busy_pct": med("load_core_busy_pct"),
                "wrk_cpu_pct": med("wrk_cpu_pct"), "target_cpu_us_per_req": med("target_cpu_us_per_req"),
                "log_bytes_per_req": med("log_bytes_per_req"), "log_lines_per_req": med("log_lines_per_req"),
                "rps_runs": rps_vals,
                "spread_pct": (100.0 * (max(rps_vals) - min(rps_vals)) / statistics.median(rps_vals)
                               if len(rps_vals) > 1 else None),
                "problems": ["run %d: %s" % (i + 1, pr) for i, r in enumerate(runs[sk][t])
                             for pr in r.get("problems", [])],
                "failed_runs": len(runs[sk][t]) - len(ok),
            }
            m["is_direct"] = t == "direct"
            summary[sk][t] = m
        # paired ratios: within one repeat the targets run back to back, so the ratio of two
        # targets' req/s in the same repeat cancels slow drift of the machine; the table shows
        # the median of the per-repeat ratios
        for t in keys:
            m = summary[sk][t]
            if m.get("error"):
                continue
            for base in bases:
                ratios = []
                for rt, rb in zip(runs[sk][t], runs[sk].get(base, [])):
                    if not rt.get("error") and not rb.get("error") and rt.get("rps") and rb.get("rps"):
                        ratios.append(rt["rps"] / rb["rps"])
                m["vs_%s_runs" % base] = [round(x, 3) for x in ratios]
                m["vs_%s" % base] = round(statistics.median(ratios), 3) if ratios else None
                # the same pairing for CPU per request: the base's us/req over ours (> 1: we
                # spend less CPU per request than the base)
                cratios = []
                for rt, rb in zip(runs[sk][t], runs[sk].get(base, [])):
                    if (not rt.get("error") and not rb.get("error") and rt.get("target_cpu_us_per_req")
                            and rb.get("target_cpu_us_per_req")):
                        cratios.append(rb["target_cpu_us_per_req"] / rt["target_cpu_us_per_req"])
                m["cpu_vs_%s_runs" % base] = [round(x, 3) for x in cratios]
                m["cpu_vs_%s" % base] = round(statistics.median(cratios), 3) if cratios else None

    def route_paths(routed, rest):
        return (["/%s%s" % (k, rest) for k in routes] if routed else [rest])

    def run_idle(sk, scen, conns):
        """idle-10k, target by target and repeat by repeat: a run without idle connections, then
        the idle set is opened (RSS before / after), the same run with it, the check, the close.
        The paired ratio (with / without, adjacent in time) is what the idle set costs."""
        idle = IdleClient(wcpu, logdir)
        info = extras[sk] = {"count": a.idle_conns, "client_nofile": idle.nofile, "targets": {}}
        log("  idle connections held by bench/idle_conns.py pinned to CPU %s (RLIMIT_NOFILE %s); each repeat: "
            "a run without them, then one with them" % (wcpu, idle.nofile))
        try:
            for t in active:
                port, routed = ports[t], t != "direct"
                pids_t = proc_tree(target_procs[t].pid)
                pids_l = backend_pids if t != "direct" else []
                ti = info["targets"][t] = {"reps": [], "base_runs": [], "problems": []}
                for rep in range(a.repeat):
                    base = measure(t, port, routed, scen, conns, rep, pids_t, pids_l, rep == 0, tag="no idle")
                    ti["base_runs"].append(base)
                    ri = {}
                    try:
                        if access_logs.get(t):
                            drain_logs(access_logs[t], count=False)
                        ri["rss_before_kib"] = mem_of(pids_t)[0]
                        o = idle.call({"cmd": "open", "port": port, "count": a.idle_conns,
                                       "paths": route_paths(routed, "/small"), "timeout": 120}, 120)
                        ri["open"] = o
                        if access_logs.get(t):
                            settle_files(access_logs[t])
                        ri["rss_idle_kib"] = mem_of(pids_t)[0]
                        if o["opened"]:
                            ri["kib_per_conn"] = round((ri["rss_idle_kib"] - ri["rss_before_kib"]) / o["opened"], 2)
                        log("  [%d/%d] %-15s %d idle connections opened in %.1fs (%d failed%s); RSS %s -> %s = %s KiB "
                            "per connection" % (rep + 1, a.repeat, t, o["opened"], o["seconds"], o["failed"],
                                                (": %s" % o["errors"]) if o["errors"] else "",
                                                mib(ri["rss_before_kib"]), mib(ri["rss_idle_kib"]),
                                                ri.get("kib_per_conn", "-")))
                        if o["failed"]:
                            ti["problems"].append("%d of %d idle connections could not be opened: %s"
                                                  % (o["failed"], a.idle_conns, o["errors"]))
                    except Exception as e:
                        ti["problems"].append("opening the idle connections: %s" % e)
                    r = measure(t, port, routed, scen, conns, rep, pids_t, pids_l, False, tag="idle")
                    runs[sk][t].append(r)
                    try:
                        ri["rss_after_load_kib"] = mem_of(pids_t)[0]
                        c = idle.call({"cmd": "check", "sample": a.idle_sample, "timeout": 30}, 30)
                        ri["check"] = c
                        bad = []
                        if ri.get("open") and c["open"] < ri["open"]["opened"]:
                            bad.append("%d of %d idle connections no longer open (closed %d, reset %d, unexpected "
                                       "data %d)" % (ri["open"]["opened"] - c["open"], ri["open"]["opened"],
                                                     c["closed"], c["reset"], c["unexpected"]))
                        if c["sample_ok"] < c["sample"]:
                            bad.append("%d of %d sampled idle connections failed a second request: %s"
                                       % (c["sample"] - c["sample_ok"], c["sample"], c["sample_errors"]))
                        ti["problems"] += ["run %d: %s" % (rep + 1, b) for b in bad]
                        log("  [%d/%d] %-15s after the load: %d of %d idle connections still open, %d/%d sampled "
                            "answered a second request; RSS %s%s" % (
                                rep + 1, a.repeat, t, c["open"], c["held"], c["sample_ok"], c["sample"],
                                mib(ri["rss_after_load_kib"]), ("  !! " + "; ".join(bad)) if bad else ""))
                    except Exception as e:
                        ti["problems"].append("checking the idle connections: %s" % e)
                    ti["reps"].append(ri)
                    try:
                        idle.call({"cmd": "close"}, 30)
                    except Exception as e:
                        ti["problems"].append("closing the idle connections: %s" % e)
                        idle.stop()
                        idle = IdleClient(wcpu, logdir)
                    # the next run without idle connections starts once the target let them go
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline and conn_count(pids_t) > 500:
                        time.sleep(0.05)
                for n, b in enumerate(ti["base_runs"]):
                    for pr in ([b["error"]] if b.get("error") else []) + b.get("problems", []):
                        ti["problems"].append("run %d without idle connections: %s" % (n + 1, pr))
                pairs = [(r["rps"], b["rps"]) for r, b in zip(runs[sk][t], ti["base_runs"])
                         if not r.get("error") and not b.get("error") and r.get("rps") and b.get("rps")]
                ti["vs_no_idle_runs"] = [round(x / y, 3) for x, y in pairs]
                ti["vs_no_idle"] = round(statistics.median(x / y for x, y in pairs), 3) if pairs else None
                for k in ("rps", "p99_ms", "target_cpu_us_per_req"):
                    vals = [b[k] for b in ti["base_runs"] if not b.get("error") and b.get(k) is not None]
                    ti["base_" + k] = statistics.median(vals) if vals else None
                # memory: the first opening only; later ones reuse the memory the first left in the
                # allocator (glibc keeps it), which makes their difference ~0 (all are in the JSON)
                first = ti["reps"][0] if ti["reps"] else {}
                for k in ("rss_before_kib", "rss_idle_kib", "kib_per_conn", "rss_after_load_kib"):
                    ti[k] = first.get(k)
        finally:
            idle.stop()

    def run_churn(sk, scen, conns):
        """churn: sandbox-proxy on the Kubernetes stand-in (the same 1,000 routes as Sandbox
        objects, label bench=routes; the proxy watches with that label selector), small GETs in
        three variants per repeat, in a rotating order:
          k8s        no updates;
          k8s-decoy  the driver updates 1,000 decoy Sandboxes without the label: the same work
                     for the driver and the stand-in on the load core, no event reaches the proxy;
          k8s-churn  the driver updates the 1,000 routed Sandboxes (each once a second)."""
        info = extras[sk] = {"rate": a.churn_rate}
        real = sandboxes_json(routes, backend_port)
        decoy = sandboxes_json(["decoy/sb%d" % i for i in range(len(routes))], backend_port)
        for o in real["items"]:
            o["metadata"]["labels"]["bench"] = "routes"
        real_file = os.path.join(tmp, "churn-routes.json")
        decoy_file = os.path.join(tmp, "churn-decoys.json")
        seed_file = os.path.join(tmp, "churn-seed.json")
        for path, doc in ((real_file, real), (decoy_file, decoy)):
            with open(path, "w") as f:
                json.dump(doc, f)
        with open(seed_file, "w") as f:
            json.dump(dict(real, items=real["items"] + decoy["items"]), f)
        standin, api_port, control_port = start_kube_standin(tmp, logdir, wcpu, seed_file)
        standin_pids = proc_tree(standin.pid)
        port = free_port()
        cfile = os.path.join(tmp, "sandbox-proxy-config.lua")
        if a.proxy_config:
            cfile = os.path.abspath(a.proxy_config)
        elif not os.path.exists(cfile):
            with open(cfile, "w") as f:
                f.write(sandbox_proxy_config(a.access_log))
        cmd = proxy_cmd(a, port, cfile, ["--kube-api", "http://127.0.0.1:%d" % api_port,
                                         "--set", "kube_label_selector=bench=routes"])
        keys = ("k8s", "k8s-decoy", "k8s-churn")
        for k in keys:
            access_logs[k] = [access_log_of("sandbox-proxy-k8s")] if a.access_log == "on" else []
        p = PROCS.start("sandbox-proxy-k8s", cmd, tcpu, logdir, env=proxy_env(),
                        stdout=access_log_of("sandbox-proxy-k8s"))
        BENCH_PIDS.add(p.pid)
        for k in keys:
            target_procs[k] = p
        configs["sandbox-proxy-k8s"] = " ".join(cmd)
        t0 = time.monotonic()
        try:
            wait_ready(p, port, "/ready", timeout=60)
            wait_ready(p, port, "/health", timeout=30,
                       check=lambda b: json.loads(b).get("ready") == len(routes)
                       and json.loads(b).get("sandboxes") == len(routes))
            info["sync_s"] = round(time.monotonic() - t0, 2)
            problems = verify_target("k8s", port, True, routes, tmp, reference)
        except Exception as e:
            problems = [str(e)]
        info["check_problems"] = problems
        log("  %-15s port %-5s pinned to CPU %-5s --kube-api stand-in (CPU %s, port %d, %d routed + %d decoy "
            "Sandboxes, label selector bench=routes), synced in %ss -- check %s"
            % ("sandbox-proxy-k8s", port, affinity_of(proc_tree(p.pid)), wcpu, api_port, len(real["items"]),
               len(decoy["items"]), info.get("sync_s", "-"),
               "OK" if not problems else "FAILED: " + "; ".join(problems)))
        log_offsets["k8s"] = {p.bench_stderr: fsize(p.bench_stderr)}
        found = scan_logs([p.bench_stderr], {}, "k8s")
        if found:
            startup_warnings["k8s"] = found[:5]
            log("  %-15s logged at start: %s" % ("sandbox-proxy-k8s", found[0][:200]))
        if problems:
            failed["sandbox-proxy-k8s"] = problems
            for k in keys:
                runs[sk][k].append({"error": "check failed: " + "; ".join(problems)})
            return
        pids_t = proc_tree(p.pid)
        pids_l = backend_pids + standin_pids
        hooks = {
            "k8s-churn": ChurnHook(wcpu, logdir, control_port, real_file, a.churn_rate, port, standin_pids),
            "k8s-decoy": ChurnHook(wcpu, logdir, control_port, decoy_file, a.churn_rate, port, standin_pids,
                                   decoy=True),
        }
        for rep in range(a.repeat):
            order = keys[rep % 3:] + keys[:rep % 3]
            for k in order:
                r = measure(k, port, True, scen, conns, rep, pids_t, pids_l, rep == 0 and k == order[0],
                            hook=hooks.get(k))
                h = r.get("hook")
                if h:
                    bad = []
                    if h.get("errors"):
                        bad.append("driver: %d failed posts (%s)" % (h["errors"], h.get("first_error")))
                    if k == "k8s-churn" and not h.get("proxy_rv_reached"):
                        bad.append("the proxy did not reach the RV of the last update (%s < %s)"
                                   % (h.get("proxy_rv"), h.get("last_rv")))
                    if k == "k8s-churn" and h.get("proxy_events", 0) < h.get("applied", 0):
                        bad.append("the proxy applied %d watch events for %d updates"
                                   % (h.get("proxy_events", 0), h.get("applied", 0)))
                    if k == "k8s-decoy" and h.get("proxy_events"):
                        bad.append("the proxy received %d events of decoy updates" % h["proxy_events"])
                    r.setdefault("problems", []).extend(bad)
                    log("  [%d/%d] %-15s driver: %d updates in %.2fs = %s/s (late ticks %d), driver CPU %s, "
                        "stand-in CPU %s; proxy applied %d events%s%s" % (
                            rep + 1, a.repeat, k, h["applied"], h["seconds"], fmt_rps(h["rate"]),
                            h["late_ticks"], pct(h["cpu_pct"]), pct(h["standin_cpu_pct"]),
                            h["proxy_events"],
                            (", reached RV %s in %.2fs" % (h["proxy_rv"], h["proxy_rv_wait_s"]))
                            if k == "k8s-churn" else "",
                            ("  !! " + "; ".join(bad)) if bad else ""))
                runs[sk][k].append(r)
        info["rss_kib"], info["hwm_kib"] = mem_of(pids_t)
        PROCS.stop(p)
        PROCS.stop(standin)

    def run_memory(sk):
        """memory: fresh processes. sandbox-proxy with 1,000 routes (idle RSS, then 10,000 idle
        keep-alive connections), sandbox-proxy with 100,000 routes, and nginx / HAProxy with the
        same 10,000 idle connections for comparison."""
        info = extras[sk] = {"count": a.idle_conns}
        idle = IdleClient(wcpu, logdir)
        paths = route_paths(True, "/small")
        cfile = os.path.join(tmp, "sandbox-proxy-config.lua")
        if a.proxy_config:
            cfile = os.path.abspath(a.proxy_config)
        elif not os.path.exists(cfile):
            with open(cfile, "w") as f:
                f.write(sandbox_proxy_config(a.access_log))
        sfile = os.path.join(tmp, "sandboxes.json")
        if not os.path.exists(sfile):
            with open(sfile, "w") as f:
                json.dump(sandboxes_json(routes, backend_port), f)

        def with_idle(name, p, port):
            """RSS at rest, with the idle set, and after closing it."""
            pids = proc_tree(p.pid)
            m = {"rss_start_kib": None}
            m["rss_start_kib"], m["hwm_start_kib"] = mem_of(pids)
            o = idle.call({"cmd": "open", "port": port, "count": a.idle_conns, "paths": paths,
                           "timeout": 120}, 120)
            m["open"] = o
            m["rss_idle_kib"], m["hwm_idle_kib"] = mem_of(pids)
            if o["opened"]:
                m["kib_per_conn"] = round((m["rss_idle_kib"] - m["rss_start_kib"]) / o["opened"], 2)
            c = idle.call({"cmd": "check", "sample": 0, "timeout": 30}, 30)
            m["still_open"] = c["open"]
            idle.call({"cmd": "close"}, 30)
            # wait (bounded) for the target to let the connections go before reading its RSS
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and conn_count(pids) > 200:
                time.sleep(0.05)
            m["rss_closed_kib"], m["hwm_closed_kib"] = mem_of(pids)
            # a second open + close cycle: memory reused, or growing again (a leak)?
            o2 = idle.call({"cmd": "open", "port": port, "count": a.idle_conns, "paths": paths,
                            "timeout": 120}, 120)
            m["rss_idle2_kib"] = mem_of(pids)[0]
            idle.call({"cmd": "close"}, 30)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and conn_count(pids) > 200:
                time.sleep(0.05)
            m["rss_closed2_kib"], m["hwm_closed2_kib"] = mem_of(pids)
            m["open2"] = o2["opened"]
            log("  %-26s RSS at start %s; with %d idle connections %s (%s KiB each); after closing "
                "them %s (peak %s); 2nd cycle: %s open, %s closed (peak %s)" % (
                    name, mib(m["rss_start_kib"]), o["opened"], mib(m["rss_idle_kib"]),
                    m.get("kib_per_conn", "-"), mib(m["rss_closed_kib"]), mib(m["hwm_closed_kib"]),
                    mib(m["rss_idle2_kib"]), mib(m["rss_closed2_kib"]), mib(m["hwm_closed2_kib"])))
            return m

        try:
            # sandbox-proxy, 1,000 routes
            port = free_port()
            cmd = proxy_cmd(a, port, cfile, ["--sandboxes-file", sfile])
            p = PROCS.start("mem-sandbox-proxy", cmd, tcpu, logdir, env=proxy_env(),
                            stdout=access_log_of("mem-sandbox-proxy"))
            t0 = time.monotonic()
            wait_ready(p, port, "/health", check=lambda b: json.loads(b).get("ready") == len(routes))
            info["sp_1k_ready_s"] = round(time.monotonic() - t0, 2)
            info["sp_1k"] = with_idle("sandbox-proxy, 1,000 routes", p, port)
            PROCS.stop(p)
            # sandbox-proxy, 100,000 routes, from the Kubernetes stand-in seeded with 100,000
            # Sandboxes (the production source; a 100,000-entry --sandboxes-file does not load
            # with the default script_time_budget: see bench/README.md)
            big = ["u%d/sb%d" % (u, s) for u in range(100) for s in range(a.memory_routes // 100)]
            bfile = os.path.join(tmp, "sandboxes-%d.json" % len(big))
            with open(bfile, "w") as f:
                json.dump(sandboxes_json(big, backend_port), f)
            info["big_routes"] = len(big)
            standin, api_port, _ = start_kube_standin(tmp, logdir, wcpu, bfile)
            os.unlink(bfile)
            port = free_port()
            cmd = proxy_cmd(a, port, cfile, ["--kube-api", "http://127.0.0.1:%d" % api_port])
            p = PROCS.start("mem-sandbox-proxy-big", cmd, tcpu, logdir, env=proxy_env(),
                            stdout=access_log_of("mem-sandbox-proxy-big"))
            t0 = time.monotonic()
            wait_ready(p, port, "/health", timeout=120,
                       check=lambda b: json.loads(b).get("ready") == len(big))
            info["sp_big_ready_s"] = round(time.monotonic() - t0, 2)
            pids = proc_tree(p.pid)
            info["sp_big_rss_kib"], info["sp_big_hwm_kib"] = mem_of(pids)
            st, body = http_get(port, "/u42/sb%d/small" % (len(big) // 100 - 1))
            info["sp_big_request"] = st
            log("  %-26s synced from the stand-in in %.2fs; RSS %s, peak %s; a routed request: %s" % (
                "sandbox-proxy, %s routes" % "{:,}".format(len(big)), info["sp_big_ready_s"],
                mib(info["sp_big_rss_kib"]), mib(info["sp_big_hwm_kib"]), st))
            PROCS.stop(p)
            PROCS.stop(standin)
            # nginx (map) and HAProxy (map), fresh, same idle set
            if "nginx" in a.memory_compare:
                prefix = os.path.join(tmp, "mem-nginx")
                os.makedirs(prefix, exist_ok=True)
                port = free_port()
                conf = os.path.join(prefix, "nginx.conf")
                with open(conf, "w") as f:
                    f.write(nginx_map_conf(prefix, port, backend_port, routes))
                p = PROCS.start("mem-nginx", ["nginx", "-p", prefix, "-e", os.path.join(prefix, "logs", "error.log"),
                                              "-c", conf, "-g", "daemon off;"], tcpu, logdir)
                wait_ready(p, port)
                info["nginx"] = with_idle("nginx (map)", p, port)
                PROCS.stop(p)
            if "haproxy" in a.memory_compare:
                port = free_port()
                conf = os.path.join(tmp, "mem-haproxy.cfg")
                with open(conf, "w") as f:
                    f.write(haproxy_conf(tmp, port, backend_port, routes))
                p = PROCS.start("mem-haproxy", ["haproxy", "-db", "-f", conf], tcpu, logdir,
                                stdout=access_log_of("mem-haproxy") if a.access_log == "on" else None)
                wait_ready(p, port)
                info["haproxy"] = with_idle("HAProxy (map)", p, port)
                PROCS.stop(p)
        except Exception as e:
            lines = str(e).splitlines()
            info["error"] = lines[0] if lines else repr(e)
            log("  ERROR in the memory scenario: %s" % e)
        finally:
            idle.stop()
            for f in os.listdir(logdir):  # the idle sets' access-log lines: not needed
                if f.startswith("mem-") and f.endswith(".access.log"):
                    os.truncate(os.path.join(logdir, f), 0)

    for sk in a.scenarios:
        scen = scen_by_key[sk]
        conns = scen[5] or a.connections
        if sk == "memory":
            log("\n== %s (fresh processes, pinned to CPU %s; idle connections from CPU %s) ==" % (
                scen[1], tcpu, wcpu))
            run_memory(sk)
            continue
        if sk == "churn":
            keys = ["k8s", "k8s-decoy", "k8s-churn"]
        else:
            keys = active
        log("\n== %s (%s %s%s, %d connection%s, %gs x %d) ==" % (
            scen[1], scen[3], "/{user}/{sandbox}" + scen[2], " + %d-byte body" % scen[4] if scen[4] else "",
            conns, "s" if conns != 1 else "", a.duration, a.repeat))
        runs[sk] = {t: [] for t in keys}
        if sk == "idle-10k":
            run_idle(sk, scen, conns)
        elif sk == "churn":
            run_churn(sk, scen, conns)
        else:
            for rep in range(a.repeat):
                for t in active:
                    pids_t = proc_tree(target_procs[t].pid)
                    pids_l = backend_pids if t != "direct" else []
                    runs[sk][t].append(measure(t, ports[t], t != "direct", scen, conns, rep, pids_t,
                                               pids_l, rep == 0))
        summarize(sk, keys, bases=("k8s", "k8s-decoy") if sk == "churn" else ("nginx", "direct"))

    # --- stderr / error logs of the targets ---------------------------------------------------
    # warnings/errors the targets logged while under load (startup lines excluded)
    log_findings = {}
    for t in target_procs:
        if t in ("k8s-churn", "k8s-decoy"):  # the same process as "k8s"
            continue
        found = scan_logs(target_log_files(t), log_offsets.get(t, {}), t)
        if found:
            log_findings[t] = {"count": len(found), "first": found[:5]}

    cleanup()

    # --- report -------------------------------------------------------------------------------
    finished = datetime.datetime.now(datetime.timezone.utc)
    header = []
    header.append("sandbox-proxy benchmark, %s" % started.strftime("%Y-%m-%d %H:%M UTC"))
    header.append("machine: %s, %d cores online, %s, kernel %s, %s" % (
        machine["cpu_model"], machine["cores_online"], machine["memory"], machine["kernel"], machine["os"]))
    header.append("versions: %s; %s; libnginx-mod-http-lua %s; %s; %s" % (
        machine["sandbox_proxy"], machine["nginx"], machine["nginx_lua_module"], machine["haproxy"], machine["wrk"]))
    header.append("CPU layout: %s; every target gets the same budget: CPU %s only (taskset)" % (layout_note, tcpu))
    header.append("routes: 1,000 (/u0..u9/sb0..sb99), requests cycle through all of them; prefix stripped; "
                  "access logs %s for every proxy; sandbox-proxy: %s" % (
                      a.access_log, target_notes.get("sandbox-proxy", "-")))
    header.append("what each target logs and where (files in the temp dir; counted and truncated after every "
                  "run, see 'log B/req'): " + "; ".join(
                      "%s: %s" % (TARGET_LABEL.get(t, t), log_notes[t])
                      for t in list(started_targets) + (["k8s"] if "churn" in a.scenarios else [])))
    header.append("limits: RLIMIT_NOFILE %d for every process (the hard limit here); sandbox-proxy --set "
                  "max_connections=20000 keepalive_timeout=%d; nginx worker_connections %d, worker_rlimit_nofile %d, "
                  "keepalive_timeout %ds; HAProxy maxconn %d%s, timeout http-keep-alive/client %ds"
                  % (nofile, KEEPALIVE_TIMEOUT, nginx_worker_connections(), nofile, KEEPALIVE_TIMEOUT,
                     haproxy_maxconn()[0], " + no strict-limits" if haproxy_maxconn()[1] else "",
                     KEEPALIVE_TIMEOUT))
    header.append("runs: %gs each, %d repeat(s), median shown (req/s, p50, p99 each the median); warm-up %gs; "
                  "wrk -t1 --latency; targets interleaved within each repeat; each run waits up to %gs for a quiet "
                  "machine and is run again (up to %d times) if other processes used >= %g%% of a core during it"
                  % (a.duration, a.repeat, a.warmup, a.quiet_wait, a.retry_disturbed, DISTURBED_PCT))
    header.append("whole run: %.1f min (from bench.py's start to the report)" % (
        (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60.0))
    legend = ("columns: req/s, p50, p99 = medians over the repeats; vs nginx / vs direct = req/s ratio "
              "(median of the per-repeat ratios: targets run back to back within a repeat); "
              "proc CPU = CPU time of the target's processes / wall time (100%% = one core; for 'direct' "
              "the backend); us/req = that CPU time per request in microseconds; T busy = CPU %s (the targets' core) busy, L busy = CPU %s (backend + wrk) "
              "busy, from /proc/stat, softirq included; spread = (max-min)/median of req/s over the "
              "repeats; bound = the core at >= %d%% busy (T, L, T+L, or neither: latency-bound or time lost "
              "outside the VM); log B/req = access-log bytes written per request (- = no log); "
              "'!' = errors, see notes" % (tcpu, ",".join(map(str, lcpus)), BUSY_LIMIT))

    text_out = ["", "=" * 100] + header + [legend]
    md_out = ["# sandbox-proxy benchmark results", ""] + ["- " + h for h in header] + ["", "_" + legend + "_", ""]
    notes = []
    churn_drop = None
    for sk in a.scenarios:
        scen = scen_by_key[sk]
        conns = scen[5] or a.connections
        if sk == "memory":
            title = "%s -- fresh processes pinned to CPU %s, idle connections from CPU %s" % (scen[1], tcpu, wcpu)
            info = extras.get(sk, {})
            churn_info = extras.get("churn") or {}
            if churn_info.get("rss_kib") is not None:
                info["k8s_1k_rss_kib"], info["k8s_1k_hwm_kib"] = churn_info["rss_kib"], churn_info["hwm_kib"]
            rows = memory_rows(info, extras.get("idle-10k"))
            mh = ["measure", "VmRSS", "VmHWM (peak)"]
            text_out += ["", title, simple_table(mh, rows)]
            md_out += ["## " + title, "", simple_table(mh, rows, md=True), ""]
            line = idle_per_conn_line(extras.get("idle-10k"))
            if line:
                text_out.append(line)
                md_out += [line, ""]
            if info.get("error"):
                notes.append("memory: %s" % info["error"])
            for k in ("sp_1k", "nginx", "haproxy"):
                m = info.get(k) or {}
                if m and (m["open"]["opened"] < info["count"] or m.get("still_open", 0) < m["open"]["opened"]):
                    notes.append("memory / %s: %d of %d idle connections opened, %d still open at the check (%s)" % (
                        k, m["open"]["opened"], info["count"], m.get("still_open", 0), m["open"]["errors"]))
            if info.get("sp_big_request") not in (None, 200):
                notes.append("memory: a routed request to the %d-route proxy answered %s" % (
                    info.get("big_routes", 0), info["sp_big_request"]))
            continue
        keys = ["k8s", "k8s-decoy", "k8s-churn"] if sk == "churn" else started_targets
        title = "%s -- %s /{user}/{sandbox}%s, %d conn" % (scen[1], scen[3], scen[2], conns)
        if sk == "churn":
            title = "%s (%s updates/s) -- %s /{user}/{sandbox}%s, %d conn" % (
                scen[1], fmt_rps(a.churn_rate), scen[3], scen[2], conns)
        rows = table_rows(summary, sk, keys)
        text_out += ["", title, text_table(rows)]
        md_out += ["## " + title, "", md_table(rows), ""]
        if sk == "idle-10k" and extras.get(sk):
            rows = idle_rows(extras[sk], summary.get(sk, {}), keys)
            sub = ("%s idle keep-alive connections per target (each made one GET first), held by a process on "
                   "CPU %s, opened and closed again in each repeat; RSS of the target's processes (VmRSS) before the "
                   "first opening and with them open, KiB/conn = (RSS idle - RSS before) / opened (the first "
                   "repeat: later ones reuse what the allocator kept); 'opened', 'open after' (still open after the load) = the least of the repeats; "
                   "'2nd req ok' = sampled ones that answered another GET; 'no idle' = the run just before, "
                   "without them; vs no idle = median of the paired ratios" % ("{:,}".format(a.idle_conns), wcpu))
            text_out += [sub, simple_table(IDLE_HEADERS, rows)]
            md_out += [sub, "", simple_table(IDLE_HEADERS, rows, md=True), ""]
            for t, ti in extras[sk]["targets"].items():
                for pr in ti.get("problems", []):
                    notes.append("idle-10k / %s: %s" % (t, pr))
        if sk == "churn":
            churn_drop, lines = churn_verdict(summary[sk], runs[sk], a.churn_rate, wcpu)
            rows = churn_rows(runs[sk])
            text_out += [simple_table(CHURN_HEADERS, rows)] + lines
            md_out += [simple_table(CHURN_HEADERS, rows, md=True), ""] + ["- " + x for x in lines] + [""]
            if churn_drop is not None and churn_drop > 5:
                notes.append("churn: throughput drop %.1f%% with %s route updates/s (goal <= 5%%)" % (
                    churn_drop, fmt_rps(a.churn_rate)))
    for t, probs in failed.items():
        notes.append("%s FAILED its checks: %s" % (t, "; ".join(probs)))
    for sk in a.scenarios:
        for t, m in summary.get(sk, {}).items():
            if m.get("error"):
                notes.append("%s / %s: %s" % (sk, t, m["error"].splitlines()[0]))
            elif m.get("problems"):
                notes.append("%s / %s: %s" % (sk, t, "; ".join(m["problems"])))
            if m.get("spread_pct") is not None and m["spread_pct"] > 25:
                notes.append("%s / %s: req/s unstable over the repeats: %s" % (
                    sk, t, ", ".join(fmt_rps(x) for x in m["rps_runs"])))
            if (m.get("p99_max_ms") and m.get("p99_ms") and m["p99_max_ms"] > 3 * m["p99_ms"]
                    and m["p99_max_ms"] > 1):
                notes.append("%s / %s: p99 outlier run: %s (median %s)" % (
                    sk, t, fmt_ms(m["p99_max_ms"]), fmt_ms(m["p99_ms"])))
    busy_runs = [(sk, t, i + 1, r["other_cpu_pct"]) for sk in runs for t, rs in runs[sk].items()
                 for i, r in enumerate(rs) if (r.get("other_cpu_pct") or 0) >= DISTURBED_PCT]
    if busy_runs:
        notes.append("other processes on the machine used CPU during %d of %d kept runs (>= %g%% of a core "
                     "even after retries; worst %.0f%% in %s / %s run %d): those figures are disturbed" % (
                         len(busy_runs), sum(len(rs) for s in runs.values() for rs in s.values()), DISTURBED_PCT,
                         max(b[3] for b in busy_runs), *max(busy_runs, key=lambda b: b[3])[:3]))
    if budget["skipped"]:
        notes.append("--time-budget %g min: %d disturbed run(s) kept without a re-run" % (
            a.time_budget, budget["skipped"]))
    for t, f in log_findings.items():
        notes.append("%s logged %d warning/error line(s), first: %s" % (t, f["count"], f["first"][0]))
    text_out += ["", "notes:"] + (["  - " + n for n in notes] or ["  - none: every target passed its checks, no non-2xx, no socket errors"])
    md_out += ["## Notes", ""] + (["- " + n for n in notes] or ["- none: every target passed its checks, no non-2xx, no socket errors"])
    log("\n".join(text_out))

    os.makedirs(a.out_dir, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    result = {
        "started": started.isoformat(), "finished": finished.isoformat(), "machine": machine,
        "cpu_layout": {"targets": tcpu, "backend": bcpu, "wrk": wcpu, "note": layout_note},
        "settings": {"duration_s": a.duration, "repeat": a.repeat, "warmup_s": a.warmup,
                     "connections": a.connections, "routes": len(routes),
                     "proxy_workers": a.proxy_workers, "proxy_set": a.proxy_set,
                     "proxy_config": a.proxy_config, "access_log": a.access_log,
                     "quiet_wait_s": a.quiet_wait, "retry_disturbed": a.retry_disturbed,
                     "idle_conns": a.idle_conns, "idle_sample": a.idle_sample, "churn_rate": a.churn_rate,
                     "memory_routes": a.memory_routes, "nofile": nofile,
                     "keepalive_timeout_s": KEEPALIVE_TIMEOUT, "time_budget_min": a.time_budget,
                     "reruns_skipped_for_time": budget["skipped"],
                     "elapsed_s": round(time.monotonic() - t_start, 1)},
        "targets": {t: {"label": TARGET_LABEL[t], "note": target_notes.get(t), "port": ports.get(t),
                        "access_log": log_notes.get(t),
                        "check_problems": failed.get(t, [])} for t in started_targets},
        "scenarios": {sk: {"title": scen_by_key[sk][1], "method": scen_by_key[sk][3],
                           "path": "/{user}/{sandbox}" + scen_by_key[sk][2] if scen_by_key[sk][2] else None,
                           "body_bytes": scen_by_key[sk][4],
                           "connections": scen_by_key[sk][5] or a.connections,
                           "median": summary.get(sk),
                           "extra": extras.get(sk),
                           "runs": {t: [{k: v for k, v in r.items() if k != "raw"} for r in rs]
                                    for t, rs in runs.get(sk, {}).items()}}
                      for sk in a.scenarios},
        "churn_drop_pct": churn_drop,
        "log_findings": log_findings,
        "startup_log_warnings": startup_warnings,
        "notes": notes,
        "configs": configs,
    }
    jpath = os.path.join(a.out_dir, "bench-%s.json" % stamp)
    mpath = os.path.join(a.out_dir, "bench-%s.md" % stamp)
    with open(jpath, "w") as f:
        json.dump(result, f, indent=2)
    with open(mpath, "w") as f:
        f.write("\n".join(md_out) + "\n")
    shutil.copyfile(jpath, os.path.join(a.out_dir, "latest.json"))
    shutil.copyfile(mpath, os.path.join(a.out_dir, "latest.md"))
    log("\nresults: %s\n         %s" % (os.path.relpath(jpath, ROOT), os.path.relpath(mpath, ROOT)))
    if a.keep_tmp:
        log("temp dir kept: %s" % tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    bad = (bool(failed) or any(m.get("error") or m.get("problems") for s in summary.values() for m in s.values())
           or any(ti.get("problems") for ti in (extras.get("idle-10k") or {}).get("targets", {}).values())
           or bool((extras.get("memory") or {}).get("error")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
