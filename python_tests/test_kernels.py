"""The kernel layer (csrc/torch/kernels.cpp, csrc/cuda/kernels.cu) through fastar._C: pack with scaling and
sum_into (CPU and CUDA), fp16/bf16 compress/decompress (CUDA: on the CPU the codec casts with ATen's
copy_), against torch's own ops, bit for bit (CUDA where there is a GPU and the build has CUDA); plus
the error messages for bad input.

The checks are shown to catch a broken build: fastar._C._set_fault (test-only, csrc/torch/kernels.h)
makes pack write one element early or launch on the default stream, and the tests at the
end of "fault injection" below assert that the same checks then fail."""
import math
import os
import sys

import pytest
import torch

import fastar._C as C

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from common import resnet50_param_shapes  # noqa: E402 - shared with bench/bench_kernels.py

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF_TYPES = [torch.float16, torch.bfloat16]

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the CUDA kernels are only exercised where one is visible"
)
needs_cuda_build = pytest.mark.skipif(
    not C.cuda_built(), reason="fastar._C was built without CUDA (FASTAR_CUDA=0 or no toolkit), so its CUDA kernels are absent"
)
DEVICES = ["cpu", pytest.param("cuda", marks=[needs_gpu, needs_cuda_build])]
CUDA_ONLY = [pytest.param("cuda", marks=[needs_gpu, needs_cuda_build])]  # compress/decompress

# shapes that hit the edge cases: scalars, empty tensors, odd sizes, sizes around the 16-byte vector
# width and the CUDA kernels' 16384-element chunk
SHAPES = [(), (0,), (1,), (3,), (7,), (8,), (9,), (3, 5), (2, 0, 3), (17, 33), (64, 3, 7, 7), (16383,), (16385,),
          (3, 16384), (40001,)]


def rand(shape, dtype, device, gen, lo=-4.0, hi=4.0):
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype).to(device)


def layout(shapes, gap, start=0):
    """Offsets of consecutive tensors with `gap` unused elements between them (gap 1 misaligns)."""
    offsets, pos = [], start
    for s in shapes:
        offsets.append(pos)
        pos += math.prod(s) + gap
    return offsets, pos


def assert_bits(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True)


def test_cuda_built_is_a_bool():
    assert isinstance(C.cuda_built(), bool)


# ---------------------------------------------------------------- pack

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.125, 1.0 / 3.0])
@pytest.mark.parametrize("gap,start", [(0, 0), (1, 3), (5, 0)])
def test_pack_matches_torch(device, dtype, scale, gap, start):
    check_pack(device, dtype, scale, gap, start)


