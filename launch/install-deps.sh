#!/usr/bin/env bash
# Installs everything mdopt needs to build and test on a fresh Debian machine (run as root).
# Idempotent: apt-get install -y skips what is present; apt-get update runs once per day.
set -euo pipefail

pkgs=(
  build-essential cmake pkg-config git python3
  libabsl-dev libcli11-dev libgtest-dev libgmock-dev
  libopenblas-openmp-dev libomp-dev libdnnl-dev
  nlohmann-json3-dev
  libopenmpi-dev openmpi-bin
  # A single-node Slurm for tests/launch/slurm_test.sh (sbatch launch/slurm.sbatch): the
  # daemons, the client commands and munge; the daemons are started by the test only.
  slurmctld slurmd slurm-client munge
  # Network namespaces and veths (ip) and a UTS namespace per stand-in host (unshare) for
  # tests/dist/host_fault_test.sh: hosts joined over TCP on one machine.
  iproute2 util-linux
  fortunes fortune-mod  # English text the examples train on (integration/examples)
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  stamp=/var/lib/apt/periodic/mdopt-update-stamp
  update() {
    $SUDO apt-get update
    $SUDO mkdir -p "$(dirname "$stamp")" && $SUDO touch "$stamp"
  }
  if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ]; then
    update
  fi
  install() { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; }
  # Package lists can be gone even when our stamp is fresh (a cleaned image): refresh once.
  install || { update && install; }
fi
# The Python tests (integration/python) need pytest, numpy and torch in the python3 that
# runs them (the first on PATH, or $MDOPT_PYTHON): installed with pip when missing (torch
# 2.15.0, the release the tests and docs were measured with: PyPI's default build, which
# brings its CUDA libraries, about 5 GB, also on a machine without a GPU; a CPU-only torch
# installed beforehand is kept; docs/integration.md). PIP_BREAK_SYSTEM_PACKAGES lets pip install into Debian's own python3 too
# (a CI machine as root); a pyenv or venv python ignores it. Offline, the tests skip.
py="${MDOPT_PYTHON:-python3}"
if ! "$py" -c 'import pytest, numpy, torch' 2>/dev/null; then
  if ! "$py" -m pip --version >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends python3-pip || true
  fi
  pip_install() { PIP_BREAK_SYSTEM_PACKAGES=1 "$py" -m pip install --quiet "$@"; }
  "$py" -c 'import pytest' 2>/dev/null || pip_install pytest || true
  "$py" -c 'import numpy' 2>/dev/null || pip_install numpy || true
  if ! "$py" -c 'import torch' 2>/dev/null; then
    # pip is quiet (its progress bars fill CI logs): say what the silence is.
    echo "mdopt: installing torch 2.15.0 for $py with pip (about 5 GB with its CUDA libraries;"
    echo "       minutes on a fast link, nothing is printed meanwhile)"
    pip_install torch==2.15.0 || true
  fi
  "$py" -c 'import pytest, numpy, torch' 2>/dev/null ||
    echo "mdopt: pytest, numpy or torch could not be installed for $py; the Python tests will skip"
fi
# The examples (integration/examples) draw a progress bar and plots, and mdopt-sim --plot
# (integration/tools/sim/plot_sim.py) its PNGs: tqdm, matplotlib.
if ! "$py" -c 'import tqdm, matplotlib' 2>/dev/null; then
  PIP_BREAK_SYSTEM_PACKAGES=1 "$py" -m pip install --quiet tqdm matplotlib ||
    echo "mdopt: tqdm or matplotlib could not be installed for $py; the examples need them"
fi
# Megatron-Core for the adapter's tests (integration/python/tests/test_megatron.py): 0.16.1,
# the newest release for Python 3.11 (0.17 on need 3.12). Only next to an installed torch
# (above), which megatron-core would otherwise pull in; the tests skip without it.
megatron_core=0.16.1
# Exit status 0: torch is there and megatron-core is absent or another version.
if "$py" -c 'import sys, importlib.metadata as m
m.version("torch")
try:
    sys.exit(m.version("megatron-core") == sys.argv[1])
except m.PackageNotFoundError:
    pass' "$megatron_core" >/dev/null 2>&1; then
  PIP_BREAK_SYSTEM_PACKAGES=1 "$py" -m pip install --quiet --root-user-action=ignore \
    "megatron-core==$megatron_core" \
    || echo "mdopt: megatron-core $megatron_core did not install; its tests will skip" >&2
fi
echo "mdopt: dependencies present"
