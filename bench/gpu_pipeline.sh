#!/bin/bash
# The Ray job on one lent GPU (device tool), measured against the engine alone (bench/pipeline_gpu.py),
# in parts, each one call, run back to back while the machine stays warm (what one part
# installs into .site/ stays there for the next). Results under $OUT.
#   bench/gpu_pipeline.sh engine   # carry .gpu-a: ray, transformers... ; the prefill's parts and the prompt-graph
#                                  # check; the engine alone: lvspec continuous and static x3
#   bench/gpu_pipeline.sh compile  # carry .gpu-a: the prefill eager vs compiled (compile_prefill); PROFILE=1
#   bench/gpu_pipeline.sh engine1  # carry .gpu-a: lvspec continuous and static x3, no prefill check first
#   bench/gpu_pipeline.sh check    # carry .gpu-a: tests/test_gpu.py whole, then bench.timing's clocks on a matmul
#   bench/gpu_pipeline.sh engine2  # lvspec eager (prompt graphs off), serial (no overlap), ar continuous x$REPEATS (3)
#   bench/gpu_pipeline.sh jobs     # carry .gpu-b: av, decord ; renders the shards, `ray start --head`, the job
#                                  # through `ray job submit`: lvspec continuous x3; one core's decode rate
#   bench/gpu_pipeline.sh jobs2    # the job: lvspec static, ar continuous, x$REPEATS (3) each
# OVERRIDES="key=value ..." go to every engine and job run (e.g. generation.prompt_graphs=true).
# Here, after: python -m bench.pipeline_gpu report --json <the JSONs> --markdown BENCHMARKS.md
# Bundles: bench/gpu_wheels.sh (here, once).
set -o pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-192}
read -r -a EXTRA <<< "${OVERRIDES:-}"
SHARDS=/tmp/lvspec-shards
export SITE=/tmp/lvspec-site  # the machine keeps /tmp between calls while warm (not the repo's ignored folders)
export PYTHONPATH=$SITE:$PWD PATH=$SITE/bin:$PATH HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
quiet() { grep --line-buffered -v -i "warn"; }
head_up() {  # a fresh single-node cluster with this machine's CPUs and its GPU
  ray stop --force >/dev/null 2>&1
  ray start --head --num-gpus 1 --disable-usage-stats --dashboard-host 127.0.0.1 2>&1 | tail -2
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv,noheader
case "$1" in
  prefill)  # carry .gpu-a: where a row's prefill goes; torch.profiler tables of it and of the engine's loop
    bench/gpu_install.sh .gpu-a >/dev/null || exit 1
    python3 -m bench.pipeline_gpu prefill --rows 48 --profile $OUT/profile.txt --json $OUT/prefill.json 2>&1 \
      | quiet | grep "^\[\|Error" ;;
  compile)  # carry .gpu-a: the prefill eager and compiled (generation.compile_prefill); PROFILE=1: profiles
    bench/gpu_install.sh .gpu-a >/dev/null || exit 1
    python3 -m bench.pipeline_gpu prefill --groups 1 4 --compile ${PROFILE:+--profile $OUT/profile.txt --rows 48} \
      --json $OUT/prefill.json "${EXTRA[@]}" 2>&1 | quiet | grep "^\[\|Error" ;;
  engine1)  # the engine alone without the prefill check: lvspec continuous and static x3 (e.g. with
            # OVERRIDES=generation.compile_prefill=true)
    bench/gpu_install.sh .gpu-a >/dev/null || exit 1
    python3 -m bench.pipeline_gpu engine --rows $ROWS --runs lvspec/continuous lvspec/static \
      --json $OUT/engine.json "${EXTRA[@]}" 2>&1 | quiet | grep "^\[\|Error" ;;
  check)  # after a refactor: the GPU tests, and the benchmarks' clocks against each other
    bench/gpu_install.sh .gpu-a >/dev/null || exit 1
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee $OUT/test_gpu.log | tail -4
    python3 -m bench.timing 2>&1 | tee $OUT/timing.log ;;
  install)
    bench/gpu_install.sh .gpu-a | tail -3; exit ;;
  engine)  # first the prompt-graph check (a capture that fails or differs stops the call), then the runs
    bench/gpu_install.sh .gpu-a || exit 1
    python3 -m bench.pipeline_gpu prefill --groups 1 --json $OUT/prefill.json "${EXTRA[@]}" 2>&1 | quiet \
      | grep "^\[\|Error"
    python3 -c "import json, sys; c = json.load(open('$OUT/prefill.json'))['prompt_graphs']
bad = [r for r in c if r['graphs']['failures'] or not r['first_tokens_equal'] or r['keys_max_abs_diff'] > 0.05]
sys.exit(f'prompt graphs: {bad}' if bad else 0)" || exit 1
    python3 -m bench.pipeline_gpu engine --rows $ROWS --runs lvspec/continuous lvspec/static \
      --json $OUT/engine.json "${EXTRA[@]}" 2>&1 | quiet | grep "^\[" ;;
  engine2)  # carry .gpu-a (installed already on a warm machine: only its manifest is read)
    bench/gpu_install.sh .gpu-a >/dev/null || exit 1
    python3 -m bench.pipeline_gpu engine --rows $ROWS --runs lvspec/eager lvspec/serial ar/continuous \
      --repeats ${REPEATS:-3} --json $OUT/engine2.json "${EXTRA[@]}" 2>&1 | quiet | grep "^\[" ;;
  jobs)
    bench/gpu_install.sh .gpu-b || exit 1
    test -d $SHARDS || python3 -m bench.videos --out $SHARDS --rows $ROWS --distinct 48 --workers 14 2>&1 | quiet
    head_up
    python3 -m bench.pipeline_gpu job --shards $SHARDS --rows $ROWS --runs lvspec/continuous \
      --repeats ${REPEATS:-3} --json $OUT/jobs.json "${EXTRA[@]}" 2>&1 | quiet | grep -A40 "^\[\|Traceback\|rror"
    [ "${DECODE:-1}" = 0 ] || python3 -m bench.pipeline_gpu decode --shards $SHARDS --frames 16 64 --json $OUT/decode.json 2>&1 | quiet \
      | grep "^\[" ;;
  jobs2)
    head_up
    python3 -m bench.pipeline_gpu job --shards $SHARDS --rows $ROWS --runs lvspec/static ar/continuous \
      --repeats ${REPEATS:-3} \
      --json $OUT/jobs2.json "${EXTRA[@]}" 2>&1 | quiet | grep -A40 "^\[\|Traceback\|rror" ;;
  *) echo "usage: $0 prefill|compile|install|check|engine|engine1|engine2|jobs|jobs2"; exit 2 ;;
esac
ray stop --force >/dev/null 2>&1
exit 0
