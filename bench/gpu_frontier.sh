#!/bin/bash
# The bulk-throughput frontier (bench/frontier.py) on a lent GPU machine (device tool), one part a call, results
# under $OUT, written after every point (a call cut short keeps what it measured; each video is prefilled
# once a sitting, PromptsOnce, so the time goes to decoding):
#   bench/gpu_frontier.sh check    # tests/test_gpu.py's split-attention tests (the kernel on this GPU)
#   bench/gpu_frontier.sh llava    # LLaVA-OV 7B/0.5B at an 80 GB card's memory (79.6 GiB cap on an H200), 16 frames,
#                                  # 128 new tokens, batch 1..256, ar sd lvspec, + an lvspec engine with slots=auto;
#                                  # 2 x batch rows streamed through each point's slots (a bulk job's steady state)
#   bench/gpu_frontier.sh packed   # LLaVA-OV 7B/0.5B as llava, batch 64..256 (where the peaks are): lvspec and ar
#                                  # with packed verifies, lvspec at 128 padded (pack_verify off), sd at 128, 192
#   bench/gpu_frontier.sh stream4  # the same pair, lvspec and ar at 128..256, 4 x batch rows streamed
#   bench/gpu_frontier.sh top      # the same pair at batch 256 alone: lvspec, then ar
#   bench/gpu_frontier.sh frames   # the same pair, 4 x batch rows: tests/test_gpu.py's packed and split tests, then
#                                  # lvspec with the draft watching every 2nd frame (its own replay patterns) at
#                                  # 192 and 256, ar and lvspec at 192 and 256 with every frame (bench/replay_patterns.json, re-recorded
#                                  # today: the same), sd with every 2nd frame at 256
#   bench/gpu_frontier.sh fit256   # tests/test_gpu.py's packed and split tests, then the same pair at 256 only,
#                                  # expandable allocator segments, 8k-token prefill groups: lvspec, sd, ar
#   bench/gpu_frontier.sh bulk     # tests/test_gpu.py's packed tests, then the same pair at 192 and 256 (default
#                                  # prefill groups, expandable segments, 78.6 GiB cap): lvspec, sd, ar
#   bench/gpu_frontier.sh qwen     # Qwen2.5-VL 32B/7B (H200: it does not fit 80 GB), 16 frames: ar, lvspec, sd
#   bench/gpu_frontier.sh qwen1    #   the same in two calls: ar and sd
#   bench/gpu_frontier.sh qwen2    #   ... lvspec, + slots=auto
#   bench/gpu_frontier.sh qwen3    #   ... in one call, at 32-128 only: lvspec, then ar
#   bench/gpu_frontier.sh qwen4    #   ... at 32 and 128, 2 x batch rows: lvspec, ar, then sd at 128
#   bench/gpu_frontier.sh profile  # kernel profiles at 256 slots: a draft step (174 live), a packed verify, ar's step
#   bench/gpu_frontier.sh fused    # LLaVA-OV 7B/0.5B at 256, 4 x batch rows, as bulk: lvspec, ar (after rotate_and_store)
#   bench/gpu_frontier.sh rotate   # tests/test_gpu.py's fused RoPE + cache-write, packed and split tests
#   bench/gpu_frontier.sh qwen32   #   ... at 32 only: lvspec, ar
#   bench/gpu_frontier.sh paper1   # the paper's setting (64 frames, 256 new tokens): LLaVA-OV 7B/0.5B (80 GB cap)
#   bench/gpu_frontier.sh paper2   #   ... Qwen2.5-VL 32B/7B; batch 1..64 (out of memory is recorded where it comes)
# Needs the transformers wheel in .whl/ (carry [".whl"]; the machine has 5.17, the project asks >= 5.23).
# Here, after: python -m bench.frontier report --json <the JSONs> --out bench/frontier.json --markdown BENCHMARKS.md
set -o pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.total --format=csv,noheader
quiet() { grep --line-buffered -v "Warning\|warn(\|warnings.warn"; }
climb() {  # name, then bench.frontier run arguments
  local name=$1; shift
  python3 -m bench.realsize frontier "$@" --json $OUT/$name.json 2>&1 | quiet | tee $OUT/$name.log \
    | grep "^\[\|slots=auto\|Error"
}
case "$1" in
  # The split-KV attention kernel on this GPU (its tests), before any climb relies on it.
  check) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k split 2>&1 | tee $OUT/check.log | tail -15 ;;
  # Modes in the order the peak-over-peak figure needs them: a call cut at its time limit loses sd's top batches.
  llava) climb llava --pair llava_onevision:7b:0.5b --memory-gib 79.6 --stream 2 --modes ar lvspec sd --auto \
           --batch-sizes 1 8 32 64 128 192 256 ;;
  # The peaks' batches only, lvspec first (a call cut at its limit keeps it and ar); padded beside for the change.
  packed) climb packed --pair llava_onevision:7b:0.5b --memory-gib 79.6 --stream 2 --modes lvspec ar \
            --batch-sizes 64 128 192 256
          climb padded --pair llava_onevision:7b:0.5b --memory-gib 79.6 --stream 2 --modes lvspec --padded \
            --batch-sizes 128
          climb packed_sd --pair llava_onevision:7b:0.5b --memory-gib 79.6 --stream 2 --modes sd \
            --batch-sizes 128 192 ;;
  # Four batches of rows a point: whole streams nearer a bulk job's (the drain a quarter of the rows, not half).
  stream4) climb stream4 --pair llava_onevision:7b:0.5b --memory-gib 79.6 --stream 4 --modes lvspec ar \
             --batch-sizes 128 192 256 ;;
  # Batch 256 alone, lvspec then ar (whether lvspec fits there), 4 x batch rows.
  top) climb top --pair llava_onevision:7b:0.5b --memory-gib 79.6 --stream 4 --modes lvspec ar --batch-sizes 256 ;;
  # 32B + 7B weights take 78 of 139 GB, a row's caches (1.2k-token prompts) about 0.45 GB: the climb ends near
  # 100 rows; four videos kept aside instead of eight.
  # The draft watching fewer frames: draft steps read half the keys, its cache takes half the memory.
  frames) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "packed or split" 2>&1 | tee $OUT/test_gpu.log | tail -3
          L="--pair llava_onevision:7b:0.5b --memory-gib 79.6 --stream 4"
          climb frames2 $L --modes lvspec --batch-sizes 192 256 --draft-frame-stride 2 \
            --patterns bench/replay_patterns_draft_frames2.json
          climb frames1 $L --modes ar lvspec --batch-sizes 192 256
          climb frames2_sd $L --modes sd --batch-sizes 256 --draft-frame-stride 2 \
            --patterns bench/replay_patterns_draft_frames2.json ;;
  # Batch 256 (ar's peak) with expandable allocator segments and 8k-token prefill groups: whether lvspec and sd fit.
  fit256) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "packed or split" 2>&1 | tee $OUT/test_gpu.log | tail -3
          export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
          climb fit256 --pair llava_onevision:7b:0.5b --memory-gib 79.6 --stream 4 --batch-sizes 256 --prefill-tokens 8192 \
            --modes lvspec sd ar ;;
  # The bulk peaks again after every free slot is refilled beside decoding: 192 and 256, default groups.
  bulk) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "packed" 2>&1 | tee $OUT/test_gpu.log | tail -3
        export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
        climb bulk --pair llava_onevision:7b:0.5b --memory-gib 78.6 --stream 4 --batch-sizes 192 256 \
          --modes lvspec sd ar ;;
  # The peaks' batches only, lvspec first, then ar (a call cut at its limit keeps lvspec's points).
  qwen3) climb qwen_lvspec --pair qwen2_5_vl:32b:7b --stream 2 --modes lvspec --videos 4 --batch-sizes 32 64 96 128
         climb qwen_ar --pair qwen2_5_vl:32b:7b --stream 2 --modes ar --videos 4 --batch-sizes 32 64 128 ;;
  # The questions Qwen2.5-VL 32B/7B must answer, in one call: batch 32 (lvspec >= 1.8x ar) and 128 (the peaks),
  # lvspec then ar, then sd at 128 (a call cut at its limit keeps what came first).
  qwen4) climb qwen4 --pair qwen2_5_vl:32b:7b --stream 2 --modes lvspec ar --videos 4 --batch-sizes 32 128
         climb qwen4_sd --pair qwen2_5_vl:32b:7b --stream 2 --modes sd --videos 4 --batch-sizes 128 ;;
  # Where a bulk lvspec cycle's time goes, kernel by kernel: the draft step and the packed verify at 256 slots.
  # --compare: each also with RoPE and the cache writes as eager ops (before attention.rotate_and_store).
  profile) python3 -m bench.step_profile --compare --sizes 0.5b --batch 256 --live 174 2>&1 | quiet | tee $OUT/draft_step.txt
           python3 -m bench.step_profile --compare --sizes 0.5b --batch 1 2>&1 | quiet | tee $OUT/draft_step_1.txt
           python3 -m bench.step_profile --compare --sizes 7b --batch 256 --live 174 --q 8 --pack 2>&1 | quiet | tee $OUT/verify.txt
           python3 -m bench.step_profile --compare --sizes 7b --batch 256 2>&1 | quiet | tee $OUT/ar_step.txt ;;
  # The bulk peak (256) again with the fused kernel: lvspec, then ar.
  fused) export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
         climb fused --pair llava_onevision:7b:0.5b --memory-gib 78.6 --stream 4 --batch-sizes 256 --modes lvspec ar ;;
  # The fused RoPE + cache-write kernel's tests on this GPU (with the packed and split ones).
  rotate) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "rotate or packed or split" 2>&1 | tee $OUT/test_gpu.log | tail -3 ;;
  # Batch 32 alone (the issue's 1.8x point), lvspec then ar.
  qwen32) climb qwen32 --pair qwen2_5_vl:32b:7b --stream 2 --modes lvspec ar --videos 4 --batch-sizes 32 ;;
  paper1) climb paper1 --pair llava_onevision:7b:0.5b --memory-gib 79.6 --frames 64 --new-tokens 256 \
      --batch-sizes 1 8 32 64 --setting paper ;;
  paper2) climb paper2 --pair qwen2_5_vl:32b:7b --frames 64 --new-tokens 256 --batch-sizes 1 8 32 64 --setting paper ;;
  *) echo "usage: $0 check|llava|packed|stream4|top|frames|fit256|bulk|qwen|qwen1|qwen2|qwen3|qwen4|qwen32|profile|rotate|fused|paper1|paper2"; exit 2 ;;
esac