def check_pack(device, dtype, scale, gap, start):
    """pack of SHAPES at the layout (gap, start) equals torch's slice assignments, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    srcs = [rand(s, dtype, device, gen) for s in SHAPES]
    offsets, total = layout(SHAPES, gap, start)
    sentinel = 12.5
    flat = torch.full((total + 2,), sentinel, dtype=dtype, device=device)
    expected = flat.clone()
    for t, off in zip(srcs, offsets):
        expected[off:off + t.numel()] = t.reshape(-1) * scale
    C.kernels_pack(srcs, flat, offsets, scale)
    assert_bits(flat, expected)  # the gaps keep the sentinel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_keeps_every_bit(device, dtype):
    gen = torch.Generator().manual_seed(3)
    srcs = [rand(s, dtype, device, gen) for s in SHAPES]
    offsets, total = layout(SHAPES, 0)
    flat = torch.empty(total, dtype=dtype, device=device)
    C.kernels_pack(srcs, flat, offsets)  # scale defaults to 1
    for t, off in zip(srcs, offsets):
        assert_bits(flat[off:off + t.numel()].reshape(t.shape), t)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_keeps_special_values(device):
    vals = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 3e38, -1e-30], device=device)
    flat = torch.zeros(9, device=device)
    C.kernels_pack([vals], flat, [1])
    assert_bits(flat[1:8], vals)
    assert torch.signbit(flat[4])  # -0.0 stays negative


@pytest.mark.parametrize("device", DEVICES)
def test_pack_of_nothing(device):
    flat = torch.ones(4, device=device)
    C.kernels_pack([], flat, [], 2.0)
    C.kernels_pack([torch.empty(0, device=device)], flat, [4], 2.0)  # an empty tensor may sit at the very end
    assert_bits(flat, torch.ones(4, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_pack_of_a_resnet50_bucket(device):
    shapes = resnet50_bucket_shapes()
    gen = torch.Generator().manual_seed(4)
    srcs = [rand(s, torch.float32, device, gen) for s in shapes]
    offsets, total = layout(shapes, 0)
    flat = torch.empty(total, device=device)
    C.kernels_pack(srcs, flat, offsets, 1.0 / 64)
    assert_bits(flat, torch.cat([t.reshape(-1) for t in srcs]) * (1.0 / 64))


# ---------------------------------------------------------------- compress / decompress

SPECIAL = [0.0, -0.0, 1.0, -1.5, 65504.0, 65519.0, 65520.0, 1e5, 3e38, -3e38, 1e-5, 6e-8, 1e-8, 1e-40,
           1.0009765625, 1.00048828125, 1.00146484375, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("wire", HALF_TYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1023, 4096, 100003])
def test_compress_matches_torch(device, wire, n):
    gen = torch.Generator().manual_seed(5)
    flat = rand((n,), torch.float32, device, gen, -1e3, 1e3)
    out = C.kernels_compress(flat, wire)
    assert out.device == flat.device
    assert_bits(out, flat.to(wire))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("wire", HALF_TYPES, ids=str)
def test_compress_rounds_special_values_like_torch(device, wire):
    flat = torch.tensor(SPECIAL, dtype=torch.float32, device=device)
    assert_bits(C.kernels_compress(flat, wire), flat.to(wire))
    # a misaligned view takes the scalar path
    assert_bits(C.kernels_compress(flat[1:], wire), flat[1:].to(wire))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("wire", HALF_TYPES, ids=str)
def test_compress_keeps_the_shape(device, wire):
    flat = torch.randn(3, 4, 5, device=device)
    out = C.kernels_compress(flat, wire)
    assert out.shape == (3, 4, 5) and out.dtype == wire


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("wire", HALF_TYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1023, 100003])
def test_decompress_matches_torch(device, wire, n):
    gen = torch.Generator().manual_seed(6)
    w = rand((n,), wire, device, gen, -100, 100)
    flat = torch.full((n,), 7.0, device=device)
    C.kernels_decompress(w, flat)
    assert_bits(flat, w.float())


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("wire", HALF_TYPES, ids=str)
def test_compress_decompress_round_trip(device, wire):
    flat = torch.tensor(SPECIAL * 3, device=device)
    back = torch.empty(len(SPECIAL) * 3 + 1, device=device)[1:]  # misaligned destination
    C.kernels_decompress(C.kernels_compress(flat, wire), back)
    assert_bits(back, flat.to(wire).float())


# ---------------------------------------------------------------- sum_into

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1,), (3,), (8,), (13,), (3, 7), (1000,), (262147,)])
def test_sum_into_matches_torch(device, dtype, shape):
    gen = torch.Generator().manual_seed(7)
    dst = rand(shape, dtype, device, gen)
    src = rand(shape, dtype, device, gen)
    expected = dst.clone().add_(src)  # torch adds half types in float and rounds once too
    C.kernels_sum_into(dst, src)
    assert_bits(dst, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_into_misaligned_and_aliased(device, dtype):
    gen = torch.Generator().manual_seed(8)
    base = rand((1001,), dtype, device, gen)
    dst, src = base[1:500].clone(), base[501:1000]  # src starts off the 16-byte grid
    expected = dst.clone().add_(src)
    C.kernels_sum_into(dst, src)
    assert_bits(dst, expected)
    same = rand((77,), dtype, device, gen)
    expected = same * 2
    C.kernels_sum_into(same, same)  # dst += dst doubles
    assert_bits(same, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_sum_into_shapes_may_differ_if_counts_match(device):
    dst = torch.ones(2, 6, device=device)
    C.kernels_sum_into(dst, torch.full((12,), 2.0, device=device))
    assert_bits(dst, torch.full((2, 6), 3.0, device=device))


# ---------------------------------------------------------------- bad input

def raises(match):
    return pytest.raises(RuntimeError, match=match)


def test_pack_errors():
    flat = torch.zeros(10)
    with raises(r"fastar pack: got 2 tensors in srcs but 1 offsets"):
        C.kernels_pack([torch.ones(2), torch.ones(2)], flat, [0])
    with raises(r"fastar pack: srcs\[1\] has dtype Double but flat has dtype Float"):
        C.kernels_pack([torch.ones(2), torch.ones(2, dtype=torch.float64)], flat, [0, 2])
    with raises(r"fastar pack: srcs\[0\] is not contiguous .*\.contiguous\(\)"):
        C.kernels_pack([torch.ones(3, 4).t()], flat, [0])
    with raises(r"fastar pack: srcs\[0\] \(4 elements\) at offset 7 does not fit in flat \(10 elements\)"):
        C.kernels_pack([torch.ones(4)], flat, [7])
    with raises(r"at offset -1 does not fit"):
        C.kernels_pack([torch.ones(4)], flat, [-1])
    with raises(r"at offset 11 does not fit"):
        C.kernels_pack([torch.ones(0)], flat, [11])
    with raises(r"fastar pack: flat must be 1-D, got sizes \[2, 5\]"):
        C.kernels_pack([torch.ones(2)], torch.zeros(2, 5), [0])
    with raises(r"fastar pack: flat is not contiguous"):
        C.kernels_pack([torch.ones(2)], torch.zeros(20)[::2], [0])
    with raises(r"fastar pack: flat has dtype Int, but only float32, float64, float16 and bfloat16 are supported"):
        C.kernels_pack([torch.ones(2, dtype=torch.int32)], torch.zeros(4, dtype=torch.int32), [0])
    with raises(r"fastar pack: srcs\[0\] is on meta, but fastar's kernels take CPU or CUDA tensors only"):
        C.kernels_pack([torch.ones(2, device="meta")], flat, [0])
    with raises(r"fastar pack: flat is on meta, but fastar's kernels take CPU or CUDA tensors only"):
        C.kernels_pack([torch.ones(2)], torch.zeros(4, device="meta"), [0])
    assert_bits(flat, torch.zeros(10))  # nothing was written by the failed calls


def test_compress_decompress_errors():
    with raises(r"fastar compress: runs on CUDA tensors"):
        C.kernels_compress(torch.ones(3), torch.float16)
    with raises(r"fastar decompress: runs on CUDA tensors"):
        C.kernels_decompress(torch.ones(3, dtype=torch.float16), torch.ones(3))
    with raises(r"fastar compress: flat has dtype Double, but compress takes a float32 bucket"):
        C.kernels_compress(torch.ones(3, dtype=torch.float64), torch.float16)
    with raises(r"fastar compress: wire dtype must be float16 or bfloat16, got Float"):
        C.kernels_compress(torch.ones(3), torch.float32)
    with raises(r"fastar compress: flat is not contiguous"):
        C.kernels_compress(torch.ones(3, 3).t(), torch.float16)
    with raises(r"fastar decompress: wire has 3 elements but flat has 4"):
        C.kernels_decompress(torch.ones(3, dtype=torch.float16), torch.ones(4))
    with raises(r"fastar decompress: wire has dtype Float, but it must be float16 or bfloat16"):
        C.kernels_decompress(torch.ones(3), torch.ones(3))
    with raises(r"fastar decompress: flat has dtype Half, but decompress writes into a float32 tensor"):
        C.kernels_decompress(torch.ones(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16))
    with raises(r"fastar decompress: flat is not contiguous"):
        C.kernels_decompress(torch.ones(3, dtype=torch.bfloat16), torch.ones(6)[::2])


def test_sum_into_errors():
    with raises(r"fastar sum_into: src has dtype Half but dst has dtype Float; they must match"):
        C.kernels_sum_into(torch.ones(3), torch.ones(3, dtype=torch.float16))
    with raises(r"fastar sum_into: src has 4 elements but dst has 3"):
        C.kernels_sum_into(torch.ones(3), torch.ones(4))
    with raises(r"fastar sum_into: dst has dtype Long, but only float32, float64, float16 and bfloat16"):
        C.kernels_sum_into(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    with raises(r"fastar sum_into: src is not contiguous"):
        C.kernels_sum_into(torch.ones(3), torch.ones(6)[::2])
    with raises(r"fastar sum_into: dst is not contiguous"):
        C.kernels_sum_into(torch.ones(6)[::2], torch.ones(3))


@needs_gpu
def test_cuda_tensors_need_a_cuda_build_or_the_same_device():
    flat = torch.zeros(8, device="cuda")
    if not C.cuda_built():
        with raises(r"fastar was built without CUDA"):
            C.kernels_pack([torch.ones(2, device="cuda")], flat, [0])
        with raises(r"fastar was built without CUDA"):
            C.kernels_sum_into(flat, flat)
        return
    with raises(r"fastar pack: srcs\[0\] is on cpu but flat is on cuda:0; move them to the same device"):
        C.kernels_pack([torch.ones(2)], flat, [0])
    with raises(r"fastar sum_into: src is on cpu but dst is on cuda:0"):
        C.kernels_sum_into(flat, torch.ones(8))
    with raises(r"fastar decompress: wire is on cpu but flat is on cuda:0"):
        C.kernels_decompress(torch.ones(8, dtype=torch.float16), flat)


# ---------------------------------------------------------------- CUDA only

# ~0.1 s of GPU time on an H100/H200 (torch.cuda._sleep spins for this many clock cycles)
SLEEP_CYCLES = 200_000_000


def check_kernels_follow_the_current_stream():
    """Every kernel is called on a side stream right after that stream wrote the kernel's inputs,
    behind a sleep of ~0.1 s, so that the inputs exist only in the side stream's order: a kernel
    launched on any other stream (the default stream, say) runs at once and reads the old inputs
    (zeros). The results are read back on the side stream too. Raises AssertionError naming the
    kernels whose output is wrong."""
    gen = torch.Generator().manual_seed(10)
    side = torch.cuda.Stream()
    shapes = [(1000, 7), (3,), (16385,), (5, 5)]
    offsets, total = layout(shapes, 1, 2)
    n = 40001
    new = {"srcs": [rand(sh, torch.float32, "cuda", gen) for sh in shapes],
           "flat": rand((total,), torch.float32, "cuda", gen), "a": rand((n,), torch.float32, "cuda", gen),
           "b": rand((n,), torch.float32, "cuda", gen), "wire": rand((n,), torch.bfloat16, "cuda", gen)}
    srcs = [torch.zeros(sh, device="cuda") for sh in shapes]
    flat_in, a, b = torch.zeros(total, device="cuda"), torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
    c, wire_in = torch.zeros(n, device="cuda"), torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    flat_out = torch.zeros(total + 3, device="cuda")
    decompressed = torch.zeros(n, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        for t, v in zip(srcs, new["srcs"]):
            t.copy_(v)
        flat_in.copy_(new["flat"])
        a.copy_(new["a"])
        b.copy_(new["b"])
        c.copy_(new["a"])
        wire_in.copy_(new["wire"])
        C.kernels_pack(srcs, flat_out, offsets, 0.5)
        C.kernels_sum_into(a, b)
        wire = C.kernels_compress(c, torch.float16)
        C.kernels_decompress(wire_in, decompressed)
        got = {"pack": flat_out.clone(), "sum_into": a.clone(),
               "compress": wire.clone(), "decompress": decompressed.clone()}
    side.synchronize()
    torch.cuda.synchronize()
    expected_flat = torch.zeros(total + 3, device="cuda")
    for v, off in zip(new["srcs"], offsets):
        expected_flat[off:off + v.numel()] = v.reshape(-1) * 0.5
    expected = {"pack": expected_flat,
                "sum_into": new["a"] + new["b"], "compress": new["a"].to(torch.float16),
                "decompress": new["wire"].float()}
    wrong = []
    for name, want in expected.items():
        have = got[name]
        pairs = zip(have, want) if isinstance(want, list) else [(have, want)]
        if not all(torch.equal(h, w) for h, w in pairs):
            wrong.append(name)
    assert not wrong, f"kernels that did not follow the current (side) stream: {wrong}"


@needs_gpu
@needs_cuda_build
def test_cuda_kernels_run_on_the_current_stream():
    check_kernels_follow_the_current_stream()


@needs_gpu
@needs_cuda_build
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_and_cpu_give_the_same_bits(dtype):
    gen = torch.Generator().manual_seed(9)
    srcs = [rand(s, dtype, "cpu", gen) for s in SHAPES]
    offsets, total = layout(SHAPES, 1)
    flats = {}
    for device in ("cpu", "cuda"):
        flat = torch.zeros(total, dtype=dtype, device=device)
        C.kernels_pack([t.to(device) for t in srcs], flat, offsets, 0.1)
        C.kernels_sum_into(flat, flat.clone())
        flats[device] = flat
    assert_bits(flats["cuda"], flats["cpu"])


@needs_gpu
@needs_cuda_build
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs to check the device guard")
def test_cuda_second_device():
    with torch.cuda.device(0):
        srcs = [torch.randn(100, device="cuda:1"), torch.randn(3, 3, device="cuda:1")]
        flat = torch.zeros(109, device="cuda:1")
        C.kernels_pack(srcs, flat, [0, 100], 2.0)
        assert_bits(flat, torch.cat([t.reshape(-1) for t in srcs]) * 2.0)


@needs_gpu
@needs_cuda_build
def test_cuda_pack_bandwidth_report(record_property):
    """Reports (does not assert) pack's bandwidth against torch.cat for a ResNet-50-like 25 MB bucket."""
    shapes = resnet50_bucket_shapes()
    srcs = [torch.randn(s, device="cuda") for s in shapes]
    offsets, total = layout(shapes, 0)
    flat = torch.empty(total, device="cuda")
    views = [flat[o:o + t.numel()].view_as(t) for t, o in zip(srcs, offsets)]

    def timed(fn, iters=50):
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters / 1e3

    moved = 2 * total * 4  # read + write
    rows = {
        "fastar pack": timed(lambda: C.kernels_pack(srcs, flat, offsets, 1.0)),
        "fastar pack*scale": timed(lambda: C.kernels_pack(srcs, flat, offsets, 0.5)),
        "torch.cat(out=)": timed(lambda: torch.cat([t.reshape(-1) for t in srcs], out=flat)),
        "torch._foreach_copy_": timed(lambda: torch._foreach_copy_(views, srcs)),
        "torch.cat*scale": timed(lambda: torch.cat([t.reshape(-1) for t in srcs]) * 0.5),
    }
    print(f"\npack of {len(shapes)} tensors, {total * 4 / 2**20:.1f} MiB on {torch.cuda.get_device_name()}:")
    for name, sec in rows.items():
        print(f"  {name:22s} {sec * 1e6:9.1f} us  {moved / sec / 1e9:7.1f} GB/s")
        record_property(f"{name} GB/s", round(moved / sec / 1e9, 1))
    # what was timed must be right: fastar's pack (not the torch baselines timed after it), written
    # over a flat of NaNs so that nothing left by an earlier call can pass for its output
    for scale in (1.0, 0.5):
        flat.fill_(float("nan"))
        C.kernels_pack(srcs, flat, offsets, scale)
        assert_bits(flat, torch.cat([t.reshape(-1) for t in srcs]) * scale)


