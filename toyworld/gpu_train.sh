#!/bin/bash
# Train the four toy models of an edition at once on one lent GPU (device tool), writing under $OUT:
#   toyworld/gpu_train.sh 2 7.5 4     # edition, target minutes, draft minutes
#   toyworld/gpu_train.sh 2 7 4 toyworld/models_v2 qwen2_5_vl   # a second stage of one family's pair, from these
# Needs PyAV and transformers 5.23 as wheels in .whl-train/ (carry it). The clip pool is rendered
# once (--pool-only) and memory-mapped by all four runs; the models come back as one tar.
set -o pipefail
edition=${1:-2} target_min=${2:-7.5} draft_min=${3:-4} init=${4:-} fams=${5:-"qwen2_5_vl llava_onevision"} extra=${6:-}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-train/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
common="--edition $edition --pool 20000 --batch-size 128 --pool-cache /tmp/pool --out /tmp/models $extra"
python3 -m toyworld.train $common --workers 15 --pool-only 2>&1 | grep -v -i warn
[ -n "$init" ] && common="$common --init-from $init"
run() {  # family role workers minutes-flag
  python3 -m toyworld.train $common --family $1 --role $2 --workers $3 $4 > $OUT/$1-$2.log 2>&1 &
}
set -- $fams
tw=$((10 / $#)) dw=$((4 / $#))  # data workers: 14 of the 16 cores, the rest for the four (or two) main processes
for family in $fams; do
  run $family target $tw "--target-minutes $target_min"
  [ "$draft_min" != 0 ] && run $family draft $dw "--draft-minutes $draft_min"
done
wait
grep -h "saved\|step .*anchor" $OUT/*.log | grep -v Warn | tail -n 40
tar -C /tmp/models -cf $OUT/models.tar .
