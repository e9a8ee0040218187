#!/usr/bin/env bash
# Build the CUDA test executables and release binaries here (no GPU needed) and bundle them
# into .gpu/ (git-ignored) for the GPU host.
#
#   scripts/gpu-build.sh [PACKAGE ...]      default: every workspace package
#
# Produces .gpu/bundle.tar.xz (tests + binaries, deduplicated by one long-window xz), a manifest
# .gpu/manifest.txt (kind, package, path), and a copy of ../shared/gpu/remote-env.sh.
# Send it with the device tool: carry [".gpu"], command `bash scripts/gpu-run.sh ...`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
shared_gpu="$root/../shared/gpu"
if ! command -v nvcc >/dev/null 2>&1; then
  eval "$("$shared_gpu/setup-cuda-toolkit.sh")"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda}"
pkgs=("$@")
if [ ${#pkgs[@]} -eq 0 ]; then
  pkgs=(shared $(ls crates))
fi
pflags=()
for p in "${pkgs[@]}"; do pflags+=(-p "$p"); done

echo "== building CUDA test executables for: ${pkgs[*]}" >&2
cargo test --release --features cuda "${pflags[@]}" --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print("test", m["package_id"].split("#")[0].split("/")[-1], m["target"]["name"], m["executable"])
' > /tmp/gpu-tests.txt
echo "== building release binaries" >&2
bins=()
for p in "${pkgs[@]}"; do
  if [ -f "crates/$p/src/main.rs" ]; then
    cargo build --release --features cuda -p "$p" 2>&1 | tail -1 >&2
    bins+=("$CARGO_TARGET_DIR/release/$p")
  fi
done

rm -rf .gpu && mkdir -p .gpu/stage/tests .gpu/stage/bin
: > .gpu/manifest.txt
while read -r kind pkg name exe; do
  dest="tests/${pkg}__${name}"
  cp "$exe" ".gpu/stage/$dest"
  echo "test $pkg $dest" >> .gpu/manifest.txt
done < /tmp/gpu-tests.txt
for b in "${bins[@]}"; do
  cp "$b" .gpu/stage/bin/
  echo "bin $(basename "$b") bin/$(basename "$b")" >> .gpu/manifest.txt
done
cp .gpu/manifest.txt .gpu/stage/
echo "== compressing $(du -sh .gpu/stage | cut -f1) (one long-window xz: shared kernels stored once)" >&2
tar -C .gpu/stage -cf - . | xz -T2 --lzma2=preset=6,dict=256MiB > .gpu/bundle.tar.xz
cp "$shared_gpu/remote-env.sh" .gpu/
rm -rf .gpu/stage
ls -la .gpu >&2
