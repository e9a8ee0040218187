"""Parse scripts/flash_hopper_bwd_probe.cu output into JSON: ms and TFLOP/s per variant and shape.

Run: python3 scripts/parse_bwd_probe.py PROBE_TXT OUT_JSON "what ran, on which card"
"""
import json, re, sys
src, out, note = sys.argv[1], sys.argv[2], sys.argv[3]
res = {"source": note, "correctness": None, "ms": {}, "tflops": {}, "vs_first": {}}
for line in open(src):
    if line.startswith("correctness:"):
        res["correctness"] = line.split(":", 1)[1].strip()
    m = re.match(r"time bwd d (\d+) causal (\d) n\s+(\d+):(.*)", line)
    if not m:
        continue
    key = f"d{m[1]}_{'causal' if m[2] == '1' else 'full'}_{m[3]}"
    for part in m[4].split("|")[1:]:
        mm = re.match(r"\s*(.+?) ([\d.]+) ms (\d+) TFLOP/s ([\d.]+)x", part)
        name, ms, tf, x = mm[1], float(mm[2]), float(mm[3]), float(mm[4])
        res["ms"].setdefault(key, {})[name] = ms
        res["tflops"].setdefault(key, {})[name] = tf
        res["vs_first"].setdefault(key, {})[name] = x
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res["vs_first"], indent=None)[:600])
