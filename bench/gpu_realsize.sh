#!/bin/bash
# One part of the real-size benchmark sitting on a lent GPU machine (device tool), writing under $OUT:
#   bench/gpu_realsize.sh llava   # graph-vs-eager toy test; LLaVA-OV 7B/0.5B, batch 1 8 32, + HF generate at 1 8;
#                                 # the reference probe at both contexts
#   bench/gpu_realsize.sh qwen7   # Qwen2.5-VL 32B/7B, same
#   bench/gpu_realsize.sh qwen3   # Qwen2.5-VL 32B/3B, same
#   bench/gpu_realsize.sh paper   # 32B/7B in the paper's setting: 64 frames, 256 new tokens, batch 1 8
#   bench/gpu_realsize.sh tp      # (2 GPUs: nvidia-h200-x2) 32B ar step at TP=1 vs 2; LLaVA-OV-72B/0.5B and
#                                 # Qwen2.5-VL-72B/7B at TP=2, ar / sd / lvspec, batch 1 8 (bench.tensor_parallel)
# Needs the transformers wheel in .whl/ and ../shared/probes/gpu_steps.py copied to .scratch/probes/.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
quiet() { grep --line-buffered -v "Warning\|warn(\|warnings.warn"; }
case "$1" in
  qwen7|qwen3)
    python3 -m bench.realsize run --pair qwen2_5_vl:32b:${1#qwen}b --batch-sizes 1 8 32 --hf-batch-sizes 1 8 \
      --json $OUT/$1.json 2>&1 | quiet | tee $OUT/$1.log | grep "^\[" ;;
  llava)
    python3 -m pytest -q tests/test_gpu.py 2>&1 | tail -3 | tee $OUT/test_gpu.log
    python3 -m bench.realsize run --pair llava_onevision:7b:0.5b --batch-sizes 1 8 32 --hf-batch-sizes 1 8 \
      --json $OUT/llava.json 2>&1 | quiet | tee $OUT/llava.log | grep "^\["
    mkdir -p $OUT/p1200 $OUT/p3200
    OUT=$OUT/p1200 CTX=1200 BS="1 8 32" python3 .scratch/probes/gpu_steps.py 3B 7B 32B > $OUT/probe1200.log 2>&1
    OUT=$OUT/p3200 CTX=3200 BS="1 8 32" python3 .scratch/probes/gpu_steps.py 0.5B 7B > $OUT/probe3200.log 2>&1
    tail -c 400 $OUT/probe1200.log; echo; tail -c 300 $OUT/probe3200.log; echo ;;
  paper)
    python3 -m bench.realsize run --pair qwen2_5_vl:32b:7b --batch-sizes 1 8 --hf-batch-sizes --frames 64 \
      --new-tokens 256 --setting paper --json $OUT/paper.json 2>&1 | quiet | tee $OUT/paper.log | grep "^\[" ;;
  tp)
    python3 -m bench.tensor_parallel step --size qwen2_5_vl:32b --tp 1 2 --batch-sizes 1 8 \
      --json $OUT/tp_step.json 2>&1 | quiet | tee $OUT/tp_step.log | grep "^\["
    python3 -m bench.tensor_parallel pairs --pair llava_onevision:72b:0.5b --pair qwen2_5_vl:72b:7b --tp 2 \
      --batch-sizes 1 8 --json $OUT/tp_pairs.json 2>&1 | quiet | tee $OUT/tp_pairs.log | grep "^\[" ;;
  *) echo "usage: $0 qwen7|qwen3|llava|paper|tp"; exit 2 ;;
esac
