#!/usr/bin/env bash
# Side-by-side UDP throughput on loopback, in one run: iperf3 -u direct, through
# shadowsocks-rust's UDP tunnel (aes-128-gcm), and through sudp's shim forward + gateway.
#
#   bash benches/compare-peers.sh            # 1200-byte and 200-byte datagrams, rising rates
#   DURATION=5 SIZES="1200" bash benches/compare-peers.sh
#   IPERF_WINDOW= bash benches/compare-peers.sh          # iperf3's default socket buffer
#   PROFILE=1 STRACE=1 SIZES=1200 RATES_1200=1400M bash benches/compare-peers.sh
#
# For each path and size it prints delivered Mbit/s, loss and the proxies' CPU time per
# delivered datagram (from /proc/PID/stat: both proxy processes together, then each alone:
# the server side, ssserver or the sudp gateway, and the client side, sslocal or the sudp
# shim), the machine's UDP receive-buffer drops during the point (`RcvbufErrors` of
# /proc/net/snmp: system-wide, so a drop at the iperf3 server shows there too) and the
# drops on the proxies' own UDP sockets alone (/proc/net/udp, as `ss -uamn` shows them), then
# the best delivered rate at < 1% loss and the ratio sudp / shadowsocks-rust.
#
# PROFILE=1: after the table, one more point through sudp (PROFILE_SIZE, PROFILE_RATE;
# 1200 B at 1400M by default) under `perf record -F 2999 -g` of the gateway and of the shim,
# and the top symbols by self time of each (`perf report --no-children`). STRACE=1: the same
# point under `strace -c -f` of both, and the system calls per delivered datagram
# (epoll_wait, recvmmsg, sendmsg...). Both need root or perf_event_paranoid/ptrace_scope
# that allow attaching to one's own processes.
#
# SKIP_SS=1 leaves shadowsocks-rust out (direct and sudp only: no cargo install);
# SUDP_BIN=path uses that sudp binary instead of building the release one.
#
# Installs iperf3 (Debian) and shadowsocks-rust (cargo) when missing. Every process it
# starts it stops by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-3}
SIZES=${SIZES:-"1200 200"}
RATES_1200=${RATES_1200:-"200M 400M 600M 800M 1000M 1400M 1700M 2000M 2400M"}
RATES_200=${RATES_200:-"20M 50M 100M 150M 200M 300M 400M"}
# Socket buffer iperf3 asks for on both ends (-w; the server takes the client's). The
# default (net.core.rmem_default, 208 KiB here) holds about 90 datagrams of 1200 bytes: a
# burst from any path, or a moment when the iperf3 server is not scheduled on a busy
# 2-vCPU machine, overflows it and the loss measured is iperf3's, not the proxy's. The same
# value applies to every path; set IPERF_WINDOW= (empty) for iperf3's default.
IPERF_WINDOW=${IPERF_WINDOW-4M}
WORK=$(mktemp -d /tmp/sudp-compare.XXXXXX)
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '== %s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------
if ! command -v iperf3 >/dev/null; then
  log "installing iperf3"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3
fi
if [ "${SKIP_SS:-0}" != 1 ] && { ! command -v ssserver >/dev/null || ! command -v sslocal >/dev/null; }; then
  log "installing shadowsocks-rust (cargo install; takes a while on 2 cores)"
  cargo install --locked shadowsocks-rust --no-default-features \
    --features "local server local-tunnel multi-threaded aead-cipher logging"
fi
if [ -n "${SUDP_BIN:-}" ]; then
  SUDP=$SUDP_BIN
else
  log "building sudp (release)"
  cargo build --release --quiet
  SUDP=$PWD/target/release/sudp
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_tcp() { # port
  for _ in $(seq 1 200); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 never opened" >&2; return 1
}
rcvbuf_errors() { # the system-wide UDP RcvbufErrors counter of /proc/net/snmp
  awk '$1 == "Udp:" { if (!n) { for (i = 2; i <= NF; i++) if ($i == "RcvbufErrors") n = i } else { print $n; exit } }' /proc/net/snmp
}
socket_drops() { # pids... -> the kernel's drop count summed over those processes' UDP sockets
  # (the last column of /proc/net/udp{,6}, what `ss -uamn` shows as d<N>), matched by inode
  python3 - "$@" <<'PY'
import os, sys
inodes = set()
for pid in sys.argv[1:]:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
total = 0
for f in ("/proc/net/udp", "/proc/net/udp6"):
    for line in open(f).readlines()[1:]:
        cols = line.split()
        if cols[9] in inodes:
            total += int(cols[-1])
print(total)
PY
}
cpu_ticks() { # pids... -> utime+stime summed, in clock ticks
  local t=0
  for p in "$@"; do
    # fields 14 and 15 of /proc/PID/stat, after the command name in parentheses
    t=$((t + $(awk '{sub(/^.*\) /,""); print $12 + $13}' "/proc/$p/stat")))
  done
  echo "$t"
}
HZ=$(getconf CLK_TCK)

