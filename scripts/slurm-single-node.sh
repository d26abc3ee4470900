#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying `oneshot sweep --executor slurm` and for its test.
#
#   sudo apt-get install -y slurm-wlm munge      # Debian/Ubuntu packages
#   sudo scripts/slurm-single-node.sh start       # writes /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd
#   scripts/slurm-single-node.sh status
#   sudo scripts/slurm-single-node.sh stop
#
# The node offers this machine's CPUs and most of its memory in one partition, `debug`. Jobs are tracked
# as plain processes (no cgroups), so it also runs in containers and VMs without systemd. `start` works on
# a fresh machine (it creates the munge key and the directories the daemons need if they are missing) and
# is idempotent: run again while the cluster is up, it changes nothing; if slurm.conf had to change, it
# restarts the Slurm daemons it started. It overwrites an existing slurm.conf only if that file was written
# by this script. CI (.ci/run) installs the packages and runs `start` before the tests; the Slurm test
# (tests/test_executors.py) only checks that a controller answers, and skips where none does.
set -euo pipefail

action=${1:-start}
conf=/etc/slurm/slurm.conf
marker="# written by oneshot scripts/slurm-single-node.sh"
node=$(hostname -s)
munge_key=/etc/munge/munge.key

say() { echo "slurm-single-node: $*"; }
fail() { echo "slurm-single-node: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || { echo "slurm-single-node: $1 not found; apt-get install -y slurm-wlm munge" >&2; exit 2; }; }
running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

conf_changed=0

write_conf() {  # sets conf_changed=1 if it wrote a different slurm.conf
  if [[ -f $conf ]] && ! grep -qF "$marker" "$conf"; then
    echo "slurm-single-node: $conf exists and was not written by this script; leaving it alone" >&2
    return
  fi
  local cpus mem_mb new
  cpus=$(nproc --all)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  # The addresses are explicit so that nothing depends on the host name resolving.
  new=$(cat <<EOF
$marker
ClusterName=oneshot
SlurmctldHost=$node(127.0.0.1)
AuthType=auth/munge
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
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
)
  if [[ -f $conf ]] && [[ "$(cat "$conf")" == "$new" ]]; then
    return
  fi
  mkdir -p "$(dirname "$conf")"
  printf '%s\n' "$new" > "$conf.tmp"
  chmod 644 "$conf.tmp"
  mv "$conf.tmp" "$conf"
  conf_changed=1
  say "wrote $conf"
}

start_munge() {
  id munge >/dev/null 2>&1 || fail "there is no munge user; apt-get install -y munge"
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s $munge_key ]]; then  # the package creates one; a bare or hand-made install may not have
    mungekey --create --keyfile="$munge_key" 2>/dev/null || dd if=/dev/urandom of="$munge_key" bs=1024 count=1 status=none
    say "created $munge_key"
  fi
  chown munge:munge "$munge_key"
  chmod 0400 "$munge_key"
  if munge_works; then
    return
  fi
  if ! running /run/munge/munged.pid; then  # a socket left by a munged that died would stop a new one
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  fi
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 20); do
    munge_works && return
    sleep 0.5
  done
  fail "munged does not answer; see /var/log/munge/munged.log"
}

stop_daemon() {  # by its pid file; waits until it has gone
  local pidfile=$1 pid
  running "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
}

node_state() { sinfo -h -N -n "$node" -o "%T" 2>/dev/null | head -n 1; }

start() {
  need munged; need munge; need slurmctld; need slurmd; need sinfo; need scontrol
  [[ $(id -u) -eq 0 ]] || fail "run as root (sudo)"
  write_conf
  if [[ $conf_changed == 1 ]]; then  # daemons that run read the old file: start them again
    stop_daemon /run/slurmd.pid
    stop_daemon /run/slurmctld.pid
  fi
  mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  start_munge
  running /run/slurmctld.pid || slurmctld
  running /run/slurmd.pid || slurmd
  local state
  for _ in $(seq 60); do  # the node registers within a few seconds
    state=$(node_state)
    case $state in
      idle|mixed|allocated|completing)
        say "up ($(sinfo -h -o '%P %D node(s) %c CPUs %T'))"
        return ;;
      down*|drain*|fail*)  # after a restart the node may come back down; it is ours to resume
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  echo "slurm-single-node: the node did not come up (state: ${state:-none}); see /var/log/slurm/slurmctld.log" \
       "and slurmd.log" >&2
  sinfo -N -l >&2 || true
  exit 1
}

stop() {
  [[ $(id -u) -eq 0 ]] || fail "run as root (sudo)"
  for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    stop_daemon "$pidfile"
  done
  say "stopped"
}

case $action in
  start) start ;;
  stop) stop ;;
  status) scontrol ping && sinfo -N -l ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
