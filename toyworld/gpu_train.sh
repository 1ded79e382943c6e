#!/bin/bash
# Train the four toy models of an edition at once on one lent GPU (device tool), writing under $OUT:
#   toyworld/gpu_train.sh 2 7.5 4     # edition, target minutes, draft minutes
#   toyworld/gpu_train.sh 2 8 0 toyworld/models_v2   # a second stage of the targets, from these checkpoints
# Needs PyAV and transformers 5.23 as wheels in .whl-train/ (carry it). The clip pool is rendered
# once (--pool-only) and memory-mapped by all four runs; the models come back as one tar.
set -o pipefail
edition=${1:-2} target_min=${2:-7.5} draft_min=${3:-4} init=${4:-}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-train/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
common="--edition $edition --pool 20000 --batch-size 128 --pool-cache /tmp/pool --out /tmp/models"
python3 -m toyworld.train $common --workers 15 --pool-only 2>&1 | grep -v -i warn
[ -n "$init" ] && common="$common --init-from $init"
run() {  # family role workers minutes-flag
  python3 -m toyworld.train $common --family $1 --role $2 --workers $3 $4 > $OUT/$1-$2.log 2>&1 &
}
run qwen2_5_vl target 5 "--target-minutes $target_min"
run llava_onevision target 5 "--target-minutes $target_min"
if [ "$draft_min" != 0 ]; then
  run qwen2_5_vl draft 2 "--draft-minutes $draft_min"
  run llava_onevision draft 2 "--draft-minutes $draft_min"
fi
wait
grep -h "saved\|step .*anchor" $OUT/*.log | grep -v Warn | tail -n 40
tar -C /tmp/models -cf $OUT/models.tar .
