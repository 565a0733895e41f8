#!/usr/bin/env bash
# The GPU checks of issues 6 and 17 in one go, on a machine with a CUDA GPU and a python3 that has torch,
# for the CURRENT tree (every output is stamped with its commit, dirty flag, torch/CUDA/driver, device):
#   build    fastar._C in place with its CUDA kernels (FASTAR_CUDA=1)
#   probe    a C++ error must arrive as a Python exception (else rebuild with the system g++)
#   tests    python_tests/test_gpu.py: pack into buckets/.grad, stream order, errors at world size 1;
#            the collective on 2 GPUs (skips on one); each check against its injected fault
#   kernels  python_tests/test_kernels.py: kernels vs torch, current stream, pack bandwidth, faults
#   backend  python_tests/test_backend*.py, when the tree has them and registers a "fastar" backend
#   bench    bench/gpu_bench.py: pack bandwidth, ResNet-50 wrap vs DDP at world size 1 (with the NCCL and
#            pack kernels each launches per step), the "fastar" backend on CUDA when it exists
#   report   markdown ready to paste into docs/results.md (also $OUT/results_gpu.md) and a stamped
#            $OUT/gpu_check.json summarising every stage
# Every stage runs under what is left of BUDGET_S (default 480 s: about 8 minutes on an H200).
#     bash bench/gpu_check.sh                          # everything, outputs in ${OUT:-out/gpu}
#     STAGES="tests report" bash bench/gpu_check.sh    # some stages (also runs on a CPU host: tests skip)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
STAGES=${STAGES:-"build probe tests kernels backend bench report"}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T_START=$SECONDS
has() { [[ " $STAGES " == *" $1 "* ]]; }
# seconds a stage may take: its own cap, or what is left of the budget (at least 20 s)
left() { local l=$(( BUDGET_S - (SECONDS - T_START) )); (( l < 20 )) && l=20; (( l > $1 )) && l=$1; echo $l; }
pytest_suite() {  # name, timeout cap, files...
  local name=$1 cap=$2; shift 2
  local t0=$SECONDS
  timeout "$(left "$cap")" $PY -m pytest -q -p no:cacheprovider -o addopts= "$@" -rs --tb=short \
    --junitxml="$OUT/$name.xml" 2>&1 | tee "$OUT/$name.log" | grep -v "^  File" | tail -40
  echo "$name: rc=${PIPESTATUS[0]} in $(( SECONDS - t0 )) s"
}
# Built by the g++ that the lent GPU host puts in $CXX (/opt/gcc/bin/g++, a wrapper), every C++
# exception in fastar._C crashed the process; built by the system compiler, whose libstdc++ the
# process loads, errors arrive as Python exceptions. The probe below checks, and rebuilds with
# /usr/bin/g++ when it fails.
{
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found (no GPU driver here)"; fi
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  git log -1 --format='commit %H %cI %s' 2>/dev/null
  git status --porcelain 2>/dev/null | head -20 | sed 's/^/changed: /'
  g++ --version | head -1
  ${CXX:-g++} --version | head -1
  $PY -c "import sysconfig; print('python CXX', sysconfig.get_config_var('CXX'))"
} 2>&1 | tee "$OUT/env.txt"
if has build; then
  t0=$SECONDS
  FASTAR_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout "$(left 200)" $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  echo "build rc=$rc in $(( SECONDS - t0 )) s"
  [ $rc -eq 0 ] || { grep -m20 -B2 -A8 "error" "$OUT/build.log"; exit 1; }
  $PY -c "import fastar; print(fastar.build_info())"
fi
# the stamp of what runs below (after the build, so that it says whether fastar._C has CUDA)
$PY bench/stamp.py >"$OUT/stamp.json" && $PY -c "import json, sys; sys.path.insert(0, 'bench'); import stamp; print('stamp:', stamp.short(json.load(open('$OUT/stamp.json'))))"
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
    CXX=/usr/bin/g++ CC=/usr/bin/gcc FASTAR_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout "$(left 200)" \
      $PY setup.py build_ext --inplace --force >"$OUT/build2.log" 2>&1
    probe; rc=$?; echo "probe rc=$rc"
    [ $rc -eq 0 ] || echo "WARNING: C++ errors still crash the process: build fastar with the compiler torch was built with"
  fi
fi
has tests && pytest_suite gpu_tests 240 python_tests/test_gpu.py
has kernels && pytest_suite kernel_tests 120 python_tests/test_kernels.py
if has backend; then
  present=$($PY -c "import fastar, torch.distributed as d; print('fastar' in d.Backend.backend_list)" 2>/dev/null)
  files=$(ls python_tests/test_backend*.py 2>/dev/null)
  if [ "$present" = "True" ] && [ -n "$files" ]; then
    # shellcheck disable=SC2086
    pytest_suite backend_tests 120 $files
  else
    echo "backend tests: skipped (fastar backend registered: ${present:-import failed}; test files: ${files:-none})"
  fi
fi
if has bench; then
  t0=$SECONDS
  timeout "$(left 240)" $PY bench/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | tail -25
  echo "bench: rc=${PIPESTATUS[0]} in $(( SECONDS - t0 )) s"
fi
echo "total $(( SECONDS - T_START )) s"
if has report; then
  echo "===== markdown for docs/results.md (also $OUT/results_gpu.md; summary in $OUT/gpu_check.json) ====="
  $PY bench/gpu_bench.py --report "$OUT"
fi
