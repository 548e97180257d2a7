#!/usr/bin/env bash
# The test command (README, CI): set up .venv, start a real one-node Slurm, run pytest, stop Slurm.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source jobs/setup_env.sh
if [ -x tests/slurm_cluster.sh ]; then
  if tests/slurm_cluster.sh start; then
    trap 'tests/slurm_cluster.sh stop || true' EXIT
  else
    echo "[tests] Slurm could not be started; Slurm tests will be skipped with the reason" >&2
  fi
fi
python -m pytest "$@"
