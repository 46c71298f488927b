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
echo "mdopt: dependencies present"
