# The two commands of the README: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
# A CPU wheel of this exact release is what the project's machines install; on a GPU host
# override it (e.g. `make test TORCH_SPEC="torch==2.13.0"` from the CUDA index).
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test test-all bench validate-clock mininet clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[bench]"
	touch $@

# The test suite also covers CompactFusion on diffusers and inside xDiT, so it needs both extras.
$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e ".[dev,diffusion,xdit]"
	touch $@

# DeCo-SGD's quick time-to-accuracy benchmark (virtual time, 4 workers, MNIST); prints the table.
demo: $(VENV)/.base
	$(PY) -m deco_sgd bench examples/deco_sgd/varying_bandwidth.yaml --out .demo/deco --quick

test: $(VENV)/.dev
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.dev
	$(PY) -m pytest -q

# Every benchmark in full; each writes its report and plots under docs/benchmarks/. The two
# DeCo-SGD MNIST scenarios share one run cache, so later ones reuse the first's static runs;
# each hold-out task has its own.
bench: $(VENV)/.dev
	$(PY) -m ccomm.bench --out docs/benchmarks/codecs.md
	$(PY) -m deco_sgd bench examples/deco_sgd/high_latency.yaml --out docs/benchmarks/deco_sgd/high_latency --cache .bench-cache/deco_sgd
	$(PY) -m deco_sgd bench examples/deco_sgd/varying_bandwidth.yaml --out docs/benchmarks/deco_sgd/varying_bandwidth --cache .bench-cache/deco_sgd
	$(PY) -m deco_sgd bench examples/deco_sgd/bandwidth_swings.yaml --out docs/benchmarks/deco_sgd/bandwidth_swings --cache .bench-cache/deco_sgd
	for f in examples/deco_sgd/holdout_*.yaml; do $(PY) -m deco_sgd bench $$f --out docs/benchmarks/deco_sgd/$$(basename $$f .yaml) --cache .bench-cache/deco_sgd_$$(basename $$f .yaml | cut -d_ -f2) || exit 1; done
	$(PY) -m compactfusion bench examples/compactfusion/ethernet.yaml --out docs/benchmarks/compactfusion/ethernet
	$(PY) -m compactfusion bench examples/compactfusion/fast_link.yaml --out docs/benchmarks/compactfusion/fast_link
	$(PY) -m compactfusion bench examples/compactfusion/ethernet_batch16.yaml --out docs/benchmarks/compactfusion/ethernet_batch16
	$(PY) -m compactfusion bench examples/compactfusion/ethernet_wide.yaml --out docs/benchmarks/compactfusion/ethernet_wide

# DeCo-SGD in real time (4 gloo ranks over netsim.emulate) against its virtual clock
# (docs/design/deco_sgd.md#real-time-validation).
validate-clock: $(VENV)/.base
	$(PY) -m deco_sgd realtime --config examples/deco_sgd/realtime_validation.yaml --out .demo/realtime

# Root on Debian/Ubuntu: Mininet for the tests marked `mininet` (skipped when it is absent).
mininet:
	@command -v mn >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mininet bridge-utils; }

clean:
	rm -rf $(VENV) .demo .bench-cache .pytest_cache .hypothesis
