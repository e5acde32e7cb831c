#!/usr/bin/env bash
# CI for the process-based transports of pcpp-comm (MPI and UCX).
#
# Installs the system packages the `mpi` and `ucx` features build against
# (Debian/Ubuntu: Open MPI, UCX, pkg-config, libclang for bindgen) when they
# are missing, then runs the pcpp-comm tests with both features: the
# conformance suite under `mpirun --oversubscribe -n 2, 3, 4`, UCX with 1-4
# ranks over loopback (tcp and shared memory) through the TCP rendezvous and
# bootstrapped over MPI, and the failure paths (abort, panic, dead peer).
#
# Usage: scripts/ci-comm.sh            (from anywhere inside the repository)
# Environment: SKIP_APT=1 skips the package installation; CI_COMM_MPICH=1 also
# builds against MPICH (libmpich-dev, in a separate target directory, several
# minutes more) and runs the MPI tests under its mpirun.
set -euo pipefail

cd "$(dirname "$0")/.."

PACKAGES=(libopenmpi-dev openmpi-bin libucx-dev pkg-config libclang-dev clang)
if [[ "${CI_COMM_MPICH:-0}" == 1 ]]; then
    PACKAGES+=(libmpich-dev mpich)
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 && "${SKIP_APT:-0}" != 1 ]]; then
    echo "ci-comm: installing ${missing[*]}"
    if [[ $(id -u) -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null; then
        SUDO=(sudo)
    else
        echo "ci-comm: need root (or sudo) to install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Open MPI refuses to start as root without these; the tests also pass
# --allow-run-as-root themselves.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

echo "ci-comm: $(mpirun --version 2>&1 | head -n 1); UCX $(pkg-config --modversion ucx)"

# Each feature on its own must build (the CLI enables them separately).
cargo build -p pcpp-comm --features mpi
cargo build -p pcpp-comm --features ucx

# The GPU example of the MPI / UCX device exchanges compiles without a GPU (CUDA loads at run time).
cargo build -p pcpp-comm --features mpi,ucx,cuda --example device_comm

# Unit tests, local conformance, MPI and UCX multi-process tests (with the device-memory cases on
# host streams, staged and CUDA-aware paths forced).
cargo test -p pcpp-comm --features mpi,ucx
if [[ "${CI_COMM_MPICH:-0}" == 1 ]]; then
    echo "ci-comm: MPICH $(mpichversion 2>/dev/null | head -n 1)"
    MPICC=mpicc.mpich PCPP_TEST_MPIRUN=mpirun.mpich \
        CARGO_TARGET_DIR="${CI_COMM_MPICH_TARGET:-target/mpich}" \
        cargo test -p pcpp-comm --features mpi --test mpi_conformance
fi
echo "ci-comm: ok"
