# Two commands cover a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BACKENDS := tensorflow jax torch
PYTEST_ARGS ?=

.PHONY: install demo test test-tensorflow test-jax test-torch benchmark

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: the `torch` extra's range is then already
	# satisfied and never pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,jax,torch]"
	# Headless Chromium, for examples/tensorboard_screenshot.py and its test:
	# Debian's package, where apt-get can install it.
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends chromium \
	  || (apt-get update && apt-get install -y --no-install-recommends chromium) \
	  || echo "Could not install chromium (not root?); tests/test_tensorboard_screenshot.py needs it: sudo apt-get install -y --no-install-recommends chromium"; \
	else \
	  echo "No apt-get: install Chromium for tests/test_tensorboard_screenshot.py"; \
	fi
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/train_lm.py

# Each backend in its own pytest run; all three run even if one fails.
test: install
	@status=0; for backend in $(BACKENDS); do \
	  echo "=== pytest with KERAS_BACKEND=$$backend ==="; \
	  KERAS_BACKEND=$$backend $(PY) -m pytest tests $(PYTEST_ARGS) || status=1; \
	done; exit $$status

test-%: install
	KERAS_BACKEND=$* $(PY) -m pytest tests $(PYTEST_ARGS)

benchmark: install
	$(PY) benchmarks/sparse_moe_benchmark.py
