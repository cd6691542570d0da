#!/usr/bin/env bash
# iSCSI benchmark: Strata's iSCSI target against tgtd (the Linux SCSI target framework), in
# one run.
#
# What it measures: libiscsi's iscsi-perf (one session, one connection, READ16 only)
# against two iSCSI targets on the same tmpfs, each serving a 1 GiB disk of random data:
#   - tgtd    tgt's user-space daemon with its defaults (rdwr backing store, 16 IO threads),
#             LUN 1 of iqn.2026-11.io.strata.bench:tgtd over $DIR/tgt.img, filled from
#             /dev/urandom; 512-byte logical blocks (TGT_BLOCK_SIZE)
#   - strata  a 1 GiB volume (LAYOUT: linear on one 2 GiB device file, or raid10 on four
#             1 GiB device files in different fault domains) under $DIR/strata/devices,
#             written in full over NBD (fio) first, then exported over iSCSI as LUN 0 of
#             iqn.2026-11.io.strata:bench; 4096-byte logical blocks
# Workloads: 4k randread QD1, 4k randread QD32, 1M seq read QD8. iscsi-perf has no write
# mode, so there are no write rows. A request is 4 KiB or 1 MiB on both targets: its
# blocks per request (-b) come from the logical block size each target reports
# (iscsi-readcapacity16). iscsi-perf picks random reads at any logical block, so on tgtd's
# 512-byte blocks 7 of 8 4k random reads are not 4 KiB aligned (TGT_BLOCK_SIZE=4096 aligns
# them). For each workload the servers run back to back (tgtd, strata), so drift in the
# machine's speed hits both alike.
#
# For every run it reports iscsi-perf's IOPS (its last "iops average", over the whole run:
# iscsi-perf has no ramp), MB/s for 1M rows (IOPS x request size in 10^6 bytes/s, as in
# bench/nbd.sh; iscsi-perf's own "MB/s" is MiB/s), the CPU seconds the server process used
# (utime+stime from /proc/PID/stat, all threads) from just before iscsi-perf starts until it
# exits (its login and logout add a few milliseconds), and IOPS per server CPU-second
# (= IOPS x RUNTIME / server CPU seconds), with ratios of Strata to tgtd and, beside the
# IOPS ratio, the target of the issue: >= 1.0x tgtd at 4k QD1, >= 2x at 4k QD32, >= 1.5x
# for 1 MiB reads. iscsi-perf runs on the same cores as the server, so client CPU limits
# both servers alike.
#
# Run it from anywhere (tgtd needs root):
#   bench/iscsi.sh
#   LAYOUT=raid10 RUNTIME=10 bench/iscsi.sh
#   OUT=/tmp/iscsi.md SERVERS=tgtd RUNTIME=3 bench/iscsi.sh
#
# Environment:
#   RUNTIME   seconds each iscsi-perf run lasts (default 15)
#   LAYOUT    Strata volume layout: linear (default) or raid10
#   DIR       scratch directory on tmpfs (default /dev/shm/strata-iscsi-bench); it is created
#             and removed by the script, and must not exist already unless an earlier run
#             of this script left it
#   STRATA    strata binary (default target/release/strata, built with
#             `cargo build --release -p strata` if missing)
#   SERVERS   servers to run, in order (default "tgtd strata")
#   WORKLOADS workloads to run by name (default all: rr4k-qd1 rr4k-qd32 sr1m-qd8)
#   OUT       also write the markdown table to this file
#   TGT_BLOCK_SIZE
#             logical block size of tgtd's LUN (default 512; 4096 as Strata's)
#   TGT_PORT, STRATA_ISCSI_PORT, STRATA_NBD_PORT, STRATA_API_PORT
#             listen ports (default 20861, 20860, 20859, 17481), all on 127.0.0.1
#   TGT_CONTROL_PORT
#             tgtd's management channel number (tgtd -C, tgtadm -C: the Unix socket
#             /var/run/tgtd/socket.N; default 20862). A tgtd started without -C uses 0:
#             this one runs beside it and never talks to it.
#
# Needs: iscsi-perf and iscsi-readcapacity16, tgtd and tgtadm, python3, fio (with the nbd
# engine, to fill the Strata volume), and cargo if the strata binary is not built.
# Debian: apt-get install libiscsi-bin tgt fio python3
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNTIME="${RUNTIME:-15}"
LAYOUT="${LAYOUT:-linear}"
DIR="${DIR:-/dev/shm/strata-iscsi-bench}"
STRATA="${STRATA:-$ROOT/target/release/strata}"
SERVERS="${SERVERS:-tgtd strata}"
WORKLOADS="${WORKLOADS:-rr4k-qd1 rr4k-qd32 sr1m-qd8}"
OUT="${OUT:-}"
TGT_BLOCK_SIZE="${TGT_BLOCK_SIZE:-512}"
TGT_PORT="${TGT_PORT:-20861}"
TGT_CONTROL_PORT="${TGT_CONTROL_PORT:-20862}"
STRATA_ISCSI_PORT="${STRATA_ISCSI_PORT:-20860}"
STRATA_NBD_PORT="${STRATA_NBD_PORT:-20859}"
STRATA_API_PORT="${STRATA_API_PORT:-17481}"
TGT_IQN="iqn.2026-11.io.strata.bench:tgtd"
STRATA_IQN="iqn.2026-11.io.strata:bench"
TGT_IPC_DIR="/var/run/tgtd"
MARKER=".strata-iscsi-bench"

