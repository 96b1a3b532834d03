# Two commands cover a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BACKENDS := tensorflow jax torch
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-tensorflow test-jax test-torch benchmark

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

# Each backend in its own pytest run. The three run side by side, since
# each keeps about one core busy (Python, eager op dispatch, XLA
# compilation): on a 2-core machine that nearly halves the wall time. Each
# writes its own log and temporary directory; the logs are printed in turn
# once all have ended, and the status is non-zero if any run failed.
# The JAX run, whose eager op dispatch makes it the longest by far, is
# itself split over two pytest-xdist workers (a file stays on one worker,
# so module fixtures are built once).
# `make test-jax` (or -tensorflow, -torch) runs one backend in the foreground.
# `make test-fast` is `make test` without the `slow` end-to-end runs
# (scripts, subprocesses): the quick local loop. CI runs `make test`.
TEST_OUTPUT := $(or $(TMPDIR),/tmp)/keras-moe-tests
XDIST_WORKERS := -n 2 --dist loadfile
test: install
	@rm -rf $(TEST_OUTPUT); mkdir -p $(TEST_OUTPUT); \
	for backend in $(BACKENDS); do \
	  echo "started: pytest with KERAS_BACKEND=$$backend"; \
	  workers=""; test $$backend != jax || workers="$(XDIST_WORKERS)"; \
	  ( KERAS_BACKEND=$$backend $(PY) -m pytest tests $$workers $(PYTEST_ARGS) \
	      --basetemp=$(TEST_OUTPUT)/tmp-$$backend \
	      > $(TEST_OUTPUT)/$$backend.log 2>&1; \
	    echo $$? > $(TEST_OUTPUT)/$$backend.status ) & \
	done; wait; status=0; \
	for backend in $(BACKENDS); do \
	  echo "=== pytest with KERAS_BACKEND=$$backend ==="; \
	  cat $(TEST_OUTPUT)/$$backend.log; \
	  test "$$(cat $(TEST_OUTPUT)/$$backend.status)" = 0 || status=1; \
	done; exit $$status

# The quick local loop: the unit tests without those marked `slow` (guides,
# examples, benchmark smoke runs, subprocess and multi-process runs), on one
# backend over two pytest-xdist workers. PyTorch by default, whose eager
# steps are the quickest here; `make test-fast FAST_BACKEND=jax` picks
# another. `make test` (and CI) still runs everything on all three.
FAST_BACKEND ?= torch
test-fast: install
	KERAS_BACKEND=$(FAST_BACKEND) $(PY) -m pytest tests $(XDIST_WORKERS) -m "not slow" $(PYTEST_ARGS)

test-%: install
	KERAS_BACKEND=$* $(PY) -m pytest tests $(PYTEST_ARGS)

benchmark: install
	$(PY) benchmarks/sparse_moe_benchmark.py
