# Two set-up commands (README): `make demo` and `make test`. Both install into .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsekern-installed
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install test pytest cpp-test lint bench demo clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	@# torch 2.13.0 CPU build from local disk when no torch is present (a bare `torch` would pull CUDA).
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' --no-build-isolation
	@touch $@

test: cpp-test pytest

pytest: install
	$(PY) -m pytest -q tests

cpp-test: install
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(PY)) > /dev/null
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

lint: install
	$(VENV)/bin/ruff check sparsekern kernels tests bench
	$(VENV)/bin/ruff format --check sparsekern kernels tests bench

bench: install
	$(VENV)/bin/sparsekern bench

demo: install
	$(PY) -m sparsekern.demo

clean:
	rm -rf build $(STAMP) sparsekern/_C*.so