die() { echo "iscsi.sh: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

case "$LAYOUT" in linear | raid10) ;; *) die "LAYOUT must be linear or raid10, not '$LAYOUT'" ;; esac
[[ "$RUNTIME" =~ ^[0-9]+$ && "$RUNTIME" -gt 0 ]] || die "RUNTIME must be a positive number of seconds"
case "$TGT_BLOCK_SIZE" in 512 | 1024 | 2048 | 4096) ;; *) die "TGT_BLOCK_SIZE must be 512, 1024, 2048 or 4096" ;; esac
[ -n "$SERVERS" ] || die "SERVERS is empty"
for s in $SERVERS; do
  case "$s" in tgtd | strata) ;; *) die "unknown server '$s' in SERVERS" ;; esac
done
has() { [[ " $SERVERS " == *" $1 "* ]]; }
for v in TGT_PORT TGT_CONTROL_PORT STRATA_ISCSI_PORT STRATA_NBD_PORT STRATA_API_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 && "${!v}" -lt 65536 ]] || die "$v must be a port number, not '${!v}'"
done
if has strata; then
  [ "$(printf '%s\n' "$STRATA_ISCSI_PORT" "$STRATA_NBD_PORT" "$STRATA_API_PORT" | sort -u | wc -l)" -eq 3 ] ||
    die "STRATA_ISCSI_PORT, STRATA_NBD_PORT and STRATA_API_PORT must differ"
  if has tgtd && [[ " $STRATA_ISCSI_PORT $STRATA_NBD_PORT $STRATA_API_PORT " == *" $TGT_PORT "* ]]; then
    die "TGT_PORT must differ from Strata's ports"
  fi
fi

# --- prerequisites ---------------------------------------------------------------------
missing=() packages=()
need() { # command package
  command -v "$1" >/dev/null && return 0
  missing+=("$1")
  [[ " ${packages[*]} " == *" $2 "* ]] || packages+=("$2")
}
need iscsi-perf libiscsi-bin
need iscsi-readcapacity16 libiscsi-bin
need python3 python3
if has tgtd; then
  need tgtd tgt
  need tgtadm tgt
fi
has strata && need fio fio
[ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]} (Debian: apt-get install ${packages[*]})"
if has tgtd; then
  [ "$(id -u)" -eq 0 ] || die "tgtd needs root (its control socket is in $TGT_IPC_DIR); run as root or set SERVERS=strata"
fi
if has strata; then
  fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (needs fio >= 3.17 built with libnbd)"
  if [ ! -x "$STRATA" ]; then
    [ "$STRATA" = "$ROOT/target/release/strata" ] || die "STRATA=$STRATA is not an executable"
    log "building strata (release)"
    (cd "$ROOT" && cargo build --release -p strata)
  fi
fi
CLK_TCK="$(getconf CLK_TCK)"

# A port something answers on is taken. (tgtd does not fail when it cannot bind its portal:
# it listens on 0.0.0.0:3260 instead, so this is checked first, and its log after.)
port_free() { # port variable
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    die "127.0.0.1:$1 is in use; set $2 to a free port"
  fi
}
if has tgtd; then port_free "$TGT_PORT" TGT_PORT; fi
if has strata; then
  port_free "$STRATA_ISCSI_PORT" STRATA_ISCSI_PORT
  port_free "$STRATA_NBD_PORT" STRATA_NBD_PORT
  port_free "$STRATA_API_PORT" STRATA_API_PORT
fi

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
mkdir -p "$DIR/logs" "$DIR/perf"
ROWS="$DIR/rows.tsv"
: >"$ROWS"

TGT_PID="" STRATA_PID="" PERF_PID="" FIO_PID=""
TGT_SOCKET="$TGT_IPC_DIR/socket.$TGT_CONTROL_PORT"
TGT_SOCKET_OURS="" # set when our tgtd made its control socket files, which it leaves behind
# tgtd ignores SIGTERM: it stops when told over its control socket, once it has no target.
stop_tgtd() {
  local i
  [ -n "$TGT_PID" ] || return 0
  if kill -0 "$TGT_PID" 2>/dev/null; then
    timeout 10 tgtadm -C "$TGT_CONTROL_PORT" --lld iscsi --op delete --mode target --tid 1 --force \
      >>"$DIR/logs/tgtadm.log" 2>&1 || true
    timeout 10 tgtadm -C "$TGT_CONTROL_PORT" --op delete --mode system >>"$DIR/logs/tgtadm.log" 2>&1 || true
    for ((i = 0; i < 100; i++)); do
      kill -0 "$TGT_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$TGT_PID" 2>/dev/null; then
      echo "iscsi.sh: tgtd (pid $TGT_PID) did not stop in 10s after tgtadm --op delete --mode system; killing it" >&2
      kill -KILL "$TGT_PID" 2>/dev/null || true
    fi
  fi
  wait "$TGT_PID" 2>/dev/null || true
  TGT_PID=""
  if [ -n "$TGT_SOCKET_OURS" ]; then
    rm -f "$TGT_SOCKET" "$TGT_SOCKET.lock"
  fi
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$PERF_PID" iscsi-perf 10
  stop_pid "$FIO_PID" fio 10
  stop_pid "$STRATA_PID" strata 30
  stop_tgtd
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

# utime+stime of a process (all its threads), in clock ticks. The command name in field 2
# may hold spaces, so count fields after its closing parenthesis.

# --- servers ---------------------------------------------------------------------------
tgtadm_() { timeout 30 tgtadm -C "$TGT_CONTROL_PORT" --lld iscsi "$@" >>"$DIR/logs/tgtadm.log" 2>&1 ||
  die "tgtadm $* failed: $(tail -n 3 "$DIR/logs/tgtadm.log")"; }

start_tgtd() {
  has tgtd || return 0
  log "starting tgtd on 127.0.0.1:$TGT_PORT (control port $TGT_CONTROL_PORT)"
  mkdir -p "$TGT_IPC_DIR"
  [ -e "$TGT_SOCKET.lock" ] || [ -e "$TGT_SOCKET" ] || TGT_SOCKET_OURS=1
  tgtd -f -C "$TGT_CONTROL_PORT" --iscsi "portal=127.0.0.1:$TGT_PORT" >"$DIR/logs/tgtd.log" 2>&1 &
  TGT_PID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    if ! kill -0 "$TGT_PID" 2>/dev/null; then
      if grep -q 'another tgtd is using' "$DIR/logs/tgtd.log"; then
        TGT_SOCKET_OURS=""
        die "another tgtd uses control port $TGT_CONTROL_PORT; set TGT_CONTROL_PORT to another number"
      fi
      die "tgtd exited while starting; log: $(tail -n 5 "$DIR/logs/tgtd.log")"
    fi
    if grep -q 'failed to create/bind to portal' "$DIR/logs/tgtd.log"; then
      die "tgtd cannot listen on 127.0.0.1:$TGT_PORT; set TGT_PORT to a free port ($(grep -m1 'unable to bind' "$DIR/logs/tgtd.log"))"
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$TGT_PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  [ "$i" -lt 300 ] || die "tgtd is not listening on port $TGT_PORT after 30 s"
  log "filling $DIR/tgt.img (1 GiB of random data)"
  dd if=/dev/urandom of="$DIR/tgt.img" bs=1M count=1024 status=none
  tgtadm_ --op new --mode target --tid 1 -T "$TGT_IQN"
  tgtadm_ --op new --mode logicalunit --tid 1 --lun 1 -b "$DIR/tgt.img" --blocksize "$TGT_BLOCK_SIZE"
  tgtadm_ --op bind --mode target --tid 1 -I ALL
}


start_strata() {
  has strata || return 0
  start_strata_volume
  # Written in full first, as tgtd's file is: reads of never-written blocks cost less.
  strata_cli export add bench --nbd
  log "filling the strata volume (fio seq write over NBD, 1M, QD8)"
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$STRATA_NBD_PORT/bench" --rw=write \
    --bs=1M --iodepth=8 --numjobs=1 --output="$DIR/logs/fio-fill.out" \
    >"$DIR/logs/fio-fill.log" 2>&1 &
  FIO_PID=$!
  wait "$FIO_PID" || die "filling the strata volume failed: $(tail -n 5 "$DIR/logs/fio-fill.log")"
  FIO_PID=""
  strata_cli export add bench --iscsi --iqn "$STRATA_IQN"
}

url_of() {
  case "$1" in
    tgtd) echo "iscsi://127.0.0.1:$TGT_PORT/$TGT_IQN/1" ;;
    strata) echo "iscsi://127.0.0.1:$STRATA_ISCSI_PORT/$STRATA_IQN/0" ;;
  esac
}
pid_of() {
  case "$1" in
    tgtd) echo "$TGT_PID" ;;
    strata) echo "$STRATA_PID" ;;
  esac
}

# The logical block size a target reports, in bytes; its disk must be 1 GiB.
declare -A BLOCK_SIZE
read_block_size() { # server
  local out="$DIR/logs/readcapacity-$1.log" bs size
  timeout 30 iscsi-readcapacity16 "$(url_of "$1")" >"$out" 2>&1 ||
    die "iscsi-readcapacity16 $(url_of "$1") failed: $(tail -n 3 "$out")"
  bs="$(sed -n 's/^LOGICAL BLOCK LENGTH IN BYTES:\([0-9]*\).*/\1/p' "$out")"
  size="$(sed -n 's/^Total size:\([0-9]*\).*/\1/p' "$out")"
  [[ "$bs" =~ ^[0-9]+$ && "$bs" -gt 0 ]] || die "no logical block size from $1: $(tail -n 3 "$out")"
  [ "$size" = $((1 << 30)) ] || die "$1 serves ${size:-?} bytes, not 1 GiB"
  ((1048576 % bs == 0 && bs <= 4096)) || die "$1 has $bs-byte logical blocks: 4 KiB requests need a divisor of 4096"
  BLOCK_SIZE[$1]="$bs"
  log "$1: 1 GiB in $bs-byte logical blocks"
}

# --- workloads -------------------------------------------------------------------------
# name -> "label|iscsi-perf flag for random LBAs|request bytes|requests in flight|target"
# where target is the least ratio of Strata's IOPS to tgtd's the issue asks for.
workload() {
  case "$1" in
    rr4k-qd1) echo "4k randread QD1|-r|4096|1|1.0" ;;
    rr4k-qd32) echo "4k randread QD32|-r|4096|32|2.0" ;;
    sr1m-qd8) echo "1M seq read QD8||1048576|8|1.5" ;;
    *) die "unknown workload '$1' in WORKLOADS" ;;
  esac
}
for w in $WORKLOADS; do workload "$w" >/dev/null; done


