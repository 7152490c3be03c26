#!/usr/bin/env bash
# Side-by-side UDP throughput on loopback, in one run: iperf3 -u direct, through
# shadowsocks-rust's UDP tunnel (aes-128-gcm), and through sudp's shim forward + gateway.
#
#   bash benches/compare-peers.sh            # 1200-byte and 200-byte datagrams, rising rates
#   DURATION=5 SIZES="1200" bash benches/compare-peers.sh
#
# For each path and size it prints delivered Mbit/s, loss and the proxies' CPU time per
# delivered datagram (from /proc/PID/stat, both proxy processes together), then the best
# delivered rate at < 1% loss and the ratio sudp / shadowsocks-rust. Installs iperf3
# (Debian) and shadowsocks-rust (cargo) when missing. Every process it starts it stops by PID.
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
if ! command -v ssserver >/dev/null || ! command -v sslocal >/dev/null; then
  log "installing shadowsocks-rust (cargo install; takes a while on 2 cores)"
  cargo install --locked shadowsocks-rust --no-default-features \
    --features "local server local-tunnel multi-threaded aead-cipher logging"
fi
log "building sudp (release)"
cargo build --release --quiet
SUDP=$PWD/target/release/sudp

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_tcp() { # port
  for _ in $(seq 1 200); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 never opened" >&2; return 1
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
SS_PORT=$(free_port); SS_LOCAL=$(free_port)
ssserver -s "127.0.0.1:$SS_PORT" -m aes-128-gcm -k sudp-compare -U >/dev/null 2>&1 &
SS_SERVER=$!; PIDS+=($SS_SERVER)
sslocal --protocol tunnel -b "127.0.0.1:$SS_LOCAL" -f "127.0.0.1:$IPERF_PORT" \
  -s "127.0.0.1:$SS_PORT" -m aes-128-gcm -k sudp-compare -U >/dev/null 2>&1 &
SS_CLIENT=$!; PIDS+=($SS_CLIENT)
wait_tcp "$SS_LOCAL"

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

run() { # path port size rate proxy-pids...
  local path=$1 port=$2 size=$3 rate=$4; shift 4
  local before after json
  before=$( (($#)) && cpu_ticks "$@" || echo 0)
  json=$(iperf3 -c 127.0.0.1 -p "$port" -u -l "$size" -b "$rate" -t "$DURATION" \
    ${IPERF_WINDOW:+-w "$IPERF_WINDOW"} --json 2>/dev/null || true)
  after=$( (($#)) && cpu_ticks "$@" || echo 0)
  python3 - "$path" "$size" "$rate" "$before" "$after" "$HZ" <<PY >>"$RESULTS"
import json, sys
path, size, rate, before, after, hz = sys.argv[1:]
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
cpu_us = (int(after) - int(before)) / int(hz) * 1e6
per = cpu_us / delivered if delivered and path != "direct" else float("nan")
print(f"{path}\t{size}\t{rate}\t{mbps:.1f}\t{loss:.2f}\t{per:.2f}")
PY
  tail -n1 "$RESULTS" | awk -F'\t' '{printf "%-7s %5s B  offered %6s  delivered %8s Mbit/s  loss %6s%%  proxy CPU %6s us/dgram\n",$1,$2,$3,$4,$5,$6}' >&2
}

for size in $SIZES; do
  rates_var=RATES_$size; rates=${!rates_var:-$RATES_1200}
  for rate in $rates; do
    run direct "$IPERF_PORT" "$size" "$rate"
    run ss "$SS_LOCAL" "$size" "$rate" "$SS_SERVER" "$SS_CLIENT"
    run sudp "$SHIM_PORT" "$size" "$rate" "$SUDP_GW" "$SUDP_SHIM"
  done
done

python3 - "$RESULTS" <<'PY'
import sys, collections
best = collections.defaultdict(lambda: (0.0, float("nan")))
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("\npath     size  best delivered at <1% loss (Mbit/s)  proxy CPU at that rate (us/dgram)")
for path, size, rate, mbps, loss, cpu in rows:
    if float(loss) < 1.0 and float(mbps) > best[(path, size)][0]:
        best[(path, size)] = (float(mbps), float(cpu))
for (path, size), (mbps, cpu) in sorted(best.items(), key=lambda k: (k[0][1], k[0][0])):
    print(f"{path:<8} {size:>4}  {mbps:>10.1f}                          {cpu:>8.2f}")
for size in sorted({s for _, s in best}):
    ss, su = best[("ss", size)][0], best[("sudp", size)][0]
    if ss > 0:
        print(f"ratio sudp / shadowsocks-rust at {size} B: {su / ss:.2f}")
PY
