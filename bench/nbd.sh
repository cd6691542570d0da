#!/usr/bin/env bash
# NBD benchmark: Strata against nbdkit (file plugin) and qemu-nbd, in one run.
#
# What it measures: fio (nbd ioengine, one connection, numjobs=1) against three NBD
# servers on the same tmpfs, each serving a 1 GiB export:
#   - nbdkit   file plugin over $DIR/peer.img (default threads)
#   - qemu-nbd raw, --aio=threads, default cache (writeback), over the same $DIR/peer.img
#   - strata   a 1 GiB volume (LAYOUT: linear on one 2 GiB device file, or raid10 on four
#              1 GiB device files in different fault domains) under $DIR/strata/devices
# Workloads: 4k randread QD1, 4k randread QD32, 4k randwrite QD32, the same two held at
# 30k IOPS, 1M seq read QD8, 1M seq write QD8. For each workload the servers run back to
# back (nbdkit, qemu-nbd, strata), so drift in the machine's speed hits all of them alike.
#
# For every run it reports fio's IOPS (and MB/s for 1M rows), the CPU seconds the server
# process used (utime+stime from /proc/PID/stat, all threads) over the measured part of
# the fio run (sampled after the ramp, until fio exits), and IOPS per server CPU-second
# (= IOs done in that window / server CPU seconds in it), with ratios to nbdkit. Note
# that fio runs on the same cores as the server, so client CPU limits all servers alike.
#
# Run it from anywhere:
#   bench/nbd.sh
#   LAYOUT=raid10 RUNTIME=10 bench/nbd.sh
#   OUT=/tmp/nbd.md SERVERS="nbdkit strata" bench/nbd.sh
#
# Environment:
#   RUNTIME   seconds each fio run is measured (default 15), after RAMP
#   RAMP      fio ramp_time seconds, not measured (default 2)
#   LAYOUT    Strata volume layout: linear (default) or raid10
#   DIR       scratch directory on tmpfs (default /dev/shm/strata-bench); it is created
#             and removed by the script, and must not exist already unless an earlier run
#             of this script left it
#   STRATA    strata binary (default target/release/strata, built with
#             `cargo build --release -p strata` if missing)
#   SERVERS   servers to run, in order (default "nbdkit qemu-nbd strata")
#   WORKLOADS workloads to run by name (default all: rr4k-qd1 rr4k-qd32 rw4k-qd32
#             rr4k-qd32-30k rw4k-qd32-30k sr1m-qd8 sw1m-qd8; the -30k ones are held at
#             30k IOPS, so every server does the same work and CPU per request compares)
#   OUT       also write the markdown table to this file
#   NBDKIT_PORT, QEMU_PORT, STRATA_NBD_PORT, STRATA_API_PORT, STRATA_ISCSI_PORT
#             listen ports (default 20810, 20811, 20809, 17480, 20808), all on 127.0.0.1
#
# Needs: fio (with the nbd engine; fio >= 3.17), nbdkit, qemu-nbd, python3, and cargo if
# the strata binary is not built. Debian: apt-get install fio nbdkit qemu-utils
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNTIME="${RUNTIME:-15}"
RAMP="${RAMP:-2}"
LAYOUT="${LAYOUT:-linear}"
DIR="${DIR:-/dev/shm/strata-bench}"
STRATA="${STRATA:-$ROOT/target/release/strata}"
SERVERS="${SERVERS:-nbdkit qemu-nbd strata}"
WORKLOADS="${WORKLOADS:-rr4k-qd1 rr4k-qd32 rw4k-qd32 rr4k-qd32-30k rw4k-qd32-30k sr1m-qd8 sw1m-qd8}"
OUT="${OUT:-}"
NBDKIT_PORT="${NBDKIT_PORT:-20810}"
QEMU_PORT="${QEMU_PORT:-20811}"
STRATA_NBD_PORT="${STRATA_NBD_PORT:-20809}"
STRATA_API_PORT="${STRATA_API_PORT:-17480}"
STRATA_ISCSI_PORT="${STRATA_ISCSI_PORT:-20808}"
MARKER=".strata-nbd-bench"

die() { echo "nbd.sh: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

case "$LAYOUT" in linear | raid10) ;; *) die "LAYOUT must be linear or raid10, not '$LAYOUT'" ;; esac
[[ "$RUNTIME" =~ ^[0-9]+$ && "$RUNTIME" -gt 0 ]] || die "RUNTIME must be a positive number of seconds"
[[ "$RAMP" =~ ^[0-9]+$ ]] || die "RAMP must be a number of seconds"
for s in $SERVERS; do
  case "$s" in nbdkit | qemu-nbd | strata) ;; *) die "unknown server '$s' in SERVERS" ;; esac
done

