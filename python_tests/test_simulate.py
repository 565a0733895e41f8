"""The cost model (fastar/simulate/) against the paper's statements and its own invariants.

simulate imports only fastar.policy of the library, so these tests never need the compiled extension."""
import json
import math
import pathlib
from dataclasses import replace

import numpy as np
import pytest

from fastar import simulate as sim  # importing fastar loads no extension (fastar._C is imported lazily)

_PATH = pathlib.Path(sim.__file__)

PAPER = sim.PRESETS["paper"]
H100 = sim.PRESETS["h100"]
MiB = 1 << 20


def servers(n, preset=PAPER):
    """n servers with one process each: the paper's inter-server allreduce alone."""
    return sim.topo_of(preset, n, 1)


# ---------------------------------------------------------------- the paper's three statements

def test_halving_doubling_about_3x_faster_than_ring_for_1m_floats_on_32_servers():
    nbytes = 4 * MiB  # 1M fp32 elements
    hd = sim.allreduce_time(nbytes, "flat", "halving_doubling", servers(32))
    ring = sim.allreduce_time(nbytes, "flat", "ring", servers(32))
    assert 2.0 <= ring / hd <= 4.5, ring / hd
    # "much faster for buffers up to about a million elements": the advantage is larger for smaller
    # buffers and fades as both become bandwidth bound (the same bytes on the wire).
    ratios = [sim.allreduce_time(b, "flat", "ring", servers(32)) /
              sim.allreduce_time(b, "flat", "halving_doubling", servers(32)) for b in (64 << 10, MiB, 4 * MiB, 256 * MiB)]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[-1] < 1.3


def test_about_90_percent_scaling_efficiency_from_8_to_256_gpus():
    s = sim.scaling(PAPER, 32, model="resnet50", batch=32, hierarchy="leader", algorithm="halving_doubling")
    assert 0.85 <= s["scaling_efficiency"] <= 0.97, s
    # The communication is mostly hidden behind backprop: what is exposed is a small part of a step.
    assert s["exposed_comm_ms"] < 0.1 * s["iteration_ms"]
    assert s["scaling_efficiency"] <= s["scaling_efficiency_comm_only"] <= 1.0
    # Efficiency only falls as servers are added (power-of-two counts).
    effs = [sim.scaling(PAPER, n)["scaling_efficiency"] for n in (1, 2, 4, 8, 16, 32)]
    assert effs[0] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(effs, effs[1:])), effs


def test_about_15_gbits_per_server_keep_up_with_backprop():
    grad = sum(n for _, n in sim.model_profile("resnet50")[0]) * 4
    assert grad == pytest.approx(102e6, rel=0.01)  # 25.6 M parameters in fp32
    gbps = sim.needed_gbps(grad, 32, 0.120, PAPER, "halving_doubling")
    assert 10 <= gbps <= 25, gbps
    # It is what it claims: at that line rate the allreduce takes exactly the 120 ms of backprop.
    t = sim.allreduce_time(grad, "flat", "halving_doubling", servers(32, replace(PAPER, nic_gbps=gbps)))
    assert t == pytest.approx(0.120, rel=1e-6)
    # The paper's 50 Gbit/s NIC leaves headroom.
    assert gbps < PAPER.nic_gbps


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("p", [2, 3, 5, 6, 7, 8, 12, 13, 16, 24, 32, 33])
def test_schedules_send_the_textbook_bytes_and_steps(p):
    b = 1e6
    hd = sim.halving_doubling_rounds(p, b)
    pow2 = p & (p - 1) == 0
    assert len(hd) == 2 * int(math.log2(p)) + (0 if pow2 else 2)  # binary blocks: 2 extra steps
    # Every byte of the buffer is reduced by exactly one owner: reduce-scatter rounds deliver
    # (p-1)/p * b per rank on average, and each rank's final chunk is whole.
    reduced = sum(size.sum() for _, _, size, red, _ in hd if red)
    assert reduced == pytest.approx((p - 1) * b)
    if pow2:  # 2(p-1)/p * b bytes sent per rank
        sent = np.zeros(p)
        for src, _, size, _, _ in hd:
            np.add.at(sent, src, size)
        assert np.allclose(sent, 2 * (p - 1) / p * b)
    ring = sim.ring_rounds(p, b)
    assert sum(r[4] for r in ring) == 2 * (p - 1)
    assert sum(r[2][0] * r[4] for r in ring) == pytest.approx(2 * (p - 1) / p * b)


