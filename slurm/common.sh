# Shared launch logic of slurm/*.sbatch (sourced, not run). See slurm/README.md for the variables.
#
# hg_init STAGE ARGS...   cd to the repository, activate the environment, check CONFIG and the
#                         overrides (exit 2 with one line naming the bad one), set RUN_DIR, copy
#                         this job's log into $RUN_DIR/slurm/
# hg_train MODULE KEY     one `accelerate launch` per node through srun + jobs.launch; a job without
#                         GPUs needs KEY.cpu=true in the config (exit 2 naming it otherwise: a GPU
#                         config is never moved to the CPU silently); the time-limit signal becomes
#                         "checkpoint, then requeue";
#                         srun gets the job's --cpus-per-task (a warning when fewer than hg_task_cpus)
# hg_task_cpus GPUS W     CPUs a node's task needs: max(GPUS, 1) x (W + 1)
# hg_run CMD...           a single-process stage (pack, evaluate) with the same signal handling

# The sbatch copy of the script runs from Slurm's spool, so paths start at the submit directory.
HYBRIDGAN_ROOT="${HYBRIDGAN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
HYBRIDGAN_ACTIVATE="${HYBRIDGAN_ACTIVATE-source .venv/bin/activate}"
CONFIG="${CONFIG:-configs/paper.yaml}"
OVERRIDES="${OVERRIDES:-}"

hg_die() {
  echo "$HG_STAGE.sbatch: $*" >&2
  exit 2
}