# One iscsi-perf run against one server; appends a row to $ROWS.
run_one() { # round workload server
  local round="$1" w="$2" server="$3" spec label rflag bytes qd target pid url blocks out
  local c0 c1 t0 t1 deadline rc iops size
  spec="$(workload "$w")"
  IFS='|' read -r label rflag bytes qd target <<<"$spec"
  pid="$(pid_of "$server")"
  url="$(url_of "$server")"
  blocks=$((bytes / ${BLOCK_SIZE[$server]}))
  out="$DIR/perf/$round-$w-$server.out"
  log "$label: $server (-b $blocks)"
  c0="$(cpu_ticks "$pid")"
  t0="$(now)"
  iscsi-perf -l -m "$qd" -b "$blocks" -t "$RUNTIME" ${rflag:+"$rflag"} "$url" \
    >"$out" 2>"$DIR/logs/iscsi-perf.log" &
  PERF_PID=$!
  # iscsi-perf can wait for ever if its target goes away, so it gets a deadline.
  deadline=$((SECONDS + RUNTIME + 60))
  while kill -0 "$PERF_PID" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || die "iscsi-perf did not finish in $((RUNTIME + 60)) s for $label on $server"
    sleep 0.1
  done
  rc=0
  wait "$PERF_PID" || rc=$?
  PERF_PID=""
  c1="$(cpu_ticks "$pid")"
  t1="$(now)"
  if [ "$rc" -ne 0 ] || ! grep -q '^finished\.' "$out"; then
    die "iscsi-perf failed (status $rc) for $label on $server: $(tr '\r' '\n' <"$out" | grep -v '^ *$' | tail -n 3) $(tail -n 3 "$DIR/logs/iscsi-perf.log")"
  fi
  size="$(sed -n 's/^FIXED transfer size of [0-9]* blocks (\([0-9]*\) byte).*/\1/p' "$out")"
  [ "$size" = "$bytes" ] || die "iscsi-perf sent ${size:-?}-byte requests to $server, not $bytes"
  iops="$(tr '\r' '\n' <"$out" | sed -n 's/^.*iops average \([0-9]*\) .*/\1/p' | tail -n 1)"
  [[ "$iops" =~ ^[0-9]+$ ]] || die "no 'iops average' in iscsi-perf's output for $label on $server"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$label" "$server" "$iops" "$bytes" \
    "$((c1 - c0))" "$CLK_TCK" "$t0" "$t1" "$target" >>"$ROWS"
}

start_tgtd
start_strata
for s in $SERVERS; do read_block_size "$s"; done

log "measuring: ${RUNTIME}s per run; servers: $SERVERS; strata layout: $LAYOUT"
round=0
for w in $WORKLOADS; do
  round=$((round + 1))
  for s in $SERVERS; do
    run_one "$round" "$w" "$s"
  done
done

if [ -n "$STRATA_PID" ] && grep -qiE 'warn|error|panic' "$DIR/logs/strata.log"; then
  echo "iscsi.sh: strata logged warnings or errors:" >&2
  grep -iE 'warn|error|panic' "$DIR/logs/strata.log" | tail -n 20 >&2
fi

# --- table -----------------------------------------------------------------------------
blocks_note=""
for s in $SERVERS; do blocks_note+="${blocks_note:+, }$s ${BLOCK_SIZE[$s]} B"; done
TABLE="$(python3 - "$ROWS" "$RUNTIME" "$LAYOUT" "$blocks_note" <<'EOF'
import sys
rows_path, runtime, layout, blocks_note = sys.argv[1:]
runtime = int(runtime)
rows = [l.rstrip("\n").split("\t") for l in open(rows_path) if l.strip()]
base = {}
parsed = []
for round_, label, server, iops, nbytes, ticks, tck, t0, t1, target in rows:
    iops, nbytes = float(iops), int(nbytes)
    cpu = int(ticks) / int(tck)
    mbps = iops * nbytes / 1e6
    # IOs iscsi-perf did in its run (its average is over RUNTIME s) per server CPU second.
    eff = iops * runtime / cpu if cpu > 0 else float("inf")
    parsed.append((round_, label, server, iops, mbps, cpu, eff, target))
    if server == "tgtd":
        base[round_] = (iops, eff)

def ratio(x, b):
    return f"{x / b:.2f}" if b and b != float("inf") and x != float("inf") else "-"

out = [
    f"libiscsi iscsi-perf, 1 session, {runtime}s per run (no ramp); logical blocks: "
    f"{blocks_note}; strata layout {layout}",
    "",
    "| workload | server | IOPS | MB/s | server CPU s | IOPS per server CPU-s | ratio to tgtd (IOPS) | target | efficiency ratio to tgtd |",
    "|---|---|---:|---:|---:|---:|---:|---|---:|",
]
for round_, label, server, iops, mbps, cpu, eff, target in parsed:
    b = base.get(round_)
    mb = f"{mbps:.0f}" if label.startswith("1M") else "-"
    e = f"{eff:,.0f}" if eff != float("inf") else "-"
    goal = "-"
    if server == "strata":
        goal = f"≥ {target}× tgtd"
        if b and b[0]:
            goal += ": met" if iops / b[0] >= float(target) else ": missed"
    out.append(
        f"| {label} | {server} | {iops:,.0f} | {mb} | {cpu:.2f} | {e} | "
        f"{ratio(iops, b[0]) if b else '-'} | {goal} | {ratio(eff, b[1]) if b else '-'} |"
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
