"""Builds fastar._C against the installed torch (pip install --no-build-isolation -e .).

CUDA sources (csrc/cuda/*.cu) join the build whenever a CUDA toolkit is found, GPU or not:
FASTAR_CUDA=auto (default) | 0 (never) | 1 (required: no toolkit is an error, not a CPU build).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup


def _is_toolkit(home):
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and (
        glob.glob(os.path.join(home, "lib64", "libcudart*")) or glob.glob(os.path.join(home, "targets", "*", "lib", "libcudart*"))
    )


def find_cuda_home():
    """The CUDA toolkit folder. nvcc on PATH may be a wrapper script (as on our dev hosts), in which
    case the folder it execs is the toolkit; torch's own guess (nvcc's parent) would then fail to link."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(env)):
            return os.environ[env]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(home):
            return home
        try:
            with open(real, "rb") as f:
                text = f.read(8192).decode("utf-8", "replace")
            for m in re.finditer(r"(/[^\s'\"]+)/bin/nvcc", text):
                if _is_toolkit(m.group(1)):
                    return m.group(1)
        except OSError:
            pass
    for home in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if _is_toolkit(home):
            return home
    return None


mode = os.environ.get("FASTAR_CUDA", "auto").lower()
if mode not in ("auto", "0", "1"):
    sys.exit(f"FASTAR_CUDA must be auto, 0 or 1, not {mode!r}")
cuda_home = find_cuda_home() if mode != "0" else None
if mode == "1" and cuda_home is None:
    sys.exit("FASTAR_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit folder (the one with bin/nvcc "
             "and lib64/libcudart.so), or build with FASTAR_CUDA=0 for a CPU-only extension")
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None and bool(glob.glob("csrc/cuda/*.cu"))
if mode == "1" and not with_cuda:
    sys.exit("FASTAR_CUDA=1 but the installed torch has no CUDA support (torch.version.cuda is None)")

root = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob("csrc/core/*.cpp")) + sorted(glob.glob("csrc/torch/*.cpp"))
include_dirs = [os.path.join(root, "csrc")]
cxx_flags = ["-O3", "-fvisibility=hidden", "-Wno-unused-parameter"]
define_macros = []
extension = cpp_extension.CppExtension
nvcc_flags = ["-O3", "-lineinfo"]  # no fast-math: sums must round like the CPU
if with_cuda:
    cpp_extension.CUDA_HOME = cuda_home
    extension = cpp_extension.CUDAExtension
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("FASTAR_WITH_CUDA", "1"))
    # pip wheels of the CUDA runtime headers (nvidia/cu13/include) sit next to torch
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # no GPU to ask: current datacenter parts (A100, H100/H200, B200)
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0;10.0"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "")
    if not os.environ["TORCH_CUDA_ARCH_LIST"]:
        del os.environ["TORCH_CUDA_ARCH_LIST"]  # torch picks the visible GPU's architecture

print(f"fastar build: cuda={'yes (' + cuda_home + ')' if with_cuda else 'no'} sources={len(sources)}", flush=True)
ext = extension(
    name="fastar._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
    libraries=["rt", "dl"],  # shm_open; dlsym (glibc < 2.34 keeps them apart)
)
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
