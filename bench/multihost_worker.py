"""The worker of bench/multihost.sh: one rank of a multi-node torchrun job whose "hosts" are network
namespaces joined by rate-limited veth links.

    torchrun --nnodes N --node-rank i --nproc-per-node P --master-addr A --master-port 29500 \
        bench/multihost_worker.py --rate-bit 1e9 --delay-us 1000 --delay-applied 1 --json out.json

Per size: a correctness pass of every impl on integer-valued float32 data (exact sums), then timed
rounds in which every impl runs once in a rotated order (drift on a shared host hits all alike); a
block of calls starts after a barrier, its time is the max over ranks, time_us is the median block
over rounds, per call. Impls: "torch:gloo" and "fastar:<hierarchy>:<algorithm>" (leader and rail
only with more than one rank per host). Then a few fastar.wrap training steps of a small model and
an exact comparison of every parameter across ranks.

Rank 0 writes the JSON and prints the table with, next to each measurement, the simulator's
prediction (fastar.simulate.allreduce_time) for the same link: alpha = the configured one-way delay,
beta = 8 / rate ("pred_us"), and the same with the link as measured ("pred_meas_link_us"): alpha =
a 4-byte allreduce's time per step (adds the software stack's latency), beta = 1 / plain TCP
goodput between two hosts with both directions busy (adds headers and TCP's dynamics).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import fastar  # noqa: E402
from fastar import simulate  # noqa: E402
from common import fmt_bytes as fmt_size, max_over_ranks, parse_sizes  # noqa: E402
from stamp import write_result  # noqa: E402


def impls_for(local_size: int) -> list[str]:
    hier = ["flat"] + (["leader", "rail"] if local_size > 1 else [])
    return ["torch:gloo"] + [f"fastar:{h}:{a}" for h in hier for a in ("halving_doubling", "ring")]


def call(impl: str, t: torch.Tensor) -> None:
    if impl == "torch:gloo":
        dist.all_reduce(t)
    else:
        _, h, a = impl.split(":")
        fastar.all_reduce(t, algorithm=a, hierarchy=h, validate=False)


def fill(t: torch.Tensor, rank: int) -> None:
    # small integers: every partial sum is exact in float32, whatever the order of additions
    torch.remainder(torch.arange(t.numel(), dtype=torch.float32), 13, out=t)
    t.add_(rank)


def expected(numel: int, world: int) -> torch.Tensor:
    return torch.remainder(torch.arange(numel, dtype=torch.float32), 13) * world + world * (world - 1) / 2


def small_alpha_us(ctl, topo, n: int = 30) -> float:
    """Effective per-step latency: the median time of a 4-byte flat halving/doubling allreduce
    divided by its number of steps on the critical path (what the simulator counts)."""
    t = torch.zeros(1)
    for _ in range(3):
        fastar.all_reduce(t, algorithm="halving_doubling", hierarchy="flat", validate=False)
    ts = []
    for _ in range(n):
        dist.barrier(group=ctl)
        t0 = time.perf_counter()
        fastar.all_reduce(t, algorithm="halving_doubling", hierarchy="flat", validate=False)
        ts.append(max_over_ranks(time.perf_counter() - t0, ctl))
    steps = simulate.features("fastar:flat:halving_doubling", 4, topo.size, topo.local_size)[0]
    return statistics.median(ts) / steps * 1e6


def tcp_goodput(peer: int, ctl, nbytes: int = 8 << 20) -> dict:
    """Plain TCP between rank 0 (host 0) and `peer` (host 1) over the shaped link: bytes/s of
    payload one way, and each way while both directions carry data at once (what an allreduce
    step does). The link's real beta, below the tc rate by the headers and TCP's dynamics."""
    import socket
    import threading
    rank = dist.get_rank()
    port = torch.zeros(1, dtype=torch.int64)
    srv = None
    if rank == 0:
        srv = socket.socket()
        srv.bind((os.environ["MASTER_ADDR"], 0))
        srv.listen(1)
        srv.settimeout(30)
        port[0] = srv.getsockname()[1]
    dist.broadcast(port, 0, group=ctl)
    res = torch.zeros(2, dtype=torch.float64)
    if rank in (0, peer):
        if rank == 0:
            conn, _ = srv.accept()
        else:
            conn = socket.create_connection((os.environ["MASTER_ADDR"], int(port.item())), timeout=30)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(60)
        data, buf = b"x" * nbytes, bytearray(1 << 20)

        def recv_all(n):
            while n > 0:
                n -= conn.recv_into(buf, min(n, len(buf)))
        # one way: peer -> 0, timed on the peer until rank 0 acknowledges
        t0 = time.perf_counter()
        if rank == peer:
            conn.sendall(data)
            recv_all(1)
        else:
            recv_all(nbytes)
            conn.sendall(b"k")
        one = time.perf_counter() - t0
        # both ways at once
        recv_all(1) if rank == 0 else None
        conn.sendall(b"g") if rank == peer else None
        if rank == 0:
            conn.sendall(b"g")
        else:
            recv_all(1)
        t0 = time.perf_counter()
        th = threading.Thread(target=conn.sendall, args=(data,))
        th.start()
        recv_all(nbytes)
        th.join()
        both = time.perf_counter() - t0
        conn.close()
        if rank == peer:
            res[0] = nbytes / one
        res[1] = nbytes / both
    if srv is not None:
        srv.close()
    dist.all_reduce(res, op=dist.ReduceOp.MAX, group=ctl)  # one-way from the peer, duplex: the better side
    return {"one_way_Bps": float(res[0]), "duplex_Bps": float(res[1]), "bytes": nbytes}


def host_rates() -> dict:
    """Memcpy and sum rates of this host (the simulator's intra-node beta and gamma)."""
    a, b = torch.ones(4 << 20), torch.ones(4 << 20)
    best_cp = best_add = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best_cp = min(best_cp, time.perf_counter() - t0)
        t0 = time.perf_counter()
        b.add_(a)
        best_add = min(best_add, time.perf_counter() - t0)
    return {"memcpy_GBps": a.numel() * 4 / best_cp / 1e9, "sum_GBps": a.numel() * 4 / best_add / 1e9}


def sim_topo(args, nodes: int, local: int, alpha_s: float, rates: dict, rate_bit: float | None = None) -> simulate.Topo:
    """The namespace cluster in the simulator's terms: one shaped NIC per host shared by its ranks,
    shared memory inside a host."""
    return simulate.Topo(nodes=nodes, gpus=local, nics=1,
                         a_in=args.intra_alpha_us * 1e-6, b_in=1 / (rates["memcpy_GBps"] * 1e9),
                         g_in=1 / (rates["sum_GBps"] * 1e9),
                         a_net=alpha_s, b_net=8 / (rate_bit or args.rate_bit), g_net=1 / (rates["sum_GBps"] * 1e9))


def predict_us(impl: str, nbytes: int, topo: simulate.Topo) -> float:
    h, a = simulate.parse_impl(impl)  # torch:gloo -> a flat ring
    return simulate.allreduce_time(float(nbytes), h, a, topo) * 1e6


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def build_model(name: str) -> nn.Module:
    if name == "small_cnn":
        return SmallCNN()
    import torchvision
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def train(args, ctl, topo_sim) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234 + rank)  # different initial weights: wrap must broadcast rank 0's
    model = fastar.wrap(build_model(args.model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    step_s, comm_s, losses = [], [], []
    buckets = []
    for i in range(args.train_steps):
        dist.barrier(group=ctl)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        dt = max_over_ranks(time.perf_counter() - t0, ctl)
        st = model.comm_stats()
        if i > 0:  # the first step also lays out the buckets
            step_s.append(dt)
            comm_s.append(max_over_ranks(st["comm_s"], ctl))
        buckets = [b["bytes"] for b in st["buckets"]]
        losses.append(float(loss.item()))
    # every parameter and buffer must be bit-identical across ranks
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0, group=ctl)
    mismatch = torch.tensor([int((flat != ref).sum())], dtype=torch.int64)
    dist.all_reduce(mismatch, group=ctl)
    pred_comm = sum(_pred_auto(b, topo_sim) for b in buckets) / 1e3
    return {"model": args.model, "image_size": args.image_size, "batch_per_rank": args.batch,
            "steps": args.train_steps, "param_count": int(flat.numel()), "bucket_bytes": buckets,
            "step_ms": statistics.median(step_s) * 1e3 if step_s else None,
            "comm_ms": statistics.median(comm_s) * 1e3 if comm_s else None,
            "pred_comm_ms": pred_comm, "loss_first": losses[0], "loss_last": losses[-1],
            "param_mismatch_elements": int(mismatch.item()), "params_identical": int(mismatch.item()) == 0}


def _pred_auto(nbytes: int, topo_sim: simulate.Topo) -> float:
    """What fastar's "auto" picks for this size on this topology, as the simulator prices it."""
    from fastar.policy import choose
    a, h, _ = choose(nbytes, "auto", "auto", topo_sim.nodes * topo_sim.gpus, topo_sim.gpus)
    return simulate.allreduce_time(float(nbytes), h, a, topo_sim) * 1e6


def measure(args, ctl, impls, sizes, rank, world):
    rows = []
    for nbytes in sizes:
        numel = nbytes // 4
        t = torch.empty(numel)
        wrong = {}
        for impl in impls:  # correctness pass
            fill(t, rank)
            call(impl, t)
            w = torch.tensor([int((t != expected(numel, world)).sum())], dtype=torch.int64)
            dist.all_reduce(w, group=ctl)
            wrong[impl] = int(w.item())
        for impl in impls:  # warm-up
            call(impl, t)
        per_call = max(1, min(args.max_calls, int(args.block_s / max(1e-4, est_s(nbytes, args)))))
        blocks = {impl: [] for impl in impls}
        for r in range(args.rounds):
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for impl in order:
                fill(t, rank)
                dist.barrier(group=ctl)
                t0 = time.perf_counter()
                for _ in range(per_call):
                    call(impl, t)
                blocks[impl].append(max_over_ranks((time.perf_counter() - t0) / per_call, ctl))
        for impl in impls:
            tu = statistics.median(blocks[impl]) * 1e6
            rows.append({"impl": impl, "bytes": nbytes, "dtype": "float32", "time_us": tu,
                         "time_us_min": min(blocks[impl]) * 1e6, "calls": per_call * args.rounds,
                         "algbw_GBps": nbytes / tu / 1e3, "wrong": wrong[impl]})
        if rank == 0:
            print(f"[multihost] {fmt_size(nbytes)} done", file=sys.stderr, flush=True)
    return rows


def est_s(nbytes: int, args) -> float:
    """A rough time per call, to size the timed blocks: two passes over the link plus latency."""
    return 2 * nbytes * 8 / args.rate_bit + 4 * (args.delay_us * 1e-6 + 200e-6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64K,1M,8M")
    ap.add_argument("--rate-bit", type=float, required=True, help="link rate, bit/s (as shaped by tc)")
    ap.add_argument("--delay-us", type=float, default=0.0, help="configured one-way delay")
    ap.add_argument("--delay-applied", type=int, default=1, help="0: netem was missing, no delay is on the links")
    ap.add_argument("--shaper", default="", help="the qdisc line used, for the record")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block-s", type=float, default=0.15, help="target seconds per timed block")
    ap.add_argument("--max-calls", type=int, default=20)
    ap.add_argument("--intra-alpha-us", type=float, default=10.0)
    ap.add_argument("--model", default="small_cnn", help="small_cnn or a torchvision constructor (resnet18)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=120)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    timeout = timedelta(seconds=args.timeout_s)
    dist.init_process_group("gloo", timeout=timeout)
    topo = fastar.init(timeout=timeout)  # local size from torchrun's LOCAL_WORLD_SIZE
    rank, world = dist.get_rank(), dist.get_world_size()
    ctl = dist.new_group(backend="gloo", timeout=timeout)  # barriers and max-over-ranks, never timed
    nodes, local = topo.num_nodes, topo.local_size
    if rank == 0:
        print(f"[multihost] {world} ranks: {nodes} hosts x {local}; local size from {topo.source}",
              file=sys.stderr, flush=True)
    rates = host_rates()
    alpha_meas = small_alpha_us(ctl, topo)
    good = tcp_goodput(local, ctl)
    alpha_cfg = args.delay_us * 1e-6 if args.delay_applied else 0.0
    topo_cfg = sim_topo(args, nodes, local, alpha_cfg, rates)
    topo_meas = sim_topo(args, nodes, local, alpha_meas * 1e-6, rates, rate_bit=good["duplex_Bps"] * 8)

    sizes = parse_sizes(args.sizes)
    impls = impls_for(local)
    rows = measure(args, ctl, impls, sizes, rank, world)
    for r in rows:
        r["pred_us"] = predict_us(r["impl"], r["bytes"], topo_cfg)
        r["pred_meas_link_us"] = predict_us(r["impl"], r["bytes"], topo_meas)
        r["ratio_meas_to_pred"] = r["time_us"] / r["pred_us"]
        r["ratio_meas_to_pred_meas_link"] = r["time_us"] / r["pred_meas_link_us"]
    tr = train(args, ctl, topo_cfg) if args.train_steps > 0 else None

    if rank == 0:
        res = {"hosts": nodes, "procs_per_host": local, "world_size": world,
               "link": {"rate_bit_s": args.rate_bit, "delay_us": args.delay_us,
                        "delay_applied": bool(args.delay_applied), "shaper": args.shaper,
                        "tcp_goodput": good},
               "model_params": {"alpha_us_configured": alpha_cfg * 1e6, "beta_s_per_byte": 8 / args.rate_bit,
                                "alpha_us_measured": alpha_meas, "beta_s_per_byte_measured": 1 / good["duplex_Bps"],
                                "intra_alpha_us": args.intra_alpha_us,
                                **rates},
               "rows": rows, "train": tr,
               "all_correct": all(r["wrong"] == 0 for r in rows) and (tr is None or tr["params_identical"]),
               "command": " ".join(sys.argv)}
        write_result(res, args.json, cpu=True)
        print_table(res)
    dist.barrier(group=ctl)
    fastar.shutdown()
    dist.destroy_process_group()
    return 0


def print_table(res: dict) -> None:
    L = res["link"]
    print(f"\n{res['hosts']} hosts x {res['procs_per_host']} ranks, link {L['rate_bit_s'] / 1e9:g} Gbit/s, "
          f"delay {L['delay_us']:g} us ({'applied' if L['delay_applied'] else 'NOT applied: no netem'}), "
          f"TCP goodput one way {L['tcp_goodput']['one_way_Bps'] * 8e-9:.3f} Gbit/s, "
          f"both ways at once {L['tcp_goodput']['duplex_Bps'] * 8e-9:.3f} Gbit/s each")
    M = res["model_params"]
    print(f"pred: alpha {M['alpha_us_configured']:.0f} us, beta 1/{1 / M['beta_s_per_byte'] / 1e6:.0f} MB/s (the tc "
          f"settings); pred_ml: alpha {M['alpha_us_measured']:.0f} us (4-byte allreduce / steps), beta "
          f"1/{1 / M['beta_s_per_byte_measured'] / 1e6:.0f} MB/s (TCP goodput, both ways)")
    print(f"{'impl':30s} {'size':>8s} {'meas_us':>10s} {'pred_us':>10s} {'meas/pred':>9s} "
          f"{'pred_ml_us':>10s} {'meas/pred_ml':>12s} {'wrong':>5s}")
    for r in res["rows"]:
        print(f"{r['impl']:30s} {fmt_size(r['bytes']):>8s} {r['time_us']:10.0f} {r['pred_us']:10.0f} "
              f"{r['ratio_meas_to_pred']:9.2f} {r['pred_meas_link_us']:10.0f} "
              f"{r['ratio_meas_to_pred_meas_link']:12.2f} {r['wrong']:5d}")
    t = res["train"]
    if t:
        print(f"train {t['model']} ({t['param_count']} params, buckets {t['bucket_bytes']}): step "
              f"{t['step_ms']:.1f} ms, comm {t['comm_ms']:.1f} ms (predicted {t['pred_comm_ms']:.1f} ms), "
              f"loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}, params identical across ranks: "
              f"{t['params_identical']}")
    print(f"all correct: {res['all_correct']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
