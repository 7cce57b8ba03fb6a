# Everything a fresh machine needs: `make demo` trains on the embedded default, `make test` tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1

.PHONY: install test test-fast demo bench clean

install: $(VENV)/.installed

# torch is pinned through constraints.txt to the CPU build (an unpinned torch pulls a CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# The whole suite (what CI runs), slow end-to-end tests included.
test: install
	$(OFFLINE) $(PY) -m pytest -q tests

# For every edit: everything but the tests marked slow.
test-fast: install
	$(OFFLINE) $(PY) -m pytest -q -m "not slow" tests

demo: install
	$(OFFLINE) $(VENV)/bin/dylora train

bench: install
	$(OFFLINE) $(PY) benchmarks/step_time.py
	$(OFFLINE) $(PY) benchmarks/checkpoint.py

clean:
	rm -rf $(VENV) runs .pytest_cache
