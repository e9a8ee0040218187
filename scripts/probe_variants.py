"""The variants of one probe build against its shipped kernels, within the same runs: TFLOP/s per
shape and kernel, averaged over the runs (probe_bwd*.txt, probe_fwd*.txt of one build), and
each kernel / its base (the first kernel of its line whose name starts with "shipped", e.g.
"shipped nc3 s3" for "turns nc3 s3": BASES below names the pairs that are not by position).

Run: python3 scripts/probe_variants.py CALL_FOLDER OUT_JSON "what ran, on which card" [GLOB ...]
GLOB: the probe outputs to read (default probe_bwd*.txt probe_fwd*.txt in CALL_FOLDER).
Writes {"source", "runs", "tflops": {shape: {kernel: mean}}, "vs_base": {shape: {kernel: ratio}}}.
"""
import glob, json, os, re, statistics, sys

folder, out, note = sys.argv[1], sys.argv[2], sys.argv[3]
patterns = sys.argv[4:] or ["probe_bwd*.txt", "probe_fwd*.txt"]
BWD = re.compile(r"time bwd d (\d+) causal (\d) n\s+(\d+):(.*)")
FWD = re.compile(r"time d\s+(\d+) causal (\d) n\s+(\d+) bh\s+\d+:(.*)")
# A variant's base where its name does not say it: the kernel it differs from by one change.
BASES = {"turns nc2": "shipped nc2", "turns nc3 s3": "shipped nc3 s3", "no turns nc2": "shipped nc2",
         "no turns nc3 s3": "shipped nc3 s3"}

runs, samples = [], {}
for pattern in patterns:
    for path in sorted(glob.glob(os.path.join(folder, pattern))):
        runs.append(os.path.basename(path))
        for line in open(path):
            m = BWD.match(line) or FWD.match(line)
            if not m:
                continue
            shape = f"d{m[1]}_{'causal' if m[2] == '1' else 'full'}_{m[3]}"
            if m.re is FWD:
                shape = "fwd_" + shape
            for part in m[4].split("|")[1:]:
                mm = re.match(r"\s*(.+?) (?:[\d.]+ ms )?(\d+)(?: TFLOP/s)?", part.strip() + " ")
                samples.setdefault(shape, {}).setdefault(mm[1].strip(), []).append(float(mm[2]))
tflops = {s: {k: round(statistics.mean(v), 1) for k, v in ks.items()} for s, ks in samples.items()}
vs_base = {}
for shape, ks in tflops.items():
    names = list(ks)
    for k in names:
        base = BASES.get(k) or ("shipped" if "shipped" in ks and k != "shipped" else None)
        if base is None or base not in ks or base == k:
            continue
        vs_base.setdefault(shape, {})[k] = round(ks[k] / ks[base], 3)
json.dump({"source": note, "runs": runs, "tflops": tflops, "vs_base": vs_base}, open(out, "w"), indent=1)
for shape in sorted(vs_base):
    print(shape, vs_base[shape])
