#!/usr/bin/env python3
"""Route-update driver of bench.py's churn scenario (Python 3 stdlib only).

  churn_driver.py --control-port P --sandboxes FILE [--rate 1000] [--tick 0.01] [--max-seconds 60]

Started by bench.py pinned to the load CPU. Loads the Sandbox objects of FILE (the SandboxList
the Kubernetes stand-in was seeded with), prints {"ready": true, ...}, then every `tick` seconds
replaces rate*tick of them through the stand-in's control API (POST /objects {"items": [...]},
one keep-alive connection): each replaced object is identical for routing, only the annotation
bench.sandbox-proxy.dev/churn changes (a sequence number), so every replacement is a real
MODIFIED watch event and the proxy re-applies the route. The objects are taken in a round, so
each sandbox is updated rate/len(objects) times per second.

Runs until its stdin is closed (bench.py closes it when wrk is done) or --max-seconds; then prints
one JSON line: updates applied, posts, errors, seconds, the achieved rate, the last
resourceVersion the stand-in answered, ticks that ran late, and its own CPU time.
"""
import argparse
import http.client
import json
import os
import resource
import select
import sys
import time

ANNOTATION = "bench.sandbox-proxy.dev/churn"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--control-port", type=int, required=True)
    ap.add_argument("--sandboxes", required=True)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--tick", type=float, default=0.01)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    a = ap.parse_args()
    with open(a.sandboxes) as f:
        objs = json.load(f)["items"]
    per_tick = max(1, int(round(a.rate * a.tick)))
    conn = http.client.HTTPConnection("127.0.0.1", a.control_port, timeout=10)
    conn.connect()
    print(json.dumps({"ready": True, "objects": len(objs), "per_tick": per_tick}), flush=True)

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    deadline = t0 + a.max_seconds
    applied = posts = errors = late = 0
    seq = 0
    last_rv = None
    first_error = None
    k = 0
    stdin_fd = sys.stdin.fileno()
    while True:
        # the next tick on the absolute schedule; a tick more than 10 ticks late is dropped
        # (counted in "late") rather than bursting to catch up
        k += 1
        due = t0 + k * a.tick
        now = time.monotonic()
        if now - due > 10 * a.tick:
            skip = int((now - due) / a.tick)
            late += skip
            k += skip
            due = t0 + k * a.tick
        wait = max(0.0, due - now)
        r, _, _ = select.select([stdin_fd], [], [], wait)
        if r and not os.read(stdin_fd, 4096):
            break  # bench.py closed stdin: wrk is done
        if time.monotonic() >= deadline:
            break
        batch = []
        for _ in range(per_tick):
            o = objs[seq % len(objs)]
            seq += 1
            o["metadata"].setdefault("annotations", {})[ANNOTATION] = str(seq)
            batch.append(o)
        try:
            conn.request("POST", "/objects", body=json.dumps({"items": batch}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            posts += 1
            if resp.status == 200:
                applied += len(batch)
                last_rv = json.loads(body).get("resourceVersion")
            else:
                errors += 1
                first_error = first_error or "HTTP %d %s" % (resp.status, body[:200])
        except (OSError, http.client.HTTPException) as e:
            errors += 1
            first_error = first_error or str(e)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", a.control_port, timeout=10)
    seconds = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    print(json.dumps({
        "applied": applied, "posts": posts, "errors": errors, "first_error": first_error,
        "seconds": round(seconds, 3), "rate": round(applied / seconds, 1) if seconds else None,
        "last_rv": last_rv, "late_ticks": late, "cpu_s": round(cpu, 3),
        "cpu_pct": round(100.0 * cpu / seconds, 1) if seconds else None,
    }), flush=True)
    conn.close()


if __name__ == "__main__":
    main()
