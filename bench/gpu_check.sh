#!/usr/bin/env bash
# The GPU checks of issue 6 in one go, on a machine with a CUDA GPU and a python3 that has torch:
# build fastar._C in place with its CUDA kernels for the visible GPU, run the GPU tests (kernels
# against torch, all_reduce and wrap on CUDA), then bench/gpu_bench.py (pack bandwidth vs copy,
# ResNet-50 step time wrap vs DDP). Logs and JSON go to ${OUT:-out/gpu}.
#     bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"
t0=$(date +%s)
FASTAR_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"; tail -5 "$OUT/build.log"
[ $rc -eq 0 ] || { grep -m20 -B2 -A8 "error" "$OUT/build.log"; exit 1; }
$PY -c "import fastar; print(fastar.build_info())"
t0=$(date +%s)
timeout 300 $PY -m pytest -q -p no:cacheprovider -o addopts= python_tests/test_gpu.py python_tests/test_kernels.py \
  -rs --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "tests in $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout 240 $PY bench/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | tail -20
echo "bench in $(( $(date +%s) - t0 )) s"
