#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying `vqkit sweep --launcher submitit` against
# real Slurm (sbatch, squeue, scancel) without a cluster: munged, slurmctld and slurmd run
# directly (no systemd), as root, from a state folder; nothing in /etc is changed.
#
#   scripts/slurm-local.sh up       # start it (prints the SLURM_CONF to export)
#   export SLURM_CONF=/tmp/vqkit-slurm/slurm.conf
#   sinfo; sbatch --wrap hostname; squeue ...
#   scripts/slurm-local.sh down     # stop the three daemons (by their pids) and cancel jobs
#   scripts/slurm-local.sh status
#
# Needs: Debian/Ubuntu packages slurm-wlm and munge (`apt-get install -y slurm-wlm munge`),
# root. The node is this host with its CPUs (VQKIT_SLURM_CPUS, default: all) and memory;
# one partition `debug`. Process tracking is proctrack/linuxproc and tasks are not confined
# (task/none): containers usually have no writable cgroup hierarchy for slurmd.
set -euo pipefail

STATE=${VQKIT_SLURM_STATE:-/tmp/vqkit-slurm}
CONF=$STATE/slurm.conf
HOST=$(hostname -s)
CPUS=${VQKIT_SLURM_CPUS:-$(nproc)}

die() { echo "slurm-local: $*" >&2; exit 2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null ||
    die "slurm-wlm and munge are not installed (apt-get install -y slurm-wlm munge)"
  [ "$(id -u)" = 0 ] || die "run as root (slurmd starts jobs as their users)"
  if alive "$STATE/slurmctld.pid"; then echo "slurm-local: already up; export SLURM_CONF=$CONF"; return; fi
  mkdir -p "$STATE"/{ctld,spool,log}
  [ -f "$STATE/munge.key" ] || mungekey --create --keyfile="$STATE/munge.key"
  chmod 600 "$STATE/munge.key"
  local mem
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$CONF" <<EOF
ClusterName=vqkit-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=${VQKIT_SLURM_PORT:-6917}
SlurmdPort=$(( ${VQKIT_SLURM_PORT:-6917} + 1 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=30
NodeName=$HOST CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  # --force: munged refuses to run as root otherwise
  munged --force --socket="$STATE/munge.socket" --key-file="$STATE/munge.key" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge.seed"
  slurmctld -f "$CONF" -i   # -i: forget jobs of an earlier run of this folder
  slurmd -f "$CONF"
  export SLURM_CONF=$CONF
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "slurm-local: up: node $HOST ($CPUS CPUs), partition debug"
      echo "export SLURM_CONF=$CONF"
      return
    fi
    sleep 1
  done
  sinfo >&2 || true
  die "the node did not come up; see $STATE/log/"
}

down() {
  if [ -f "$CONF" ] && alive "$STATE/slurmctld.pid"; then
    SLURM_CONF=$CONF scancel --full --user=root 2>/dev/null || true
  fi
  for d in slurmd slurmctld munged; do
    if alive "$STATE/$d.pid"; then
      pid=$(cat "$STATE/$d.pid")
      kill -TERM "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$STATE/$d.pid"
  done
  echo "slurm-local: down"
}

status() {
  for d in munged slurmctld slurmd; do
    if alive "$STATE/$d.pid"; then echo "$d: running (pid $(cat "$STATE/$d.pid"))"; else echo "$d: stopped"; fi
  done
  if alive "$STATE/slurmctld.pid"; then SLURM_CONF=$CONF sinfo; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
