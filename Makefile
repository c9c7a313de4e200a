# make demo   - install the package into .venv and run the embedded default on 2 CPU ranks (see README)
# make test   - also install the dev extras and DeepSpeed's CPU ops, lint (ruff), and run the whole suite (what CI runs)
# make lint   - ruff check + ruff format --check (configured in pyproject.toml); make format rewrites
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch when no NVIDIA GPU is present: a bare `torch` pulls several GB of CUDA wheels.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6' || echo 'torch==2.13.0')
DEEPSPEED_SPEC ?= deepspeed==0.19.8
# Two stages: what the demo runs (the package; no compiled op: it trains with torch's AdamW and gloo), and what the
# suite adds (dev/qlora/bench extras, DeepSpeed's CPU Adam, shared-memory and fused Adam ops, built once).
INSTALLED := $(VENV)/.dtrain-installed
DEV_INSTALLED := $(VENV)/.dtrain-dev-installed

# The suite runs on TEST_WORKERS pytest-xdist workers (whole files each, in the order tests/conftest.py sets: unit tests,
# then the longest integration files). A 2-rank launch leaves a core idle while Python starts and while DeepSpeed's
# launcher polls; a second worker fills it (on 2 cores: 15 min instead of 19). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: install install-dev demo test test-unit test-integration test-extended test-precision-branches lint format clean

$(INSTALLED): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	# DeepSpeed ships only a source package whose build imports torch: build it against the torch just installed.
	$(PIP) install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PIP) install -q -e .
	touch $(INSTALLED)

$(DEV_INSTALLED): $(INSTALLED)
	$(PIP) install -q -e ".[dev,qlora,bench]"
	# DeepSpeed compiles its CPU Adam and shared-memory ops on first use (2-3 min here): once now, not in a test.
	$(PY) -m dtrain.ds_ops
	touch $(DEV_INSTALLED)

install: $(INSTALLED)

install-dev: $(DEV_INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu

lint: $(DEV_INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEV_INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q --durations=15 $(PARALLEL)

test-unit: $(DEV_INSTALLED)
	$(PY) -m pytest -q -m "not integration" $(PARALLEL)

test-integration: $(DEV_INSTALLED)
	$(PY) -m pytest -q -m integration --durations=0 $(PARALLEL)

test-extended: lint  # the default suite plus the extended cases and every architecture combination
	DTRAIN_EXTENDED=1 DTRAIN_ARCH_MATRIX=full $(PY) -m pytest -q --durations=15 $(PARALLEL)

# precision=auto picks bf16 on CPUs that compute it natively (AMX, AVX512-BF16) and fp32 elsewhere: the suite must
# pass either way. DTRAIN_CPU_FLAGS replaces this CPU's flags in that decision (dtrain/resolve.py), so both branches
# run here whatever the CPU has (the bf16 branch is several times slower on a CPU without native bf16: longer timeouts).
test-precision-branches: $(DEV_INSTALLED)
	DTRAIN_CPU_FLAGS=none $(PY) -m pytest -q $(PARALLEL)
	DTRAIN_CPU_FLAGS=amx_bf16 DTRAIN_TEST_TIMEOUT_SCALE=4 $(PY) -m pytest -q $(PARALLEL)

clean:
	rm -rf $(VENV) outputs .pytest_cache
