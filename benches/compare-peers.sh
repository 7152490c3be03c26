#!/usr/bin/env bash
# Side-by-side UDP throughput on loopback, in one run: iperf3 -u direct, through
# shadowsocks-rust's UDP tunnel (aes-128-gcm), and through sudp's shim forward + gateway with
# the default suite (`sudp`, AES-128-CBC + HMAC-SHA256) and with the AEAD suite 0x03
# (`sudp-gcm`, a second shim offering only aes128-gcm, same gateway). Each point runs twice:
# with iperf3's default socket buffers (what applications get unless they ask) and with
# `-w 4M`; both are reported in the same table (column `buf`).
#
#   bash benches/compare-peers.sh            # 1200-byte and 200-byte datagrams, rising rates
#   DURATION=5 SIZES="1200" bash benches/compare-peers.sh
#   WINDOWS=default bash benches/compare-peers.sh        # default buffers only (or WINDOWS=4M)
#   PROFILE=1 STRACE=1 SIZES=1200 RATES_1200=1400M bash benches/compare-peers.sh
#
# After the table, "latency under load": for each size, at half of sudp's highest clean rate
# (default buffers; 4M if none was clean), `sudp bench` sends a fixed rate for LAT_DURATION
# seconds through each sudp shim's local SOCKS5 (RFC 1928 UDP from the bench to the shim,
# secure records from there on) and directly, to a `sudp bench reflect` far end, and prints
# the p50/p99 of round trip / 2 (separate processes, so not one-way clocks) and the p99
# added over direct. LATENCY=0 skips it.
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
# PROXY_NICE=N starts sudp's gateway and shims under `nice -n N` (the `nice` key of their
# configs does the same), so iperf3 is scheduled before them when the 2 CPUs are short.
#
# Installs iperf3 (Debian) and shadowsocks-rust (cargo) when missing. Every process it
# starts it stops by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-3}
SIZES=${SIZES:-"1200 200"}
RATES_1200=${RATES_1200:-"200M 400M 600M 800M 1000M 1400M 1700M 2000M 2400M"}
RATES_200=${RATES_200:-"20M 50M 100M 150M 200M 300M 400M"}
# Socket buffers iperf3 asks for on both ends (-w; the server takes the client's), one run
# of every point per entry: "default" passes no -w (net.core.rmem_default, 208 KiB here,
# about 90 datagrams of 1200 bytes: what ffmpeg, VLC and WebRTC stacks get), "4M" passes
# -w 4M, which hides a receiver starved for a moment on a busy 2-vCPU machine. The old
# IPERF_WINDOW=VALUE (empty: default) still selects a single buffer.
if [ -n "${IPERF_WINDOW+set}" ]; then WINDOWS=${IPERF_WINDOW:-default}; fi
WINDOWS=${WINDOWS:-"default 4M"}
LATENCY=${LATENCY:-1}
LAT_DURATION=${LAT_DURATION:-3}
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

# --- sudp: gateway + two shims (CBC and AES-128-GCM), each with a TCP and a UDP forward on
# one local port and a local SOCKS5 (for the latency probe) ------------------------------
"$SUDP" cert --out "$WORK/pki" >/dev/null
GW_PORT=$(free_port)
run_logged() { log "$*"; "$@"; }
# Starts a command in the background, logged; $! is the command's own PID (not a subshell's:
# its /proc/PID/stat is what the CPU columns read).
bg_logged() { log "$*"; "$@" & }
bg_logged ${PROXY_NICE:+nice -n $PROXY_NICE} "$SUDP" gateway --listen "127.0.0.1:$GW_PORT" --cert "$WORK/pki/gateway.pem" \
  --key "$WORK/pki/gateway.key" --no-auth --allow 127.0.0.0/8 --log warn >/dev/null
SUDP_GW=$!; PIDS+=($SUDP_GW)
wait_tcp "$GW_PORT"
start_shim() { # suite -> sets SHIM_PID SHIM_FWD SHIM_SOCKS
  SHIM_FWD=$(free_port); SHIM_SOCKS=$(free_port)
  bg_logged ${PROXY_NICE:+nice -n $PROXY_NICE} "$SUDP" shim --gateway "127.0.0.1:$GW_PORT" --ca "$WORK/pki/ca.pem" --server-name localhost \
    --socks "127.0.0.1:$SHIM_SOCKS" --suites "$1" \
    --forward "tcp:127.0.0.1:$SHIM_FWD=127.0.0.1:$IPERF_PORT" \
    --forward "udp:127.0.0.1:$SHIM_FWD=127.0.0.1:$IPERF_PORT" --log warn >/dev/null
  SHIM_PID=$!; PIDS+=($SHIM_PID)
  wait_tcp "$SHIM_FWD"; wait_tcp "$SHIM_SOCKS"
}
start_shim aes128-cbc-hmac-sha256
SUDP_SHIM=$SHIM_PID; SHIM_PORT=$SHIM_FWD; SHIM_SOCKS_CBC=$SHIM_SOCKS
start_shim aes128-gcm
SUDP_SHIM_GCM=$SHIM_PID; SHIM_PORT_GCM=$SHIM_FWD; SHIM_SOCKS_GCM=$SHIM_SOCKS

