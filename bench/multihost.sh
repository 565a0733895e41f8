#!/usr/bin/env bash
# A multi-host run on one machine: N network namespaces ("hosts") joined by veth links to a bridge
# that lives in its own namespace, each link shaped by tc (rate, and delay where the kernel has
# netem), then torchrun's multi-node rendezvous across them running bench/multihost_worker.py
# (fastar.all_reduce per hierarchy/algorithm vs torch's Gloo allreduce, exact checks, a few
# fastar.wrap training steps, the simulator's prediction next to every measurement).
#
#   sudo bench/multihost.sh [--hosts 2..4] [--procs-per-host 1|2] [--rate 1gbit] [--delay 1ms]
#                           [--sizes 64K,1M,8M] [--model small_cnn|resnet18] [--train-steps 4]
#                           [--timeout 300] [--run-id 1..254] [--out DIR]
#
# Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN), ip, tc. Names carry a per-run id: namespaces
# fastar-mh<id>-h<i> and fastar-mh<id>-br, links mh<id>h<i> (host side) / mh<id>p<i> (bridge side),
# addresses 10.77.<id>.<i+1>/24. Everything is removed on exit, on failure and on INT/TERM.
# Writes DIR/multihost.json (rank 0) and DIR/host<i>.log; prints the measured vs predicted table.
set -euo pipefail
shopt -s inherit_errexit

HOSTS=2 PPH=1 RATE=1gbit DELAY=1ms SIZES=64K,1M,8M OUT="" RUN_ID="" TIMEOUT=300
MODEL=small_cnn TRAIN_STEPS=4 ROUNDS=3 PORT=29500
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) HOSTS=$2; shift 2 ;;
    --procs-per-host) PPH=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --delay) DELAY=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --train-steps) TRAIN_STEPS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --run-id) RUN_ID=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "multihost.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $HOSTS =~ ^[2-4]$ ]] || { echo "multihost.sh: --hosts must be 2..4, got $HOSTS" >&2; exit 2; }
[[ $PPH =~ ^[12]$ ]] || { echo "multihost.sh: --procs-per-host must be 1 or 2, got $PPH" >&2; exit 2; }
for tool in ip tc timeout setsid; do
  command -v "$tool" >/dev/null || { echo "multihost.sh: '$tool' not found; install iproute2/coreutils" >&2; exit 3; }
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
TORCHRUN=${TORCHRUN:-$REPO/.venv/bin/torchrun}
[[ -x $TORCHRUN ]] || { echo "multihost.sh: $TORCHRUN not found (set TORCHRUN=)" >&2; exit 3; }

# "1gbit" / "100mbit" / "500kbit" -> bit/s; "1ms" / "200us" -> us
to_bits() { awk -v s="$1" 'BEGIN{ v=s+0; u=tolower(s); sub(/^[0-9.]+/, "", u);
  m = (u=="gbit")?1e9:(u=="mbit")?1e6:(u=="kbit")?1e3:(u=="bit"||u=="")?1:-1;
  if (m<0) exit 1; printf "%.0f", v*m }'; }
to_us() { awk -v s="$1" 'BEGIN{ v=s+0; u=tolower(s); sub(/^[0-9.]+/, "", u);
  m = (u=="s")?1e6:(u=="ms")?1e3:(u=="us")?1:-1; if (m<0) exit 1; printf "%.0f", v*m }'; }
RATE_BIT=$(to_bits "$RATE") || { echo "multihost.sh: --rate $RATE: use e.g. 1gbit, 100mbit" >&2; exit 2; }
DELAY_US=$(to_us "$DELAY") || { echo "multihost.sh: --delay $DELAY: use e.g. 1ms, 200us" >&2; exit 2; }

# A run id in 1..254 that no namespace uses yet (the bridge namespace is created first and is the lock).
pick_id() {
  local id
  for _ in $(seq 1 50); do
    id=${RUN_ID:-$(( (RANDOM % 254) + 1 ))}
    if ip netns add "fastar-mh${id}-br" 2>/dev/null; then echo "$id"; return 0; fi
    [[ -n $RUN_ID ]] && break
  done
  return 1
}
ID=$(pick_id) || { echo "multihost.sh: cannot create a network namespace (fastar-mh${RUN_ID:-?}-br): not root," \
  "no CAP_NET_ADMIN, or the id is taken" >&2; exit 4; }
PREFIX="fastar-mh${ID}-"
BR_NS="${PREFIX}br"
NSES=("$BR_NS")
PIDS=()
echo "multihost: run id $ID, namespaces ${PREFIX}*" >&2
OUT=${OUT:-$(mktemp -d "/tmp/fastar-multihost-${ID}-XXXX")}
mkdir -p "$OUT"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # our torchruns first (each leads its own process group), then whatever still runs inside our namespaces
  for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  sleep 0.5
  for ns in "${NSES[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  done
  for p in "${PIDS[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
  # deleting a namespace removes the veth ends (and the bridge) inside it
  for ns in "${NSES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  local left
  left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -c "^${PREFIX}" || true)
  [[ $left == 0 ]] || echo "multihost: WARNING: $left namespace(s) ${PREFIX}* left behind" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip -n "$BR_NS" link add br0 type bridge
