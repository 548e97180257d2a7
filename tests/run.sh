#!/usr/bin/env bash
# The test command (README, CI): set up .venv, start a real one-node Slurm, run pytest on two workers, stop Slurm.
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
# Two workers, a test file each at a time (pytest-xdist): half the suite's time is spent waiting on
# processes it started. HYBRIDGAN_TEST_WORKERS=0 runs everything in this one process.
python -m pytest -n "${HYBRIDGAN_TEST_WORKERS:-2}" --dist loadfile "$@"
