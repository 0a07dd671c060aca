#!/usr/bin/env python3
"""Where each request's CPU goes: sandbox-proxy next to nginx (map), same backend, same 1,000
routes, small GET, access logs on and written to files. Started by bench/profile (which installs
the packages first); Python 3 standard library only. See bench/README.md, "Profile".

Per target (sandbox-proxy --workers 1 with its default scripts + the bench config; nginx with
one worker), the target pinned to one CPU, backend + load on another:

 1. user-space instructions per request: callgrind (valgrind), warm-up, zero, exactly N
    requests from a small keep-alive client, dump; Ir/request and the top functions (self cost);
 2. system calls per request: strace -c -f attached to the normally running target during a
    short wrk run;
 3. user / system CPU per request, no tracer: /proc/PID/stat around wrk runs (repeated,
    targets alternating, medians), with the load CPU's busy % (is the load side saturated?).

Every process is started in its own process group (bench.py's Procs) and stopped by its id on
exit, on an exception and on SIGINT/SIGTERM/SIGHUP; the temp dir is removed (unless --keep-tmp).
"""
import argparse
import atexit
import datetime
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
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import bench as B  # noqa: E402  (the generators, Procs, /proc helpers of bench/bench.py)

ROOT = B.ROOT
WRK_SCRIPT = B.WRK_SCRIPT
TARGETS = [("sandbox-proxy", "sandbox-proxy"), ("nginx", "nginx (map)"),
           ("sandbox-proxy-b", "sandbox-proxy B")]  # B: the same binary with --b-set knobs
LABEL = dict(TARGETS)
CLIENT_CONNS = 10
TOP_FUNCTIONS = 12
MIN_SYSCALLS_PER_REQ = 0.01

log = B.log
warn = B.warn


# ----------------------------------------------------------------------------------------------
# processes and cleanup


STATE = {"tmp": None, "keep_tmp": False, "cleaned": False}


def cleanup():
    if STATE["cleaned"]:
        return
    STATE["cleaned"] = True
    B.cleanup()  # stops every process in B.PROCS (SIGTERM to its group, then SIGKILL)
    if STATE["tmp"] and not STATE["keep_tmp"]:
        shutil.rmtree(STATE["tmp"], ignore_errors=True)


def on_signal(signum, frame):
    cleanup()
    sys.exit(128 + signum)


def stop_proc(p, grace=10.0):
    B.PROCS.stop(p, grace)
    for entry in list(B.PROCS.procs):
        if entry[1] is p:
            B.PROCS.procs.remove(entry)


