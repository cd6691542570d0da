# Shared by bench/nbd.sh and bench/iscsi.sh (sourced, not run): stopping processes,
# reading a process's CPU time, and a Strata controller with a 1 GiB `bench` volume.
# The sourcing script defines die() and log() and sets DIR, STRATA, LAYOUT and the
# STRATA_*_PORT variables.

now() { date +%s.%N; }

stop_pid() { # pid name seconds
  local pid="$1" name="$2" wait_s="$3" i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait_s * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$(basename "$0"): $name (pid $pid) did not stop in ${wait_s}s after SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# utime + stime of a process, all threads, in clock ticks.
cpu_ticks() {
  local stat rest
  stat="$(cat "/proc/$1/stat")" || die "cannot read /proc/$1/stat: is the server still running?"
  rest="${stat##*) }"
  # shellcheck disable=SC2086
  set -- $rest # fields 3.. of stat
  echo $(("${12}" + "${13}"))
}

strata_cli() { "$STRATA" --data-dir "$DIR/strata" "$@" >>"$DIR/logs/strata-cli.log" 2>&1 ||
  die "strata $* failed: $(tail -n 3 "$DIR/logs/strata-cli.log")"; }

# Starts `strata serve` on $DIR/strata (every listener on its own port, so nothing else
# on the machine's default ports matters), sets STRATA_PID, and makes a 1 GiB volume
# `bench`: linear on one 2 GiB device file, or $LAYOUT on four 1 GiB ones in separate
# fault domains. The caller exports and fills it.
start_strata_volume() {
  log "starting strata ($LAYOUT)"
  RUST_LOG="${RUST_LOG:-warn}" "$STRATA" serve --data-dir "$DIR/strata" \
    --api "127.0.0.1:$STRATA_API_PORT" --nbd "127.0.0.1:$STRATA_NBD_PORT" \
    --iscsi "127.0.0.1:$STRATA_ISCSI_PORT" >"$DIR/logs/strata.log" 2>&1 &
  STRATA_PID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    [ -f "$DIR/strata/endpoints.json" ] && break
    kill -0 "$STRATA_PID" 2>/dev/null || die "strata serve exited while starting"
    sleep 0.1
  done
  [ -f "$DIR/strata/endpoints.json" ] || die "strata serve wrote no endpoints.json in 30 s"
  if [ "$LAYOUT" = linear ]; then
    strata_cli device add "$DIR/strata/devices/dev0" --create 2G
  else
    for i in 0 1 2 3; do
      strata_cli device add "$DIR/strata/devices/dev$i" --create 1G --fault-domain "shelf$i"
    done
  fi
  strata_cli volume create bench --size 1G --layout "$LAYOUT"
}
