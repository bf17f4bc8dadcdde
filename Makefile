# streamkv: every stage of the paper, from result JSON to PDF. `make` alone lists the targets.
# Every variable below can be overridden from the environment or the command line (VAR=value make ...);
# the experiment knobs themselves (CAP_TOTAL, REPEAT_RUNS, SWEEP_R_VALUES, ...) are read by the CLI from
# the environment and .env, so `REPEAT_RUNS=3 make main` works as in the seed guide.

PYTHON      ?= python3
VENV        ?= .venv
VENV_TF4    ?= .venv-tf4
VENV_MIT    ?= .venv-mit
# MIT streaming-llm: `make mit-env` exports MIT_COMMIT (pinned in docker/docker.mk, with the image's pins)
# from the clone at MIT_REPO into MIT_DIR and applies scripts/mit/streaming-llm.patch.
MIT_DIR     ?= .mit/streaming-llm
STREAMKV    ?= $(VENV)/bin/streamkv
FORCE       ?= 0
PYTEST_ARGS ?=

force_flag := $(if $(filter 1 true yes,$(FORCE)),-f,)
installed  := $(VENV)/.installed
# Once `make mit-env` has prepared them, the MIT stage and the tables use the patched checkout and its
# pinned interpreter (a clone at MIT_REPO is only the source the checkout is exported from).
mit_prepared := $(wildcard $(MIT_DIR)/.streamkv-patch)
mit_vars   := $(if $(mit_prepared),MIT_REPO=$(abspath $(MIT_DIR)) PYTHON_BIN=$(abspath $(VENV_MIT))/bin/python,)

.DEFAULT_GOAL := help
.PHONY: help setup paper baseline main ablations sweeps mit mit-env bench tex pdf test test-default-kernels test-tf4 test-flash-decode lint clean

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# The venv is rebuilt when the lock or the package metadata changes; torch is pinned to 2.13.0 there.
$(installed): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

setup: $(installed) ## Create .venv and install streamkv with the locked dependencies

paper: $(installed) ## Run every stage, generate the tables and build the PDF (profile: STREAMKV_PROFILE, default demo)
	$(mit_vars) $(STREAMKV) paper --no-pdf $(force_flag)
	scripts/ensure_tex.sh
	VENV=$(VENV) scripts/build_pdf.sh

baseline: $(installed) ## The fixed sliding-window-recompute baseline (written once, then reused)
	$(STREAMKV) baseline $(force_flag)

main: $(installed) ## Main results: baseline (reused) + Start+Recent + Lazy Pruning on both datasets
	$(STREAMKV) main $(force_flag)

ablations: $(installed) ## Lazy Pruning ablation ladder on the long dataset
	$(STREAMKV) ablations $(force_flag)

sweeps: $(installed) ## R sweep (σ and δ too with RUN_QUALITY_HEURISTICS=1)
	$(STREAMKV) sweeps $(force_flag)

mit: $(installed) ## MIT streaming-llm reference (after `make mit-env`; skipped with one line otherwise)
	$(mit_vars) $(STREAMKV) mit-reference $(force_flag)

$(VENV_MIT)/.installed: requirements-mit.lock
	$(PYTHON) -m venv $(VENV_MIT)
	$(VENV_MIT)/bin/pip install -q --upgrade pip
	$(VENV_MIT)/bin/pip install -q -r requirements-mit.lock
	touch $@

$(MIT_DIR)/.streamkv-patch: scripts/mit/streaming-llm.patch scripts/mit/setup.sh
	@test -n "$(MIT_REPO)" \
		|| { echo "streamkv: error: set MIT_REPO to a git clone of mit-han-lab/streaming-llm" >&2; exit 2; }
	mkdir -p $(dir $(MIT_DIR))
	scripts/mit/setup.sh "$(MIT_REPO)" $(MIT_COMMIT) $(MIT_DIR)

mit-env: $(VENV_MIT)/.installed $(MIT_DIR)/.streamkv-patch ## MIT's pinned env and patched code (MIT_REPO=<clone>)

bench: $(installed) ## Decode speed and memory: streaming vs recompute
	$(STREAMKV) bench $(force_flag)

tex: $(installed) ## Rebuild NeurIPS/generated/*.tex from results/ (never loads a model)
	$(mit_vars) $(STREAMKV) tables

pdf: tex ## Build NeurIPS/neurips_2025_compressed.pdf (installs TeX Live from Debian when missing and root)
	scripts/ensure_tex.sh
	VENV=$(VENV) scripts/build_pdf.sh

test: $(installed) ## Run the test suite (transformers 5.x; the numerics on portable kernels; transformers 4.57)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-default-kernels
	$(MAKE) test-tf4
	$(MAKE) test-flash-decode

# The fast engine's Triton decode attention runs on CPU under Triton's interpreter, with Triton in a folder
# of its own (requirements-triton.lock says why).
TRITON_SITE := .triton-interpreter
$(TRITON_SITE)/.installed: requirements-triton.lock $(installed)
	rm -rf $(TRITON_SITE)
	$(VENV)/bin/pip install -q --target $(TRITON_SITE) -r requirements-triton.lock
	touch $@

test-flash-decode: $(TRITON_SITE)/.installed ## The Triton kernels (decode attention, GEMV probe) on CPU, under Triton's interpreter
	TRITON_INTERPRET=1 PYTHONPATH=$(abspath $(TRITON_SITE)) \
		$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/test_flash_decode.py tests/test_gemv.py tests/test_gemv_fusion.py

# Every numeric tolerance is derived from the dtype, the number of terms and the magnitudes
# (tests/bounds.py), not from one CPU's kernels: this runs the tests that check them a second time on ATen's
# portable kernels, whatever instruction set the machine has.
NUMERICS_TESTS := tests/test_metrics.py tests/test_engines.py tests/test_reference.py tests/test_parallel.py \
	tests/test_fast.py tests/test_runner.py tests/test_demo_model.py tests/test_score_policies.py tests/test_add_a_policy.py \
	tests/test_periods.py
test-default-kernels: $(installed) ## The numerics tests again with ATEN_CPU_CAPABILITY=default
	ATEN_CPU_CAPABILITY=default $(VENV)/bin/python -m pytest $(PYTEST_ARGS) $(NUMERICS_TESTS)

$(VENV_TF4)/.installed: requirements-tf4.lock pyproject.toml
	$(PYTHON) -m venv $(VENV_TF4)
	$(VENV_TF4)/bin/pip install -q --upgrade pip
	$(VENV_TF4)/bin/pip install -q -r requirements-tf4.lock
	$(VENV_TF4)/bin/pip install -q --no-deps -e .
	touch $@

test-tf4: $(VENV_TF4)/.installed ## Engine and model tests on the paper's transformers line (4.57.3)
	$(VENV_TF4)/bin/python -m pytest $(PYTEST_ARGS) tests/test_engines.py tests/test_reference.py \
		tests/test_parallel.py tests/test_fast.py tests/test_recompute.py tests/test_score_policies.py tests/test_periods.py \
		tests/test_metrics.py tests/test_assets.py tests/test_demo_model.py

lint: $(installed) ## hadolint on the Dockerfile (zero findings)
	$(MAKE) lint-docker

clean: ## Remove results and generated tables/PDF (keeps the venvs)
	rm -rf results NeurIPS/generated NeurIPS/build NeurIPS/neurips_2025_compressed.pdf

include docker/docker.mk
