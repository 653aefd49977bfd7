# Shared by up.sh and down.sh (sourced).

# alive PID: the process exists and is not a zombie (PID 1 here may be slow to reap
# killed daemons, and a zombie still answers kill -0).
alive() {
  local st
  [ -n "${1:-}" ] || return 1
  st=$(ps -o stat= -p "$1" 2>/dev/null | tr -d ' ') || return 1
  [ -n "$st" ] && [ "${st#Z}" = "$st" ]
}

# running NAME [PIDFILE]: prints the pid of a live process NAME (from the pid file, or pgrep).
running() {
  local name=$1 pidf=${2:-} pid
  if [ -n "$pidf" ] && [ -s "$pidf" ]; then
    pid=$(cat "$pidf" 2>/dev/null || true)
    if alive "$pid" && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
      echo "$pid"; return 0
    fi
  fi
  for pid in $(pgrep -x "$name" || true); do
    alive "$pid" && { echo "$pid"; return 0; }
  done
  return 1
}
