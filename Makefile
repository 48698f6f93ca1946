# Two commands do all the set-up: `make pipeline` (the main job) and `make test`.
# Both create .venv on first use; nothing is installed or registered outside it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: pipeline test lab gpu wheelhouse clean-venv

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "labutils needs Python 3.11+; run make with PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)

# uv installs what pip would in a quarter of the time (54 s against 3.7 minutes on a fresh 2-core machine); where it
# cannot be had (no package index), pip does the same install. Both byte-compile what they install: where
# PYTHONDONTWRITEBYTECODE is set, as on CI, Python never writes a .pyc itself, and every process would compile torch
# again. uv reads no pip configuration, so pip's find-links (where a machine keeps a local torch wheel) are handed on.
FIND_LINKS = $(sort $(PIP_FIND_LINKS) $(shell $(PY) -m pip config get global.find-links 2>/dev/null))
define install
	($(PY) -m pip install --quiet uv && $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode \
	  $(addprefix --find-links ,$(FIND_LINKS)) $(1)) || (echo "uv failed or is unavailable: installing with pip"; \
	  $(PY) -m pip install --quiet $(1))
endef

$(VENV)/.installed: pyproject.toml | $(PY)
	$(call install,-e .)
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(call install,-e '.[dev]')
	@touch $@ $(VENV)/.installed

# The lab's own code byte-compiled once: where PYTHONDONTWRITEBYTECODE is set (CI), Python never caches it, and each of
# the suite's ~130 processes (kernels, study workers, CLIs) compiled labutils again (0.2-0.3 s each on 2 cores).
COMPILE = @$(PY) -m compileall -q labutils benchmarks > /dev/null

## pipeline: run notebooks 01→05 through papermill into results/ (ARGS="-p profile cpu"; FORCE=1 re-runs finished stages)
pipeline: $(VENV)/.installed
	$(COMPILE)
	$(PY) -m labutils.pipeline $(if $(filter 1 yes true,$(FORCE)),--force) $(ARGS)

## test: ruff (lint and format, line length 120), then the test suite (what CI runs), one test file per worker process, a worker per core and two more (TEST_WORKERS=0: in this process)
## (a file per worker: its module fixtures, such as the notebook chain, are built once; the longest files first, in
## the order tests/conftest.py gives, which xdist would otherwise replace by one of test counts)
## The extra workers keep the cores busy while others wait on their processes (kernels, study workers), and hold the
## suite's share of a machine that also runs other work (the scheduler shares the cores by runnable process): with one
## core kept busy by another process, pytest took 400 s with 3 workers and 380 s with 4 (2 cores, 2026-12-08).
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)) + 2 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) + 2)')
# One torch thread per process: the test workers, their notebook kernels, study workers and DDP ranks share the
# cores, and a thread per core in each oversubscribes them (pytest on a fresh 2-core clone: 290 s with torch's
# default threads, 218 s with one).
test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --quiet . && $(VENV)/bin/ruff format --check --quiet .
	$(COMPILE)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

## lab: open the notebooks in JupyterLab, with the venv's kernel
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks

## gpu: the GPU kit into results/gpu/<date>-<gpu>/ (STEPS=tests,speed,... for some; DEVICE=cpu: dry run at smoke sizes and the gpu plan; NANOGPT=<checkout>)
## On the GPU machine it runs with the image's python3 and .whl/ (see benchmarks/README.md, "Running the GPU kit").
DEVICE ?= cuda
STEPS  ?= env,tests,speed,target,nanogpt,pipeline,summary
KIT_PYTHON ?= $(if $(filter cpu,$(DEVICE)),$(PY),python3)
NANOGPT ?=
gpu: $(if $(filter cpu,$(DEVICE)),$(VENV)/.installed-dev)
	$(KIT_PYTHON) benchmarks/gpu_kit.py run --device $(DEVICE) --steps $(STEPS) $(if $(NANOGPT),--nanogpt $(NANOGPT)) $(ARGS)

## wheelhouse: download into .whl/ the wheels the GPU machine's image lacks (needs the package index)
wheelhouse: $(VENV)/.installed
	$(PY) benchmarks/gpu_kit.py wheelhouse

clean-venv:
	rm -rf $(VENV)
