#!/usr/bin/env bash
# The GPU checks of issue 6 in one go, on a machine with a CUDA GPU and a python3 that has torch:
# build fastar._C in place with its CUDA kernels for the visible GPU, run the GPU tests (kernels
# against torch, all_reduce and wrap on CUDA), then bench/gpu_bench.py (pack bandwidth vs copy,
# ResNet-50 step time wrap vs DDP). Logs and JSON go to ${OUT:-out/gpu}.
#     bash bench/gpu_check.sh                    # everything
#     STAGES="build tests" bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
STAGES=${STAGES:-"build probe tests kernels bench"}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# Built by the g++ that the lent GPU host puts in $CXX (/opt/gcc/bin/g++, a wrapper), every C++
# exception in fastar._C crashed the process; built by the system compiler, whose libstdc++ the
# process loads, errors arrive as Python exceptions. The probe below checks, and rebuilds with
# /usr/bin/g++ when it fails.
has() { [[ " $STAGES " == *" $1 "* ]]; }
{
  nvidia-smi -L
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  g++ --version | head -1
  ${CXX:-g++} --version | head -1
  $PY -c "import sysconfig; print('python CXX', sysconfig.get_config_var('CXX'))"
} 2>&1 | tee "$OUT/env.txt"
if has build; then
  t0=$(date +%s)
  FASTAR_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || { grep -m20 -B2 -A8 "error" "$OUT/build.log"; exit 1; }
  $PY -c "import fastar; print(fastar.build_info())"
fi
probe() {
  $PY - <<'PYEOF' 2>&1 | tail -5
import torch, fastar._C as C
for name, call in (("c10::Error", lambda: C.kernels_pack([torch.ones(2)], torch.zeros(10), [0, 1])),
                   ("std::invalid_argument", lambda: C.schedule("bogus", 0, 1, 1))):
    try:
        call()
        print("probe", name, "raised nothing")
    except Exception as e:  # noqa
        print("probe", name, "->", type(e).__name__, str(e).splitlines()[0][:100])
PYEOF
  return ${PIPESTATUS[0]}
}
if has probe; then  # a C++ error must arrive as a Python exception
  probe; rc=$?
  echo "probe rc=$rc"
  if [ $rc -ne 0 ]; then
    echo "C++ errors crash this build (compiler: ${CXX:-c++}); rebuilding with the system compiler /usr/bin/g++"
    CXX=/usr/bin/g++ CC=/usr/bin/gcc FASTAR_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace --force \
      >"$OUT/build2.log" 2>&1
    probe; rc=$?; echo "probe rc=$rc"
    [ $rc -eq 0 ] || echo "WARNING: C++ errors still crash the process: build fastar with the compiler torch was built with"
  fi
fi
if has tests; then
  t0=$(date +%s)
  timeout 240 $PY -m pytest -q -p no:cacheprovider -o addopts= python_tests/test_gpu.py -rs --tb=short 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -v "^  File" | tail -60
  echo "gpu tests in $(( $(date +%s) - t0 )) s"
fi
if has kernels; then
  t0=$(date +%s)
  timeout 200 $PY -m pytest -q -p no:cacheprovider -o addopts= python_tests/test_kernels.py -rs --tb=short 2>&1 \
    | tee "$OUT/kernel_tests.log" | grep -v "^  File" | tail -30
  echo "kernel tests in $(( $(date +%s) - t0 )) s"
fi
if has bench; then
  t0=$(date +%s)
  timeout 240 $PY bench/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | tail -20
  echo "bench in $(( $(date +%s) - t0 )) s"
fi
