# One command each: `make train` (set up, then the embedded default run) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?=

.PHONY: setup train test bench device-wheels

setup: $(VENV)/.installed

# torch first, pinned: the CPU wheel. Installing the package first would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(VENV)/bin/hf-dograph train $(RECIPE)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/step_cost.py

# For the lent GPU machine (benchmarks/gpu/run_checks.sh): cp312 wheels of what its image lacks, into .whl/.
device-wheels:
	python3 -m pip download -q --dest .whl --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -r benchmarks/gpu/device-requirements.txt
