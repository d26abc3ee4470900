#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying `oneshot sweep --executor slurm` and for its test.
#
#   sudo apt-get install -y slurm-wlm munge      # Debian/Ubuntu packages
#   sudo scripts/slurm-single-node.sh start       # writes /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd
#   sudo scripts/slurm-single-node.sh status
#   sudo scripts/slurm-single-node.sh stop
#
# The node offers this machine's CPUs and most of its memory in one partition, `debug`. Jobs are tracked
# as plain processes (no cgroups), so it also runs in containers and VMs without systemd. Running it
# again when the cluster is up changes nothing. It overwrites an existing slurm.conf only if that file
# was written by this script.
set -euo pipefail

action=${1:-start}
conf=/etc/slurm/slurm.conf
marker="# written by oneshot scripts/slurm-single-node.sh"
node=$(hostname -s)

need() { command -v "$1" >/dev/null || { echo "slurm-single-node: $1 not found; apt-get install -y slurm-wlm munge" >&2; exit 2; }; }

write_conf() {
  if [[ -f $conf ]] && ! grep -qF "$marker" "$conf"; then
    echo "slurm-single-node: $conf exists and was not written by this script; leaving it alone" >&2
    return
  fi
  local cpus mem_mb
  cpus=$(nproc --all)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$conf" <<EOF
$marker
ClusterName=oneshot
SlurmctldHost=$node
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  need munged; need slurmctld; need slurmd
  [[ $(id -u) -eq 0 ]] || { echo "slurm-single-node: run as root (sudo)" >&2; exit 2; }
  write_conf
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! running /run/munge/munged.pid; then
    [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key; chown munge:munge /etc/munge/munge.key; }
    su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid" 2>/dev/null || runuser -u munge -- munged
  fi
  running /run/slurmctld.pid || slurmctld
  running /run/slurmd.pid || slurmd
  for _ in $(seq 60); do  # the node registers within a few seconds
    if sinfo -h -N -o "%T" 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
      scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
      echo "slurm-single-node: up ($(sinfo -h -o '%P %D node(s) %c CPUs %T'))"
      return
    fi
    if sinfo -h -N -o "%T" 2>/dev/null | grep -qE "^(down|drained)"; then
      scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 1
  done
  echo "slurm-single-node: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
  sinfo -N -l >&2 || true
  exit 1
}

stop() {
  for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
  done
  echo "slurm-single-node: stopped"
}

case $action in
  start) start ;;
  stop) stop ;;
  status) sinfo -N -l ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
