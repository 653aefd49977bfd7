#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster (munged + slurmctld + slurmd) on this
# machine, for integration tests. Idempotent: safe to run repeatedly and after down.sh.
#
# Needs root. Debian 12 (Slurm 22.05 from Debian's packages). Does not need systemd:
# the daemons are started by hand.
#
# Environment knobs (all optional):
#   SLURM_UP_TIMEOUT   seconds to wait for the node to become idle (default 60)
#   SLURM_MIN_JOB_AGE  seconds a finished job stays visible in slurmctld (default 3600)
#   SLURM_KILL_WAIT    seconds between SIGTERM and SIGKILL when a job is killed (default 30)
#   SLURM_CRED_EXPIRE  AuthInfo cred_expire: also how long a requeued job waits before it
#                      may start again (Slurm default 120; unset = Slurm default)
set -euo pipefail

die() { echo "slurm up.sh: ERROR: $*" >&2; exit 1; }
log() { echo "slurm up.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (uses apt-get, writes /etc/slurm, starts daemons)"

T0=$(date +%s.%N)
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-60}
MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-3600}
KILL_WAIT=${SLURM_KILL_WAIT:-30}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-}

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid

# ---------------------------------------------------------------- packages
PKGS=(munge slurmctld slurmd slurm-client)
missing=()
for p in "${PKGS[@]}"; do
  st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$st" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} ..."
  t_inst=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  # Keep package maintainer scripts from starting daemons (no systemd here; we start them ourselves).
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  : >/tmp/slurm-up-apt.log
  apt_install() { nice -n 10 apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/slurm-up-apt.log 2>&1; }
  if ! apt_install; then
    log "apt-get install failed; running apt-get update and retrying"
    if ! nice -n 10 apt-get update >>/tmp/slurm-up-apt.log 2>&1 || ! apt_install; then
      [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
      tail -n 30 /tmp/slurm-up-apt.log >&2
      die "apt-get install ${missing[*]} failed (full log: /tmp/slurm-up-apt.log)"
    fi
  fi
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "installed in $(( $(date +%s) - t_inst )) s"
fi

for b in munged slurmctld slurmd sinfo sbatch scontrol; do
  command -v "$b" >/dev/null || die "$b not found after install"
done

# ---------------------------------------------------------------- helpers

# alive, running: lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# stop NAME PIDFILE: TERM, wait up to 10 s, then KILL.
stop() {
  local name=$1 pidf=$2 pid
  pid=$(running "$name" "$pidf") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidf"
}

show_logs() {
  local f
  for f in /var/log/munge/munged.log $LOG_DIR/slurmctld.log $LOG_DIR/slurmd.log \
           $LOG_DIR/munged.out $LOG_DIR/slurmctld.out $LOG_DIR/slurmd.out; do
    [ -s "$f" ] || continue
    echo "----- tail of $f" >&2
    tail -n 20 "$f" >&2
  done
}

# ---------------------------------------------------------------- munge
getent passwd munge >/dev/null || die "user munge missing (munge package broken?)"
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0700 /var/lib/munge /var/log/munge
key_new=0
if [ ! -s "$MUNGE_KEY" ]; then
  dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
  key_new=1
fi
chown munge:munge /etc/munge "$MUNGE_KEY"
chmod 0700 /etc/munge
chmod 0400 "$MUNGE_KEY"

if [ $key_new = 1 ]; then stop munged "$MUNGE_PID"; fi
if ! running munged "$MUNGE_PID" >/dev/null; then
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock "$MUNGE_PID"
  mkdir -p "$LOG_DIR"
  setsid runuser -u munge -- munged </dev/null >"$LOG_DIR/munged.out" 2>&1 || true
  for _ in $(seq 1 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 || { show_logs; die "munged is not working"; }

# ---------------------------------------------------------------- slurm.conf
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MIB=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 ))
HEADROOM=$(( MEM_MIB / 10 )); [ $HEADROOM -lt 512 ] && HEADROOM=512
REAL_MEM=$(( MEM_MIB - HEADROOM )); [ $REAL_MEM -lt 1 ] && REAL_MEM=1
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"

