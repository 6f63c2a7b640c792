#!/usr/bin/env bash
# Installs what helix needs from Debian's packages, skipping what is already there.
# The CUDA toolkit (nvcc, cuBLASLt, NCCL) is used when present; without it helix builds CPU-only.
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config libopenmpi-dev openmpi-bin libboost-program-options-dev
      libfmt-dev libgtest-dev libopenblas-dev zlib1g-dev python3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