# --- the iperf3 server (target of every path) ------------------------------------------
IPERF_PORT=$(free_port)
iperf3 -s -p "$IPERF_PORT" >/dev/null 2>&1 &
PIDS+=($!)
wait_tcp "$IPERF_PORT"

# --- shadowsocks-rust: ssserver + sslocal in tunnel mode, TCP and UDP -------------------
if [ "${SKIP_SS:-0}" != 1 ]; then
SS_PORT=$(free_port); SS_LOCAL=$(free_port)
ssserver -s "127.0.0.1:$SS_PORT" -m aes-128-gcm -k sudp-compare -U >/dev/null 2>&1 &
SS_SERVER=$!; PIDS+=($SS_SERVER)
sslocal --protocol tunnel -b "127.0.0.1:$SS_LOCAL" -f "127.0.0.1:$IPERF_PORT" \
  -s "127.0.0.1:$SS_PORT" -m aes-128-gcm -k sudp-compare -U >/dev/null 2>&1 &
SS_CLIENT=$!; PIDS+=($SS_CLIENT)
wait_tcp "$SS_LOCAL"
fi

# --- sudp: gateway + shim with a TCP and a UDP forward on the same local port ----------
"$SUDP" cert --out "$WORK/pki" >/dev/null
GW_PORT=$(free_port); SHIM_PORT=$(free_port)
"$SUDP" gateway --listen "127.0.0.1:$GW_PORT" --cert "$WORK/pki/gateway.pem" --key "$WORK/pki/gateway.key" \
  --no-auth --allow 127.0.0.0/8 --log warn >/dev/null &
SUDP_GW=$!; PIDS+=($SUDP_GW)
wait_tcp "$GW_PORT"
"$SUDP" shim --gateway "127.0.0.1:$GW_PORT" --ca "$WORK/pki/ca.pem" --server-name localhost --no-socks \
  --forward "tcp:127.0.0.1:$SHIM_PORT=127.0.0.1:$IPERF_PORT" \
  --forward "udp:127.0.0.1:$SHIM_PORT=127.0.0.1:$IPERF_PORT" --log warn >/dev/null &
SUDP_SHIM=$!; PIDS+=($SUDP_SHIM)
wait_tcp "$SHIM_PORT"

RESULTS=$WORK/results.tsv
: > "$RESULTS"

