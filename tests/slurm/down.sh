#!/usr/bin/env bash
# Tear down the single-node test Slurm cluster started by up.sh: cancel leftover jobs,
# stop slurmd, slurmctld and munged. Packages, config, munge key and logs stay.
# Idempotent: does nothing (and exits 0) when nothing runs.
#
# Environment knobs (optional):
#   SLURM_DOWN_GRACE  seconds to let cancelled jobs end on SIGTERM before their
#                     processes are killed outright (default 5)
set -uo pipefail

die() { echo "slurm down.sh: ERROR: $*" >&2; exit 1; }
log() { echo "slurm down.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ -z "${SLURM_JOB_ID:-}" ] || die "refusing to run inside a Slurm job (SLURM_JOB_ID=$SLURM_JOB_ID)"

GRACE=${SLURM_DOWN_GRACE:-5}
CTLD_PID=/run/slurm/slurmctld.pid
SLURMD_PID=/run/slurm/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
T0=$(date +%s.%N)


# alive, running: lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# stop NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL. Prints what it did.
stopped=()
stop() {
  local name=$1 pidf=$2 pid
  [ -n "${SLURM_DOWN_DEBUG:-}" ] && log "$(date +%T.%N) stopping $name"
  while pid=$(running "$name" "$pidf"); do
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    stopped+=("$name")
  done
  rm -f "$pidf"
}

# descendants PID: all descendant pids of PID (depth first).
descendants() {
  local c
  for c in $(pgrep -P "$1" || true); do
    echo "$c"
    descendants "$c"
  done
}

# ---------------------------------------------------------------- jobs
ncancel=0
if running slurmctld "$CTLD_PID" >/dev/null && command -v squeue >/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    ncancel=$(echo "$jobs" | wc -l)
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    # Jobs that exit on SIGTERM leave the queue at once; wait a little for them.
    for _ in $(seq 1 $(( GRACE * 2 ))); do
      [ -z "$(squeue -h -t running,completing,suspended -o %A 2>/dev/null || true)" ] && break
      sleep 0.5
    done
  fi
fi

# ---------------------------------------------------------------- leftover job processes
# Jobs still running (e.g. ones that trap SIGTERM and sit in KillWait) are killed outright:
# every slurmstepd with its process tree, plus any process carrying SLURM_JOB_ID in its
# environment (children that a killed batch shell orphaned escape proctrack/linuxproc).
# This is done before slurmd is stopped: slurmd does not exit on SIGTERM while it waits on
# a job being killed.
self_and_ancestors=" $$ "
p=$$
while [ "$p" -gt 1 ] 2>/dev/null; do
  p=$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ' || true); [ -n "$p" ] || break
  self_and_ancestors+="$p "
done
victims=()
nstep=0
for sp in $(pgrep -x slurmstepd || true); do
  victims+=("$sp")
  mapfile -t -O "${#victims[@]}" victims < <(descendants "$sp")
  nstep=$((nstep + 1))
done
for d in /proc/[0-9]*; do
  p=${d#/proc/}
  case "$self_and_ancestors" in *" $p "*) continue ;; esac
  if { tr '\0' '\n' <"$d/environ"; } 2>/dev/null | grep -q '^SLURM_JOB_ID='; then
    victims+=("$p")
  fi
done
nproc_killed=0
if [ ${#victims[@]} -gt 0 ]; then
  for p in "${victims[@]}"; do kill -KILL "$p" 2>/dev/null && nproc_killed=$((nproc_killed + 1)); done
  sleep 0.3
fi

# ---------------------------------------------------------------- daemons
stop slurmd "$SLURMD_PID"
stop slurmctld "$CTLD_PID"
# slurmscriptd is slurmctld's helper; it normally exits with it.
for p in $(pgrep -x slurmscriptd || true); do kill -TERM "$p" 2>/dev/null || true; done
stop munged "$MUNGE_PID"

ELAPSED=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
if [ ${#stopped[@]} -eq 0 ] && [ "$nproc_killed" = 0 ]; then
  echo "slurm down: nothing was running (${ELAPSED}s)"
else
  names=$(printf '%s\n' "${stopped[@]}" | awk '!seen[$0]++' | paste -sd' ' -)
  echo "slurm down: stopped ${names:-nothing}; cancelled $ncancel job(s); killed $nstep job step(s) ($nproc_killed processes) in ${ELAPSED}s"
fi