# ---------------------------------------------------------------- fault injection
# A deliberately broken build must fail the checks above: fastar._C._set_fault (test-only) turns
# one bug on for this process; the fixture turns it off again whatever happens.

@pytest.fixture
def fault():
    yield C._set_fault
    C._set_fault("")


def test_faults_are_off_by_default_and_named():
    assert C._fault() == ""
    with pytest.raises(ValueError, match="unknown fault 'pack_offst'"):
        C._set_fault("pack_offst")
    assert C._fault() == ""


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gap,start", [(0, 0), (1, 3)])
def test_pack_writing_to_the_wrong_offset_fails_the_pack_check(device, gap, start, fault):
    check_pack(device, torch.float32, 0.5, gap, start)  # the check passes on the real build
    fault("pack_offset")
    assert C._fault() == "pack_offset"
    with pytest.raises(AssertionError, match=r"Tensor-likes are not equal!\s+Mismatched elements: [1-9]"):
        check_pack(device, torch.float32, 0.5, gap, start)
    fault("")
    check_pack(device, torch.float32, 0.5, gap, start)


# CUDA only, no [cpu] case: the CPU kernels run on the calling thread in program order, so there is no
# stream to get wrong and the default_stream fault has nothing to break there.
@needs_gpu
@needs_cuda_build
def test_pack_on_the_default_stream_fails_the_stream_check(fault):
    check_kernels_follow_the_current_stream()
    fault("default_stream")
    with pytest.raises(AssertionError, match=r"\['pack'\]"):
        check_kernels_follow_the_current_stream()


# ---------------------------------------------------------------- helpers

def resnet50_bucket_shapes(cap_bytes=25 * 2**20):
    """The first fp32 bucket DDP would fill: parameters in reverse order up to 25 MB."""
    out, size = [], 0
    for s in reversed(resnet50_param_shapes()):
        n = math.prod(s) * 4
        if out and size + n > cap_bytes:
            break
        out.append(s)
        size += n
    return out


def test_resnet50_shapes_are_resnet50():
    assert sum(math.prod(s) for s in resnet50_param_shapes()) == 25_557_032