def test_a_shared_nic_carries_each_direction_once():
    """A full-duplex NIC sends and receives at once: in a ring over 2 nodes of 2 ranks, one rank of a
    node sends across the network while the other receives, and that is one message each way, not
    two in one direction. Ranks of a node that send out at the same time do share it."""
    t = sim.Topo(nodes=2, gpus=2, nics=1, a_in=0.0, b_in=0.0, g_in=0.0, a_net=0.0, b_net=1.0, g_net=0.0)
    b = 4.0  # 1 byte per ring message
    assert sim.rounds_time(sim.ring_rounds(4, b), t) == pytest.approx(2 * 3 * 1.0)  # 6 rounds of 1 byte
    # rail-like: both ranks of node 0 send 1 byte to node 1 and receive 1 byte from it in the same
    # round -> the node's NIC carries 2 bytes each way, at 1 s per byte per direction
    src, dst = np.array([0, 1, 2, 3]), np.array([2, 3, 0, 1])
    assert sim.rounds_time([(src, dst, np.ones(4), False, 1)], t) == pytest.approx(2.0)
    # two NICs: each rank has its own again
    assert sim.rounds_time([(src, dst, np.ones(4), False, 1)], replace(t, nics=2)) == pytest.approx(1.0)


def test_flat_halving_doubling_keeps_its_first_log2_g_steps_in_the_node():
    rounds = sim.halving_doubling_rounds(32 * 8, 1e6)
    crosses = [bool(np.any(src // 8 != dst // 8)) for src, dst, *_ in rounds]
    assert crosses[:3] == [False] * 3 and all(crosses[3:-3]) and crosses[-3:] == [False] * 3


@pytest.mark.parametrize("nodes", [3, 5, 6, 12, 24, 33])
def test_non_power_of_two_node_counts_work(nodes):
    for impl in sim.IMPLS:
        h, a = impl.split(":")
        t = sim.allreduce_time(25e6, h, a, sim.topo_of(PAPER, nodes))
        assert 0 < t < 1.0
    s = sim.scaling(PAPER, nodes)
    assert 0.5 < s["scaling_efficiency"] < 1.0
    # Binary blocks cost the extra steps and the unbalanced hand-over: never faster than the
    # power of two below with the same bytes per rank.
    lower = 1 << (nodes.bit_length() - 1)
    assert sim.allreduce_time(4 * MiB, "flat", "halving_doubling", servers(nodes)) > \
        sim.allreduce_time(4 * MiB, "flat", "halving_doubling", servers(lower))


def test_rail_uses_every_nic_and_leader_one():
    big = 100e6
    t8 = sim.topo_of(H100, 16)  # 8 NICs per node
    assert sim.allreduce_time(big, "rail", "halving_doubling", t8) < \
        0.3 * sim.allreduce_time(big, "leader", "halving_doubling", t8)
    one_nic = sim.topo_of(PAPER, 16)  # one NIC per node: rail's 8 shards share it
    rail = sim.allreduce_time(big, "rail", "halving_doubling", one_nic)
    leader = sim.allreduce_time(big, "leader", "halving_doubling", one_nic)
    assert 0.5 < rail / leader < 1.2


# ---------------------------------------------------------------- training step

def test_ddp_buckets_of_resnet50():
    bk = sim.buckets("resnet50")
    total = sum(n for _, n in sim.model_profile("resnet50")[0]) * 4
    assert sum(b for b, _ in bk) == total
    assert bk[0][0] >= 1e6 and all(b >= 25e6 for b, _ in bk[1:-1])
    ready = [r for _, r in bk]
    assert ready == sorted(ready) and ready[-1] == pytest.approx(1.0)


def test_cli_json_keys_and_plot(tmp_path):
    out = tmp_path / "out.json"
    sim.main(["--nodes", "6", "--gpus-per-node", "8", "--model", "resnet50", "--link-gbps", "50",
              "--json", str(out)])
    d = json.loads(out.read_text())
    for k in ("config", "iteration_ms", "images_per_s", "scaling_efficiency", "allreduce_ms"):
        assert k in d
    assert set(d["allreduce_ms"]) == set(sim.IMPLS)
    assert d["images_per_s"] == pytest.approx(6 * 8 * 32 / d["iteration_ms"] * 1e3)
    png = tmp_path / "eff.png"
    sim.plot(H100, png, node_counts=[1, 2, 3, 4])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- calibration

TRUE = {"torch:gloo": (60e-6, 1 / 2e9), "fastar:flat:halving_doubling": (30e-6, 1 / 1.5e9),
        "fastar:leader:halving_doubling": (20e-6, 1 / 3e9), "fastar:rail:ring": (15e-6, 1 / 4e9)}
SIZES = [4 << 10, 64 << 10, 256 << 10, MiB, 4 * MiB, 16 * MiB, 64 * MiB]


@pytest.mark.parametrize("world,local", [(4, 2), (6, 2), (8, 4), (3, 1)])
def test_calibrate_recovers_alpha_beta(world, local):
    res = sim.calibrate(sim.synthetic_bench(TRUE, SIZES, world, local))
    for impl, (alpha, beta) in TRUE.items():
        assert res["fits"][impl]["alpha_us"] == pytest.approx(alpha * 1e6, rel=1e-6)
        assert res["fits"][impl]["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)
    assert res["max_rel_err_ge_256KiB"]["all"] < 1e-9
    assert len(res["rows"]) == len(TRUE) * len(SIZES)


def test_calibrate_with_noise_and_shared_fit(tmp_path):
    bench = sim.synthetic_bench(TRUE, SIZES, 4, 2, noise=0.02, seed=3)
    res = sim.calibrate(bench)
    for impl, (alpha, beta) in TRUE.items():
        assert res["fits"][impl]["beta_s_per_byte"] == pytest.approx(beta, rel=0.05)
    assert res["max_rel_err_ge_256KiB"]["all"] < 0.08
    # One (alpha, beta) for every impl cannot explain impls of different speeds: worse fit.
    shared = sim.calibrate(bench, shared=True)
    assert shared["max_rel_err_ge_256KiB"]["all"] > res["max_rel_err_ge_256KiB"]["all"]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    cli = sim.main(["--calibrate", str(path), "--per-impl", "--json", str(tmp_path / "cal.json")])
    assert cli["fits"].keys() == res["fits"].keys()


# ---------------------------------------------------------------- this host as a cluster (calibrate_host)

CALIB_DIR = pathlib.Path(__file__).resolve().parent / "data" / "calib"
HOST_TRUE = sim.HostModel(tcp_alpha=200e-6, tcp_beta=1 / 3e9, tcp_cpu=1 / 4.5e9, shm_alpha=8e-6, shm_beta=1 / 5e9,
                          gloo_alpha=700e-6, cache_ratio=0.4, shm_cache_ratio=0.6, cache_bytes=6e6, step_cpu=150e-6,
                          cores=2)
HOST_CONFIGS = [(2, 2), (2, 1), (4, 1), (4, 2), (3, 1)]  # (world, local): 1x2, 2x1, 4x1, 2x2, 3x1


def _synthetic_host_bench(m, world, local):
    impls = ["torch:gloo", "fastar:flat:halving_doubling", "fastar:flat:ring", "fastar:auto:auto"]
    if local > 1:
        impls += [f"fastar:{h}:{a}" for h in ("leader", "rail") for a in ("halving_doubling", "ring")]
    rows = [{"impl": i, "bytes": b, "time_us": sim.host_time(i, b, world, local, m) * 1e6}
            for i in impls for b in SIZES if i != "fastar:auto:auto" or b <= 256 << 10]
    return {"world_size": world, "local_size": local, "cpus": 2, "rows": rows}


def test_host_tcp_rounds_are_the_simulators_rounds_half_duplex():
    """The host model's per-round summary is rounds_time with one rank per node, sends and receives
    taking turns (without the shared-core bound)."""
    m = replace(HOST_TRUE, tcp_cpu=0.0, step_cpu=0.0)
    for algo in sim.ALGORITHMS:
        for p in (2, 3, 4, 5, 6, 8):
            t = sim.Topo(p, 1, 1, 0.0, 0.0, 0.0, m.tcp_alpha, m.tcp_beta, 0.0, duplex=False)
            want = sim.rounds_time(sim.schedule_rounds(algo, p, 3e6), t)
            assert sim.tcp_time(algo, p, 3e6, m)[0] == pytest.approx(want, rel=1e-12), (algo, p)


def test_host_model_fit_recovers_a_known_host():
    """Rows made by a known HostModel on 1x2, 2x1, 3x1 and 4x1: the fit predicts the held-out 2x2 rows
    (every hierarchy and algorithm) to within 3%."""
    benches = [_synthetic_host_bench(HOST_TRUE, w, l) for w, l in HOST_CONFIGS]
    res = sim.calibrate_host(benches)
    assert res["fit_labels"] == ["1x2", "2x1", "3x1", "4x1"]
    assert set(res["labels"]) == {"1x2", "2x1", "4x1", "2x2", "3x1"}
    assert {r["role"] for r in res["rows"] if r["label"] == "2x2"} == {"held_out"}
    assert res["max_rel_err_ge_256KiB"]["held_out"] < 0.03, res["max_rel_err_ge_256KiB"]
    assert res["max_rel_err_ge_256KiB"]["fit"] < 0.03


def test_host_model_parts():
    m = HOST_TRUE
    # 4 ranks on 2 cores: flat allreduces are bound by the work of all ranks, not one rank's path,
    # for large buffers (bytes) and for small ones (the CPU of every step)
    for nbytes in (4096, 64 * MiB):
        assert sim.host_time("fastar:flat:ring", nbytes, 4, 1, m) > \
            1.3 * sim.host_time("fastar:flat:ring", nbytes, 4, 1, replace(m, cores=4))
    big = 64 * MiB
    # one node: the arena only, far faster than loopback TCP between the same two ranks
    assert sim.host_time("fastar:leader:halving_doubling", big, 2, 2, m) < \
        0.5 * sim.host_time("fastar:flat:halving_doubling", big, 2, 2, m)
    # torch's Gloo allreduce is a ring with its own latency
    assert sim.host_time("torch:gloo", 4096, 4, 1, m) > sim.host_time("fastar:flat:ring", 4096, 4, 1, m)
    # "auto" resolves as fastar.policy.choose() does, plus one header exchange
    assert sim.auto_choice(1 * MiB, 4, 2) == ("leader", "halving_doubling")
    assert sim.auto_choice(16 * MiB, 4, 2) == ("rail", "halving_doubling")
    assert sim.auto_choice(32 * MiB, 6, 1) == ("flat", "ring")
    assert sim.host_time("fastar:auto:auto", 256 << 10, 4, 1, m) == pytest.approx(
        sim.host_time("fastar:flat:halving_doubling", 256 << 10, 4, 1, m) + m.tcp_alpha)


def test_auto_choice_is_the_librarys_policy():
    """simulate prices what the library runs: both ask fastar.policy, which holds the only thresholds."""
    from fastar import policy
    assert sim.RAIL_ABOVE_BYTES is policy.RAIL_ABOVE_BYTES
    for W, L in ((2, 1), (4, 2), (6, 1), (6, 2), (8, 4), (12, 3)):
        node = policy.Node(W, L, 4 << 20)
        for nbytes in (4096, 4 << 20, policy.RAIL_ABOVE_BYTES, policy.RAIL_ABOVE_BYTES + 1, 64 << 20):
            p = policy.plan(nbytes, 4, node)
            assert sim.auto_choice(nbytes, W, L) == (p.hierarchy, p.algorithm), (W, L, nbytes)


def test_calibrated_predictions_of_this_hosts_benchmarks_within_30_percent(tmp_path):
    """The issue's target, on the committed runs of bench/allreduce_bw.py (python_tests/data/calib: every
    configuration run 3 times in each of 3 sessions, a row's time the median of the 9): fitted on the
    1x2, 2x1, 3x1 and 4x1 rows, the host model predicts every row of 256 KiB and up within 30%,
    the held-out 2x2 rows (every hierarchy and algorithm, Gloo's allreduce, auto) included."""
    files = sorted(CALIB_DIR.glob("*/allreduce_*.json"))
    assert len(files) >= 15, f"calibration runs missing under {CALIB_DIR}"
    res = sim.calibrate_host([json.loads(f.read_text()) for f in files])
    assert set(res["labels"]) == {"1x2", "2x1", "3x1", "4x1", "2x2"} and res["runs"]["2x2"] >= 3
    big = [r for r in res["rows"] if r["bytes"] >= 256 << 10]
    held = [r for r in big if r["role"] == "held_out"]
    assert {r["label"] for r in held} == {"2x2"}
    assert {f"fastar:{h}:{a}" for h in sim.HIERARCHIES for a in sim.ALGORITHMS} | {"torch:gloo"} <= \
        {r["impl"] for r in held}
    worst = max(big, key=lambda r: abs(r["rel_err"]))
    assert abs(worst["rel_err"]) <= 0.30, worst
    out = tmp_path / "cal.json"
    cli = sim.main(["--calibrate", *map(str, files), "--json", str(out)])
    assert json.loads(out.read_text())["max_rel_err_ge_256KiB"] == pytest.approx(cli["max_rel_err_ge_256KiB"])