hg_init() {
  HG_STAGE="$1"
  shift
  cd "$HYBRIDGAN_ROOT" || hg_die "HYBRIDGAN_ROOT=$HYBRIDGAN_ROOT: no such directory"
  if [ -n "$HYBRIDGAN_ACTIVATE" ]; then
    eval "$HYBRIDGAN_ACTIVATE" || hg_die "HYBRIDGAN_ACTIVATE='$HYBRIDGAN_ACTIVATE' failed"
  fi
  # a file, or the name of a config shipped in the package (paper, smoke-cpu, ...), resolved below
  [ -f "$CONFIG" ] || [[ "$CONFIG" != */* && "$CONFIG" != *.yaml ]] ||
    hg_die "CONFIG=$CONFIG: config file not found (relative to $HYBRIDGAN_ROOT)"
  if [ -n "${ACCELERATE_CONFIG:-}" ] && [ ! -f "$ACCELERATE_CONFIG" ]; then
    hg_die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG: file not found (relative to $HYBRIDGAN_ROOT)"
  fi
  local extra
  read -ra extra <<<"$OVERRIDES"
  HG_OVERRIDES=("${extra[@]}" "$@")
  # One line per bad key/value, from the same loader the stages use; sets RUN_DIR, CFG_SOURCE,
  # CFG_SHARDS, CFG_WORKERS, CFG_PRETRAIN_CPU, CFG_TRAIN_CPU.
  local resolved err
  err="$(mktemp)"
  resolved="$(python - "$CONFIG" "${HG_OVERRIDES[@]}" 2>"$err" <<'EOF'
import shlex, sys
from hybridgan.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as err:
    sys.exit(f"config error: {err}")
print(f"RUN_DIR={shlex.quote(f'{cfg.run.root}/{cfg.run.name}')}")
print(f"CFG_SOURCE={shlex.quote(cfg.data.source)}")
print(f"CFG_SHARDS={shlex.quote(cfg.data.shards)}")
print(f"CFG_WORKERS={cfg.data.workers}")
print(f"CFG_PRETRAIN_CPU={str(cfg.pretrain.cpu).lower()}")
print(f"CFG_TRAIN_CPU={str(cfg.train.cpu).lower()}")
EOF
)" || hg_die "$(tail -n 1 "$err")"
  rm -f "$err"
  eval "$resolved"
  hg_log_to_run_dir
  echo "[slurm] job ${SLURM_JOB_ID:-none} ($HG_STAGE) on ${SLURM_JOB_NODELIST:-$(hostname -s)}:" \
    "nodes=${SLURM_NNODES:-1} restarts=${SLURM_RESTART_COUNT:-0} config=$CONFIG run=$RUN_DIR"
}

hg_log_to_run_dir() {
  # #SBATCH --output cannot expand variables: keep Slurm's file and append a copy in the run folder.
  # tee ignores the job's signals so that the last lines of a checkpointing stage still arrive.
  local log="$RUN_DIR/slurm/${SLURM_JOB_NAME:-$HG_STAGE}-${SLURM_JOB_ID:-local}.out"
  mkdir -p "$RUN_DIR/slurm"
  exec > >(trap '' TERM INT USR1; exec tee -a "$log") 2>&1
}

hg_gpus_per_node() {
  echo "${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
}

hg_task_cpus() {
  # Every process (one per GPU, one in CPU mode) runs its loop plus W DataLoader workers, each busy
  # decoding JPEGs. The same rule as jobs.launch.task_cpus (used by jobs.submit).
  local gpus="$1" workers="$2"
  echo $(( (gpus > 0 ? gpus : 1) * (workers + 1) ))
}

hg_default_accelerate_config() {
  local gpus="$1" nodes="$2"
  if [ "$gpus" -eq 0 ]; then
    echo ""
  elif [ "$nodes" -gt 1 ]; then
    echo "configs/accelerate/multi-node.yaml"
  elif [ "$gpus" -gt 1 ]; then
    echo "configs/accelerate/multi-gpu.yaml"
  else
    echo "configs/accelerate/single-gpu.yaml"
  fi
}

HG_REQUEUE=0
HG_CHILD=""

hg_on_usr1() {
  # --signal=B:USR1@T reaches this shell alone: ask every step's processes to checkpoint
  # (the stages turn SIGTERM into "checkpoint, then exit"), then requeue once they are done.
  echo "[slurm] USR1 (time limit near): checkpointing, then requeue" >&2
  HG_REQUEUE=1
  scancel --signal=TERM "$SLURM_JOB_ID"
}

hg_on_term() {
  # scancel, scontrol requeue, preemption: Slurm signals the steps itself; wait for their checkpoint.
  echo "[slurm] TERM: waiting for the stage to checkpoint" >&2
}

hg_wait_child() {
  local rc
  while :; do
    wait "$HG_CHILD"
    rc=$?
    kill -0 "$HG_CHILD" 2>/dev/null || break
  done
  wait "$HG_CHILD" 2>/dev/null
  rc=$?
  # A stage that finished anyway (exit 0) is done; any other exit after USR1 is the checkpoint stop.
  if [ "$HG_REQUEUE" -eq 1 ] && [ "$rc" -ne 0 ]; then
    echo "[slurm] stage stopped (exit $rc); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$rc"
}

hg_run() {
  trap hg_on_usr1 USR1
  trap hg_on_term TERM
  echo "[slurm] running: $*"
  "$@" &
  HG_CHILD=$!
  hg_wait_child
}

hg_train() {
  local module="$1" key="$2" gpus nodes main_ip needed cpus on_cpu
  gpus="$(hg_gpus_per_node)"
  on_cpu="CFG_${key^^}_CPU"
  if [ "$gpus" -eq 0 ] && [ "${!on_cpu}" != true ]; then
    hg_die "no GPUs on this job (--gpus-per-node=0) but $CONFIG trains $key on GPUs ($key.cpu=false):" \
      "ask for GPUs (--gpus-per-node N), or pass $key.cpu=true to train on CPUs"
  fi
  nodes="${SLURM_NNODES:-1}"
  needed="$(hg_task_cpus "$gpus" "$CFG_WORKERS")"
  cpus="${SLURM_CPUS_PER_TASK:-1}"
  echo "[slurm] $cpus CPUs per task; $(( gpus > 0 ? gpus : 1 )) processes x" \
    "(data.workers=$CFG_WORKERS + 1) need $needed"
  if [ "$cpus" -lt "$needed" ]; then
    echo "[slurm] warning: fewer CPUs than loader processes, training will wait on data:" \
      "submit with --cpus-per-task=$needed or lower data.workers" >&2
  fi
  ACCELERATE_CONFIG="${ACCELERATE_CONFIG-$(hg_default_accelerate_config "$gpus" "$nodes")}"
  local args=(--config "$CONFIG" "${HG_OVERRIDES[@]}")
  main_ip="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  export GPUS_PER_NODE="$gpus" ACCELERATE_CONFIG
  # jobs.launch renders the accelerate line from each node's SLURM_NODEID and prints it.
  # --cpus-per-task explicitly: since Slurm 22.05 srun does not inherit the job's value.
  hg_run srun --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
    python -m jobs.launch --main-ip "$main_ip" -m "$module" "${args[@]}"
}
