"""pytest-benchmark microbenchmarks of fastar's kernels against the torch code they replace: pack of a
ResNet-50 25 MB gradient bucket (with the 1/world_size scale), fp16 compress (CUDA only), and sum_into
of 4 MB. CPU always; CUDA too when a GPU is visible and fastar._C has its CUDA kernels.

    .venv/bin/python -m pytest bench/bench_kernels.py --benchmark-group-by=group \
        [--benchmark-json bench/results/kernels_<host>.json]

On CUDA every timed call ends with torch.cuda.synchronize(), so the numbers are launch + kernel time.
"""
import math
import os
import sys

import pytest
import torch

import fastar._C as C

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import resnet50_param_shapes  # noqa: E402  (test_kernels.py checks the count)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and C.cuda_built()),
        reason="needs a CUDA GPU and a fastar._C built with CUDA")),
]
SCALE = 1.0 / 8  # averaging over 8 ranks


def bucket_shapes(cap_bytes=25 * 2**20):
    """A 25 MB fp32 bucket filled as DDP fills it: from the last parameter backwards. ResNet-50's first
    bucket holds few large tensors, so the second one (many small tensors: the harder case for a
    multi-tensor kernel) is appended until the cap."""
    out, size = [], 0
    for s in reversed(resnet50_param_shapes()):
        n = math.prod(s) * 4
        if size + n > cap_bytes:
            continue
        out.append(s)
        size += n
    return out


def timed(benchmark, device, fn):
    if device == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    run()  # warm-up (allocator, pinned-memory pool)
    benchmark(run)


def packed_bucket(device) -> tuple[list, list[int], torch.Tensor]:
    """The bucket's gradients (random, seeded) on device, each one's offset in the flat buffer, and
    the flat buffer (uninitialised): the arguments of fastar._C.kernels_pack."""
    gen = torch.Generator().manual_seed(0)
    srcs = [torch.randn(s, generator=gen).to(device) for s in bucket_shapes()]
    offsets, pos = [], 0
    for t in srcs:
        offsets.append(pos)
        pos += t.numel()
    return srcs, offsets, torch.empty(pos, device=device)


@pytest.fixture(scope="module", params=DEVICES)
def bucket(request):
    return (request.param, *packed_bucket(request.param))


@pytest.mark.parametrize("impl", ["fastar", "torch.cat*scale", "torch.cat(out=).mul_"])
def test_pack(benchmark, bucket, impl):
    device, srcs, offsets, flat = bucket
    benchmark.group = f"pack {len(srcs)} tensors -> {flat.numel() * 4 / 2**20:.0f} MiB bucket, {device}"
    benchmark.extra_info.update(bytes=flat.numel() * 4, tensors=len(srcs))
    if impl == "fastar":
        fn = lambda: C.kernels_pack(srcs, flat, offsets, SCALE)  # noqa: E731
    elif impl == "torch.cat*scale":
        fn = lambda: torch.cat([t.reshape(-1) for t in srcs]) * SCALE  # noqa: E731
    else:
        fn = lambda: torch.cat([t.reshape(-1) for t in srcs], out=flat).mul_(SCALE)  # noqa: E731
    timed(benchmark, device, fn)
    if impl != "torch.cat*scale":
        torch.testing.assert_close(flat, torch.cat([t.reshape(-1) for t in srcs]) * SCALE, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["fastar", "torch .to"])
def test_compress_fp16(benchmark, bucket, impl):
    device, _, _, flat = bucket
    if device == "cpu":
        pytest.skip("compress runs on CUDA tensors (on the CPU the codec casts with ATen's copy_)")
    benchmark.group = f"compress {flat.numel() * 4 / 2**20:.0f} MiB fp32 -> fp16, {device}"
    flat.normal_()
    if impl == "fastar":
        fn = lambda: C.kernels_compress(flat, torch.float16)  # noqa: E731
    else:
        fn = lambda: flat.to(torch.float16)  # noqa: E731
    timed(benchmark, device, fn)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["fastar", "torch add_"])
def test_sum_into_4mb(benchmark, device, dtype, impl):
    n = 4 * 2**20 // torch.tensor([], dtype=dtype).element_size()
    benchmark.group = f"sum_into 4 MiB {str(dtype).replace('torch.', '')}, {device}"
    benchmark.extra_info["bytes"] = 4 * 2**20
    dst = torch.zeros(n, dtype=dtype, device=device)
    src = torch.full((n,), 2.0**-20, dtype=dtype, device=device)
    if impl == "fastar":
        fn = lambda: C.kernels_sum_into(dst, src)  # noqa: E731
    else:
        fn = lambda: dst.add_(src)  # noqa: E731
    timed(benchmark, device, fn)