def proc_ticks(pid):
    """(utime, stime) in clock ticks of a process (all its threads), from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        st = f.read()
    fields = st[st.rfind(")") + 2:].split()
    return int(fields[11]), int(fields[12])


def run_cmd(cmd, timeout):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout + r.stderr


def version_of(cmd, pat=None):
    try:
        rc, out = run_cmd(cmd, 10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = out.strip().splitlines()
    s = lines[0] if lines else "?"
    if pat:
        m = re.search(pat, s)
        s = m.group(0) if m else s
    return s


# ----------------------------------------------------------------------------------------------
# the targets


class Setup:
    """The backend (on the load CPU) and the generated files of both targets."""

    def __init__(self, a, tmp, logdir, tcpu, lcpu):
        self.a, self.tmp, self.logdir, self.tcpu, self.lcpu = a, tmp, logdir, tcpu, lcpu
        self.routes = ["u%d/sb%d" % (u, s) for u in range(10) for s in range(100)]
        data_dir = os.path.join(tmp, "www")
        os.makedirs(data_dir)
        self.backend_port = B.free_port()
        bprefix = os.path.join(tmp, "backend")
        os.makedirs(bprefix)
        conf = os.path.join(bprefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(B.backend_conf(bprefix, self.backend_port, data_dir))
        self.backend = B.PROCS.start("backend", ["nginx", "-p", bprefix, "-e",
                                                 os.path.join(bprefix, "logs", "error.log"),
                                                 "-c", conf, "-g", "daemon off;"], str(lcpu), logdir)
        B.wait_ready(self.backend, self.backend_port)
        status, body = B.http_get(self.backend_port, "/small")
        if status != 200 or body != B.SMALL_BODY.encode():
            raise RuntimeError("backend self-check failed: %d %r" % (status, body[:80]))
        # sandbox-proxy: the SandboxList of the 1,000 routes and bench.py's config
        self.sfile = os.path.join(tmp, "sandboxes.json")
        with open(self.sfile, "w") as f:
            json.dump(B.sandboxes_json(self.routes, self.backend_port), f)
        self.cfile = os.path.join(tmp, "sandbox-proxy-config.lua")
        with open(self.cfile, "w") as f:
            f.write(B.sandbox_proxy_config("on"))
        self.n = 0

    def access_log_of(self, key, tag):
        if key == "nginx":
            return os.path.join(self.tmp, "nginx-" + tag, "logs", "access.log")
        return os.path.join(self.logdir, "sandbox-proxy-%s.access.log" % tag)

    def start(self, key, tag, callgrind_dir=None):
        """Start one target, pinned to the target CPU; under callgrind if callgrind_dir is given.
        Returns (Popen, port, pid to measure: the process itself, or nginx's worker)."""
        port = B.free_port()
        name = "%s-%s" % (key, tag)
        vg = []
        if callgrind_dir:
            vg = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--dump-instr=no",
                  "--callgrind-out-file=%s/out.%%p" % callgrind_dir]
        timeout = 300.0 if callgrind_dir else 30.0
        if key.startswith("sandbox-proxy"):
            cmd = [self.a.proxy_bin, "--listen", "127.0.0.1:%d" % port, "--workers", "1",
                   "--sandboxes-file", self.sfile, "--config", self.cfile]
            for kv in self.a.proxy_set + (self.a.b_set if key == "sandbox-proxy-b" else []):
                cmd += ["--set", kv]
            # stdout carries the access log (access_log.lua, on in the config): to a file
            p = B.PROCS.start(name, vg + cmd, str(self.tcpu), self.logdir, env=B.proxy_env(),
                              stdout=self.access_log_of(key, tag))
            p.bench_cmd = vg + cmd

            def all_routes(body):
                try:
                    return json.loads(body).get("ready") == len(self.routes)
                except ValueError:
                    return False
            B.wait_ready(p, port, "/health", timeout=timeout, check=all_routes)
            pid = p.pid
        else:
            prefix = os.path.join(self.tmp, name)
            os.makedirs(prefix)
            conf = os.path.join(prefix, "nginx.conf")
            with open(conf, "w") as f:
                f.write(B.nginx_map_conf(prefix, port, self.backend_port, self.routes))
            # under callgrind: no master, the one process is the worker (and the valgrind'd one)
            g = "daemon off; master_process off;" if callgrind_dir else "daemon off;"
            cmd = ["nginx", "-p", prefix, "-e", os.path.join(prefix, "logs", "error.log"), "-c", conf,
                   "-g", g]
            p = B.PROCS.start(name, vg + cmd, str(self.tcpu), self.logdir)
            p.bench_cmd = vg + cmd
            B.wait_ready(p, port, timeout=timeout)
            pid = p.pid
            if not callgrind_dir:
                pid = None
                deadline = time.monotonic() + 10
                while pid is None and time.monotonic() < deadline:
                    kids = [x for x in B.proc_tree(p.pid) if x != p.pid]
                    pid = kids[0] if len(kids) == 1 else None
                    if pid is None:
                        time.sleep(0.05)
                if pid is None:
                    raise RuntimeError("nginx worker of %d not found" % p.pid)
        # one routed request with curl: the proxy must strip the prefix and answer the backend's body
        out = os.path.join(self.tmp, "curl.out")
        status = B.curl("http://127.0.0.1:%d/u3/sb42/small" % port, out)
        with open(out, "rb") as f:
            got = f.read()
        if status != 200 or got != B.SMALL_BODY.encode():
            raise RuntimeError("%s: GET /u3/sb42/small -> %d %r" % (name, status, got[:80]))
        return p, port, pid


# ----------------------------------------------------------------------------------------------
# the keep-alive client for the callgrind step


