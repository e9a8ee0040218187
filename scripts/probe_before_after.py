"""Before and after a kernel change, timed in one device call (scripts/gpu-call-hopper-bwd.sh with
.gpu/probe/before/): the backward probe's and the forward probe's TFLOP/s per kernel and shape,
averaged over the runs of each build, and after / before.

Run: python3 scripts/probe_before_after.py CALL_FOLDER OUT_JSON "what ran, on which card"
Reads CALL_FOLDER/probe_bwd*.txt and probe_fwd*.txt: probe_<which>[_<build>][.<n>].txt, the build
"after" where none is named; writes per shape and kernel the TFLOP/s of every run of each build
("tflops") and, for each build B other than "before", B_vs_before (mean over mean).
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


result = {"source": note, "runs": {}, "tflops": {}}
for which in ("bwd", "fwd"):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, f"probe_{which}*.txt"))):
        m = re.match(rf"probe_{which}(?:_([a-z]+))?(?:\.\d+)?\.txt$", os.path.basename(path))
        build = (m[1] if m else None) or "after"
        runs.setdefault(build, []).append(tflops(path))
        result["runs"].setdefault(which, {}).setdefault(build, []).append(os.path.basename(path))
    if "before" not in runs or len(runs) < 2:
        continue
    keys = set.intersection(*(set(r) for rs in runs.values() for r in rs))
    for shape, kernel in sorted(keys):
        name = f"{which} {kernel}"
        per_build = {build: [r[(shape, kernel)] for r in rs] for build, rs in runs.items()}
        result["tflops"].setdefault(shape, {})[name] = per_build
        for build, v in per_build.items():
            if build != "before":
                ratio = round(statistics.mean(v) / statistics.mean(per_build["before"]), 3)
                result.setdefault(f"{build}_vs_before", {}).setdefault(shape, {})[name] = ratio
json.dump(result, open(out, "w"), indent=1)
for key in (k for k in result if k.endswith("_vs_before")):
    for shape, r in result[key].items():
        print(key, shape, r)
