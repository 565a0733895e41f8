# The README's two commands: `make demo` and `make test`. Each does all the set-up first
# (virtual environment in .venv, torch from this machine's disk, the compiled extension) and
# redoes only what changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := torch==2.14.1 torchvision==0.29.1 ninja numpy pytest pytest-timeout hypothesis psutil tqdm matplotlib scikit-learn pytest-benchmark
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml
NPROC ?= 2

.PHONY: demo test setup build core-test py-test bench clean

setup: $(VENV)/.stamp-deps
$(VENV)/.stamp-deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(DEPS)
	touch $@

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

py-test: build
	$(PY) -m pytest -q -x python_tests

test: core-test py-test

demo: build
	$(PY) -m fastar.demo

bench: build
	$(PY) bench/allreduce_bw.py --nproc 2 --json bench/results/allreduce_2p.json

clean:
	rm -rf build build-core *.egg-info fastar/_C*.so $(VENV)/.stamp-build
