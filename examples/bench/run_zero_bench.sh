#!/usr/bin/env bash
# ZeRO benchmark: `helix train` on N MPI ranks (default 2, sharing one GPU through the host-staged
# MPI backend when there are fewer GPUs than ranks) for each --zero stage; prints a table of real
# tokens/s, mean step time, rank 0's allocator peak and its per-rank memory line (parameters,
# gradients, optimizer state, peak activations; launch/trainer.cpp log_memory). A stage that fails
# (out of memory, timeout) gives a FAILED row with the reason; the others go on.
#   examples/bench/run_zero_bench.sh BUILD_DIR [--model esm2-3b] [--stages "0 3"] [--np 2] [--steps 6]
#       [--warmup 2] [--tokens-per-step 16384] [--timeout 240] [--device cuda] [--extra "--recompute full"]
# Results go to $OUT_DIR (default: a new temporary folder): one log and metrics.jsonl per stage,
# table.txt.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { sed -n 2,10p "$0"; exit 2; }
build=$(cd "$1" && pwd) || exit 2
shift
model=esm2-3b stages="0 3" np=2 steps=6 warmup=2 tokens=16384 timeout_s=240 device=cuda extra="--recompute full"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --stages) stages=$2; shift 2 ;;
    --np) np=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --tokens-per-step) tokens=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --extra) extra=$2; shift 2 ;;
    *) echo "run_zero_bench.sh: unknown option '$1'"; exit 2 ;;
  esac
done
helix=$build/helix
[ -x "$helix" ] || helix=$build/launch/helix
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
data=$root/examples/data/swissprot_3k.fasta.gz
total=$((steps + warmup))
: > "$out/results.txt"
for z in $stages; do
  dir=$out/zero$z
  rm -rf "$dir"
  log=$out/zero$z.log
  echo "== $model --zero $z on $np ranks ($total steps, first $warmup untimed)"
  # shellcheck disable=SC2086
  timeout "$timeout_s" mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$np" \
    "$helix" train --model "$model" --data "$data" --tokens-per-step "$tokens" --steps "$total" \
    --eval-batches 0 --log-interval 1 --device "$device" --zero "$z" $extra --out "$dir" > "$log" 2>&1
  rc=$?
  rm -f "$dir/model.safetensors"
  python3 - "$dir/metrics.jsonl" "$log" "$z" "$warmup" "$rc" >> "$out/results.txt" <<'PY'
import json, os, re, sys
path, log, z, warmup, rc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
text = open(log, errors="replace").read()
mem = re.search(r"parameters ([\d.]+) MiB, gradients ([\d.]+) MiB, optimizer state ([\d.]+) MiB, "
                r"peak activations ([\d.-]+) MiB", text)
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
train = [r for r in rows if r.get("kind") == "train"]
timed = [r for r in train if r["step"] > warmup]
if rc != "0" or not timed:
    why = [l for l in text.splitlines() if "error" in l.lower() or "out of memory" in l.lower()]
    print(f"{z:>5} FAILED (exit {rc}{', timed out' if rc == '124' else ''}): {(why[-1] if why else text[-200:]).strip()[:150]}")
    sys.exit()
secs = sum(r["step_seconds"] for r in timed)
toks = sum(r["tokens"] for r in timed)
peak = max(r["mem_peak_bytes"] for r in train) / 2**30
m = [float(x) / 1024 for x in mem.groups()] if mem else [float("nan")] * 4
print(f"{z:>5} {toks / secs:>9.0f} {secs / len(timed):>8.2f} {peak:>9.2f} {m[0]:>8.2f} {m[1]:>8.2f} {m[2]:>8.2f}"
      f" {m[3]:>8.2f} {train[-1]['loss']:>7.3f}")
PY
  tail -1 "$out/results.txt"
done
{
  echo
  echo "$model, $np ranks, $tokens tokens per step (all ranks), $steps timed steps after $warmup; extra flags: $extra"
  echo "per rank (rank 0), GiB: params / grads / optim = persistent buffers (exact), activ = allocator peak minus them"
  printf "%5s %9s %8s %9s %8s %8s %8s %8s %7s\n" zero "tok/s" "step s" "peak GiB" params grads optim activ loss
  cat "$out/results.txt"
} | tee "$out/table.txt"
