# Everything a fresh machine needs: `make demo` trains on the embedded default, `make test` tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1

.PHONY: install system-packages lint test test-fast demo bench clean

install: $(VENV)/.installed

# `dylora eval` runs generated code inside bubblewrap (Debian/Ubuntu package `bubblewrap`). As root,
# with apt, it is installed here; otherwise the sandbox tests are skipped with one line saying so
# (and CI, with CI=true, fails them instead).
system-packages:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap (the sandbox of dylora eval) with apt-get"; \
	    (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null)) \
	      || echo "could not install bubblewrap: the sandbox tests will be skipped"; \
	  else \
	    echo "bubblewrap is not installed and this is not root with apt: the sandbox tests will be skipped (sudo apt-get install bubblewrap)"; \
	  fi; }

# torch is pinned through constraints.txt to the CPU build (an unpinned torch pulls a CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# Lint and import order (ruff, configured in pyproject.toml); `make test` runs it first.
lint: install
	$(VENV)/bin/ruff check dylora_moe tests benchmarks scripts

# The whole suite (what CI runs), slow end-to-end tests included.
test: install system-packages lint
	$(OFFLINE) $(PY) -m pytest -q tests

# For every edit: everything but the tests marked slow.
test-fast: install system-packages
	$(OFFLINE) $(PY) -m pytest -q -m "not slow" tests

# A fixed run id, resumed: `make demo` again continues (or, finished, re-reports) runs/demo, and the
# README's next steps (runs/demo/final) follow from it.
demo: install
	$(OFFLINE) $(VENV)/bin/dylora train --run_id demo --resume auto

bench: install
	$(OFFLINE) $(PY) benchmarks/step_time.py
	$(OFFLINE) $(PY) benchmarks/checkpoint.py

clean:
	rm -rf $(VENV) runs .pytest_cache