ip -n "$BR_NS" link set br0 up
ip -n "$BR_NS" link set lo up

# netem (delay, optionally with its own rate) is not in every kernel; tbf alone then shapes the rate
# and the delay is reported as not applied (the worker's prediction then uses alpha = 0 and the
# measured round trip).
BURST=$(( RATE_BIT / 8 / 2000 )); (( BURST < 16384 )) && BURST=16384   # 0.5 ms at line rate, >= 16 KiB
shape() {  # shape NS DEV: egress of DEV in NS
  local ns=$1 dev=$2
  if (( DELAY_US > 0 )) && tc -n "$ns" qdisc add dev "$dev" root handle 1: netem delay "${DELAY_US}us" limit 100000 2>/dev/null; then
    tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: tbf rate "$RATE_BIT" burst "$BURST" latency 200ms
    echo netem
  else
    tc -n "$ns" qdisc add dev "$dev" root handle 10: tbf rate "$RATE_BIT" burst "$BURST" latency 200ms
    echo tbf
  fi
}

DELAY_APPLIED=1
for i in $(seq 0 $((HOSTS - 1))); do
  ns="${PREFIX}h$i" hv="mh${ID}h$i" bv="mh${ID}p$i"
  ip netns add "$ns"
  NSES+=("$ns")
  ip link add "$hv" netns "$ns" type veth peer name "$bv" netns "$BR_NS"
  ip -n "$BR_NS" link set "$bv" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "10.77.$ID.$((i + 1))/24" dev "$hv"
  ip -n "$ns" link set "$hv" up
  # host -> bridge carries the delay (one way = --delay) and the rate; bridge -> host the rate only,
  # so that a host also receives at most at line rate (a full-duplex NIC).
  kind=$(shape "$ns" "$hv")
  [[ $kind == netem ]] || DELAY_APPLIED=0
  tc -n "$BR_NS" qdisc add dev "$bv" root tbf rate "$RATE_BIT" burst "$BURST" latency 200ms
done
(( DELAY_US == 0 )) && DELAY_APPLIED=1
SHAPER="$(tc -n "${PREFIX}h0" qdisc show dev "mh${ID}h0" | tr '\n' ';')"
if (( DELAY_APPLIED == 0 )); then
  echo "multihost: WARNING: this kernel has no netem qdisc; links are rate-limited by tbf, the ${DELAY} delay is NOT applied" >&2
fi
echo "multihost: $HOSTS hosts x $PPH ranks, rate $RATE ($RATE_BIT bit/s), shaper: $SHAPER" >&2

MASTER="10.77.$ID.1"
for i in $(seq 0 $((HOSTS - 1))); do
  ns="${PREFIX}h$i" hv="mh${ID}h$i"
  # setsid: each torchrun leads its own process group, which cleanup kills as a whole
  setsid timeout -k 10 "$TIMEOUT" ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$hv" TP_SOCKET_IFNAME="$hv" \
    OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 \
    "$TORCHRUN" --nnodes "$HOSTS" --node-rank "$i" --nproc-per-node "$PPH" \
      --master-addr "$MASTER" --master-port "$PORT" --max-restarts 0 \
      "$REPO/bench/multihost_worker.py" --sizes "$SIZES" --rate-bit "$RATE_BIT" --delay-us "$DELAY_US" \
      --delay-applied "$DELAY_APPLIED" --shaper "$SHAPER" --model "$MODEL" --train-steps "$TRAIN_STEPS" \
      --rounds "$ROUNDS" --timeout-s "$TIMEOUT" --json "$OUT/multihost.json" \
    >"$OUT/host$i.log" 2>&1 &
  PIDS+=($!)
done

rc=0
for i in "${!PIDS[@]}"; do
  r=0; wait "${PIDS[$i]}" || r=$?
  if (( r != 0 )); then
    rc=$r
    echo "multihost: host $i exited with $r (124: timeout after ${TIMEOUT}s); last lines of $OUT/host$i.log:" >&2
    tail -n 25 "$OUT/host$i.log" >&2 || true
  fi
done
if (( rc == 0 )); then
  # rank 0's table (torchrun prefixes nothing without --tee; the worker prints it on host 0)
  sed -n '/^[0-9]* hosts x /,/^all correct/p' "$OUT/host0.log"
  grep -q '^all correct: True' "$OUT/host0.log" || { echo "multihost: results not all correct" >&2; rc=5; }
fi
echo "multihost: results in $OUT/multihost.json" >&2
exit "$rc"
