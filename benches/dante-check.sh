#!/usr/bin/env bash
# `sudp bench --socks` against a third-party SOCKS5 UDP proxy, Dante's danted, on loopback:
# the check docs/BENCHMARKS.md ("Against real deployments") describes. Starts
# `sudp bench reflect` as the far end and danted (no authentication, loopback only: it may
# relay nothing but 127.0.0.0/8 to 127.0.0.0/8), then runs the bench's naked and direct modes
# through it at a fixed, modest rate.
#
#   bash benches/dante-check.sh
#   SIZES=200,1200 RATE=5000 DURATION=3s SUDP_BIN=target/debug/sudp bash benches/dante-check.sh
#
# Installs dante-server (Debian) when danted is missing. Every process it starts it stops by
# PID.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-200,1200}
RATE=${RATE:-5000}
DURATION=${DURATION:-2s}
WORK=$(mktemp -d /tmp/sudp-dante.XXXXXX)
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '== %s\n' "$*" >&2; }

if ! command -v danted >/dev/null; then
  log "installing dante-server"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dante-server
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

# The far end: prints "reflecting UDP on ADDR" once bound.
"$SUDP" bench reflect --listen 127.0.0.1:0 --log warn >"$WORK/reflect.out" &
PIDS+=($!)
for _ in $(seq 1 100); do
  TARGET=$(sed -n 's/^reflecting UDP on //p' "$WORK/reflect.out")
  [ -n "$TARGET" ] && break
  sleep 0.05
done
[ -n "${TARGET:-}" ] || { echo "sudp bench reflect did not start" >&2; exit 1; }

PORT=$(free_port)
{
  echo "logoutput: $WORK/danted.log"
  echo "internal: 127.0.0.1 port = $PORT"
  echo "external: 127.0.0.1"
  echo "clientmethod: none"
  echo "socksmethod: none"
  [ "$(id -u)" = 0 ] && echo "user.unprivileged: nobody"
  echo "client pass { from: 127.0.0.0/8 to: 127.0.0.0/8 }"
  echo "socks pass { from: 127.0.0.0/8 to: 127.0.0.0/8 command: udpassociate }"
  echo "socks pass { from: 127.0.0.0/8 to: 127.0.0.0/8 command: udpreply }"
} >"$WORK/danted.conf"
danted -f "$WORK/danted.conf" -N 1 &
PIDS+=($!)
wait_tcp "$PORT"
log "danted $(danted -v 2>&1 | head -n1) on 127.0.0.1:$PORT, reflector $TARGET"

"$SUDP" bench --socks "127.0.0.1:$PORT" --target "$TARGET" --mode naked \
  --size "$SIZES" --rate "$RATE" --duration "$DURATION" --no-half
"$SUDP" bench --target "$TARGET" --mode direct \
  --size "$SIZES" --rate "$RATE" --duration "$DURATION" --no-half
