#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the tests: start | stop | status.
#
#   tests/slurm_cluster.sh start    install (apt) when missing, write slurm.conf, start munged,
#                                   slurmctld and slurmd as root without systemd, wait for the node
#   tests/slurm_cluster.sh stop     stop the daemons this script started
#   tests/slurm_cluster.sh status   exit 0 when the node answers `sinfo`
#
# State lives in $HYBRIDGAN_SLURM_DIR (default /tmp/hybridgan-slurm). `start` writes
# $HYBRIDGAN_SLURM_DIR/env (`export SLURM_CONF=...`) for the tests to read; when Slurm cannot be
# started it writes the reason to $HYBRIDGAN_SLURM_DIR/unavailable and exits non-zero: 3 when this
# machine cannot have Slurm at all (no apt-get, not root: tests skip with the reason), 1 otherwise.
# CPU only, no cgroups, no accounting daemon (`scontrol show job` works, `sacct` does not).
set -euo pipefail

dir="${HYBRIDGAN_SLURM_DIR:-/tmp/hybridgan-slurm}"
conf="$dir/slurm.conf"
timeout_s="${HYBRIDGAN_SLURM_TIMEOUT:-60}"
node="$(hostname -s)"

log() { echo "[slurm_cluster] $*" >&2; }

fail() {
  mkdir -p "$dir"
  echo "$*" > "$dir/unavailable"
  log "error: $*"
  exit "${HG_FAIL_CODE:-1}"
}

unavailable() {
  HG_FAIL_CODE=3 fail "$@"
}

install_packages() {
  local missing=()
  for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || unavailable "Slurm is not installed (${missing[*]} missing) and installing it needs root"
  command -v apt-get >/dev/null 2>&1 || unavailable "Slurm is not installed (${missing[*]} missing) and apt-get is not available"
  log "installing slurmctld slurmd slurm-client munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$dir/apt.log" 2>&1 || unavailable "apt-get update failed (see $dir/apt.log)"
  apt-get install -y -qq slurmctld slurmd slurm-client munge >>"$dir/apt.log" 2>&1 \
    || unavailable "apt-get install slurmctld slurmd slurm-client munge failed (see $dir/apt.log)"
}

write_conf() {
  # `slurmd -C` prints this host's "NodeName=... CPUs=... RealMemory=..." line.
  local hw cpus mem
  hw="$(/usr/sbin/slurmd -C | head -1)"
  cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
  mem="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat > "$conf" <<EOF
# Written by tests/slurm_cluster.sh: a one-node CPU test cluster.
ClusterName=hybridgan
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
$hw
PartitionName=cpu Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if pgrep -u munge -x munged >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
}

node_idle() {
  SLURM_CONF="$conf" sinfo -h -n "$node" -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'
}

cmd_start() {
  mkdir -p "$dir"
  rm -f "$dir/unavailable"
  if [ -f "$conf" ] && running "$dir/slurmctld.pid" && running "$dir/slurmd.pid" && node_idle; then
    log "already running (SLURM_CONF=$conf)"
    write_env
    return 0
  fi
  install_packages
  [ "$(id -u)" -eq 0 ] || unavailable "starting slurmctld/slurmd/munged needs root"
  cmd_stop quiet
  write_conf
  start_munge
  SLURM_CONF="$conf" /usr/sbin/slurmctld -i || fail "slurmctld did not start (see $dir/log/slurmctld.log)"
  SLURM_CONF="$conf" /usr/sbin/slurmd || fail "slurmd did not start (see $dir/log/slurmd.log)"
  local waited=0
  until node_idle; do
    if [ "$waited" -ge "$timeout_s" ]; then
      fail "node $node not idle after ${timeout_s}s: $(SLURM_CONF="$conf" sinfo -h -o '%n %t %E' 2>&1 | head -1) (logs in $dir/log)"
    fi
    # A node left down/drained by an earlier run comes back with resume.
    SLURM_CONF="$conf" scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    sleep 1
    waited=$((waited + 1))
  done
  write_env
  log "node $node idle after ${waited}s; export SLURM_CONF=$conf (also in $dir/env)"
}

write_env() {
  echo "export SLURM_CONF=$conf" > "$dir/env"
  echo "SLURM_CONF=$conf"
}

cmd_stop() {
  local pidfile
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
    if running "$pidfile"; then
      kill "$(cat "$pidfile")"
      for _ in $(seq 20); do running "$pidfile" || break; sleep 0.25; done
    fi
    rm -f "$pidfile"
  done
  rm -f "$dir/env"
  [ "${1:-}" = quiet ] || log "stopped slurmctld and slurmd ($dir kept)"
}

cmd_status() {
  if [ -f "$conf" ] && node_idle; then
    SLURM_CONF="$conf" sinfo
    return 0
  fi
  log "not running"
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
