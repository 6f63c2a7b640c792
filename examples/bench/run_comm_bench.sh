#!/usr/bin/env bash
# Communicator bus bandwidth, helix (tests/bench/comm.cpp) against NCCL through torch.distributed
# (examples/bench/comm_torch.py), one process per GPU, NVLink multicast off, same run:
#   examples/bench/run_comm_bench.sh BUILD_DIR [NP] [extra args for both, e.g. --max-mb 256]
# Writes helix.jsonl, torch.jsonl and table.txt to $OUT_DIR (default: a temporary folder).
set -uo pipefail
build=${1:?usage: run_comm_bench.sh BUILD_DIR [NP] [ARGS]}
np=${2:-$(nvidia-smi -L 2>/dev/null | wc -l)}
shift 2 2>/dev/null || shift $#
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
mpi=(mpirun --oversubscribe --bind-to none -np "$np" -x NCCL_NVLS_ENABLE)
"${mpi[@]}" "$build/tests/helix_bench_comm" "$@" > "$out/helix.jsonl" || { echo "helix_bench_comm failed"; exit 1; }
"${mpi[@]}" python3 "$root/examples/bench/comm_torch.py" "$@" > "$out/torch.jsonl" || { echo "comm_torch.py failed"; exit 1; }
python3 - "$out" <<'PY' | tee "$out/table.txt"
import json, sys
out = sys.argv[1]
def load(p):
    return {(r["op"], r["bytes"]): r for r in map(json.loads, filter(str.strip, open(p)))}
h, t = load(f"{out}/helix.jsonl"), load(f"{out}/torch.jsonl")
first = next(iter(h.values()))
print(f"helix ({first['backend']}, {first['ranks']} ranks) vs NCCL via torch.distributed: bus bandwidth GB/s")
print(f"{'op':<11} {'MB':>8} {'helix':>8} {'torch':>8} {'ratio':>6}")
for key in sorted(h, key=lambda k: (k[0], k[1])):
    if key in t:
        a, b = h[key]["busbw_gbps"], t[key]["busbw_gbps"]
        print(f"{key[0]:<11} {key[1] / 2**20:>8.0f} {a:>8.1f} {b:>8.1f} {a / b if b else float('nan'):>6.2f}")
PY
echo "results in $out"
