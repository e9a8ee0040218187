#!/usr/bin/env python3
"""Summarise an `ncu --csv --metrics gpu__time_duration.sum` log: GPU time per kernel name.

    python3 scripts/ncu_summary.py NCU.csv [--top 30]

Prints the kernels that took the most device time (total, count, mean), the number of launches
and the summed kernel time of the profiled region. Kernel names are shortened to the function
name (template arguments and parameter lists dropped) so the same kernel groups together.
"""
import csv
import re
import sys
from collections import defaultdict

UNIT_NS = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9}


def short(name: str) -> str:
    name = re.sub(r"\(.*\)$", "", name.strip())  # parameter list
    depth, out = 0, []
    for ch in name:  # drop template arguments
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    base = "".join(out).split("::")[-1].strip().replace("void ", "")
    if base.startswith("Kernel") or base in ("device_kernel", "kernel"):  # CUTLASS/cuBLAS: keep the tile name
        inner = re.search(r"<([^<>,]+)", name)
        if inner:
            base += "<" + inner.group(1).split("::")[-1].strip() + ">"
    return base


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 30
    lines = [l for l in open(path, errors="replace") if l.startswith('"')]
    if not lines:
        sys.exit(f"{path}: no CSV rows (did ncu profile anything?)")
    rows = list(csv.DictReader(lines))
    total = defaultdict(float)
    count = defaultdict(int)
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(r["Metric Value"].replace(",", "")) * UNIT_NS.get(r.get("Metric Unit", "nsecond"), 1.0)
        k = short(r["Kernel Name"])
        total[k] += ns
        count[k] += 1
    all_ns = sum(total.values())
    launches = sum(count.values())
    print(f"{launches} kernel launches, {all_ns / 1e6:.2f} ms of kernel time in the profiled region")
    print(f"{'kernel':<60} {'launches':>8} {'total ms':>9} {'share':>6} {'mean us':>8}")
    for k, ns in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{k[:60]:<60} {count[k]:>8} {ns / 1e6:>9.3f} {100 * ns / all_ns:>5.1f}% {ns / count[k] / 1e3:>8.1f}")


if __name__ == "__main__":
    main()
