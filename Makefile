# Every target creates or refreshes ./.venv from pyproject.toml on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Local single-user runs and the tests: an in-process Ray that ends with the job, auth off (unset,
# Ray 2.60's ray.init() would turn token auth on and write ~/.ray/auth_token). A shared head uses
# token auth: README, "Running a job".
export RAY_AUTH_MODE := disabled

# checkov pins boto3 and packaging versions that ray and aiobotocore reject: it gets its own venv.
CHECKOV_ENV := $(VENV)/tools/checkov
export CHECKOV := $(abspath $(CHECKOV_ENV))/bin/checkov

.PHONY: venv run test lint bench toymodels toymodels-v2 clean chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== setting up $(VENV) (first run only; torch is large) =="
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --python $(PY) -e '.[test]' --config-settings editable_mode=compat
	@touch $@

TOY_DATA := data/bucket/toy

run: $(STAMP)
	@echo "== Ray token authentication is off for this local single-user run (shared machines: README, Running a job) =="
	@test -d $(TOY_DATA) || $(PY) -m toyworld.shards --uri $(TOY_DATA) --videos 32 --seed 7 --shard-size 8
	$(PY) -m jobs.caption --config jobs/configs/local.yaml --quality toyworld.score:job_quality \
	  job_id=toy-local-$$(date +%Y%m%d-%H%M%S)

$(CHECKOV): | $(STAMP)  # order-only: a changed pyproject.toml rebuilds .venv, not checkov's own venv
	@echo "== installing checkov into $(CHECKOV_ENV) (first run only) =="
	$(VENV)/bin/uv venv -q --python $(PYTHON) $(CHECKOV_ENV)
	$(VENV)/bin/uv pip install -q --python $(CHECKOV_ENV)/bin/python checkov==3.3.30

# The report test renders the page in a real browser: Debian's chromium (installed on first use).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "== installing chromium (Debian package; tests/test_report.py renders in it) =="; \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

test: $(STAMP) $(CHECKOV) chromium
	$(PY) -m pytest -x -q

lint: $(STAMP) $(CHECKOV)
	$(PY) infra/validate.py

bench: $(STAMP)
	$(PY) -m bench.evaluate --all --videos 200 --seed 1234 --filler-entropy default 0 --json bench/toyworld_eval.json --markdown BENCHMARKS.md
	$(PY) -m bench.toy --all --videos 200 --seed 1234 --json bench/toyworld.json --markdown BENCHMARKS.md
	$(PY) -m bench.evaluate --all --edition 2 --videos 200 --seed 1234 --json bench/toyworld_v2_eval.json --markdown BENCHMARKS.md
	$(PY) -m bench.toy --all --edition 2 --videos 200 --seed 1234 --json bench/toyworld_v2.json --markdown BENCHMARKS.md
	$(PY) -m bench.calibration --edition 2 --family llava_onevision --sample 64 --heldout 200 --json bench/calibration_v2.json
	$(PY) -m bench.calibration --edition 2 --family qwen2_5_vl --sample 64 --heldout 200 --json bench/calibration_v2_qwen.json
	$(PY) -m bench.pipeline --videos 64 --json bench/pipeline.json --markdown BENCHMARKS.md

toymodels: $(STAMP)
	$(PY) -m toyworld.train --all
	$(PY) -m toyworld.calibrate --family qwen2_5_vl
	$(PY) -m toyworld.calibrate --family llava_onevision

# The second edition (two-event clips, multi-token fillers in two styles); on a GPU: toyworld/gpu_train.sh.
toymodels-v2: $(STAMP)
	$(PY) -m toyworld.train --all --edition 2
	$(PY) -m toyworld.calibrate --family qwen2_5_vl --edition 2
	$(PY) -m toyworld.calibrate --family llava_onevision --edition 2

clean:
	rm -rf $(VENV) .pytest_cache
