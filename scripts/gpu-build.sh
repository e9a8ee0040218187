#!/usr/bin/env bash
# Build CUDA executables here (no GPU needed) and bundle them into .gpu/ (git-ignored) for the
# GPU host.
#
#   scripts/gpu-build.sh [--tests "PKG/TEST PKG/lib ..."] [--bins "PKG ..."]
#
#   --tests  integration-test targets (PKG/NAME) or library unit tests (PKG/lib) to build with
#            --features cuda (default: shared/lib shared/gpu)
#   --bins   topic binaries (PKG) or other binaries (PKG/BIN, e.g. shared/launch) to build in
#            release with --features cuda (default: none)
#   --examples  examples (PKG/NAME) to build likewise, e.g. t0810_kv_cache/parity
#   GPU_FEATURES=nccl  build tests, bins and examples with NCCL (shared::nccl, test shared/nccl;
#               only packages with an nccl feature: shared, t0810_kv_cache); the link needs libnccl.so
#               on LIBRARY_PATH (e.g. a folder with a libnccl.so link to PyTorch's nvidia/nccl/lib/libnccl.so.2)
#
# Every executable embeds Candle's CUDA kernels (~43 MB each); stripped, and one long-window xz
# over one tar storing the kernels once, each executable adds about 1 MB to the bundle.
# GPU_STRIP=0 keeps the symbols; GPU_XZ_DICT sets the window (see below). Produces
# .gpu/bundle.tar.xz, a manifest and a copy of ../shared/gpu/remote-env.sh (and WikiText-2 under
# .gpu/data, ~9 MB, for the experiments: remove it when only tests run and the upload is tight).
# Then, with the device tool:
#   carry [".gpu"], command: bash scripts/gpu-run.sh tests   |   bash scripts/gpu-run.sh bin NAME ARGS...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
shared_gpu="$root/../shared/gpu"
tests="shared/lib shared/gpu"
bins=""
examples=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) tests="$2"; shift 2 ;;
    --bins) bins="$2"; shift 2 ;;
    --examples) examples="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if ! command -v nvcc >/dev/null 2>&1; then
  eval "$("$shared_gpu/setup-cuda-toolkit.sh")"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda}"
# The executables run on another machine: no `-C target-cpu=native` from .cargo/config.toml (an
# empty RUSTFLAGS replaces it), unless the caller asks for flags of its own.
export RUSTFLAGS="${RUSTFLAGS-}"
unset CARGO_ENCODED_RUSTFLAGS  # it would take precedence over RUSTFLAGS
rm -rf .gpu && mkdir -p .gpu/stage/tests .gpu/stage/bin
: > .gpu/stage/manifest.txt
for t in $tests; do
  pkg=${t%%/*}; name=${t#*/}
  if [ "$name" = lib ]; then sel=(--lib); else sel=(--test "$name"); fi
  echo "== test $pkg/$name" >&2
  exe=$(cargo test --release --features "${GPU_FEATURES:-cuda}" -p "$pkg" "${sel[@]}" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]: print(m["executable"])' | tail -1)
  [ -n "$exe" ] || { echo "build of $t failed:" >&2; cargo test --release --features "${GPU_FEATURES:-cuda}" -p "$pkg" "${sel[@]}" --no-run >&2; exit 1; }
  cp "$exe" ".gpu/stage/tests/${pkg}__${name}"
  echo "test $pkg tests/${pkg}__${name}" >> .gpu/stage/manifest.txt
done
for b in $bins; do
  # PKG (its binary of the same name) or PKG/BIN (e.g. shared/launch)
  pkg=${b%%/*}; name=${b#*/}
  echo "== bin $b" >&2
  if [ "$pkg" = "$name" ]; then sel=(); else sel=(--bin "$name"); fi
  cargo build --release --features "${GPU_FEATURES:-cuda}" -p "$pkg" ${sel[@]+"${sel[@]}"} 2>&1 | tail -1 >&2
  cp "$CARGO_TARGET_DIR/release/$name" .gpu/stage/bin/
  echo "bin $name bin/$name" >> .gpu/stage/manifest.txt
done
for e in $examples; do
  pkg=${e%%/*}; name=${e#*/}
  echo "== example $pkg/$name" >&2
  cargo build --release --features "${GPU_FEATURES:-cuda}" -p "$pkg" --example "$name" 2>&1 | tail -1 >&2
  cp "$CARGO_TARGET_DIR/release/examples/$name" .gpu/stage/bin/
  echo "bin $name bin/$name" >> .gpu/stage/manifest.txt
done
# The revision the executables are built from (gpu-run.sh reports it and hands it to results.json).
git describe --always --dirty > .gpu/stage/git-rev.txt 2>/dev/null || echo unknown > .gpu/stage/git-rev.txt
# Symbols off (panic messages keep their file and line): about a fifth of each executable.
# GPU_STRIP=0 keeps them.
if [ "${GPU_STRIP:-1}" = 1 ]; then
  find .gpu/stage/tests .gpu/stage/bin -type f -exec strip {} +
fi
# One long-window xz stores the kernels every executable embeds once: with a window as large as
# the whole tar (GPU_XZ_DICT, 1536 MiB by default; ~16 GiB of memory and ~8 minutes on 2 cores
# for 29 executables), the workspace's 27 CUDA test executables and two topic binaries come to
# ~26 MB, which fits the device tool's 64 MiB upload beside the working tree.
echo "== compressing $(du -sh .gpu/stage | cut -f1)" >&2
tar -C .gpu/stage -cf - . | xz -T1 -9e --lzma2=dict="${GPU_XZ_DICT:-1536MiB}" > .gpu/bundle.tar.xz
cp "$shared_gpu/remote-env.sh" .gpu/
# The GPU host has no fonts: carry one for the plots.
font=$(fc-match -f "%{file}" "DejaVu Sans:style=Book" 2>/dev/null || true)
[ -f "$font" ] && cp "$font" .gpu/font.ttf
# The GPU host has no ../shared: carry WikiText-2 (xz, ~9 MB) for the experiments.
if [ -d "$root/../shared/data/wikitext-2" ]; then
  mkdir -p .gpu/data && cp "$root"/../shared/data/wikitext-2/*.xz .gpu/data/
fi
rm -rf .gpu/stage
ls -la .gpu >&2