RESULTS=$WORK/results.tsv
: > "$RESULTS"

run() { # path port size rate window [server-pid client-pid]
  local path=$1 port=$2 size=$3 rate=$4 win=$5; shift 5
  local wflag=()
  [ "$win" = default ] || wflag=(-w "$win")
  local before after before_s after_s before_c after_c drops0 drops1 sock0 sock1 json
  before=$( (($#)) && cpu_ticks "$@" || echo 0)
  before_s=$( (($#)) && cpu_ticks "$1" || echo 0)
  before_c=$( (($#)) && cpu_ticks "$2" || echo 0)
  drops0=$(rcvbuf_errors)
  sock0=$( (($#)) && socket_drops "$@" || echo 0)
  json=$(iperf3 -c 127.0.0.1 -p "$port" -u -l "$size" -b "$rate" -t "$DURATION" \
    "${wflag[@]}" --json 2>/dev/null || true)
  drops1=$(rcvbuf_errors)
  sock1=$( (($#)) && socket_drops "$@" || echo 0)
  after=$( (($#)) && cpu_ticks "$@" || echo 0)
  after_s=$( (($#)) && cpu_ticks "$1" || echo 0)
  after_c=$( (($#)) && cpu_ticks "$2" || echo 0)
  python3 - "$path" "$size" "$rate" "$before" "$after" "$HZ" "$before_s" "$after_s" \
    "$before_c" "$after_c" "$((drops1 - drops0))" "$((sock1 - sock0))" "$win" <<PY >>"$RESULTS"
import json, sys
path, size, rate, before, after, hz, bs, as_, bc, ac, drops, sock, win = sys.argv[1:]
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
      f"\t{per(bs, as_):.2f}\t{per(bc, ac):.2f}\t{drops}\t{delivered}\t{sock}\t{win}")
PY
  tail -n1 "$RESULTS" | awk -F'\t' '{printf "%-8s %5s B  buf %-7s offered %6s  delivered %8s Mbit/s  loss %6s%%  proxy CPU %6s us/dgram (server %s, client %s)  RcvbufErrors %s (proxy sockets %s)\n",$1,$2,$12,$3,$4,$5,$6,$7,$8,$9,$11}' >&2
}

for size in $SIZES; do
  rates_var=RATES_$size; rates=${!rates_var:-$RATES_1200}
  for rate in $rates; do
    for win in $WINDOWS; do
      run direct "$IPERF_PORT" "$size" "$rate" "$win"
      [ "${SKIP_SS:-0}" = 1 ] || run ss "$SS_LOCAL" "$size" "$rate" "$win" "$SS_SERVER" "$SS_CLIENT"
      run sudp "$SHIM_PORT" "$size" "$rate" "$win" "$SUDP_GW" "$SUDP_SHIM"
      run sudp-gcm "$SHIM_PORT_GCM" "$size" "$rate" "$win" "$SUDP_GW" "$SUDP_SHIM_GCM"
    done
  done
done

python3 - "$RESULTS" <<'PY'
import sys, collections
best = collections.defaultdict(lambda: (0.0, float("nan"), float("nan"), float("nan")))
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("\npath     size  buf      offered  delivered Mbit/s  loss %  proxy CPU µs/dgram  server  client  RcvbufErrors  proxy socket drops")
for path, size, rate, mbps, loss, cpu, srv, cli, drops, _, sock, win in rows:
    print(f"{path:<8} {size:>4}  {win:<7}  {rate:>6}  {mbps:>15}  {loss:>6}  {cpu:>18}  {srv:>6}  {cli:>6}  {drops:>12}  {sock:>18}")
print("\npath     size  buf      best delivered at <1% loss (Mbit/s)  proxy CPU at that rate (us/dgram): both, server, client")
for path, size, rate, mbps, loss, cpu, srv, cli, drops, _, sock, win in rows:
    if float(loss) < 1.0 and float(mbps) > best[(path, size, win)][0]:
        best[(path, size, win)] = (float(mbps), float(cpu), float(srv), float(cli))
for (path, size, win), (mbps, cpu, srv, cli) in sorted(best.items(), key=lambda k: (k[0][1], k[0][2], k[0][0])):
    print(f"{path:<8} {size:>4}  {win:<7}  {mbps:>10.1f}                          {cpu:>8.2f} {srv:>8.2f} {cli:>8.2f}")
for size, win in sorted({(s, w) for _, s, w in best}):
    d = best[("direct", size, win)][0]
    for path in ("sudp", "sudp-gcm"):
        su = best[(path, size, win)][0]
        ss = best[("ss", size, win)][0]
        if su <= 0:
            print(f"{path} at {size} B, {win} buffers: no point below 1% loss")
            continue
        line = f"{path} at {size} B, {win} buffers: best clean rate"
        if d > 0:
            line += f" {su / d:.2f}x direct's"
        if ss > 0:
            line += f", {su / ss:.2f}x shadowsocks-rust's"
        print(line)
PY

# --- latency under load: half of sudp's highest clean rate, sudp bench in its own process ---
if [ "$LATENCY" = 1 ]; then
  REFL_PORT=$(free_port)
  bg_logged "$SUDP" bench reflect --listen "127.0.0.1:$REFL_PORT" >/dev/null
  PIDS+=($!)
  python3 - "$REFL_PORT" <<'PY' # the reflector answers
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.1)
for _ in range(100):
    s.sendto(b"x" * 40, ("127.0.0.1", int(sys.argv[1])))
    try:
        s.recv(100); break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("the reflector never answered")
PY
  half_rate() { # path size -> half the best clean Mbit/s (default buffers, else any), or nothing
    python3 - "$RESULTS" "$1" "$2" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
path, size = sys.argv[2], sys.argv[3]
def best(win):
    clean = [float(r[3]) for r in rows if r[0] == path and r[1] == size and float(r[4]) < 1.0
             and (win is None or r[11] == win)]
    return max(clean, default=0.0)
b = best("default") or best(None)
if b > 0:
    print(f"{b / 2:.1f}")
PY
  }
  lat_bench() { # out.json args... -> "p50 p99" of round trip / 2, µs
    run_logged "$SUDP" bench "${@:2}" --duration "${LAT_DURATION}s" --no-half --json "$1" \
      >/dev/null 2>>"$WORK/latency.log" || true
    python3 - "$1" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["runs"][0]
    print(f'{r["p50_us"]:.1f} {r["p99_us"]:.1f} {r["loss_pct"]:.2f}')
except Exception:
    print("nan nan nan")
PY
  }
  LAT=$WORK/latency.tsv; : > "$LAT"
  for size in $SIZES; do
    for spec in sudp:$SHIM_SOCKS_CBC sudp-gcm:$SHIM_SOCKS_GCM; do
      path=${spec%%:*}; socks=${spec#*:}
      half=$(half_rate "$path" "$size")
      if [ -z "$half" ]; then log "latency: $path $size B had no clean rate, skipped"; continue; fi
      read -r d50 d99 dloss < <(lat_bench "$WORK/lat-direct-$path-$size.json" --target "127.0.0.1:$REFL_PORT" \
        --mode direct --size "$size" --rate "${half}Mbit")
      read -r s50 s99 sloss < <(lat_bench "$WORK/lat-$path-$size.json" --socks "127.0.0.1:$socks" \
        --target "127.0.0.1:$REFL_PORT" --mode naked --size "$size" --rate "${half}Mbit")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$path" "$size" "$half" "$d50" "$d99" "$dloss" \
        "$s50" "$s99" "$sloss" >> "$LAT"
    done
  done
  python3 - "$LAT" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("\nlatency under load: round trip / 2 (sudp bench, separate processes, via the shim's SOCKS5), "
      "at half of each suite's best clean rate")
print("path      size  rate Mbit/s   direct p50/p99 µs (loss %)   sudp p50/p99 µs (loss %)   p99 added over direct µs")
for path, size, rate, d50, d99, dl, s50, s99, sl in rows:
    added = float(s99) - float(d99)
    print(f"{path:<9} {size:>4}  {rate:>11}   {d50:>8}/{d99:<8} ({dl:>5})   {s50:>8}/{s99:<8} ({sl:>5})   {added:>10.1f}")
PY
fi
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
  run sudp "$SHIM_PORT" "$PROFILE_SIZE" "$PROFILE_RATE" "${WINDOWS%% *}" "$SUDP_GW" "$SUDP_SHIM"
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
