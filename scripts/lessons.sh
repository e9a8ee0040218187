#!/usr/bin/env bash
# Reruns the CPU experiments the lessons quote and commits-ready copies of what they wrote:
#
#   scripts/lessons.sh [TOPIC ...]        (default: every topic, then the ladder)
#
# TOPIC is a crate name (t0801_self_attention …), `ladder` (t0810's ladder example) or
# `t0805_full_transformer_fused` (8-05's main job with the fused LayerNorm and FlashAttention,
# t0810's main_job example). Each run
# goes to output/lessons/<topic>/ and is copied into reports/lessons/<topic>/: results.json, the
# full log, and run.json (the command, the machine, the date, the git revision). Its figures are
# copied into notebooks-md/figures/<topic>/cpu/, where the lessons link them.
#
# Runs in release mode on the CPU with the binaries' default presets; WikiText-2 is found as the
# binaries find it (--data-dir, WIKITEXT2_DIR, the cache, or ../shared/data/wikitext-2).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
all="t0801_self_attention t0802_multi_head_attention t0803_positional_encoding t0804_transformer_block
t0805_full_transformer t0805_full_transformer_fused t0806_modern_blocks t0807_grouped_query_attention t0808_rope t0809_flash_attention
t0810_kv_cache ladder"
topics=${*:-$all}
out=output/lessons
cargo build --release --bins --examples -q
for t in $topics; do
  if [ "$t" = ladder ]; then
    cmd=(cargo run --release -q -p t0810_kv_cache --example ladder -- --device cpu --out "$out")
  elif [ "$t" = t0805_full_transformer_fused ]; then
    cmd=(cargo run --release -q -p t0810_kv_cache --example main_job -- --device cpu --out "$out")
  else
    cmd=(cargo run --release -q -p "$t" -- --device cpu --out "$out")
  fi
  dest=reports/lessons/$t
  mkdir -p "$dest" "notebooks-md/figures/$t/cpu"
  echo "== $t: ${cmd[*]}"
  started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  t0=$(date +%s)
  "${cmd[@]}" > "$dest/log.txt" 2>&1 || { echo "   $t failed: $(tail -3 "$dest/log.txt")"; continue; }
  wall=$(( $(date +%s) - t0 ))
  cp "$out/$t/results.json" "$dest/results.json"
  find "$out/$t" -maxdepth 1 -name '*.png' -exec cp {} "notebooks-md/figures/$t/cpu/" \;
  python3 - "$dest/run.json" "$started" "$wall" "${cmd[*]}" <<'EOF'
import json, os, platform, subprocess, sys
path, started, wall, cmd = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"command": cmd.replace(" -q", ""), "started_at": started, "wall_s": wall,
           "machine": f"{os.cpu_count()} cores, {cpu}", "git_rev": rev}, open(path, "w"), indent=1)
EOF
  echo "   $t: ${wall} s → $dest"
done
