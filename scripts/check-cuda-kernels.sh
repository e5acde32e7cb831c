#!/usr/bin/env bash
# Compiles every CUDA kernel of pcpp-kernels with NVRTC, on a machine without a GPU or CUDA.
# Installs NVRTC (and the CUDA 13.0 headers) from PyPI into .venv-nvrtc/ (ignored by git), points
# the dynamic loader at libnvrtc and runs pcpp-kernels' tests with the `cuda` feature, including
# the ignored `nvrtc_compile` test (the GPU parity tests stay ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-nvrtc
PKGS=("nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*")
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip show nvidia-cuda-nvrtc >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PKGS[@]}"
fi
LIBDIR=$(dirname "$(find "$PWD/$VENV" -name 'libnvrtc.so.13' | head -n 1)")
if [ ! -f "$LIBDIR/libnvrtc.so.13" ]; then
    echo "check-cuda-kernels: libnvrtc.so.13 not found under $VENV" >&2
    exit 1
fi
export LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The CUDA build and its GPU-free tests (start-up probe), then the kernel compile check.
cargo test -p pcpp-kernels --features cuda
cargo test -p pcpp-kernels --features cuda --test nvrtc_compile -- --ignored
