#!/usr/bin/env bash
# FP8 benchmark and convergence check on one GPU (FP8 tensor cores: H100/H200/Ada): for each model,
# `helix train` on the bundled Swiss-Prot proteins with --fp8 none (bf16) and --fp8 delayed, same
# data, seed, crops and masks, then prints per model: throughput ratio (delayed / none, real tokens
# per second over the steps after the warm-up), peak memory, and the loss-curve difference (mean and
# max |loss_fp8 - loss_bf16| per step over the last half of the run, and the mean loss of the last 20
# steps of each). Not a test: the numbers go to docs/perf/fp8.md.
#   examples/bench/run_fp8_bench.sh BUILD_DIR [--models "esm2-650m esm2-3b"] [--steps "200 80"]
#       [--tokens "16384 8192"] [--recompute "none full"] [--warmup 10] [--timeout SEC] [--extra "FLAGS"]
# --steps / --tokens / --recompute: one value per model (the defaults fit in ~6 minutes on one H100;
# 3B recomputes activations to fit in 80 GB); --extra: more flags for every run. Results go to
# $OUT_DIR (default: a new temporary folder): one log and metrics.jsonl per run, table.txt.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { sed -n 2,13p "$0"; exit 2; }
build=$(cd "$1" && pwd) || exit 2
shift
models="esm2-650m esm2-3b" steps="200 80" tokens="16384 8192" recompute="none full" warmup=10 timeout_s=150 extra=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --recompute) recompute=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --extra) extra=$2; shift 2 ;;
    *) echo "run_fp8_bench.sh: unknown option '$1'"; exit 2 ;;
  esac
done
read -r -a model_list <<< "$models"
read -r -a step_list <<< "$steps"
read -r -a token_list <<< "$tokens"
read -r -a recompute_list <<< "$recompute"
[ ${#step_list[@]} -eq ${#model_list[@]} ] && [ ${#token_list[@]} -eq ${#model_list[@]} ] &&
  [ ${#recompute_list[@]} -eq ${#model_list[@]} ] ||
  { echo "run_fp8_bench.sh: --steps, --tokens and --recompute need one value per model (${#model_list[@]})"; exit 2; }
helix=$build/helix
[ -x "$helix" ] || helix=$build/launch/helix
[ -x "$helix" ] || { echo "run_fp8_bench.sh: no helix binary in $build"; exit 2; }
data=$root/examples/data/swissprot_3k.fasta.gz
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

for idx in "${!model_list[@]}"; do
  model=${model_list[$idx]} n=${step_list[$idx]} tok=${token_list[$idx]} rec=${recompute_list[$idx]}
  for fp8 in none delayed; do
    dir=$out/$model-$fp8
    rm -rf "$dir"
    echo "== $model --fp8 $fp8: $n steps of $tok tokens, --recompute $rec"
    # shellcheck disable=SC2086
    timeout "$timeout_s" "$helix" train --model "$model" --data "$data" --tokens-per-step "$tok" --steps "$n" \
      --max-residues 510 --lr 4e-4 --warmup 20 --seed 1 --eval-batches 0 --log-interval 25 --fp8 "$fp8" \
      --recompute "$rec" --out "$dir" $extra > "$out/$model-$fp8.log" 2>&1
    rc=$?
    rm -f "$dir/model.safetensors"
    [ $rc -eq 0 ] || { echo "   exit $rc (124: timed out after ${timeout_s}s); last lines:"; tail -3 "$out/$model-$fp8.log"; }
    grep -E "fp8:|step $n/" "$out/$model-$fp8.log" | tail -2
  done
done

python3 - "$out" "$warmup" "${model_list[@]}" <<'PY' | tee "$out/table.txt"
import json, os, sys
out, warmup, models = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def load(m, f):
    p = os.path.join(out, f"{m}-{f}", "metrics.jsonl")
    if not os.path.exists(p):
        return []
    return [r for r in (json.loads(l) for l in open(p) if l.strip()) if r.get("kind") == "train"]
print(f"\nFP8 delayed scaling vs bf16 (--fp8 none), same data and seed; tok/s over steps > {warmup}")
print(f"{'model':<10} {'steps':>5} {'bf16 tok/s':>11} {'fp8 tok/s':>10} {'ratio':>6} {'bf16 GiB':>9} {'fp8 GiB':>8}"
      f" {'loss bf16':>9} {'loss fp8':>9} {'mean|d|':>8} {'max|d|':>7}")
for m in models:
    a, b = load(m, "none"), load(m, "delayed")
    n = min(len(a), len(b))
    if n <= warmup:
        print(f"{m:<10} incomplete runs: {len(a)} bf16 steps, {len(b)} fp8 steps (see the logs in {out})")
        continue
    def tps(rs):
        t = [r for r in rs[:n] if r["step"] > warmup]
        return sum(r["tokens"] for r in t) / sum(r["step_seconds"] for r in t)
    def gib(rs):
        return max(r["mem_peak_bytes"] for r in rs) / 2**30
    half = [(x["loss"], y["loss"]) for x, y in zip(a[n // 2:n], b[n // 2:n]) if x["loss"] is not None and y["loss"] is not None]
    d = [abs(x - y) for x, y in half]
    last = lambda rs: (lambda t: sum(t) / max(1, len(t)))([r["loss"] for r in rs[max(0, n - 20):n] if r["loss"] is not None])
    ta, tb = tps(a), tps(b)
    print(f"{m:<10} {n:>5} {ta:>11.0f} {tb:>10.0f} {tb / ta:>6.2f} {gib(a):>9.2f} {gib(b):>8.2f}"
          f" {last(a):>9.4f} {last(b):>9.4f} {sum(d) / max(1, len(d)):>8.4f} {max(d, default=0):>7.4f}")
    skipped = b[n - 1].get("skipped_total", 0)
    if skipped:
        print(f"{m:<10} fp8 run skipped {skipped} steps (non-finite loss or gradient)")
PY
echo "results in $out"
