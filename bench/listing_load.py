#!/usr/bin/env python3
"""bench/listing_load.py: the load side of bench/listing (Python 3 standard library only).

CONNS processes call GET /sandboxes back to back on their own keep-alive connection:
  --mode user   with --list-key (a user's credential): one page of that user's listing
  --mode admin  with --list-key (an admin's): a paginated walk of the whole table
                (?limit=LIMIT, then ?continue=...), started again at its end
  --mode none   no listing load (the baseline)
while this process, the probe, sends GET PROBE_PATH with --probe-key one after another
(PROBE_GAP seconds apart) on its own connection and records each latency. Every loop is
bounded by --duration and by a request count. Prints one JSON line with the figures.
"""
import argparse
import http.client
import json
import multiprocessing
import time

MAX_REQUESTS = 10_000_000


def lister(port, mode, key, limit, duration, out):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": "Bearer " + key}
    end = time.monotonic() + duration
    n = pages_bytes = errors = walks = 0
    token = None
    while time.monotonic() < end and n < MAX_REQUESTS:
        path = "/sandboxes"
        if mode == "admin":
            path += "?limit=%d" % limit + ("&continue=" + token if token else "")
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        n += 1
        pages_bytes += len(body)
        if r.status != 200:
            errors += 1
            token = None
            continue
        if mode == "admin":
            # the token is in the last bytes ("metadata" ends the object): no JSON parse of
            # the whole page on the load side
            at = body.rfind(b'"continue":"')
            token = body[at + 12:body.index(b'"', at + 12)].decode() if at >= 0 else None
            if not token:
                walks += 1
    conn.close()
    out.put({"requests": n, "bytes": pages_bytes, "errors": errors, "walks": walks})


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, max(0, int(len(v) * p + 0.999999) - 1))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["none", "user", "admin"], required=True)
    ap.add_argument("--list-key", default="")
    ap.add_argument("--probe-key", required=True)
    ap.add_argument("--probe-path", required=True)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--probe-gap", type=float, default=0.002)
    a = ap.parse_args()

    q = multiprocessing.Queue()
    procs = []
    if a.mode != "none":
        for _ in range(a.conns):
            p = multiprocessing.Process(target=lister, args=(a.port, a.mode, a.list_key, a.limit,
                                                             a.duration, q))
            p.start()
            procs.append(p)
    time.sleep(0.2)  # the listers are under way
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
    headers = {"Authorization": "Bearer " + a.probe_key}
    lat, statuses = [], {}
    end = time.monotonic() + a.duration - 0.4
    while time.monotonic() < end and len(lat) < MAX_REQUESTS:
        t0 = time.perf_counter()
        conn.request("GET", a.probe_path, headers=headers)
        r = conn.getresponse()
        r.read()
        lat.append(time.perf_counter() - t0)
        statuses[r.status] = statuses.get(r.status, 0) + 1
        time.sleep(a.probe_gap)
    conn.close()
    load = [q.get(timeout=a.duration + 60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    print(json.dumps({
        "mode": a.mode,
        "probe": {"requests": len(lat), "statuses": statuses, "p50": pct(lat, 0.5),
                  "p99": pct(lat, 0.99), "max": max(lat) if lat else None},
        "listing": {"requests": sum(x["requests"] for x in load),
                    "bytes": sum(x["bytes"] for x in load),
                    "errors": sum(x["errors"] for x in load),
                    "walks": sum(x["walks"] for x in load),
                    "seconds": a.duration},
    }))


if __name__ == "__main__":
    main()
