#!/usr/bin/env bash
# Attention benchmark, helix against PyTorch's varlen_attn on identical packed batches, one GPU:
# runs build/tests/helix_bench_attention (which writes the lengths), then attention_torch.py on
# those lengths, then prints the ratio table (helix TFLOP/s over PyTorch TFLOP/s, > 1 is faster).
#   examples/bench/run_attention_bench.sh [BUILD_DIR] [--causal] [--iters N] [--cases ...] [--dims ...]
# (the extra arguments go to both sides)
# Results (JSON lines and the table) go to $OUT_DIR (default: a new temporary folder).
# HELIX_BWD_TILING=keys64|keys128|tiled2d picks the helix backward's dK/dV tiling (tiled2d: the
# 8-warp 2-D partition, docs/perf/attention.md v5), HELIX_FWD_TILING=rows16|rows32 the D = 128
# forward's rows per warp (default: the library's choice); comma lists time every combination on the
# same data in the same run (one table row each, e.g. keys64,keys128,tiled2d).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/build}
shift || true
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
bench="$build/tests/helix_bench_attention"
[ -x "$bench" ] || { echo "run_attention_bench.sh: $bench not found (build the helix_bench_attention target)"; exit 1; }

"$bench" --lengths-out "$out/lengths.json" ${HELIX_BWD_TILING:+--bwd-tiling "$HELIX_BWD_TILING"} \
  ${HELIX_FWD_TILING:+--fwd-tiling "$HELIX_FWD_TILING"} "$@" | tee "$out/helix.jsonl"
python3 "$here/attention_torch.py" --lengths "$out/lengths.json" "$@" | tee "$out/torch.jsonl"
python3 - "$out/helix.jsonl" "$out/torch.jsonl" <<'PY' | tee "$out/table.txt"
import json, sys
def load(path, tilings):
    rows = {}
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            key = (r["case"], r["head_dim"], r["mask"])
            if tilings:
                key += (r.get("bwd_tiling", "default"), r.get("fwd_tiling", "default"))
            rows[key] = r
    return rows
helix, torch = load(sys.argv[1], True), load(sys.argv[2], False)
backend = next(iter(torch.values()), {}).get("backend", "?")
print(f"\nhelix vs PyTorch ({backend}), TFLOP/s (fwd: 4*H*D*sum s^2; fwd+bwd: 3.5x that)")
multi = len({k[3:] for k in helix}) > 1  # several tilings: show them
tiling = lambda k: f" {k[3] + '/' + k[4]:<15}" if multi else ""
print(f"{'case':<9} {'D':>4} {'H':>3} {'mask':<13}" + (f" {'bwd/fwd tiling':<15}" if multi else "")
      + f" {'helix fwd':>9} {'torch fwd':>9} {'ratio':>6} {'helix f+b':>9} {'torch f+b':>9} {'ratio':>6}")
for key in sorted(helix):
    h, t = helix[key], torch.get(key[:3])
    if t is None:
        continue
    print(f"{key[0]:<9} {key[1]:>4} {h['heads']:>3} {key[2]:<13}{tiling(key)} {h['fwd_tflops']:>9.1f} {t['fwd_tflops']:>9.1f}"
          f" {h['fwd_tflops'] / t['fwd_tflops']:>6.2f} {h['fwdbwd_tflops']:>9.1f} {t['fwdbwd_tflops']:>9.1f}"
          f" {h['fwdbwd_tflops'] / t['fwdbwd_tflops']:>6.2f}")
PY
echo "results in $out"
