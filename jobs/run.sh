#!/usr/bin/env bash
# README command 1: the whole chain (pack -> pretrain -> train hybrid + pathak -> evaluate -> report).
#   bash jobs/run.sh                      built-in synthetic faces, small CPU config, a few minutes
#   bash jobs/run.sh /data/celeba-hq      a CelebA-HQ folder or .zip, the paper's settings
# Extra arguments after the path are dotted config overrides (train.epochs=2 ...).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source jobs/setup_env.sh
if [ $# -eq 0 ] || [[ "$1" == *=* ]]; then
  exec python -m hybridgan.reproduce --config configs/smoke-cpu.yaml "$@"
fi
data="$1"; shift
exec python -m hybridgan.reproduce --config configs/paper.yaml --data "$data" "$@"
