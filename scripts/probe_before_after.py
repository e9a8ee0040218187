"""Before and after a kernel change, timed in one device call (scripts/gpu-call-hopper-bwd.sh with
.gpu/probe/before/): the backward probe's and the forward probe's TFLOP/s per kernel and shape,
averaged over the runs of each build, and after / before.

Run: python3 scripts/probe_before_after.py CALL_FOLDER OUT_JSON "what ran, on which card"
Reads CALL_FOLDER/probe_bwd*.txt and probe_fwd*.txt: probe_<which>[_before][.<n>].txt.
"""
import glob, json, os, re, statistics, sys

folder, out, note = sys.argv[1], sys.argv[2], sys.argv[3]
BWD = re.compile(r"time bwd d (\d+) causal (\d) n\s+(\d+):(.*)")
FWD = re.compile(r"time d\s+(\d+) causal (\d) n\s+(\d+) bh\s+\d+:(.*)")


def tflops(path):
    """{(shape, kernel): TFLOP/s} of one probe run."""
    res = {}
    for line in open(path):
        m = BWD.match(line) or FWD.match(line)
        if not m:
            continue
        shape = f"d{m[1]}_{'causal' if m[2] == '1' else 'full'}_{m[3]}"
        for part in m[4].split("|")[1:]:
            mm = re.match(r"\s*(.+?) (?:[\d.]+ ms )?(\d+)(?: TFLOP/s)?", part.strip() + " ")
            res[(shape, mm[1].strip())] = float(mm[2])
    return res


result = {"source": note, "runs": {}, "tflops": {}, "after_vs_before": {}}
for which in ("bwd", "fwd"):
    runs = {"before": [], "after": []}
    for path in sorted(glob.glob(os.path.join(folder, f"probe_{which}*.txt"))):
        build = "before" if "_before" in os.path.basename(path) else "after"
        runs[build].append(tflops(path))
        result["runs"].setdefault(which, {}).setdefault(build, []).append(os.path.basename(path))
    if not runs["before"] or not runs["after"]:
        continue
    keys = set.intersection(*(set(r) for r in runs["before"] + runs["after"]))
    for shape, kernel in sorted(keys):
        name = f"{which} {kernel}"
        b = [r[(shape, kernel)] for r in runs["before"]]
        a = [r[(shape, kernel)] for r in runs["after"]]
        t = result["tflops"].setdefault(shape, {})
        t[name] = {"before": b, "after": a}
        result["after_vs_before"].setdefault(shape, {})[name] = round(statistics.mean(a) / statistics.mean(b), 3)
json.dump(result, open(out, "w"), indent=1)
for shape, r in result["after_vs_before"].items():
    print(shape, r)
