# Every target creates or refreshes ./.venv from pyproject.toml on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_AUTH_MODE := disabled

.PHONY: venv run test bench toymodels clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== setting up $(VENV) (first run only; torch is large) =="
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) -e '.[test]' --config-settings editable_mode=compat
	@touch $@

run: $(STAMP)
	$(PY) -m toyworld.demo --videos 8

test: $(STAMP)
	$(PY) -m pytest -x -q

bench: $(STAMP)
	$(PY) -m toyworld.bench --all --json bench/toyworld.json --markdown BENCHMARKS.md

toymodels: $(STAMP)
	$(PY) -m toyworld.train --all

clean:
	rm -rf $(VENV) .pytest_cache
