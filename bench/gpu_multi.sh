#!/bin/bash
# The Ray job on one lent node of four GPUs (issue 18), in parts, each one device call, back to back while
# the machine stays warm (what a part installs into $SITE and renders into /tmp stays for the next).
# Results under $OUT; here, after: python -m bench.pipeline_multi_gpu --json <the JSONs> --markdown BENCHMARKS.md
#   bench/gpu_multi.sh install   # carry .gpu-a (ray, transformers, ...)
#   bench/gpu_multi.sh scale1    # carry .gpu-b (av, decord): renders the shards; one one-GPU replica x3 through
#                                # `ray job submit` on GPU 0, while GPUs 2-3 run one Qwen2.5-VL 32B/7B TP=2
#                                # replica alone in one process (engine x3)
#   bench/gpu_multi.sh scale4    # four one-GPU replicas x3
#   bench/gpu_multi.sh scale2    # two one-GPU replicas x$REPEATS
#   bench/gpu_multi.sh tp        # two TP=2 Qwen2.5-VL 32B/7B replicas x1 (TP_REPLICAS=1 on two GPUs); again,
#                                # SIGKILLing one peer mid-job (renders the shards if no earlier part did)
#   bench/gpu_multi.sh oneshot|tpstep|pairs   # carry .gpu-a, two GPUs: the one-shot all-reduce's test; the 32B
#                                # step at TP 1 / 2 (nccl, oneshot); two 72B pairs in one call (memory released)
# On two GPUs (no four-GPU node lent): `tpengine` (carry .gpu-a: installs, then the TP=2 replica alone x3;
# PROFILE=1: then a torch.profiler table of a stream, rank 0's view), then `TP_REPLICAS=1 bench/gpu_multi.sh tp`
# (carry .gpu-b).
# Every job and engine run uses jobs/configs/gpu-bench.yaml (LLaVA-OV 7B/0.5B dummy weights, replayed acceptance,
# 16 frames); the tensor-parallel runs override the pair (Qwen2.5-VL 32B/7B) and leave the prefill eager
# (compile_prefill was measured for one-GPU replicas only). Decode actors: 8 a replica.
set -o pipefail
cd "$(dirname "$0")/.."
PER=${PER:-192}  # rows a replica
REPEATS=${REPEATS:-3}
export SITE=/tmp/lvspec-site
export PYTHONPATH=$SITE:$PWD PATH=$SITE/bin:$PATH HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
QWEN=(model.target=bench/models/qwen2_5_vl-32b model.draft=bench/models/qwen2_5_vl-7b generation.compile_prefill=false
      caption.tensor_parallel=2 caption.num_gpus=2)
quiet() { grep --line-buffered -v -i "warn"; }
head_up() {  # a fresh single-node cluster: $1 GPUs (those CUDA_VISIBLE_DEVICES leaves visible)
  ray stop --force >/dev/null 2>&1
  ray start --head --num-gpus "$1" --disable-usage-stats --dashboard-host 127.0.0.1 2>&1 | tail -1
}
render() {
  bench/gpu_install.sh .gpu-b | tail -2 || exit 1
  test -d /tmp/lvspec-shards-all || python3 -m bench.videos --out /tmp/lvspec-shards-all --rows $((4 * PER)) \
    --distinct 48 --workers 24 2>&1 | quiet
}
tp_engine() {  # one TP=2 replica alone in this process (rank 0) and its peer, the job's rows a replica
  timeout -s USR1 -k 10 ${ENGINE_TIMEOUT:-0} python3 -m bench.pipeline_gpu engine --rows $PER --runs lvspec/continuous --repeats 3 \
    --json $OUT/tp-engine.json ${PROFILE:+--profile $OUT/tp-profile.txt} "${QWEN[@]}" 2>&1 | tee $OUT/tp-engine.full.log | quiet | grep --line-buffered "^\[\|Error\|Traceback"
}
shards() {  # the first $1 rows of the rendered 4 x $PER (shards of 16 rows, hard links)
  local dir=/tmp/lvspec-shards-$1
  [ -d $dir ] || { mkdir -p $dir && ls /tmp/lvspec-shards-all/shard-*.tar | head -n $(($1 / 16)) | xargs -I{} ln {} $dir/; }
  echo $dir
}
job() {  # N replicas, REPEATS runs, JSON name, extra arguments
  local n=$1 reps=$2 name=$3; shift 3
  python3 -m bench.pipeline_gpu job --shards "$(shards $((n * PER)))" --rows $((n * PER)) --repeats "$reps" \
    --timeout ${JOB_TIMEOUT:-540} --json $OUT/$name.json "$@" caption.replicas=$n decode.actors=$((8 * n)) 2>&1 | quiet \
    | grep --line-buffered -A30 "^\[\|Traceback\|rror"
}
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv,noheader
case "$1" in
  install)
    bench/gpu_install.sh .gpu-a | tail -3; exit ;;
  scale1)
    render
    (export CUDA_VISIBLE_DEVICES=2,3; tp_engine > $OUT/tp-engine.log) &
    side=$!
    export CUDA_VISIBLE_DEVICES=0  # the cluster's one GPU; the GPU sampler reads only it
    head_up 1
    job 1 "$REPEATS" scale-1
    wait $side
    cat $OUT/tp-engine.log ;;
  scale4)
    head_up 4
    job 4 "$REPEATS" scale-4 ;;
  scale2)
    head_up 4
    job 2 "$REPEATS" scale-2 ;;
  oneshot)  # carry .gpu-a: the one-shot all-reduce's GPU test (sums as NCCL's, captured, same tokens)
    bench/gpu_install.sh .gpu-a | tail -1 || exit 1
    timeout 400 python3 -m pytest -q -x tests/test_gpu.py -k one_shot 2>&1 | tail -25 ;;
  tpstep)  # the 32B ar step at TP=1 and TP=2 over NCCL and one-shot, with where a step's time goes
    bench/gpu_install.sh .gpu-a | tail -1 || exit 1
    timeout 580 python3 -m bench.tensor_parallel step --size qwen2_5_vl:32b --tp 1 2 --batch-sizes 1 8 \
      --all-reduce nccl oneshot --repeats ${STEP_REPEATS:-3} --json $OUT/tp_step.json 2>&1 | quiet \
      | grep --line-buffered "^\[\|TP=2 step\|wrote\|lvspec rank\|rror" ;;
  pairs)  # two 72B pairs in one call: the first pair's memory is released before the second
    bench/gpu_install.sh .gpu-a | tail -1 || exit 1
    timeout 590 python3 -m bench.tensor_parallel pairs --pair llava_onevision:72b:0.5b --pair qwen2_5_vl:72b:7b \
      --tp 2 --batch-sizes 1 --repeats 3 --json $OUT/tp_pairs.json 2>&1 | quiet \
      | grep --line-buffered "^\[\|wrote\|rror\|RELEASED" ;;
  tpengine)
    bench/gpu_install.sh .gpu-a | tail -1 || exit 1
    ENGINE_TIMEOUT=540 tp_engine ;;
  tp|tpkill)
    render
    n=${TP_REPLICAS:-2}
    head_up $((2 * n))
    JOB_TIMEOUT=300 job $n 1 tp-kill --kill-peer-after 10 output.rows_per_file=16 "${QWEN[@]}"
    [ "$1" = tpkill ] || JOB_TIMEOUT=270 job $n 1 tp-job "${QWEN[@]}" ;;
  *) echo "usage: $0 install|scale1|scale4|scale2|tpengine|tp|tpkill|oneshot|tpstep|pairs"; exit 2 ;;
esac
ray stop --force >/dev/null 2>&1
exit 0
