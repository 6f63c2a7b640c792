#!/usr/bin/env bash
# Fails when a file includes a header of a layer above its own (core <- kernels <- parallel <- layers
# <- launch) or when kernels/ includes NCCL or MPI. Usage: check_layering.sh ROOT | --self-test
set -u
rank() { case $1 in core) echo 0;; kernels) echo 1;; parallel) echo 2;; layers) echo 3;; launch) echo 4;; *) echo 9;; esac; }

check_tree() {
  local root=$1 bad=0
  for d in core kernels parallel layers launch; do
    [ -d "$root/$d" ] || continue
    local r; r=$(rank $d)
    while IFS= read -r line; do
      [ -n "$line" ] || continue
      local f=${line%%:*}
      local inc; inc=$(printf '%s' "$line" | sed -E 's/.*#[[:space:]]*include[[:space:]]*[<"]([^>"]+)[>"].*/\1/')
      inc=${inc#helix/}
      while [ "${inc#../}" != "$inc" ]; do inc=${inc#../}; done
      local t; t=$(rank "${inc%%/*}")
      if [ "$t" != 9 ] && [ "$t" -gt "$r" ]; then
        echo "layering: ${f#$root/} includes $inc (a $d file may not include from ${inc%%/*})"; bad=1
      fi
      if [ "$d" = kernels ] && printf '%s' "$inc" | grep -qE '^(nccl|mpi)\.h$'; then
        echo "layering: ${f#$root/} includes $inc (kernels never include NCCL or MPI)"; bad=1
      fi
    done < <(grep -rHE '^[[:space:]]*#[[:space:]]*include' "$root/$d" --include='*.h' --include='*.hpp' \
               --include='*.cuh' --include='*.cpp' --include='*.cu' 2>/dev/null)
  done
  return $bad
}

if [ "${1:-}" = --self-test ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/core" "$tmp/kernels" "$tmp/layers"
  echo '#include "layers/model.h"' > "$tmp/core/bad.h"
  echo '#include <nccl.h>' > "$tmp/kernels/bad.cu"
  echo '#include "core/tensor.h"' > "$tmp/layers/good.h"
  out=$(check_tree "$tmp") && { echo "self-test: planted violations were not detected"; exit 1; }
  n=$(printf '%s\n' "$out" | grep -c '^layering:')
  [ "$n" = 2 ] || { echo "self-test: expected 2 violations, got $n:"; echo "$out"; exit 1; }
  echo "self-test: both planted violations detected"; exit 0
fi
check_tree "${1:?usage: check_layering.sh ROOT | --self-test}" && echo "layering: ok"