run() { # path port size rate [server-pid client-pid]
  local path=$1 port=$2 size=$3 rate=$4; shift 4
  local before after before_s after_s before_c after_c drops0 drops1 sock0 sock1 json
  before=$( (($#)) && cpu_ticks "$@" || echo 0)
  before_s=$( (($#)) && cpu_ticks "$1" || echo 0)
  before_c=$( (($#)) && cpu_ticks "$2" || echo 0)
  drops0=$(rcvbuf_errors)
  sock0=$( (($#)) && socket_drops "$@" || echo 0)
  json=$(iperf3 -c 127.0.0.1 -p "$port" -u -l "$size" -b "$rate" -t "$DURATION" \
    ${IPERF_WINDOW:+-w "$IPERF_WINDOW"} --json 2>/dev/null || true)
  drops1=$(rcvbuf_errors)
  sock1=$( (($#)) && socket_drops "$@" || echo 0)
  after=$( (($#)) && cpu_ticks "$@" || echo 0)
  after_s=$( (($#)) && cpu_ticks "$1" || echo 0)
  after_c=$( (($#)) && cpu_ticks "$2" || echo 0)
  python3 - "$path" "$size" "$rate" "$before" "$after" "$HZ" "$before_s" "$after_s" \
    "$before_c" "$after_c" "$((drops1 - drops0))" "$((sock1 - sock0))" <<PY >>"$RESULTS"
import json, sys
path, size, rate, before, after, hz, bs, as_, bc, ac, drops, sock = sys.argv[1:]
try:
    d = json.loads('''$json''')
    s = d["end"].get("sum_received") or d["end"]["sum"]
    total = d["end"]["sum"].get("packets", 0)
    lost = d["end"]["sum"].get("lost_packets", 0)
    delivered = max(total - lost, 0)
    mbps = s["bits_per_second"] / 1e6
    loss = d["end"]["sum"].get("lost_percent", 100.0)
except Exception as e:
    mbps, loss, delivered = 0.0, 100.0, 0
def per(b, a):
    us = (int(a) - int(b)) / int(hz) * 1e6
    return us / delivered if delivered and path != "direct" else float("nan")
print(f"{path}\t{size}\t{rate}\t{mbps:.1f}\t{loss:.2f}\t{per(before, after):.2f}"
      f"\t{per(bs, as_):.2f}\t{per(bc, ac):.2f}\t{drops}\t{delivered}\t{sock}")
PY
  tail -n1 "$RESULTS" | awk -F'\t' '{printf "%-7s %5s B  offered %6s  delivered %8s Mbit/s  loss %6s%%  proxy CPU %6s us/dgram (server %s, client %s)  RcvbufErrors %s (proxy sockets %s)\n",$1,$2,$3,$4,$5,$6,$7,$8,$9,$11}' >&2
}

for size in $SIZES; do
  rates_var=RATES_$size; rates=${!rates_var:-$RATES_1200}
  for rate in $rates; do
    run direct "$IPERF_PORT" "$size" "$rate"
    [ "${SKIP_SS:-0}" = 1 ] || run ss "$SS_LOCAL" "$size" "$rate" "$SS_SERVER" "$SS_CLIENT"
    run sudp "$SHIM_PORT" "$size" "$rate" "$SUDP_GW" "$SUDP_SHIM"
  done
done

python3 - "$RESULTS" <<'PY'
import sys, collections
best = collections.defaultdict(lambda: (0.0, float("nan"), float("nan"), float("nan")))
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("\npath    size  offered  delivered Mbit/s  loss %  proxy CPU µs/dgram  server  client  RcvbufErrors  proxy socket drops")
for path, size, rate, mbps, loss, cpu, srv, cli, drops, _, sock in rows:
    print(f"{path:<7} {size:>4}  {rate:>6}  {mbps:>15}  {loss:>6}  {cpu:>18}  {srv:>6}  {cli:>6}  {drops:>12}  {sock:>18}")
print("\npath     size  best delivered at <1% loss (Mbit/s)  proxy CPU at that rate (us/dgram): both, server, client")
for path, size, rate, mbps, loss, cpu, srv, cli, drops, _, sock in rows:
    if float(loss) < 1.0 and float(mbps) > best[(path, size)][0]:
        best[(path, size)] = (float(mbps), float(cpu), float(srv), float(cli))
for (path, size), (mbps, cpu, srv, cli) in sorted(best.items(), key=lambda k: (k[0][1], k[0][0])):
    print(f"{path:<8} {size:>4}  {mbps:>10.1f}                          {cpu:>8.2f} {srv:>8.2f} {cli:>8.2f}")
for size in sorted({s for _, s in best}):
    ss, su = best[("ss", size)][0], best[("sudp", size)][0]
    if ss > 0:
        print(f"ratio sudp / shadowsocks-rust at {size} B: {su / ss:.2f}")
PY

# --- PROFILE=1 / STRACE=1: one more sudp point, instrumented ---------------------------
PROFILE_SIZE=${PROFILE_SIZE:-1200}
PROFILE_RATE=${PROFILE_RATE:-1400M}
instrumented() { # tool: perf or strace
  local tool=$1 out=$WORK/$1 tracers=() p
  mkdir -p "$out"
  for p in gateway:$SUDP_GW shim:$SUDP_SHIM; do
    if [ "$tool" = perf ]; then
      perf record -F 2999 -g -p "${p#*:}" -o "$out/${p%%:*}.data" -- sleep $((DURATION + 1)) \
        >/dev/null 2>&1 &
    else
      # -p for every thread: -f follows only threads started after the attach.
      local tids=()
      for t in /proc/"${p#*:}"/task/*; do tids+=(-p "${t##*/}"); done
      strace -c -f "${tids[@]}" -o "$out/${p%%:*}.txt" >/dev/null 2>&1 &
    fi
    tracers+=($!); PIDS+=($!)
  done
  sleep 0.5 # the tracers attach
  run sudp "$SHIM_PORT" "$PROFILE_SIZE" "$PROFILE_RATE" "$SUDP_GW" "$SUDP_SHIM"
  local delivered
  delivered=$(tail -n1 "$RESULTS" | cut -f10)
  if [ "$tool" = strace ]; then
    for p in "${tracers[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  fi
  for p in "${tracers[@]}"; do wait "$p" 2>/dev/null || true; done
  for p in gateway shim; do
    if [ "$tool" = perf ]; then
      echo; echo "== perf: $p, top symbols by self time ($PROFILE_SIZE B at $PROFILE_RATE)"
      perf report -i "$out/$p.data" --no-children --sort symbol --stdio 2>/dev/null \
        | grep -E '^ +[0-9.]+%' | sed -E 's/ +-? +-? *$//' | head -12 || true
    else
      echo; echo "== strace -c: $p, system calls per delivered datagram ($delivered delivered)"
      awk -v n="$delivered" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && n > 0 {
        printf "%-16s %10d calls  %6.2f per datagram\n", $NF, $4, $4 / n }' "$out/$p.txt" | head -12 || true
    fi
  done
}
[ "${PROFILE:-0}" = 1 ] && instrumented perf
[ "${STRACE:-0}" = 1 ] && instrumented strace
exit 0
