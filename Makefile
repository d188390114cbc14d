# The two quick-start commands are `make demo` and `make test`; both install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.igsp-installed
# Offline everywhere: no test or demo may reach a model hub (weights cannot be downloaded here or in CI).
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast test-interpret demo demo-digits pretrain bench bench-cpu perf-model gpu-suite check clean

install: $(STAMP)

# Idempotent: the stamp is rebuilt only when the package metadata or the C++ sources change.
# torch/torchvision are pinned here (not in setup.py) because these machines serve exactly these wheels from
# local disk; a newer torch would download several GB.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/cpu/*.cpp csrc/cpu/*/*.cpp csrc/cpu/*.h csrc/cpu/*/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,train,bench]"
	touch $(STAMP)

# The whole CPU suite: reference, modules, C++ extension, trainer, data; then the Triton kernels under the
# interpreter in their own process (TRITON_INTERPRET must be set before triton kernels are imported).
# pytest exits 5 when a marker selects nothing; that is not a failure of the interpreter run.
test: install
	$(PY) -m pytest -q -n 2 -m "not interpret and not gpu" tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 -m "interpret" tests || test $$? -eq 5

test-fast: install
	$(PY) -m pytest -q -x -m "not interpret and not gpu and not slow" tests

test-interpret: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "interpret" tests

# The offline continual benchmark: igsp, moe-adapters, lora and zeroshot on offline-mtil with the small CLIP
# pretrained here (igsp/pretrained/igsp-small-synthetic; ~3 minutes on an idle 2-core machine).
demo: install
	$(VENV)/bin/igsp demo

# The fastest smoke test: the same methods on the digits stream with a randomly initialised tiny CLIP.
demo-digits: install
	$(VENV)/bin/igsp demo --stream digits

# Rebuild igsp/pretrained/igsp-small-synthetic (~8 minutes on an idle 2-core machine) with the command its manifest
# records; with the library versions the manifest lists, the file comes out byte for byte the same (same sha256).
pretrain: install
	$(VENV)/bin/igsp pretrain --output runs/pretrain-igsp-small --tag igsp-small-synthetic --install

bench: install
	$(PY) -m pytest benchmarks -m "not cpu_bench" --benchmark-json=benchmarks/results/bench.json

bench-cpu: install
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks/cpu -q --benchmark-json=benchmarks/results/cpu_bench.json
	$(PY) benchmarks/cpu/report.py benchmarks/results/cpu_bench.json > benchmarks/results/cpu_bench.md

# The performance model's predicted GPU time per kernel of the fused op (runs on the CPU; benchmarks/perf_model.py).
# Add ARGS=--json for the JSON document (headline case under "headline").
perf-model: install
	$(PY) benchmarks/perf_model.py $(ARGS)

# On a GPU machine (installs nothing; see benchmarks/README.md): compiled-kernel tests, benchmark table, throughput.
gpu-suite:
	bash benchmarks/gpu_suite.sh $(or $(OUT),benchmarks/results/gpu_suite)

check: install
	$(VENV)/bin/ruff check igsp_kernels igsp tests benchmarks setup.py

clean:
	rm -rf build *.egg-info igsp_kernels/_C*.so .pytest_cache
