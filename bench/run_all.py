"""Run every benchmark and print one table: metric, ours, baseline, ratio, target.

Stock ipykernel is measured in the same run as the baseline where a ratio is asked for.
Needs root (local sandboxes). Writes Markdown with ``--markdown FILE`` (the README's table).

    python bench/run_all.py [--quick] [--markdown bench/results/latest.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_apply  # noqa: E402
import bench_floods  # noqa: E402
import bench_kernel  # noqa: E402
import bench_notices  # noqa: E402
import bench_policy  # noqa: E402

OPTIONAL = ("bench_kubernetes",)  # benchmarks that appear when their module exists


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    repeat = 5 if args.quick else 15
    rows = []
    rows += bench_kernel.rows(repeat=50 if args.quick else 200)
    rows += bench_apply.rows(repeat=20 if args.quick else 50)
    rows += bench_notices.rows(repeat=repeat)
    rows += bench_floods.rows()
    rows += bench_policy.rows(count=500, repeat=5 if args.quick else 11)
    for name in OPTIONAL:
        try:
            module = __import__(name)
        except ImportError:
            continue
        rows += module.rows()
    lines = ["| metric | ours | baseline (stock ipykernel) | ratio | target |", "|---|---:|---:|---:|---|"]
    for row in rows:
        base = row.get("baseline")
        ratio = f"{row['ours'] / base:.2f}×" if base else "—"
        lines.append(f"| {row['metric']} | {row['ours']:.2f} | {'—' if base is None else f'{base:.2f}'} | {ratio} | {row['target']} |")
    stamp = datetime.date.today().isoformat()
    text = f"Measured {stamp} on {machine()}.\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
