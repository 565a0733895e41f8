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

# Cleanup state. The traps go in before anything is created, and a signal that arrives while a
# namespace is being created and recorded is held until the name is in NSES (bash runs a trap between
# two commands, so without this a TERM right after `ip netns add` would exit before the name is
# recorded and leave the namespace behind).
ID="" PREFIX="" BR_NS=""
NSES=() PIDS=()
CRITICAL=0 PENDING=""
on_signal() {  # on_signal EXIT_CODE
  if (( CRITICAL )); then PENDING=$1; return 0; fi
  exit "$1"
}
leave_critical() {
  CRITICAL=0
  if [[ -n $PENDING ]]; then exit "$PENDING"; fi
  return 0
}

# Our processes: the torchrun process groups (each led by its setsid'd timeout), then whatever still
# runs inside our namespaces (torchrun starts its workers in sessions of their own).
ns_pids() {
  local ns
  for ns in "${NSES[@]}"; do ip netns pids "$ns" 2>/dev/null || true; done
}
live_in_groups() {  # processes of our torchrun process groups that have not exited (zombies excluded)
  (( ${#PIDS[@]} )) || { echo 0; return 0; }
  ps -e -o pgid=,stat= | awk -v g=" ${PIDS[*]} " 'index(g, " " $1 " ") && $2 !~ /^Z/ {n++} END {print n+0}'
}
kill_children() {
  local p i
  for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  for p in $(ns_pids); do kill -TERM "$p" 2>/dev/null || true; done
  for i in $(seq 1 30); do  # up to 3 s for a clean exit (torchrun stops its workers on TERM)
    [[ $(live_in_groups) == 0 && -z $(ns_pids) ]] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
  for p in $(ns_pids); do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for i in $(seq 1 30); do  # a killed process holds its namespace (and veth) until it is gone
    [[ -z $(ns_pids) ]] && break
    sleep 0.1
  done
  return 0
}

cleanup() {
  local rc=$? left ns
  trap '' INT TERM HUP  # a second signal must not cut the cleanup short
  trap - EXIT
  set +e
  kill_children
  # Deleting a namespace removes the veth ends (and the bridge) inside it. Everything named with our
  # run's prefix is ours (the bridge namespace is the lock on the id).
  if [[ -n $PREFIX ]]; then
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}" || true); do NSES+=("$ns"); done
  fi
  for ns in "${NSES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  if [[ -n $PREFIX ]]; then
    left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -c "^${PREFIX}" || true)
    [[ $left == 0 ]] || echo "multihost: WARNING: $left namespace(s) ${PREFIX}* left behind" >&2
  fi
  (( rc == 130 || rc == 143 || rc == 129 )) && echo "multihost: interrupted (exit $rc); namespaces, links and processes removed" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'on_signal 129' HUP

# A run id in 1..254 that no namespace uses yet (the bridge namespace is created first and is the lock).
pick_id() {
  local id
  for _ in $(seq 1 50); do
    id=${RUN_ID:-$(( (RANDOM % 254) + 1 ))}
    CRITICAL=1
    if ip netns add "fastar-mh${id}-br" 2>/dev/null; then
      ID=$id PREFIX="fastar-mh${id}-" BR_NS="fastar-mh${id}-br"
      NSES+=("$BR_NS")
      leave_critical
      return 0
    fi
    leave_critical
    [[ -n $RUN_ID ]] && break
  done
  return 1
}
pick_id || { echo "multihost: cannot create a network namespace (fastar-mh${RUN_ID:-?}-br): not root," \
  "no CAP_NET_ADMIN, or the id is taken" >&2; exit 4; }
echo "multihost: run id $ID, namespaces ${PREFIX}*" >&2
OUT=${OUT:-$(mktemp -d "/tmp/fastar-multihost-${ID}-XXXX")}
mkdir -p "$OUT"

ip -n "$BR_NS" link add br0 type bridge
ip -n "$BR_NS" link set br0 up
ip -n "$BR_NS" link set lo up

# netem (the delay) is not in every kernel: this project's CI kernel is built without it
# (CONFIG_NET_SCH_NETEM is not set, no modules to load; tbf, htb and pfifo exist, fq for EDT-based
# delay does not). Probe once; without it the links are rate-limited by tbf alone and the delay is
# reported as not applied (the worker's "pred" then uses alpha = 0, "pred_ml" the measured latency).
BURST=$(( RATE_BIT / 8 / 2000 )); (( BURST < 16384 )) && BURST=16384   # 0.5 ms at line rate, >= 16 KiB
HAVE_NETEM=0 NETEM_ERR=""
if (( DELAY_US > 0 )); then
  if NETEM_ERR=$(tc -n "$BR_NS" qdisc add dev lo root netem delay "${DELAY_US}us" 2>&1); then
    HAVE_NETEM=1
    tc -n "$BR_NS" qdisc del dev lo root 2>/dev/null || true
  fi
fi
shape() {  # shape NS DEV: egress of DEV in NS
  local ns=$1 dev=$2
  if (( HAVE_NETEM )); then
    tc -n "$ns" qdisc add dev "$dev" root handle 1: netem delay "${DELAY_US}us" limit 100000
    tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: tbf rate "$RATE_BIT" burst "$BURST" latency 200ms
  else
    tc -n "$ns" qdisc add dev "$dev" root handle 10: tbf rate "$RATE_BIT" burst "$BURST" latency 200ms
  fi
}

for i in $(seq 0 $((HOSTS - 1))); do
  ns="${PREFIX}h$i" hv="mh${ID}h$i" bv="mh${ID}p$i"
  NSES+=("$ns")  # recorded first: the name carries our id, so cleanup may delete it even if never made
  ip netns add "$ns"
  ip link add "$hv" netns "$ns" type veth peer name "$bv" netns "$BR_NS"
  ip -n "$BR_NS" link set "$bv" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "10.77.$ID.$((i + 1))/24" dev "$hv"
  ip -n "$ns" link set "$hv" up
  # host -> bridge carries the delay (one way = --delay) and the rate; bridge -> host the rate only,
  # so that a host also receives at most at line rate (a full-duplex NIC).
  shape "$ns" "$hv"
  tc -n "$BR_NS" qdisc add dev "$bv" root tbf rate "$RATE_BIT" burst "$BURST" latency 200ms
done
DELAY_APPLIED=$(( DELAY_US == 0 || HAVE_NETEM ))
SHAPER="$(tc -n "${PREFIX}h0" qdisc show dev "mh${ID}h0" | tr '\n' ';')"
if (( ! DELAY_APPLIED )); then
  echo "multihost: WARNING: --delay $DELAY requested, but this kernel has no netem qdisc" \
    "(tc: ${NETEM_ERR:-netem failed}): NO DELAY IS APPLIED. The links are rate-limited by tbf at $RATE only;" \
    "the 'pred' column uses alpha = 0 and 'pred_ml' the latency measured in this run. Use --delay 0 to" \
    "silence this, or a kernel with CONFIG_NET_SCH_NETEM for delay emulation." >&2
fi
echo "multihost: $HOSTS hosts x $PPH ranks, rate $RATE ($RATE_BIT bit/s), delay $DELAY" \
  "($( (( DELAY_APPLIED )) && echo applied || echo 'NOT applied: no netem')), shaper: $SHAPER" >&2

MASTER="10.77.$ID.1"
for i in $(seq 0 $((HOSTS - 1))); do
  ns="${PREFIX}h$i" hv="mh${ID}h$i"
  # setsid: each torchrun leads its own process group, which cleanup kills as a whole; a signal
  # is held until its pid is recorded
  CRITICAL=1
  setsid timeout -k 10 "$TIMEOUT" ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$hv" TP_SOCKET_IFNAME="$hv" \
    OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 \
    "$TORCHRUN" --nnodes "$HOSTS" --node-rank "$i" --nproc-per-node "$PPH" \
      --master-addr "$MASTER" --master-port "$PORT" --max-restarts 0 \
      "$REPO/bench/multihost_worker.py" --sizes "$SIZES" --rate-bit "$RATE_BIT" --delay-us "$DELAY_US" \
      --delay-applied "$DELAY_APPLIED" --shaper "$SHAPER" --model "$MODEL" --train-steps "$TRAIN_STEPS" \
      --rounds "$ROUNDS" --timeout-s "$TIMEOUT" --json "$OUT/multihost.json" \
    >"$OUT/host$i.log" 2>&1 &
  PIDS+=($!)
  leave_critical
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
