# `make test` and `make bench` set up their own environment: .venv, refreshed whenever
# pyproject.toml changes. Nothing but Python >= 3.10 is needed beforehand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-all bench bench-quick bench-micro bench-peers bench-gpu lint sample clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,plots]'
	touch $(STAMP)

# The fast tier: every test but the end-to-end runs marked slow (pyproject's markers).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Everything, the slow end-to-end runs included (what CI runs).
test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m mlshift_jax bench

bench-quick: $(STAMP)
	$(PY) -m mlshift_jax bench --quick

bench-micro: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-autosave

# The speed table with torch beside JAX and numpy: install the peers extra (torch, CPU
# build) and torchattacks without its declared dependencies (torchvision, requests: never
# imported; pyproject's peers extra says why), retime the speed cells, then rewrite the
# tables (every other cell from the cache).
TORCHATTACKS := torchattacks==3.5.1
bench-peers: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[peers]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps '$(TORCHATTACKS)'
	$(PY) -m mlshift_jax bench --only 'speed/' --force
	$(PY) -m mlshift_jax bench

# On a machine with an NVIDIA GPU: JAX's CUDA 12 build, then floor check + full matrix.
# Without one it refuses (one line, exit 2) before installing anything.
bench-gpu: $(STAMP)
	scripts/bench_gpu.sh --check
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[cuda12]'
	scripts/bench_gpu.sh $(PY)

lint: $(STAMP)
	$(PY) -m ruff check mlshift_jax tests benchmarks scripts

# Rebuild the bundled sample from a full MNIST (MLSHIFT_DATA_DIR or the cache).
sample: $(STAMP)
	$(PY) scripts/make_sample.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks
