"""Sandbox kernel vs stock ipykernel, measured in the same run (issue: the foundation).

Metrics: median round trip of ``1+1``; kernel start to the first execute reply; printing
1,000,000 short lines (wall time and the kernel process's peak RSS); interrupt latency (the
interrupt request sent while a busy loop runs → the cell's reply, median of 5; target 1 s). Prints a table and,
with ``--json FILE``, writes the numbers.

    python bench/bench_kernel.py [--repeat 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchlib import Kernel, Sampler

TARGETS = {"roundtrip_1p1_ms": 1.25, "start_to_first_reply_s": 1.5, "print_1e6_lines_s": 1.5}
#: absolute targets (seconds), not ratios
ABSOLUTE = {"interrupt_to_reply_s": 1.0}


def _interrupt_latency(km, kc, runs: int = 5) -> float:
    """Median seconds from the interrupt request to the reply of a cell spinning in Python."""
    took = []
    for _ in range(runs):
        msg_id = kc.execute("print('spinning', flush=True)\nwhile True: pass")
        while True:  # interrupt once the cell runs (an earlier one has nothing to stop)
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                break
        sent = time.perf_counter()
        km.interrupt_kernel()
        while True:
            reply = kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                took.append(time.perf_counter() - sent)
                break
    return statistics.median(took)


def measure(kernel_name: str, repeat: int) -> dict:
    started = time.perf_counter()
    with Kernel(kernel_name=kernel_name, ready_timeout=120) as k:
        k.run("1+1", timeout=600)
        start_to_first = time.perf_counter() - started
        for _ in range(10):
            k.run("1+1", timeout=600)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            k.run("1+1", timeout=600)
            times.append((time.perf_counter() - t) * 1000)
        with Sampler(k.pid) as sampler:
            t = time.perf_counter()
            k.run("for i in range(1_000_000):\n    print(i)", timeout=600)
            print_s = time.perf_counter() - t
        interrupt_s = _interrupt_latency(k.km, k.kc)
        return {
            "interrupt_to_reply_s": interrupt_s,
            "roundtrip_1p1_ms": statistics.median(times),
            "start_to_first_reply_s": start_to_first,
            "print_1e6_lines_s": print_s,
            "kernel_peak_rss_mb": sampler.peak,
        }


def rows(repeat: int = 200) -> list[dict]:
    stock = measure("python3", repeat)
    ours = measure("sandbox", repeat)
    out = []
    for metric, label in (("roundtrip_1p1_ms", "round trip of 1+1 (median ms)"),
                          ("start_to_first_reply_s", "kernel start → first reply (s)"),
                          ("print_1e6_lines_s", "print 1,000,000 lines (s)"),
                          ("kernel_peak_rss_mb", "kernel peak RSS while printing (MB)"),
                          ("interrupt_to_reply_s", "interrupt → cell reply (median s)")):
        target = TARGETS.get(metric)
        out.append({"metric": label, "ours": ours[metric], "baseline": stock[metric],
                    "target": f"≤ {target}× stock" if target else
                    f"≤ {ABSOLUTE[metric]} s" if metric in ABSOLUTE else "bounded"})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    stock = measure("python3", args.repeat)
    ours = measure("sandbox", args.repeat)
    rows = []
    for metric in ("roundtrip_1p1_ms", "start_to_first_reply_s", "print_1e6_lines_s", "kernel_peak_rss_mb",
                   "interrupt_to_reply_s"):
        ratio = ours[metric] / stock[metric] if stock[metric] else float("nan")
        target = TARGETS.get(metric)
        rows.append({"metric": metric, "ours": ours[metric], "baseline": stock[metric], "ratio": ratio,
                     "target": f"≤ {target}×" if target else
                     f"≤ {ABSOLUTE[metric]} s" if metric in ABSOLUTE else "bounded"})
    print(f"{'metric':28} {'sandbox':>10} {'ipykernel':>10} {'ratio':>7}  target")
    for row in rows:
        print(f"{row['metric']:28} {row['ours']:10.3f} {row['baseline']:10.3f} {row['ratio']:7.2f}  {row['target']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
