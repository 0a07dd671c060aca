#!/usr/bin/env python3
"""bench/goals.py ON.json OFF.json [--out-dir DIR]: the per-core goals of issue 16 from two
bench.py results (access logs on for every target, and off for every target), side by side.

For each load scenario and each log mode: every target's CPU per request (us, median over the
repeats), sandbox-proxy's p99 next to nginx's, and nginx's CPU per request divided by
sandbox-proxy's (the median of the per-repeat ratios, targets run back to back within a repeat),
against the goal: >= 1.2 on small GETs, >= 1.0 on 1 MiB GETs (10 and 50 connections) and on the
4 KiB POST ("no loss"); p99 no worse than nginx's. Python 3 standard library only. Writes a
Markdown copy to DIR/goals-YYYYmmdd-HHMMSS.md (and DIR/goals-latest.md)."""
import argparse
import datetime
import json
import os
import sys

GOALS = [  # scenario, label, CPU ratio goal (nginx us/req / ours)
    ("small-c50", "small GET, 50 conns", 1.2),
    ("small-c1", "small GET, 1 conn", 1.2),
    ("get-1m", "1 MiB GET, 50 conns", 1.0),
    ("get-1m-c10", "1 MiB GET, 10 conns", 1.0),
    ("post-4k", "4 KiB POST, 50 conns", 1.0),
]
TARGETS = [("nginx", "nginx"), ("nginx-lua", "nginx + Lua"), ("haproxy", "HAProxy"),
           ("sandbox-proxy", "sandbox-proxy")]


def us(m):
    v = (m or {}).get("target_cpu_us_per_req")
    return "-" if v is None else "{:,.1f}".format(v) if v < 100 else "{:,.0f}".format(v)


def ms(m):
    v = (m or {}).get("p99_ms")
    if v is None:
        return "-"
    return "%.0fus" % (v * 1000) if v < 1 else "%.2fms" % v


def rows_of(res, mode):
    out = []
    scen = res.get("scenarios", {})
    for sk, label, goal in GOALS:
        med = (scen.get(sk) or {}).get("median") or {}
        sp = med.get("sandbox-proxy")
        if not sp:
            continue
        ng = med.get("nginx")
        conns = (scen.get(sk) or {}).get("connections")
        if conns:
            label = "%s, %d conn%s" % (label.rsplit(",", 1)[0], conns, "" if conns == 1 else "s")
        ratio = sp.get("cpu_vs_nginx")
        if ratio is None and ng and ng.get("target_cpu_us_per_req") and sp.get("target_cpu_us_per_req"):
            ratio = ng["target_cpu_us_per_req"] / sp["target_cpu_us_per_req"]  # an older result: medians
        p99_ok = None
        if ng and sp.get("p99_ms") is not None and ng.get("p99_ms") is not None:
            p99_ok = sp["p99_ms"] <= ng["p99_ms"]
        met = "-" if ratio is None else ("yes" if ratio >= goal else "no")
        out.append([label, mode] + [us(med.get(t)) for t, _ in TARGETS] + [
            "-" if ratio is None else "%.2f" % ratio,
            ">= %.1f" % goal, met,
            "%s vs %s" % (ms(sp), ms(ng)),
            "-" if p99_ok is None else ("yes" if p99_ok else "no"),
        ])
    return out


def table(headers, rows, md):
    if md:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return out
    w = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w[i]) if i < 2 else str(x).rjust(w[i]) for i, x in enumerate(r))
    return [fmt(headers), fmt(["-" * n for n in w])] + [fmt(r) for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("on_json")
    ap.add_argument("off_json")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args()
    with open(a.on_json) as f:
        on = json.load(f)
    with open(a.off_json) as f:
        off = json.load(f)
    # each scenario with logs on, then off
    ron, roff = rows_of(on, "on"), rows_of(off, "off")
    rows = []
    for i in range(max(len(ron), len(roff))):
        rows += ron[i:i + 1] + roff[i:i + 1]
    headers = ["scenario", "logs"] + ["%s us/req" % l for _, l in TARGETS] + [
        "nginx / sandbox-proxy (CPU)", "goal", "met", "p99 sandbox-proxy vs nginx", "p99 met"]
    title = "Issue 16 goals: CPU per request, nginx's divided by sandbox-proxy's (median of per-repeat ratios)"
    print("\n" + title)
    print("\n".join(table(headers, rows, False)))
    os.makedirs(a.out_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    md = ["# " + title, "", "logs on: `%s`, logs off: `%s`" % (a.on_json, a.off_json), ""]
    md += table(headers, rows, True)
    for name in ("goals-%s.md" % stamp, "goals-latest.md"):
        with open(os.path.join(a.out_dir, name), "w") as f:
            f.write("\n".join(md) + "\n")
    print("\nresults: %s" % os.path.join(a.out_dir, "goals-%s.md" % stamp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
