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

TOY_DATA := data/bucket/toy

run: $(STAMP)
	@test -d $(TOY_DATA) || $(PY) -m toyworld.shards --uri $(TOY_DATA) --videos 32 --seed 7 --shard-size 8
	$(PY) -m jobs.caption --config jobs/configs/local.yaml job_id=toy-local-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -x -q

bench: $(STAMP)
	$(PY) -m bench.evaluate --all --videos 200 --seed 1234 --filler-entropy default 0 --json bench/toyworld_eval.json --markdown BENCHMARKS.md
	$(PY) -m bench.toy --all --videos 200 --seed 1234 --json bench/toyworld.json --markdown BENCHMARKS.md
	$(PY) -m bench.pipeline --videos 64 --json bench/pipeline.json --markdown BENCHMARKS.md

toymodels: $(STAMP)
	$(PY) -m toyworld.train --all
	$(PY) -m toyworld.calibrate --family qwen2_5_vl
	$(PY) -m toyworld.calibrate --family llava_onevision

clean:
	rm -rf $(VENV) .pytest_cache
