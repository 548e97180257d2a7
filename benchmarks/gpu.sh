#!/usr/bin/env bash
# The day a GPU is lent: the train step at the paper's size for fp32/bf16 x eager/compiled x the hybrid
# and Pathak discriminators, on the real loader, into benchmarks/results/<device>.json (MFU, peak GPU
# memory, data-wait share, the GPU's own matmul rates). About 8 minutes on one GPU; each cell is written
# as soon as it is measured, and cells left when the budget is spent are recorded as skipped.
#
#   bash benchmarks/gpu.sh                  # one GPU; BATCH (default 64) and SHARDS may be set
#   bash benchmarks/gpu.sh --cpu-dry-run    # the same logic on the CPU at tiny sizes, eager cells only
#                                           # (compiling ResNet50 on a CPU takes minutes)
#   extra arguments go to `python -m hybridgan.bench matrix` (e.g. --steps 10, key=value overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then source .venv/bin/activate; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY_RUN=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY_RUN=1; shift; fi

if [[ $DRY_RUN == 0 ]] && ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: benchmarks/gpu.sh needs a CUDA GPU and torch sees none (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1));" \
       "run 'bash benchmarks/gpu.sh --cpu-dry-run' to check the script on the CPU" >&2
  exit 2
fi

SHARDS="${SHARDS:-${TMPDIR:-/tmp}/hybridgan-gpu-bench-shards}"
if [[ $DRY_RUN == 1 ]]; then
  CONFIG=configs/smoke-cpu.yaml
  SIZES=(--cpu --no-compile --batch-size 4 --steps 1 --warmup 1 --rate-size 128 --budget-s "${BUDGET_S:-60}"
         data.image_size=32 mask.hole_size=16 generator.base_channels=8 generator.bottleneck=32
         discriminator.decoder_width=4 discriminator.pathak_channels=8 data.workers=1 data.shuffle_buffer=20)
  IMAGES=80
else
  CONFIG=configs/paper.yaml
  SIZES=(--batch-size "${BATCH:-64}" --steps 20 --warmup 5 --budget-s "${BUDGET_S:-400}" data.workers=8)
  IMAGES=2048
fi
if [[ ! -f "$SHARDS/manifest.json" ]]; then
  # shards of 64: every loader worker gets shards of its own
  python -m hybridgan.pack "synthetic:$IMAGES" --out "$SHARDS" --config "$CONFIG" --workers "$(nproc)" pack.shard_size=64
fi
# a hard stop below 8 minutes; the JSON holds every cell finished before it
timeout "${TIMEOUT_S:-470}" python -m hybridgan.bench matrix --config "$CONFIG" "${SIZES[@]}" \
  "data.shards=$SHARDS" "discriminator.from_scratch=true" "$@"