# --- prerequisites ---------------------------------------------------------------------
missing=()
command -v fio >/dev/null || missing+=(fio)
command -v python3 >/dev/null || missing+=(python3)
[[ " $SERVERS " != *" nbdkit "* ]] || command -v nbdkit >/dev/null || missing+=(nbdkit)
[[ " $SERVERS " != *" qemu-nbd "* ]] || command -v qemu-nbd >/dev/null || missing+=(qemu-utils)
[ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]} (Debian: apt-get install fio nbdkit qemu-utils)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (needs fio >= 3.17 built with libnbd)"
if [[ " $SERVERS " == *" strata "* && ! -x "$STRATA" ]]; then
  [ "$STRATA" = "$ROOT/target/release/strata" ] || die "STRATA=$STRATA is not an executable"
  log "building strata (release)"
  (cd "$ROOT" && cargo build --release -p strata)
fi
CLK_TCK="$(getconf CLK_TCK)"

# --- scratch directory and cleanup -----------------------------------------------------
if [ -e "$DIR" ]; then
  if [ -f "$DIR/$MARKER" ]; then
    rm -rf "$DIR"
  elif [ -d "$DIR" ] && [ -z "$(ls -A "$DIR")" ]; then
    rmdir "$DIR"
  else
    die "$DIR exists and was not made by this script; remove it or set DIR"
  fi
fi
mkdir -p "$DIR"
touch "$DIR/$MARKER"
mkdir -p "$DIR/logs" "$DIR/fio"
ROWS="$DIR/rows.tsv"
: >"$ROWS"

NBDKIT_PID="" QEMU_PID="" STRATA_PID="" FIO_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$FIO_PID" fio 10
  stop_pid "$STRATA_PID" strata 30
  stop_pid "$NBDKIT_PID" nbdkit 10
  stop_pid "$QEMU_PID" qemu-nbd 10
  if [ "$rc" -ne 0 ] && [ -s "$DIR/logs/strata.log" ]; then
    echo "--- last lines of the strata log:" >&2
    tail -n 20 "$DIR/logs/strata.log" >&2
  fi
  [ -f "$DIR/$MARKER" ] && rm -rf "$DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_port() { # port pid name
  local i
  for ((i = 0; i < 300; i++)); do
    kill -0 "$2" 2>/dev/null || die "$3 exited while starting; log: $(tail -n 5 "$DIR/logs/$3.log" 2>/dev/null)"
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$3 is not listening on port $1 after 30 s"
}

# utime+stime of a process (all its threads), in clock ticks. The command name in field 2
# may hold spaces, so count fields after its closing parenthesis.

# --- servers ---------------------------------------------------------------------------

start_peers() {
  if [[ " $SERVERS " == *" nbdkit "* || " $SERVERS " == *" qemu-nbd "* ]]; then
    log "filling $DIR/peer.img (1 GiB of random data)"
    dd if=/dev/urandom of="$DIR/peer.img" bs=1M count=1024 status=none
  fi
  if [[ " $SERVERS " == *" nbdkit "* ]]; then
    nbdkit -f -i 127.0.0.1 -p "$NBDKIT_PORT" --pidfile "$DIR/nbdkit.pid" \
      file "$DIR/peer.img" >"$DIR/logs/nbdkit.log" 2>&1 &
    NBDKIT_PID=$!
    wait_port "$NBDKIT_PORT" "$NBDKIT_PID" nbdkit
  fi
  if [[ " $SERVERS " == *" qemu-nbd "* ]]; then
    qemu-nbd -f raw -b 127.0.0.1 -p "$QEMU_PORT" -x '' -t -e 8 --aio=threads \
      "$DIR/peer.img" >"$DIR/logs/qemu-nbd.log" 2>&1 &
    QEMU_PID=$!
    wait_port "$QEMU_PORT" "$QEMU_PID" qemu-nbd
  fi
}

start_strata() {
  [[ " $SERVERS " == *" strata "* ]] || return 0
  start_strata_volume
  strata_cli export add bench --nbd
  log "filling the strata volume (fio seq write, 1M, QD8)"
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$STRATA_NBD_PORT/bench" --rw=write \
    --bs=1M --iodepth=8 --numjobs=1 --output-format=json --output="$DIR/fio/strata-fill.json" \
    >"$DIR/logs/fio-fill.log" 2>&1 || die "filling the strata volume failed: $(tail -n 5 "$DIR/logs/fio-fill.log")"
}

uri_of() {
  case "$1" in
    nbdkit) echo "nbd://127.0.0.1:$NBDKIT_PORT/" ;;
    qemu-nbd) echo "nbd://127.0.0.1:$QEMU_PORT/" ;;
    strata) echo "nbd://127.0.0.1:$STRATA_NBD_PORT/bench" ;;
  esac
}
pid_of() {
  case "$1" in
    nbdkit) echo "$NBDKIT_PID" ;;
    qemu-nbd) echo "$QEMU_PID" ;;
    strata) echo "$STRATA_PID" ;;
  esac
}

