#!/usr/bin/env bash
# Training benchmark, helix against PyTorch on one GPU: for each model, `helix train` and
# train_torch.py (THD eager, THD torch.compile, Hugging Face EsmForMaskedLM padded sdpa) on the same
# batches (same proteins, crops, masks, 16384 tokens per step, same step count); the first --warmup
# steps are not timed. Prints a table: real tokens/s, model TFLOP/s, peak memory, final loss, and
# helix's ratios over THD eager and compiled (throughput: > 1 is faster; memory: < 1 is smaller).
#   examples/bench/run_training_bench.sh BUILD_DIR [--steps N] [--warmup W] [--models "esm2-150m esm2-650m"]
#       [--modes "helix thd-eager thd-compiled hf"] [--tokens-per-step T] [--timeout SEC]
# --steps N: timed steps (each run does W + N steps). --timeout: per run (0: none).
# A run that fails (unsupported head dim, out of memory, timeout) gives one JSON line with "error" and
# one table row saying why; the other runs go on. Results go to $OUT_DIR (default: a new temporary
# folder): results.jsonl, one log per run, table.txt.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { sed -n 2,13p "$0"; exit 2; }
build=$(cd "$1" && pwd) || exit 2
shift
steps=25 warmup=5 timeout_s=0 tokens=16384
models="esm2-150m esm2-650m"
modes="helix thd-eager thd-compiled hf"
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --tokens-per-step) tokens=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    *) echo "run_training_bench.sh: unknown option '$1'"; exit 2 ;;
  esac
done
for mode in $modes; do
  case "$mode" in helix | thd-eager | thd-compiled | hf) ;;
    *) echo "run_training_bench.sh: unknown mode '$mode' (helix, thd-eager, thd-compiled, hf)"; exit 2 ;;
  esac
done
data=$root/examples/data/swissprot_3k.fasta.gz
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
results=$out/results.jsonl
: > "$results"
total=$((steps + warmup))
helix=$build/helix
[ -x "$helix" ] || helix=$build/launch/helix
with_timeout() { if [ "$timeout_s" -gt 0 ]; then timeout "$timeout_s" "$@"; else "$@"; fi; }

# One JSON line with "error" for a failed run: the reason is the log's last line that says so.
error_line() {  # impl model mode rc log
  local why
  why=$(grep -E '^helix: error' "$5" | tail -1)
  [ -z "$why" ] && why=$(grep -v '^[[:space:]]*$' "$5" | grep -iE 'error|fail|expected|out of memory' | tail -1)
  [ -z "$why" ] && why=$(grep -v '^[[:space:]]*$' "$5" | tail -1)
  [ "$4" = 124 ] && why="timed out after ${timeout_s}s; $why"
  python3 -c 'import json,sys; print(json.dumps({"impl": sys.argv[1], "model": sys.argv[2], "mode": sys.argv[3],
    "error": "exit %s: %s" % (sys.argv[4], sys.argv[5][:300])}))' "$1" "$2" "$3" "$4" "$why" >> "$results"
}

for model in $models; do
  for mode in $modes; do
    log=$out/$model-$mode.log
    echo "== $model $mode (steps $total, first $warmup untimed)"
    if [ "$mode" = helix ]; then
      if [ ! -x "$helix" ]; then
        echo "helix binary not found in $build" > "$log"; error_line helix "$model" helix 127 "$log"; continue
      fi
      dir=$out/helix-$model
      rm -rf "$dir"
      with_timeout "$helix" train --model "$model" --data "$data" --tokens-per-step "$tokens" --steps "$total" \
        --eval-batches 0 --log-interval 5 --out "$dir" > "$log" 2>&1
      rc=$?
      rm -f "$dir/model.safetensors"  # the benchmark does not need the weights (2.6 GB at 650M)
      if [ $rc -ne 0 ] || [ ! -s "$dir/metrics.jsonl" ]; then
        error_line helix "$model" helix "$rc" "$log"
      else
        python3 - "$dir/metrics.jsonl" "$model" "$warmup" "$tokens" >> "$results" <<'PY'
