"""The basic blocks of a kernel's largest loop in SASS, with their sizes and most frequent
opcodes: how many instructions a warp issues per iteration along a path, read off by hand.

Needs nvdisasm (pip download --no-deps nvidia-cuda-nvdisasm; unzip; nvidia/cu13/bin/nvdisasm):
  nvcc -cubin -O3 -std=c++17 --use_fast_math -gencode arch=compute_90a,code=sm_90a \\
       -o /tmp/h.cubin crates/t0809_flash_attention/kernels/flash_attn_hopper.cu
  nvdisasm -c /tmp/h.cubin | awk -v k=".text.flash_bwd_wgmma_bf16_d64:" \\
       '$0==k{f=1;next} /^\\.text\\./{if(f)exit} f' > /tmp/k.sass
  python3 scripts/sass_loop_blocks.py /tmp/k.sass
Each line: first instruction's index, instruction count, label, last instruction (a branch shows
where the path goes), and the six most frequent opcodes.
"""
import collections, re, sys

ins, labels = [], {}
for line in open(sys.argv[1]):
    m = re.match(r"^(\.L_x_\d+):", line)
    if m:
        labels[m.group(1)] = len(ins)
        continue
    m = re.match(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
    if m:
        ins.append(m.group(2))
loops = []
for i, x in enumerate(ins):
    m = re.search(r"BRA\S*\s+`\((\.L_x_\d+)\)", x)
    if m and labels.get(m.group(1), len(ins)) <= i:
        loops.append((labels[m.group(1)], i))
s, e = max(loops, key=lambda a: a[1] - a[0])
print(f"largest loop: instructions {s}..{e} ({e - s + 1})")
starts = sorted({s} | {v for v in labels.values() if s <= v <= e} | {i + 1 for i in range(s, e + 1) if "BRA" in ins[i]})
for a, b in zip(starts, starts[1:] + [e + 1]):
    if a > e:
        break
    blk = ins[a:min(b, e + 1)]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in blk)
    lab = [k for k, v in labels.items() if v == a]
    print(f"{a:5d} n={len(blk):4d} {' '.join(lab):10s} last={blk[-1][:60]:60s} top={ops.most_common(6)}")