class Client:
    """CLIENT_CONNS threads, one keep-alive connection each (opened once, kept for the warm-up
    and the measured requests). Request i goes to /u{i%10}/sb{(i//10)%100}/small (the same
    sandbox-major order as wrk_routes.lua: every route once per 1,000 requests); thread t sends
    requests t, t+CLIENT_CONNS, ...; every answer must be 200 with a Content-Length body."""

    def __init__(self, port, timeout=120.0):
        self.port = port
        self.socks = []
        for _ in range(CLIENT_CONNS):
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(s)
        self.bufs = [b""] * CLIENT_CONNS

    def close(self):
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass

    def _one(self, t, n, counts, errors):
        s = self.socks[t]
        buf = self.bufs[t]
        host = "127.0.0.1:%d" % self.port
        try:
            for i in range(t, n, CLIENT_CONNS):
                path = "/u%d/sb%d/small" % (i % 10, (i // 10) % 100)
                s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, host)).encode())
                for _ in range(10000):  # bounded: a head is far below 10,000 reads
                    end = buf.find(b"\r\n\r\n")
                    if end >= 0:
                        break
                    chunk = s.recv(65536)
                    if not chunk:
                        raise RuntimeError("connection closed by the target before the answer to %s" % path)
                    buf += chunk
                else:
                    raise RuntimeError("no response head for %s" % path)
                head, buf = buf[:end], buf[end + 4:]
                lines = head.split(b"\r\n")
                parts = lines[0].split()
                status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                clen, close = None, False
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    k = k.strip().lower()
                    if k == b"content-length":
                        clen = int(v.strip())
                    elif k == b"connection" and v.strip().lower() == b"close":
                        close = True
                if status != 200:
                    raise RuntimeError("%s -> HTTP %d" % (path, status))
                if clen is None:
                    raise RuntimeError("%s: no Content-Length" % path)
                while len(buf) < clen:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise RuntimeError("connection closed in the body of %s" % path)
                    buf += chunk
                buf = buf[clen:]
                counts[t] += 1
                if close:
                    raise RuntimeError("%s: the target closes the connection (Connection: close)" % path)
        except Exception as e:  # reported by run()
            errors.append("connection %d: %s" % (t, e))
        self.bufs[t] = buf

    def run(self, n):
        counts = [0] * CLIENT_CONNS
        errors = []
        threads = [threading.Thread(target=self._one, args=(t, n, counts, errors), daemon=True)
                   for t in range(CLIENT_CONNS)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(900)
            if th.is_alive():
                raise RuntimeError("client thread still running after 900 s")
        if errors:
            raise RuntimeError("; ".join(errors[:3]))
        if sum(counts) != n:
            raise RuntimeError("client: %d of %d answers" % (sum(counts), n))
        return time.monotonic() - t0


# ----------------------------------------------------------------------------------------------
# 1. callgrind


def parse_annotate_total(text):
    """The 'PROGRAM TOTALS' line of callgrind_annotate."""
    for line in text.splitlines():
        if "PROGRAM TOTALS" in line:
            return int(line.split()[0].replace(",", ""))
    return None


def parse_callgrind(path):
    """Self cost (Ir) per (function, object) from a callgrind dump, and the dump's summary.

    callgrind_annotate 3.19 adds the inclusive cost of the calls that were still active at the
    dump ('calls=0' lines: main, the worker thread's loop, clone...) to their callers' self cost,
    so it lists those at ~100%; here a call's cost line (the one after 'calls=') is skipped, and
    code inlined from other files (fi=/fe=) counts for the function it was inlined into."""
    names = {"ob": {}, "fl": {}, "fn": {}}
    kind_of = {"ob": "ob", "cob": "ob", "fl": "fl", "fi": "fl", "fe": "fl", "cfi": "fl", "cfl": "fl",
               "fn": "fn", "cfn": "fn"}
    self_cost = {}
    summary = None
    ob, fn = "???", "???"
    skip_next = False
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line[0] == "#":
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                if skip_next:  # the inclusive cost of a call: not this function's own
                    skip_next = False
                    continue
                tok = line.split()
                if len(tok) > 1:
                    key = (fn, ob)
                    self_cost[key] = self_cost.get(key, 0) + int(tok[1])
                continue
            k, eq, v = line.partition("=")
            if not eq:
                if line.startswith("summary:"):
                    summary = int(line.split()[1])
                continue
            if k == "calls":
                skip_next = True
                continue
            if k not in kind_of:
                continue
            table_ = names[kind_of[k]]
            m = re.match(r"^\((\d+)\)(?: (.*))?$", v)
            if m:
                if m.group(2) is not None:
                    table_[m.group(1)] = m.group(2)
                v = table_.get(m.group(1), "???")
            if k == "ob":
                ob = v
            elif k == "fn":
                fn = v
    return summary, self_cost


def group_functions(self_cost):
    """[(Ir, function, object)] by self cost. Functions without a symbol are summed per object:
    code in no object file is what LuaJIT compiled at run time (its traces); the unnamed code
    of libluajit (shipped stripped) is its interpreter, allocator and GC."""
    merged = {}
    for (fn, ob), ir in self_cost.items():
        fn = re.sub(r"'\d+$", "", fn)  # recursion levels: f'2
        obj = os.path.basename(ob) if ob not in ("", "???") else "-"
        if re.match(r"^0x[0-9a-fA-F]+$", fn) or fn == "???":
            fn = ("(JIT-compiled Lua traces, outside any object)" if obj == "-"
                  else "(no symbol: %s)" % obj)
        merged[(fn, obj)] = merged.get((fn, obj), 0) + ir
    return sorted(((ir, fn, obj) for (fn, obj), ir in merged.items()), key=lambda x: -x[0])


def callgrind_step(setup, key, n, warmup):
    cgdir = os.path.join(setup.tmp, "callgrind-" + key)
    os.makedirs(cgdir)
    log("  %s: starting under callgrind (pinned to CPU %s) ..." % (LABEL[key], setup.tcpu))
    t0 = time.monotonic()
    p, port, pid = setup.start(key, "callgrind", callgrind_dir=cgdir)
    log("  %s: ready after %.1f s; warm-up %d requests" % (LABEL[key], time.monotonic() - t0, warmup))
    client = Client(port)
    try:
        client.run(warmup)
        rc, out = run_cmd(["callgrind_control", "-z", str(pid)], 120)
        if rc != 0:
            raise RuntimeError("callgrind_control -z %d failed (%d): %s" % (pid, rc, out.strip()[-400:]))
        wall = client.run(n)
        rc, out = run_cmd(["callgrind_control", "-d", str(pid)], 120)
        if rc != 0:
            raise RuntimeError("callgrind_control -d %d failed (%d): %s" % (pid, rc, out.strip()[-400:]))
    finally:
        client.close()
    stop_proc(p, grace=60.0)
    # --callgrind-out-file=DIR/out.%p with a requested dump: DIR/out.PID.1 is that dump (all
    # threads: --separate-threads=no), DIR/out.PID the rest up to the exit
    dump = os.path.join(cgdir, "out.%d.1" % pid)
    if not os.path.exists(dump):
        dump = os.path.join(cgdir, "out.%d" % pid)
    if not os.path.exists(dump):
        raise RuntimeError("no callgrind dump in %s: %s" % (cgdir, os.listdir(cgdir)))
    rc, text = run_cmd(["callgrind_annotate", "--threshold=100", "--auto=no", dump], 300)
    if rc != 0:
        raise RuntimeError("callgrind_annotate %s failed: %s" % (dump, text[-400:]))
    total = parse_annotate_total(text)
    if not total:
        raise RuntimeError("no PROGRAM TOTALS in callgrind_annotate %s" % dump)
    summary, self_cost = parse_callgrind(dump)
    fn_sum = sum(self_cost.values())  # = the dump's 'totals:' line
    funcs = group_functions(self_cost)
    log("  %s: %d requests in %.1f s under callgrind; %s Ir total -> %s Ir/request" % (
        LABEL[key], n, wall, "{:,}".format(total), "{:,.0f}".format(total / n)))
    return {"total_ir": total, "fn_sum": fn_sum, "requests": n, "ir_per_req": total / n, "wall_s": wall,
            "top": [(ir / n, fn, obj, 100.0 * ir / fn_sum) for ir, fn, obj in funcs[:TOP_FUNCTIONS]],
            "dump": os.path.basename(dump)}


# ----------------------------------------------------------------------------------------------
# wrk


def wrk_cmd(port, seconds):
    return ["wrk", "-t1", "-c50", "-d%ds" % seconds, "-s", WRK_SCRIPT, "http://127.0.0.1:%d" % port,
            "--", "routed", "/small", "GET", "0", "10", "100"]


def run_wrk(setup, port, seconds):
    """wrk pinned to the load CPU, bounded by -d and a watchdog (seconds + 30)."""
    cmd = ["taskset", "-c", str(setup.lcpu)] + wrk_cmd(port, seconds)
    outpath = os.path.join(setup.tmp, "wrk.out")
    with open(outpath, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        B.PROCS.procs.append(("wrk", p))
        try:
            p.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            stop_proc(p)
            raise RuntimeError("wrk did not finish in time")
        B.PROCS.procs.remove(("wrk", p))
    with open(outpath, errors="replace") as f:
        text = f.read()
    if p.returncode != 0:
        raise RuntimeError("wrk exited %s:\n%s" % (p.returncode, text))
    res = B.parse_wrk(text)
    if not res.get("requests"):
        raise RuntimeError("wrk: no request count in:\n%s" % text)
    errs = res.get("socket_errors") or {}
    res["problems"] = []
    if res.get("non2xx"):
        res["problems"].append("%d non-2xx answers" % res["non2xx"])
    if any(errs.values()):
        res["problems"].append("socket errors %s" % errs)
    return res


# ----------------------------------------------------------------------------------------------
# 2. strace


def parse_strace_c(text):
    """strace -c summary -> ({syscall: calls}, total calls, {syscall: errors})."""
    calls, errors, total = {}, {}, None
    for line in text.splitlines():
        tok = line.split()
        if len(tok) < 5 or not re.match(r"^[\d.]+$", tok[0]):
            continue
        name = tok[-1]
        nums = tok[1:-1]  # seconds, usecs/call, calls[, errors]
        if len(nums) < 3 or not all(x.isdigit() or re.match(r"^[\d.]+$", x) for x in nums):
            continue
        n = int(nums[2])
        if name == "total":
            total = n
        else:
            calls[name] = n
            errors[name] = int(nums[3]) if len(nums) > 3 else 0
    if total is None:
        total = sum(calls.values())
    return calls, total, errors


def strace_step(setup, key, port, pid, seconds):
    out = os.path.join(setup.tmp, "strace-%s.txt" % key)
    # -f with -p: every thread. strace runs on the target's CPU: a traced process waits for its
    # tracer at every system call, so the two alternate; on the load CPU strace would queue
    # behind wrk and the backend at each stop.
    p = B.PROCS.start("strace-" + key, ["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                      str(setup.tcpu), setup.logdir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if "attached" in B.tail(p.bench_stderr, 50):
            break
        if p.poll() is not None:
            raise RuntimeError("strace exited %s: %s" % (p.returncode, B.tail(p.bench_stderr)))
        time.sleep(0.05)
    else:
        stop_proc(p)
        raise RuntimeError("strace did not attach to %d: %s" % (pid, B.tail(p.bench_stderr)))
    time.sleep(0.2)
    try:
        res = run_wrk(setup, port, seconds)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGINT)  # detach and write the summary
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            pass
        stop_proc(p)
    with open(out) as f:
        text = f.read()
    calls, total, errors = parse_strace_c(text)
    reqs = res["requests"]
    log("  %s: %d requests under strace (%.0f req/s), %d system calls -> %.2f per request" % (
        LABEL[key], reqs, res["rps"] or 0, total, total / reqs))
    return {"requests": reqs, "rps": res["rps"], "total": total, "per_req": total / reqs,
            "calls": {k: v / reqs for k, v in calls.items()},
            "errors": {k: v / reqs for k, v in errors.items() if v},
            "problems": res["problems"]}


# ----------------------------------------------------------------------------------------------
# 3. CPU split


def cpu_step(setup, key, port, pid, seconds, our_pids):
    u0, s0 = proc_ticks(pid)
    stat0 = B.cpu_stat()
    all0 = B.all_proc_ticks()
    t0 = time.monotonic()
    res = run_wrk(setup, port, seconds)
    wall = time.monotonic() - t0
    u1, s1 = proc_ticks(pid)
    stat1 = B.cpu_stat()
    all1 = B.all_proc_ticks()
    reqs = res["requests"]
    tick_us = 1e6 / B.CLK_TCK
    ours = set(our_pids) | {os.getpid()}
    other = sum(t - all0.get(p, (0, ""))[0] for p, (t, _) in all1.items() if p not in ours)
    r = {"requests": reqs, "rps": res["rps"], "utime": u1 - u0, "stime": s1 - s0,
         "user_us": (u1 - u0) * tick_us / reqs, "sys_us": (s1 - s0) * tick_us / reqs,
         "target_busy": B.busy_pct(stat0, stat1, [setup.tcpu]),
         "load_busy": B.busy_pct(stat0, stat1, [setup.lcpu]),
         "other_pct": round(100.0 * other / B.CLK_TCK / wall, 1),
         "problems": res["problems"]}
    r["total_us"] = r["user_us"] + r["sys_us"]
    return r


# ----------------------------------------------------------------------------------------------
# output


def fnum(x, digits=0):
    if x is None:
        return "-"
    return ("{:,.%df}" % digits).format(x)


def table(headers, rows, md=False, align=None):
    align = align or (["l"] + ["r"] * (len(headers) - 1))
    if md:
        out = ["| " + " | ".join(headers) + " |",
               "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        return "\n".join(out)
    w = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(headers)]

    def fmt(r):
        return "  ".join(str(c).rjust(w[i]) if align[i] == "r" else str(c).ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([fmt(headers), "  ".join("-" * x for x in w)] + [fmt(r) for r in rows])


def ratio(a, b):
    return "%.2f" % (a / b) if a is not None and b else "-"


def summary_rows(keys, cg, st, cpu):
    def get(d, k, f):
        return f(d[k]) if k in d and d[k] is not None else None

    def med(k, field):
        runs = cpu.get(k) or []
        vals = [r[field] for r in runs if r.get(field) is not None]
        return statistics.median(vals) if vals else None

    spec = [
        ("user-space instructions (Ir) (callgrind)", lambda k: get(cg, k, lambda d: d["ir_per_req"]), 0),
        ("system calls (strace -c -f)", lambda k: get(st, k, lambda d: d["per_req"]), 2),
        ("user CPU us", lambda k: med(k, "user_us"), 1),
        ("system CPU us", lambda k: med(k, "sys_us"), 1),
        ("total CPU us", lambda k: med(k, "total_us"), 1),
        ("req/s (wrk -c50, no tracer)", lambda k: med(k, "rps"), 0),
        ("target CPU busy %", lambda k: med(k, "target_busy"), 0),
        ("load CPU busy % (backend + wrk)", lambda k: med(k, "load_busy"), 0),
    ]
    rows = []
    for name, f, d in spec:
        vals = [f(k) for k in keys]
        row = [name] + [fnum(v, d) for v in vals]
        if len(keys) == 2:
            row.append(ratio(vals[0], vals[1]) if "busy" not in name else "")
        rows.append(row)
    return rows


def syscall_rows(keys, st):
    names = set()
    for k in keys:
        if k in st:
            names |= {n for n, v in st[k]["calls"].items() if v >= MIN_SYSCALLS_PER_REQ}
    order = sorted(names, key=lambda n: -max(st[k]["calls"].get(n, 0) for k in keys if k in st))
    rows = []
    for n in order:
        rows.append([n] + [fnum(st[k]["calls"].get(n), 2) if k in st and st[k]["calls"].get(n, 0) >= MIN_SYSCALLS_PER_REQ
                           else ("<0.01" if k in st and n in st[k]["calls"] else "-") for k in keys])
    rows.append(["total (all calls)"] + [fnum(st[k]["per_req"], 2) if k in st else "-" for k in keys])
    return rows


HOW_TO_READ = (
    "Instructions per request (user space, callgrind) and system calls per request (strace) are "
    "deterministic-ish and machine-independent: they count work, not time, and change only when "
    "the code or its configuration changes, so they are the figures to compare between builds. "
    "The microsecond split (no tracer) shows how much of each request is kernel time: mostly TCP "
    "on loopback (two connections per proxied request, client and backend side), which no "
    "user-space change can remove; only the user part is what the proxy's own code can shrink. "
    "If the load CPU (backend + wrk) is saturated (close to 100% busy), req/s and the throughput "
    "ratio between the targets are bounded by the load side, not by the target; compare CPU per "
    "request instead.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000, help="measured requests under callgrind (default 5000)")
    ap.add_argument("--warmup-requests", type=int, default=3000, help="warm-up requests under callgrind (default 3000)")
    ap.add_argument("--strace-seconds", type=int, default=3, help="wrk run under strace (default 3)")
    ap.add_argument("--cpu-seconds", type=int, default=5, help="each wrk run of the CPU split (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="CPU split runs per target, alternating (default 3)")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each CPU-split run, wait up to S s for a quiet machine (default 10)")
    ap.add_argument("--steps", default="callgrind,strace,cpu", help="which steps (default: all three)")
    ap.add_argument("--targets", default="sandbox-proxy,nginx", help="default: sandbox-proxy,nginx")
    ap.add_argument("--proxy-bin", default=os.path.join(ROOT, "build", "sandbox-proxy"),
                    help="default: build/sandbox-proxy")
    ap.add_argument("--proxy-set", action="append", default=[], metavar="KNOB=VALUE",
                    help="passed to sandbox-proxy as --set KNOB=VALUE (repeatable)")
    ap.add_argument("--b-set", action="append", default=[], metavar="KNOB=VALUE",
                    help="adds the target sandbox-proxy-b (\"sandbox-proxy B\"): the same binary with "
                         "these --set knobs too, measured in the same alternating runs (repeatable)")
    ap.add_argument("--target-cpu", type=int, help="default: the first CPU this process may use")
    ap.add_argument("--load-cpu", type=int, help="backend + load; default: the second CPU")
    ap.add_argument("--out-dir", default=os.path.join(BENCH_DIR, "results"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs, callgrind dumps)")
    a = ap.parse_args()
    a.steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if a.b_set and "sandbox-proxy-b" not in a.targets:
        a.targets.append("sandbox-proxy-b")
    for s in a.steps:
        if s not in ("callgrind", "strace", "cpu"):
            ap.error("unknown step %r" % s)
    for t in a.targets:
        if t not in LABEL:
            ap.error("unknown target %r" % t)
    if not (1 <= a.requests <= 1000000 and 0 <= a.warmup_requests <= 1000000 and 1 <= a.strace_seconds <= 600
            and 1 <= a.cpu_seconds <= 600 and 1 <= a.repeat <= 50):
        ap.error("out of range: --requests [1, 1e6], --warmup-requests [0, 1e6], --*-seconds [1, 600], --repeat [1, 50]")
    if not os.access(a.proxy_bin, os.X_OK):
        sys.exit("sandbox-proxy binary not found: %s" % a.proxy_bin)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    atexit.register(cleanup)

    cpus = sorted(os.sched_getaffinity(0))
    tcpu = a.target_cpu if a.target_cpu is not None else cpus[0]
    lcpu = a.load_cpu if a.load_cpu is not None else cpus[min(1, len(cpus) - 1)]
    if tcpu == lcpu:
        warn("target and load share CPU %d" % tcpu)
    # this script (the callgrind client, the /proc sampling) runs on the load CPU too
    os.sched_setaffinity(0, {lcpu})

    B.ACCESS_LOG = "on"
    B.NOFILE = B.raise_nofile(B.NOFILE_WANT)  # nginx_common() writes it into the configs

    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.monotonic()
    tmp = STATE["tmp"] = tempfile.mkdtemp(prefix="sp-profile-")
    STATE["keep_tmp"] = a.keep_tmp
    os.chmod(tmp, 0o755)  # nginx workers run as an unprivileged user when started as root
    logdir = os.path.join(tmp, "logs")
    os.makedirs(logdir)

    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {
        "sandbox-proxy": version_of([a.proxy_bin, "--version"]),
        "nginx": version_of(["nginx", "-v"], r"nginx/\S+"),
        "valgrind": version_of(["valgrind", "--version"]),
        "strace": version_of(["strace", "-V"], r"version \S+"),
        "wrk": version_of(["wrk", "-v"], r"wrk \S+"),
    }
    machine = "%s, %d CPUs online, kernel %s" % (model, os.cpu_count(), os.uname().release)
    log("sandbox-proxy profile  %s" % started.strftime("%Y-%m-%d %H:%M:%S UTC"))
    log("machine: %s" % machine)
    log("versions: " + "; ".join("%s: %s" % kv for kv in versions.items()))
    log("CPU %d: the target (and strace while it traces it); CPU %d: backend nginx + load (client, wrk, "
        "this script); temp dir %s" % (tcpu, lcpu, tmp))

    setup = Setup(a, tmp, logdir, tcpu, lcpu)
    cg, st, cpu = {}, {}, {}
    problems = []

    if "callgrind" in a.steps:
        log("1. callgrind: %d warm-up + %d measured requests per target (%d keep-alive connections)"
            % (a.warmup_requests, a.requests, CLIENT_CONNS))
        for k in a.targets:
            try:
                cg[k] = callgrind_step(setup, k, a.requests, a.warmup_requests)
            except Exception as e:
                problems.append("callgrind / %s: %s" % (k, e))
                warn("callgrind / %s: %s" % (k, e))
                for name, p in list(B.PROCS.procs):
                    if name == "%s-callgrind" % k:
                        stop_proc(p, grace=30.0)

    plain = {}
    if "strace" in a.steps or "cpu" in a.steps:
        for k in a.targets:
            try:
                p, port, pid = setup.start(k, "plain")
                plain[k] = (p, port, pid)
                run_wrk(setup, port, 1)  # warm-up: JIT, upstream keep-alive pool
                log("  %s: started (port %d, measured pid %d), warmed up" % (LABEL[k], port, pid))
            except Exception as e:
                problems.append("start / %s: %s" % (k, e))
                warn("start / %s: %s" % (k, e))
    our_pids = set()
    for _, p in B.PROCS.procs:
        our_pids |= set(B.proc_tree(p.pid))

    if "cpu" in a.steps and plain:
        log("3. CPU split: %d x %d s wrk per target, alternating, no tracer" % (a.repeat, a.cpu_seconds))
        for i in range(a.repeat):
            for k in a.targets:
                if k not in plain:
                    continue
                p, port, pid = plain[k]
                waited, _ = B.wait_quiet(a.quiet_wait)
                try:
                    r = cpu_step(setup, k, port, pid, a.cpu_seconds, our_pids)
                except Exception as e:
                    problems.append("cpu / %s: %s" % (k, e))
                    warn("cpu / %s: %s" % (k, e))
                    continue
                r["waited_s"] = waited
                cpu.setdefault(k, []).append(r)
                for pr in r["problems"]:
                    problems.append("cpu / %s run %d: %s" % (k, i + 1, pr))
                log("  run %d %-14s %7s req/s  user %5.1f + sys %5.1f = %5.1f us/req  CPU %d %3.0f%%  CPU %d %3.0f%%  "
                    "others %.0f%%" % (i + 1, LABEL[k], fnum(r["rps"]), r["user_us"], r["sys_us"], r["total_us"],
                                       tcpu, r["target_busy"] or 0, lcpu, r["load_busy"] or 0, r["other_pct"]))

    if "strace" in a.steps and plain:
        log("2. strace -c -f: %d s wrk per target" % a.strace_seconds)
        for k in a.targets:
            if k not in plain:
                continue
            p, port, pid = plain[k]
            try:
                st[k] = strace_step(setup, k, port, pid, a.strace_seconds)
                for pr in st[k]["problems"]:
                    problems.append("strace / %s: %s" % (k, pr))
            except Exception as e:
                problems.append("strace / %s: %s" % (k, e))
                warn("strace / %s: %s" % (k, e))

    for k, (p, port, pid) in plain.items():
        if p.poll() is not None:
            problems.append("%s exited during the run (%s): %s" % (k, p.returncode, B.tail(p.bench_stderr, 5)))
        stop_proc(p)
    stop_proc(setup.backend)
    elapsed = time.monotonic() - t_start

    # --- report -----------------------------------------------------------------------------
    keys = a.targets
    heads = ["per request"] + [LABEL[k] for k in keys] + (["ratio"] if len(keys) == 2 else [])
    srows = summary_rows(keys, cg, st, cpu)
    text = ["", "=" * 90,
            "Profile: GET /{user}/{sandbox}/small over 1,000 routes, access logs on (files); "
            "target on CPU %d, load on CPU %d" % (tcpu, lcpu),
            table(heads, srows)]
    if st:
        text += ["", "system calls per request (strace -c -f, >= %.2f/req)" % MIN_SYSCALLS_PER_REQ,
                 table(["syscall"] + [LABEL[k] for k in keys], syscall_rows(keys, st))]
    for k in keys:
        if k in cg:
            text += ["", "%s: top %d functions by self cost (Ir/req, %% of total)" % (LABEL[k], TOP_FUNCTIONS)]
            for ir, fn, obj, pc in cg[k]["top"][:5]:
                text.append("  %9s %5.1f%%  %s [%s]" % (fnum(ir), pc, fn[:60], obj))
            text.append("  ... (all %d in the markdown file)" % TOP_FUNCTIONS)
    if problems:
        text += ["", "problems:"] + ["  - " + x for x in problems]
    text.append("whole run: %.1f min" % (elapsed / 60))

    md = ["# sandbox-proxy profile: where each request's CPU goes", "",
          "- %s UTC, %s" % (started.strftime("%Y-%m-%d %H:%M:%S"), machine),
          "- " + "; ".join("%s: %s" % (k, v) for k, v in versions.items()),
          "- workload: GET /u{0..9}/sb{0..99}/small (1,000 routes, the backend's 31-byte body), access logs on, "
          "written to files; backend: nginx (bench.py's), 1 worker",
          "- sandbox-proxy: `%s` (default scripts, bench.py's config: client rate limit out of reach, access log on), "
          "stdout (the access log) to a file" % " ".join(
              ["sandbox-proxy", "--listen", "127.0.0.1:PORT", "--workers", "1", "--sandboxes-file", "F", "--config", "C"]
              + [x for kv in a.proxy_set for x in ("--set", kv)]),
          "- nginx: bench.py's `map` reverse proxy (1,000-line map, upstream keepalive 64, JSON access_log "
          "buffer=64k flush=200ms), 1 worker; under callgrind `master_process off; daemon off;`",
          "- CPU %d: the target (taskset), and strace while it traces it; CPU %d: backend, load (client / wrk), "
          "this script" % (tcpu, lcpu),
          "- whole run: %.1f min" % (elapsed / 60), "",
          "## Summary", "", table(heads, srows, md=True), "",
          "_instructions: callgrind Ir (user space, every thread) between `callgrind_control -z` and `-d` / %d requests; "
          "system calls: `strace -c -f -p PID` during a %d s wrk run / wrk's requests; CPU: /proc/PID/stat utime + stime "
          "(%d ticks/s; nginx: its worker) around %d s wrk runs / wrk's requests, median of %d runs, targets "
          "alternating; busy %%: /proc/stat of that CPU (softirq included) during those runs; ratio = "
          "sandbox-proxy / nginx_" % (a.requests, a.strace_seconds, B.CLK_TCK, a.cpu_seconds, a.repeat), ""]
    if cg:
        md += ["## 1. User-space instructions (callgrind)", "",
               "`valgrind --tool=callgrind --smc-check=all-non-file --dump-instr=no`, target pinned to CPU %d; "
               "a client of %d threads with one keep-alive connection each, cycling through the 1,000 routes (every "
               "answer checked: 200, body read by Content-Length): %d warm-up requests, `callgrind_control -z`, "
               "%d requests, `callgrind_control -d`, then `callgrind_annotate --threshold=100` of the dump. Timers and "
               "log flushes that ran meanwhile are included. `(no symbol: libluajit-5.1.so...)` is LuaJIT's "
               "interpreter, GC and allocator (the distribution's library carries no symbols for them); "
               "`(JIT-compiled Lua traces)` is the machine code LuaJIT generated at run time; "
               "`(no symbol: nginx)` are nginx's static functions (the packaged binary is stripped)." % (tcpu, CLIENT_CONNS, a.warmup_requests, a.requests), ""]
        for k in keys:
            if k not in cg:
                continue
            c = cg[k]
            md += ["### %s: %s Ir/request" % (LABEL[k], fnum(c["ir_per_req"])), "",
                   "%s Ir (PROGRAM TOTALS) for %d requests (%.1f s under callgrind; dump `%s`). Top %d functions "
                   "by self cost (Ir/req = self cost / requests; %% of the sum of all functions' self costs, the "
                   "dump's `totals:`, %.1f%% %s PROGRAM TOTALS, callgrind's `summary:`):" % (
                       fnum(c["total_ir"]), c["requests"], c["wall_s"], c["dump"], TOP_FUNCTIONS,
                       abs(100.0 * (c["fn_sum"] - c["total_ir"]) / c["total_ir"]),
                       "above" if c["fn_sum"] >= c["total_ir"] else "below"), "",
                   table(["function", "object", "Ir/req", "% of total"],
                         [[fn.replace("|", "\\|"), obj, fnum(ir), "%.1f%%" % pc] for ir, fn, obj, pc in c["top"]],
                         md=True, align=["l", "l", "r", "r"]), ""]
    if st:
        md += ["## 2. System calls (strace -c -f)", "",
               "`strace -c -f -p PID` (pinned to CPU %d, the target's: tracer and tracee alternate at every call) "
               "attached to the running target (not valgrind'd) during `%s` (pinned to CPU %d); calls / the requests "
               "wrk reports, those >= %.2f per request. Under strace the target is several times slower, so calls "
               "whose count depends on batching (epoll_wait, the log writes) can differ somewhat from an untraced "
               "run." % (
                   tcpu, " ".join(["wrk"] + wrk_cmd(0, a.strace_seconds)[1:]).replace(":0", ":PORT"), lcpu,
                   MIN_SYSCALLS_PER_REQ), "",
               table(["syscall"] + [LABEL[k] for k in keys], syscall_rows(keys, st), md=True), "",
               ", ".join("%s: %s requests (%s req/s under strace)" % (LABEL[k], fnum(st[k]["requests"]),
                                                                      fnum(st[k]["rps"])) for k in keys if k in st)]
        errs = ["%s: %s" % (LABEL[k], ", ".join("%s %.2f" % (n, v) for n, v in sorted(st[k]["errors"].items(),
                                                                                     key=lambda x: -x[1])
                                                if v >= MIN_SYSCALLS_PER_REQ))
                for k in keys if k in st and any(v >= MIN_SYSCALLS_PER_REQ for v in st[k]["errors"].values())]
        if errs:
            md += ["", "Failed calls per request (EAGAIN and the like): " + "; ".join(errs)]
        md.append("")
    if cpu:
        md += ["## 3. CPU split (no tracer)", "",
               "`%s` pinned to CPU %d; utime / stime of the target (nginx: its worker) from /proc/PID/stat "
               "before and after. Every run:" % (" ".join(["wrk"] + wrk_cmd(0, a.cpu_seconds)[1:]).replace(":0", ":PORT"),
                                                 lcpu), ""]
        rows = []
        for i in range(a.repeat):
            for k in keys:
                rs = cpu.get(k) or []
                if i < len(rs):
                    r = rs[i]
                    rows.append([i + 1, LABEL[k], fnum(r["requests"]), fnum(r["rps"]), r["utime"], r["stime"],
                                 "%.1f" % r["user_us"], "%.1f" % r["sys_us"], "%.1f" % r["total_us"],
                                 "%.0f%%" % (r["target_busy"] or 0), "%.0f%%" % (r["load_busy"] or 0),
                                 "%.0f%%" % r["other_pct"]])
        md += [table(["run", "target", "requests", "req/s", "utime", "stime", "user us/req", "sys us/req",
                      "total us/req", "CPU %d busy" % tcpu, "CPU %d busy" % lcpu, "others"], rows, md=True,
                     align=["r", "l"] + ["r"] * 10), "",
               "_others: CPU used meanwhile by processes that are not part of this run, in %% of one core "
               "(the machine may be shared; each run first waited up to %g s for a quiet machine)_" % a.quiet_wait,
               ""]
    if problems:
        md += ["## Problems", ""] + ["- " + x for x in problems] + [""]
    md += ["## How to read this", "", HOW_TO_READ, ""]

    log("\n".join(text))
    os.makedirs(a.out_dir, exist_ok=True)
    mpath = os.path.join(a.out_dir, "profile-%s.md" % started.strftime("%Y%m%d-%H%M%S"))
    with open(mpath, "w") as f:
        f.write("\n".join(md) + "\n")
    log("\nresults: %s" % os.path.relpath(mpath, ROOT))
    if a.keep_tmp:
        log("temp dir kept: %s" % tmp)
    cleanup()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
