#!/usr/bin/env bash
# One call on a GPU machine: configure + build (CUDA, sm_90a), run every test, then the kernel
# benchmarks. Logs go to $OUT (or ./gpu_check_out). Used for the numbers in docs/perf/.
#   examples/scripts/gpu_check.sh [tests|bench|all|train|fp8]
# Where Boost.Program_options is not installed as a library (the GPU image), point
# HELIX_BOOST_PO_SOURCES at its
# src/*.cpp (same Boost version as the headers; examples/scripts/fetch_boost_po_sources.sh fetches
# them into .carry/boost_po) and it is compiled into the build.
set -uo pipefail
what=${1:-all}
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$root/gpu_check_out}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
po=()
[ -n "${HELIX_BOOST_PO_SOURCES:-}" ] && po=(-DHELIX_BOOST_PO_SOURCES="$HELIX_BOOST_PO_SOURCES")
cmake -S "$root" -B "$root/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release "${po[@]}" > "$out/configure.log" 2>&1 ||
  { tail -30 "$out/configure.log"; exit 1; }
ninja -C "$root/build-gpu" > "$out/build.log" 2>&1 || { grep -E "error" -A3 "$out/build.log" | head -60; exit 1; }
echo "build ok"
if [ "$what" = tests ] || [ "$what" = all ]; then
  (cd "$root/build-gpu" && ctest -j4 --timeout 300 --output-on-failure ${CTEST_ARGS:-} > "$out/ctest.log" 2>&1)
  grep -E "tests passed|\*\*\*Failed|Timeout" "$out/ctest.log" | head -40
fi
if [ "$what" = train ]; then
  OUT_DIR="$out/train" timeout 560 bash "$root/examples/bench/run_training_bench.sh" "$root/build-gpu" ${TRAIN_ARGS:-} \
    > "$out/bench_training.txt" 2>&1
  tail -30 "$out/bench_training.txt"
fi
if [ "$what" = fp8 ]; then  # FP8 vs bf16 training, docs/perf/fp8.md
  OUT_DIR="$out/fp8" timeout 560 bash "$root/examples/bench/run_fp8_bench.sh" "$root/build-gpu" ${FP8_ARGS:-} \
    > "$out/bench_fp8.txt" 2>&1
  tail -30 "$out/bench_fp8.txt"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 240 "$root/build-gpu/tests/helix_bench_kernels_gemm" > "$out/bench_gemm.txt" 2>&1
  timeout 240 "$root/build-gpu/tests/helix_bench_kernels_memory" > "$out/bench_memory.txt" 2>&1
  OUT_DIR="$out/attention" timeout 300 bash "$root/examples/bench/run_attention_bench.sh" "$root/build-gpu" \
    > "$out/bench_attention.txt" 2>&1
  tail -20 "$out/bench_attention.txt"
fi