# --- workloads -------------------------------------------------------------------------
# name -> "label|rw|bs|iodepth|rate". A rate (IOPS fio asks for, below what every server
# reaches) makes every server do the same work, so its CPU seconds compare cost per request
# directly; unlimited runs saturate the server, whose CPU is then capped by what fio leaves.
workload() {
  case "$1" in
    rr4k-qd32-30k) echo "4k randread QD32 at 30k IOPS|randread|4k|32|30000" ;;
    rw4k-qd32-30k) echo "4k randwrite QD32 at 30k IOPS|randwrite|4k|32|30000" ;;
    rr4k-qd1) echo "4k randread QD1|randread|4k|1" ;;
    rr4k-qd32) echo "4k randread QD32|randread|4k|32" ;;
    rw4k-qd32) echo "4k randwrite QD32|randwrite|4k|32" ;;
    sr1m-qd8) echo "1M seq read QD8|read|1M|8" ;;
    sw1m-qd8) echo "1M seq write QD8|write|1M|8" ;;
    *) die "unknown workload '$1' in WORKLOADS" ;;
  esac
}
for w in $WORKLOADS; do workload "$w" >/dev/null; done


# One fio run against one server; appends a row to $ROWS.
run_one() { # round workload server
  local round="$1" spec label rw bs qd rate server="$3" pid uri json c0 c1 t0 t1
  shift
  spec="$(workload "$1")"
  IFS='|' read -r label rw bs qd rate <<<"$spec"
  pid="$(pid_of "$server")"
  uri="$(uri_of "$server")"
  json="$DIR/fio/$round-$1-$server.json"
  log "$label: $server"
  fio --name=w --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
    --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" ${rate:+--rate_iops="$rate"} \
    --output-format=json --output="$json" >"$DIR/logs/fio.log" 2>&1 &
  FIO_PID=$!
  # The server's CPU is sampled from the end of the ramp until fio exits.
  sleep "$RAMP"
  c0="$(cpu_ticks "$pid")"
  t0="$(now)"
  if ! wait "$FIO_PID"; then
    die "fio failed for $label on $server: $(tail -n 5 "$DIR/logs/fio.log")"
  fi
  c1="$(cpu_ticks "$pid")"
  t1="$(now)"
  FIO_PID=""
  python3 - "$round" "$json" "$label" "$server" "$rw" "$c0" "$c1" "$CLK_TCK" "$t0" "$t1" >>"$ROWS" <<'EOF'
import json, sys
round_, path, label, server, rw, c0, c1, tck, t0, t1 = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
if job.get("error"):
    sys.exit(f"fio reported error {job['error']} for {label} on {server}")
side = job["write" if "write" in rw else "read"]
cpu = (int(c1) - int(c0)) / int(tck)
window = float(t1) - float(t0)
print("\t".join(map(str, [round_, label, server, side["iops"], side["bw_bytes"] / 1e6, cpu, window])))
EOF
}

start_peers
start_strata

log "measuring: ${RUNTIME}s per run after ${RAMP}s ramp; servers: $SERVERS; strata layout: $LAYOUT"
round=0
for w in $WORKLOADS; do
  round=$((round + 1))
  for s in $SERVERS; do
    run_one "$round" "$w" "$s"
  done
done

if [ -n "$STRATA_PID" ] && grep -qiE 'warn|error|panic' "$DIR/logs/strata.log"; then
  echo "nbd.sh: strata logged warnings or errors:" >&2
  grep -iE 'warn|error|panic' "$DIR/logs/strata.log" | tail -n 20 >&2
fi

# --- table -----------------------------------------------------------------------------
TABLE="$(python3 - "$ROWS" "$RUNTIME" "$RAMP" "$LAYOUT" <<'EOF'
import sys
rows_path, runtime, ramp, layout = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(rows_path) if l.strip()]
base = {}
parsed = []
for round_, label, server, iops, mbps, cpu, window in rows:
    iops, mbps, cpu, window = float(iops), float(mbps), float(cpu), float(window)
    # IOs done while the CPU was sampled, per server CPU second.
    eff = iops * window / cpu if cpu > 0 else float("inf")
    parsed.append((round_, label, server, iops, mbps, cpu, eff))
    if server == "nbdkit":
        base[round_] = (iops, eff)

def ratio(x, b):
    return f"{x / b:.2f}" if b and b != float("inf") and x != float("inf") else "-"

out = [
    f"fio nbd engine, 1 job, {runtime}s measured after {ramp}s ramp; strata layout {layout}",
    "",
    "| workload | server | IOPS | MB/s | server CPU s | IOPS per server CPU-s | ratio to nbdkit (IOPS) | efficiency ratio to nbdkit |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
]
for round_, label, server, iops, mbps, cpu, eff in parsed:
    b = base.get(round_)
    mb = f"{mbps:.0f}" if label.startswith("1M") else "-"
    e = f"{eff:,.0f}" if eff != float("inf") else "-"
    out.append(
        f"| {label} | {server} | {iops:,.0f} | {mb} | {cpu:.2f} | {e} | "
        f"{ratio(iops, b[0]) if b else '-'} | {ratio(eff, b[1]) if b else '-'} |"
    )
print("\n".join(out))
EOF
)"
echo
echo "$TABLE"
if [ -n "$OUT" ]; then
  printf '%s\n' "$TABLE" >"$OUT"
  echo "(table written to $OUT)" >&2
fi