TMP_CONF=$(mktemp)
cat >"$TMP_CONF" <<EOF
# Written by lorad tests/slurm/up.sh -- single-node test cluster. Overwritten on each run.
ClusterName=lorad
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
${CRED_EXPIRE:+AuthInfo=cred_expire=$CRED_EXPIRE}
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
# No slurmdbd: sacct has nothing. Finished jobs stay visible to scontrol/squeue for MinJobAge s,
# and every finished job is appended (state, exit code) to the jobcomp text file.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=$MIN_JOB_AGE
KillWait=$KILL_WAIT
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
MessageTimeout=10
# Refuse at submit time a job that no partition limit allows (e.g. -c 8 on a 2-CPU node),
# instead of leaving it PENDING forever with Reason=PartitionConfig.
EnforcePartLimits=ALL
NodeName=$HOST CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=debug Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF

conf_changed=0
if ! cmp -s "$TMP_CONF" "$CONF"; then
  install -m 0644 "$TMP_CONF" "$CONF"
  conf_changed=1
fi
rm -f "$TMP_CONF"

if [ $conf_changed = 1 ]; then
  # A running daemon would keep the old config; restart what runs.
  if running slurmctld "$CTLD_PID" >/dev/null || running slurmd "$SLURMD_PID" >/dev/null; then
    log "slurm.conf changed; restarting slurmd and slurmctld"
    stop slurmd "$SLURMD_PID"
    stop slurmctld "$CTLD_PID"
  fi
fi

# ---------------------------------------------------------------- daemons
if ! running slurmctld "$CTLD_PID" >/dev/null; then
  setsid slurmctld </dev/null >"$LOG_DIR/slurmctld.out" 2>&1 || { show_logs; die "slurmctld failed to start"; }
fi
if ! running slurmd "$SLURMD_PID" >/dev/null; then
  setsid slurmd </dev/null >"$LOG_DIR/slurmd.out" 2>&1 || { show_logs; die "slurmd failed to start"; }
fi

# ---------------------------------------------------------------- wait for the node
state=""
resumed=0
deadline=$(( $(date +%s) + UP_TIMEOUT ))
while :; do
  state=$(sinfo -h -N -n "$HOST" -p main -o %T 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    drained|draining|down|drained\*|down\*|fail*)
      # A node left down/drained by an earlier run (not one that is merely not yet
      # responding, which shows as down* until slurmd registers): resume it once.
      if [ $resumed = 0 ] && running slurmd "$SLURMD_PID" >/dev/null && [ "${state%\*}" = "$state" ]; then
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        resumed=1
      fi ;;
  esac
  if [ "$(date +%s)" -ge $deadline ]; then
    echo "node $HOST state: '${state:-<no answer from slurmctld>}'" >&2
    scontrol show node "$HOST" 2>&1 | sed 's/^/  /' >&2 || true
    for d in munged slurmctld slurmd; do
      running "$d" >/dev/null && echo "$d: running" >&2 || echo "$d: NOT running" >&2
    done
    show_logs
    die "node $HOST did not become idle within ${UP_TIMEOUT}s"
  fi
  sleep 0.5
done

# slurmctld reloads the node as idle from its state file before slurmd registers: make sure
# the daemons are really alive.
for d in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
  running "${d%%:*}" "${d#*:}" >/dev/null || { show_logs; die "${d%%:*} is not running"; }
done

ELAPSED=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
PARTS=$(sinfo -h -o %P | paste -sd, -)
echo "slurm up: cluster=lorad node=$HOST cpus=$CPUS mem=${REAL_MEM}MiB partitions=$PARTS state=$state ($(sinfo -V)) in ${ELAPSED}s"