import json, sys
path, model, warmup, tps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(l) for l in open(path) if l.strip()]
train = [r for r in rows if r.get("kind") == "train"]
timed = [r for r in train if r["step"] > warmup]
secs = sum(r["step_seconds"] for r in timed)
toks = sum(r["tokens"] for r in timed)
flops = sum(r["tflops"] * 1e12 * r["step_seconds"] for r in timed)
peak = max(r["mem_peak_bytes"] for r in train)
out = {"impl": "helix", "model": model, "mode": "helix", "tokens_per_step": tps, "steps": len(train),
       "timed_steps": len(timed), "tokens": toks, "seconds": round(secs, 4),
       "tokens_per_second": round(toks / secs, 1) if secs > 0 else 0,
       "tflops": round(flops / secs / 1e12, 2) if secs > 0 else 0,
       "step_seconds_mean": round(secs / max(1, len(timed)), 5), "mem_peak_bytes": peak,
       "mem_peak_gib": round(peak / 2**30, 2), "first_loss": train[0]["loss"], "final_loss": train[-1]["loss"],
       "skipped": train[-1]["skipped_total"]}
if not timed:
    out["error"] = f"no timed steps (steps {len(train)}, warmup {warmup})"
print(json.dumps(out))
PY
      fi
    else
      case "$mode" in
        thd-eager) flags=(--mode thd) ;;
        thd-compiled) flags=(--mode thd --compile) ;;
        hf) flags=(--mode hf) ;;
      esac
      with_timeout python3 "$here/train_torch.py" --model "$model" "${flags[@]}" --data "$data" \
        --tokens-per-step "$tokens" --steps "$total" --warmup "$warmup" > "$log.json" 2> "$log"
      rc=$?
      if grep -q '^{' "$log.json"; then
        grep '^{' "$log.json" | tail -1 >> "$results"  # train_torch.py reports its own errors
      else
        error_line torch "$model" "$mode" "$rc" "$log"
      fi
    fi
    tail -1 "$results"
  done
done

python3 - "$results" "$tokens" "$steps" "$warmup" <<'PY' | tee "$out/table.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tokens, steps, warmup = sys.argv[2:5]
order = ["helix", "thd-eager", "thd-compiled", "hf-sdpa", "hf"]
models = list(dict.fromkeys(r["model"] for r in rows))
print(f"\nESM-2 training, {tokens} tokens per step, {steps} timed steps after {warmup} warm-up steps; tok/s counts"
      " real tokens; TFLOP/s = (6 * matmul params * tokens + 12 * hidden * layers * sum s^2) / time")
print(f"{'model':<10} {'run':<13} {'tok/s':>9} {'TFLOP/s':>8} {'peak GiB':>9} {'loss':>7}  note")
for m in models:
    rs = sorted((r for r in rows if r["model"] == m), key=lambda r: order.index(r["mode"]) if r["mode"] in order else 9)
    for r in rs:
        if "error" in r:
            print(f"{m:<10} {r['mode']:<13} {'FAILED':>9} {'':>8} {'':>9} {'':>7}  {r['error'][:110]}")
            continue
        note = r.get("attention", "")
        print(f"{m:<10} {r['mode']:<13} {r['tokens_per_second']:>9.0f} {r['tflops']:>8.1f} {r['mem_peak_gib']:>9.2f}"
              f" {r['final_loss']:>7.3f}  {note[:60]}")
    ok = {r["mode"]: r for r in rs if "error" not in r}
    h = ok.get("helix")
    for ref in ("thd-eager", "thd-compiled", "hf-sdpa"):
        t = ok.get(ref)
        if h and t:
            print(f"{m:<10} helix/{ref:<13} throughput {h['tokens_per_second'] / t['tokens_per_second']:.2f}x,"
                  f" memory {h['mem_peak_bytes'] / t['mem_peak_bytes']:.2f}x")
        elif t:
            print(f"{m:<10} helix/{ref:<13} n/a (helix run failed)")
PY
echo "results in $out"
