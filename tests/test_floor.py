"""bench.floor: the shapes it counts are the decoder's, and a run's floor is its bytes and FLOPs."""

from __future__ import annotations

import pytest

from bench.floor import BF16_PEAK, Stack, stages
from bench.realsize import build
from lvspec.adapter import text_config
from lvspec.decoder import TextDecoder


@pytest.mark.parametrize("family,size", [("llava_onevision", "0.5b"), ("qwen2_5_vl", "7b")])
def test_a_stacks_sizes_are_what_the_real_size_decoder_reads(family, size):
    model = build(family, size, "meta")  # real shapes, no memory
    T = TextDecoder(model, text_config(model).vocab_size)
    stack = Stack.of(family, size)
    assert stack.params * 2 == T.weight_bytes()
    assert stack.kv_token == len(T.layers) * T.kv_heads * T.head_dim * 2 * 2


PAIR = {"target": "llava_onevision-7b", "draft": "llava_onevision-0.5b", "prompt_tokens": 3000, "new_tokens": 200}


def test_an_ar_steps_floor_is_its_weights_and_caches_through_hbm():
    T = Stack.of("llava_onevision", "7b")
    run = {"mode": "ar", "batch_size": 8, "cycles": 10, "slot_use": 1.0, "tokens_per_verify": 8,
           "ms_per_verify": 20.0, "cycle_ms": 21.0, "decode_tokens_per_s": 8 / 0.021, "k_mean": 0.0}
    s = stages(run, PAIR, "NVIDIA H100 80GB HBM3")
    step = (T.params * 2 + 8 * T.kv_token * 3100) / 3.35e12  # 8 tokens: far under the ridge
    assert s["floor_s"]["verify"] == pytest.approx(10 * step)
    assert s["measured_s"] == pytest.approx({"verify": 0.2, "rest": 0.01})
    assert s["floor_tokens_per_s"] == pytest.approx(8 / step)
    assert s["share"] == pytest.approx(10 * step / 0.21)


def test_a_wide_verify_is_floored_by_its_flops_and_the_draft_by_its_own_rows_keys():
    T, D = Stack.of("llava_onevision", "7b"), Stack.of("llava_onevision", "0.5b")
    run = {"mode": "lvspec", "batch_size": 256, "cycles": 4, "slot_use": 0.5, "tokens_per_verify": 640,
           "k_mean": 6.0, "ms_per_verify": 30.0, "ms_per_draft_step": 3.0, "cycle_ms": 50.0,
           "decode_tokens_per_s": 10000.0}
    s = stages(run, PAIR, "NVIDIA H200")
    rows = 128
    verify = 2 * T.params * 640 / BF16_PEAK + rows * T.kv_token * 3100 / 4.8e12
    assert 2 * T.params * 640 / BF16_PEAK > T.params * 2 / 4.8e12  # compute-bound at 640 tokens
    assert s["floor_s"]["verify"] == pytest.approx(4 * verify)
    drafted = (640 - rows) * 4  # each row's own K, over four cycles
    assert s["floor_s"]["draft"] == pytest.approx(24 * D.params * 2 / 4.8e12 + drafted * D.kv_token * 3100 / 4.8e12)
    assert s["measured_s"] == pytest.approx({"verify": 0.12, "draft": 0.072, "rest": 0.008})
    assert stages({**run, "out_of_memory": True}, PAIR, "H200") is None
    assert stages(run, {**PAIR, "draft_frame_stride": 2}, "H200") is None  # the draft's prompt length unknown
