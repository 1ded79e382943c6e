"""The lvspec engine: exactness where it must be exact, honest counters, clean failures.

Token-identity tests run the toy models in float64: the toy grammar makes filler logits near-ties
by design, and float64 keeps batch-shape rounding differences from flipping them, so a mismatch
means a real bug, not float luck.
"""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText

from lvspec import Engine, Replay, SpecConfig, generate
from toyworld import families, grammar
from toyworld.families import load_pair, render_videos

FAMILIES = families.FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    processor, target, draft = load_pair(request.param, dtype=torch.float64)
    return request.param, processor, target, draft


def make_rows(processor, frame_counts, seed=31, prompts=None):
    """One processor output per video; prompts of different lengths, videos of different frame counts."""
    _, _, frames = render_videos(len(frame_counts), seed=seed, num_frames=max(frame_counts))
    prompts = prompts or [grammar.prompt_for(h) for h in (None, 0.5, 1.0, 0.25)][: len(frame_counts)]
    rows = []
    for video, n, prompt in zip(frames, frame_counts, prompts):
        keep = torch.linspace(0, len(video) - 1, n).round().long().numpy()
        rows.append(processor(text=[families.chat_text(processor, prompt)], videos=[video[keep]], return_tensors="pt"))
    return rows


def hf_greedy(processor, target, rows, max_new_tokens=48, eos=None):
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>") if eos is None else eos
    out = []
    for row in rows:
        ids = target.generate(**row, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id)
        out.append(ids[0, row["input_ids"].shape[1]:].tolist())
    return out


def assert_counters_add_up(result, k):
    s = result.stats
    assert s.accepted_exact + s.accepted_loose + s.accepted_shift + s.corrections + s.bonus == s.num_tokens
    assert s.num_tokens == len(result.tokens)
    assert s.target_forwards == s.num_cycles + 1
    assert s.draft_forwards <= 1 + k * s.num_cycles
    assert s.drafted <= k * s.num_cycles and (s.draft_forwards == 0 or s.draft_forwards == 1 + s.drafted + s.catch_ups)
    # Each target forward adds one token of its own, except a last one cut short by a stop token.
    assert s.num_cycles <= s.corrections + s.bonus <= s.num_cycles + 1
    if s.num_cycles:
        assert s.mean_accepted_length == pytest.approx((s.num_tokens - 1) / s.num_cycles)


@pytest.mark.parametrize("frame_counts", [[8], [8, 4, 6, 8]], ids=["batch1", "batch4"])
@pytest.mark.parametrize("cfg", [
    SpecConfig(mode="sd", k=5),
    SpecConfig(mode="lvspec", k=5, theta=0.0),
    SpecConfig(mode="lvspec", k=5, loose=False),
    SpecConfig(mode="ar"),
], ids=["sd", "lvspec-theta0", "lvspec-strict", "ar"])
def test_exact_modes_are_token_identical_to_greedy_generate(pair, frame_counts, cfg):
    _, processor, target, draft = pair
    rows = make_rows(processor, frame_counts)
    expected = hf_greedy(processor, target, rows)
    results = generate(target, draft, rows, dataclasses.replace(cfg, max_new_tokens=48))
    assert [r.tokens for r in results] == expected
    for r in results:
        assert_counters_add_up(r, cfg.longest_draft)
        assert r.stats.accepted_loose == r.stats.accepted_shift == 0


def test_lvspec_counters_add_up_and_loosening_happens(pair):
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 8, 6, 4])
    cfg = SpecConfig(mode="lvspec", k=6, theta=0.45, max_new_tokens=48)
    results = generate(target, draft, rows, cfg, tokenizer=processor.tokenizer, trace=True)
    for r in results:
        assert_counters_add_up(r, cfg.k)
        assert r.finished_by == "stop" and r.tokens[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert all(0.0 <= t["relevance"] <= 1.0 for t in r.trace)
    assert sum(r.stats.accepted_loose + r.stats.accepted_shift for r in results) > 0


def eager_video_mass(family, row, tokens):
    """Reference relevance: [layers, heads, positions] attention mass on the video tokens, from HF's
    eager attention over the whole sequence (prompt + emitted tokens), materialised the slow way."""
    model = AutoModelForImageTextToText.from_pretrained(families.model_dir(family, "target"), dtype=torch.float64,
                                                        local_files_only=True, attn_implementation="eager").eval()
    ids = torch.cat([row["input_ids"], torch.tensor([tokens])], 1)
    extra = {k: v for k, v in row.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in row:
        extra["mm_token_type_ids"] = torch.nn.functional.pad(row["mm_token_type_ids"], (0, len(tokens)))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, **extra)
    video = ids[0] == model.config.video_token_id
    return torch.stack([a[0][..., video].sum(-1) for a in out.attentions])


def verified_positions(result, prompt_len, k):
    """Sequence position of the target query behind each trace slot (slots predict consecutive
    emitted tokens; a cycle whose k drafts were all accepted also emits an untraced bonus)."""
    emitted, run = 1, 0  # token 0 comes from the prefill
    for slot in result.trace:
        if emitted >= len(result.tokens):
            return
        yield slot, prompt_len + emitted - 1
        emitted, run = emitted + 1, run + 1 if slot["accepted"] else 0
        if run == k:
            emitted, run = emitted + 1, 0


@pytest.mark.parametrize("weights", [None, (3.0, 1.0, 0.0)], ids=["mean", "weighted"])
def test_relevance_is_the_attention_mass_on_video_keys(pair, weights):
    """Every head's relevance equals HF eager attention's mass on the video tokens for that query,
    in a ragged batch; the gate's relevance is the mean over the chosen heads, or their weighted
    mean (weights normalised; listed in any order, they stay with their heads)."""
    family, processor, target, draft = pair
    rows = make_rows(processor, [8, 5])
    n_layers = target.config.get_text_config().num_hidden_layers
    chosen = ((n_layers - 1, 2), (0, 1), (n_layers - 1, 0))  # not in the engine's (layer, head) order
    cfg = SpecConfig(mode="lvspec", k=4, theta=1.0, max_new_tokens=64, relevance_heads=chosen,
                     relevance_weights=weights)
    w = torch.tensor(weights or (1.0,) * len(chosen), dtype=torch.float64)
    checked = 0
    for row, result in zip(rows, generate(target, draft, rows, cfg, trace=True)):
        mass = eager_video_mass(family, row, result.tokens)
        for slot, q in verified_positions(result, row["input_ids"].shape[1], cfg.k):
            by_head = slot["relevance_by_head"]  # every head of the probed layers
            assert sorted(by_head) == [(i, h) for i in (0, n_layers - 1) for h in range(mass.shape[1])]
            probed = torch.tensor([by_head[key] for key in sorted(by_head)], dtype=torch.float64)
            assert torch.allclose(probed, mass[[0, n_layers - 1], :, q].flatten(), atol=1e-5), (family, q)
            heads = mass[[i for i, _ in chosen], [h for _, h in chosen], q].double()
            assert slot["relevance"] == pytest.approx(((heads * w).sum() / w.sum()).item(), abs=1e-5)
            checked += 1
    assert checked >= 20


def test_replay_makes_a_run_do_the_recorded_work(pair):
    """Replaying an lvspec run's accepted counts through strict `sd` reproduces that run: the same
    drafts get kept, so the same tokens, cycles and forwards (what real-size speed runs rely on)."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6])
    cfg = SpecConfig(mode="lvspec", k=5, theta=0.45, max_new_tokens=48)
    recorded = generate(target, draft, rows, cfg, trace=True)
    assert sum(r.stats.accepted_loose + r.stats.accepted_shift for r in recorded) > 0
    replay = Replay.from_outputs(recorded)
    replayed = generate(target, draft, rows, dataclasses.replace(cfg, mode="sd"), replay=replay, trace=True)
    for a, b in zip(recorded, replayed):
        assert len(a.accepted_per_cycle) == a.stats.num_cycles
        assert b.tokens == a.tokens and b.accepted_per_cycle == a.accepted_per_cycle
        assert (b.stats.num_cycles, b.stats.target_forwards, b.stats.draft_forwards) == \
               (a.stats.num_cycles, a.stats.target_forwards, a.stats.draft_forwards)
        assert_counters_add_up(b, cfg.k)
    assert replay.mean_accepted() == pytest.approx(
        sum(map(sum, (r.accepted_per_cycle for r in recorded))) / sum(r.stats.num_cycles for r in recorded))
    with pytest.raises(ValueError, match="replay"):
        Replay([[], []])


def test_sd_with_k1_is_token_identical(pair):
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 6])
    results = generate(target, draft, rows, SpecConfig(mode="sd", k=1, max_new_tokens=48))
    assert [r.tokens for r in results] == hf_greedy(processor, target, rows)
    for r in results:
        assert r.stats.draft_forwards == 1 + r.stats.num_cycles
        assert_counters_add_up(r, 1)


def test_stop_token_inside_an_accepted_block_truncates_there(pair):
    # "." ends the first sentence mid-caption, inside blocks that K=8 drafts accept whole.
    _, processor, target, draft = pair
    period = processor.tokenizer.convert_tokens_to_ids(".")
    rows = make_rows(processor, [8, 8, 4])
    expected = hf_greedy(processor, target, rows, eos=period)
    for mode in ("sd", "lvspec"):
        results = generate(target, draft, rows, SpecConfig(mode=mode, k=8, theta=0.0, stop_token_ids=(period,), max_new_tokens=48))
        assert [r.tokens for r in results] == expected
        assert all(r.tokens.count(period) == 1 and r.tokens[-1] == period for r in results)
        assert all(r.finished_by == "stop" for r in results)


@pytest.mark.parametrize("limit", [1, 5, 11])
def test_max_new_tokens_is_respected_exactly(pair, limit):
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 6])
    expected = hf_greedy(processor, target, rows, max_new_tokens=limit)
    for mode in ("ar", "sd"):
        results = generate(target, draft, rows, SpecConfig(mode=mode, k=4, max_new_tokens=limit))
        assert [r.tokens for r in results] == expected
        assert all(len(r.tokens) == limit and r.finished_by == "length" for r in results)


def test_a_row_that_finishes_early_stops_consuming_work(pair):
    _, processor, target, draft = pair
    tok = processor.tokenizer
    rows = make_rows(processor, [8, 8, 8, 8], seed=5)
    full = hf_greedy(processor, target, rows)
    # Stop on the first token of one row's caption that no other row's caption contains.
    early = min(range(len(rows)), key=lambda i: len(full[i]))
    others = {t for i, ids in enumerate(full) if i != early for t in ids}
    stop = next(t for t in full[early][1:] if t not in others)
    expected = hf_greedy(processor, target, rows, eos=stop)
    results = generate(target, draft, rows, SpecConfig(mode="sd", k=4, stop_token_ids=(stop,), max_new_tokens=48),
                       tokenizer=tok)
    assert [r.tokens for r in results] == expected
    short, rest = results[early], [r for i, r in enumerate(results) if i != early]
    assert short.finished_by == "stop" and all(r.finished_by == "length" for r in rest)
    assert all(short.stats.target_forwards < r.stats.target_forwards for r in rest)
    assert all(short.stats.draft_forwards < r.stats.draft_forwards for r in rest)


def test_bad_configuration_fails_clearly():
    with pytest.raises(ValueError, match="k"):
        SpecConfig(k=0)
    with pytest.raises(ValueError, match="theta"):
        SpecConfig(theta=1.5)
    with pytest.raises(ValueError, match="theta"):
        SpecConfig(theta=-0.1)
    with pytest.raises(ValueError, match="mode"):
        SpecConfig(mode="beam")
    with pytest.raises(ValueError, match="alpha"):
        SpecConfig(alpha=0)


def test_mismatched_pairs_and_inputs_fail_clearly():
    processor, target, draft = load_pair("llava_onevision")
    q_processor, q_target, q_draft = load_pair("qwen2_5_vl")
    rows = make_rows(processor, [8])
    with pytest.raises(ValueError, match="one model family"):
        generate(target, q_draft, rows, SpecConfig(mode="sd"))
    other = type(draft)(draft.config.__class__.from_dict(draft.config.to_dict()))
    other.config.text_config.eos_token_id = 3
    with pytest.raises(ValueError, match="tokenizers differ"):
        generate(target, other, rows, SpecConfig(mode="sd"))
    with pytest.raises(ValueError, match="needs a draft"):
        generate(target, None, rows, SpecConfig(mode="sd"))
    text_only = processor(text=["<|im_start|>user\nDescribe the video.<|im_end|>\n"], return_tensors="pt")
    with pytest.raises(ValueError, match="no video"):
        generate(target, draft, [text_only], SpecConfig(mode="sd"))
    q_text_only = q_processor(text=["<|im_start|>user\nDescribe the video.<|im_end|>\n"], return_tensors="pt")
    with pytest.raises(ValueError, match="no video"):
        generate(q_target, q_draft, [q_text_only], SpecConfig(mode="ar"))
    with pytest.raises(ValueError, match="relevance_layers"):
        generate(target, draft, rows, SpecConfig(relevance_layers=(99,)))
    with pytest.raises(ValueError, match="relevance_heads"):
        generate(target, draft, rows, SpecConfig(relevance_heads=((0, 99),)))
    with pytest.raises(ValueError, match="relevance_heads"):
        SpecConfig(relevance_heads=((0, 1),), relevance_layers=(0,))
    with pytest.raises(ValueError, match="relevance_heads"):
        SpecConfig(relevance_heads=((0, 1, 2),))
    with pytest.raises(ValueError, match="relevance_heads"):
        SpecConfig(relevance_heads=((0, 1), (0, 1)))
    for weights, heads in (((1.0,), None), ((1.0,), ((0, 1), (1, 0))), ((1.0, -0.5), ((0, 1), (1, 0))),
                           ((0.0, 0.0), ((0, 1), (1, 0))), (("x", 1.0), ((0, 1), (1, 0)))):
        with pytest.raises(ValueError, match="^relevance_weights"):
            SpecConfig(relevance_heads=heads, relevance_weights=weights)


def test_models_used_by_lvspec_still_generate_like_hf_afterwards(pair):
    """The relevance attention stays installed on the target; HF's own (assisted) generate must not notice."""
    family, processor, target, draft = pair
    rows = make_rows(processor, [8, 6])
    before = hf_greedy(processor, target, rows)
    generate(target, draft, rows, SpecConfig(mode="lvspec", k=4, max_new_tokens=48), tokenizer=processor.tokenizer)
    assert hf_greedy(processor, target, rows) == before
    if target.config.get_text_config().vocab_size == draft.config.get_text_config().vocab_size:
        tok = processor.tokenizer
        for row, want in zip(rows, before):
            ids = target.generate(**row, assistant_model=draft, max_new_tokens=48, do_sample=False,
                                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
            assert ids[0, row["input_ids"].shape[1]:].tolist() == want


def test_every_attention_path_computes_the_same_forward(pair):
    """The engine picks among the attention paths by speed on a GPU; the masked ones must agree
    exactly in float64 (ragged slots, left padding, 1 and 6 new tokens). "split" needs Triton:
    tests/test_attention.py checks it in float32 through Triton's interpreter, test_gpu.py on a GPU."""
    from lvspec.decoder import TextDecoder, attention_paths

    ATTENTION = attention_paths(torch.device("cpu"))
    assert ATTENTION == ("matmul", "sdpa", "sdpa_gqa")

    _, processor, target, draft = pair
    for model in (target, draft):
        decoder = TextDecoder(model, model.config.get_text_config().vocab_size)
        cache = decoder.new_cache(3, 256)
        torch.manual_seed(0)
        cache.k.normal_()
        cache.v.normal_()
        cache.length.copy_(torch.tensor([100, 73, 120]))
        cache.pad.copy_(torch.tensor([0, 20, 5]))
        cache.offset.copy_(torch.tensor([3, -20, 0]))
        for q in (1, 6):
            tokens = torch.randint(0, 500, (3, q))
            outs = {}
            for mode in ATTENTION:
                decoder.attention = {"step": mode, "verify": mode}
                with torch.inference_mode():
                    outs[mode] = decoder.forward(cache, tokens)
            for mode in ATTENTION[1:]:
                assert torch.allclose(outs[mode], outs[ATTENTION[0]], atol=1e-10), (mode, q)


def test_llava_video_features_equal_hfs():
    """LLaVA-OneVision's video features (pooled channels-last, for speed) are HF's, exactly."""
    from lvspec.llava_onevision import video_features

    processor, target, draft = load_pair("llava_onevision", dtype=torch.float64)

    rows = make_rows(processor, [6, 6], prompts=[grammar.prompt_for(None)] * 2)
    pixels = torch.cat([r["pixel_values_videos"] for r in rows]).to(torch.float64)
    for model in (target, draft):
        cfg = model.config
        with torch.inference_mode():
            ours = video_features(model, pixels)
            hf = model.model.get_video_features(pixels, vision_feature_layer=cfg.vision_feature_layer,
                                                vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        assert ours.shape == hf.pooler_output.shape and torch.equal(ours, hf.pooler_output)


def test_unpadded_prompts_take_the_causal_path_and_write_the_same_cache(pair):
    """Prompts of one width prefill without a mask (SDPA's causal path: flash attention on a GPU);
    keys, values and the last position's hidden state match the explicit band's exactly, and a
    padded group still gets the band."""
    from lvspec.decoder import TextDecoder

    _, processor, target, draft = pair
    rows = make_rows(processor, [6, 6], prompts=[grammar.prompt_for(None)] * 2)
    assert rows[0]["input_ids"].shape == rows[1]["input_ids"].shape
    for model in (target, draft):
        prompt = Engine(target, draft, SpecConfig(mode="ar")).adapter.prompt(model, rows)
        width = prompt.embeds.shape[1]
        decoder = TextDecoder(model, model.config.get_text_config().vocab_size)
        caches, hidden = [], []
        for causal in (True, False):
            cache = decoder.new_cache(2, width + 8)
            view = cache.prefill_view(torch.arange(2), prompt.pad, prompt.padded)
            mask = view.mask(width) if causal else view.band(width)
            assert (mask is None) == causal
            with torch.inference_mode():
                hidden.append(model.model.language_model(
                    inputs_embeds=prompt.embeds, attention_mask=mask, position_ids=prompt.position_ids,
                    past_key_values=view, use_cache=True).last_hidden_state[:, -1])
            caches.append(cache)
        assert torch.allclose(hidden[0], hidden[1], atol=1e-10)
        assert torch.allclose(caches[0].k, caches[1].k, atol=1e-10) and torch.allclose(caches[0].v, caches[1].v)
        assert caches[0].k[:, :, :, :width].abs().sum() > 0  # the keys were written
    padded = make_rows(processor, [6, 4])
    prompt = Engine(target, draft, SpecConfig(mode="ar")).adapter.prompt(target, padded)
    cache = TextDecoder(target, target.config.get_text_config().vocab_size).new_cache(2, 512)
    assert prompt.padded and cache.prefill_view(torch.arange(2), prompt.pad, prompt.padded).mask(
        prompt.embeds.shape[1]) is not None


def test_a_held_engine_reuses_its_state_across_batches_with_idle_slots(pair):
    """One engine, fixed slots, batches of 2, 4 and 3 rows: every batch decodes exactly like HF
    greedy, whatever the earlier batches left in the cache, and the state is built once."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6, 8], seed=9)
    expected = hf_greedy(processor, target, rows)
    engine = Engine(target, draft, SpecConfig(mode="sd", k=4, max_new_tokens=48), slots=4)
    first = engine.generate(rows[:2])
    state = engine._state
    assert [r.tokens for r in first] == expected[:2]
    assert [r.tokens for r in engine.generate(rows)] == expected
    assert [r.tokens for r in engine.generate(rows[1:])] == expected[1:]
    assert engine._state is state
    assert [r.tokens for r in engine.generate(rows * 2)] == expected * 2  # more rows than slots: in chunks


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that makes the host wait for the device (or sizes a tensor from its data),
    i.e. anything that a CUDA graph cannot capture."""

    SYNCS = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS or func.overloadpacket in (torch.ops.aten._unique2, torch.ops.aten.unique_consecutive):
            raise AssertionError(f"{func} waits on the host")
        if func.overloadpacket is torch.ops.aten.index and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            raise AssertionError("boolean indexing sizes its result from data")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["ar", "sd", "lvspec"])
def test_a_decoding_cycle_never_waits_on_the_host(pair, mode):
    """Draft loop, verify forward (relevance probe and acceptance rule included) and commit run
    without one host synchronisation: what lets them be captured as CUDA graphs."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 6])
    engine = Engine(target, draft, SpecConfig(mode=mode, k=4, theta=0.45, max_new_tokens=48))
    engine.generate(rows)  # builds the decode state
    st, cycle = engine._state, engine.cycle
    with torch.inference_mode():
        st.reset()
        slots = torch.arange(len(rows))
        prompts = engine.adapter.prompt(target, rows), engine.adapter.prompt(draft, rows) if engine.D is not None else None
        cycle.place(st, cycle.prompt_keys(st, *prompts, slots), *prompts, slots)
        with _NoHostSync():
            for k in ([0, 0] if mode == "ar" else [4, 0, 1, 0, 3]):
                if engine.D is not None:
                    cycle.ingest(st)
                if k:
                    cycle.draft(st, k)
                cycle.verify(st, k)
                cycle.commit(st, k)
    assert int(st.count[0].min()) > 1  # the cycles emitted tokens


def test_a_prefill_beside_a_cycle_keeps_its_slots_keys(pair):
    """A group prefilled while the other slots run a cycle (overlap: another CUDA stream) keeps
    exactly the keys a prefill alone writes: the cycle writes every slot's keys at its length, so
    the reserved slot is parked at the caches' tails (here a fresh slot, length 0, where the cycle
    would write over the prompt's first keys)."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 6])
    engine = Engine(target, draft, SpecConfig(mode="sd", k=4, max_new_tokens=48), slots=2)
    engine.generate(rows)  # builds the decode state
    st, cycle, one, two = engine._state, engine.cycle, torch.tensor([0]), torch.tensor([1])
    prompts = [(engine.adapter.prompt(target, [r]), engine.adapter.prompt(draft, [r])) for r in rows]
    width = prompts[1][0].embeds.shape[1]
    keys = []
    for beside in (True, False):
        with torch.inference_mode():
            st.reset()
            cycle.place(st, cycle.prompt_keys(st, *prompts[0], one), *prompts[0], one)
            if beside:
                cycle.reserve(st, two)
            first = cycle.prompt_keys(st, *prompts[1], two)
            if beside:  # every stage a cycle may run writes past a reserved slot's length, none into its prompt
                cycle.ingest(st)
                cycle.draft(st, 4)
                cycle.verify(st, 4)
                cycle.commit(st, 4)
            cycle.place(st, first, *prompts[1], two)
        keys.append([c.k[:, 1, :, :width].clone() for c in (st.T, st.D)] + [st.T.length[1].item()])
    assert all(torch.equal(a, b) for a, b in zip(keys[0][:2], keys[1][:2])) and keys[0][2] == keys[1][2] == width


def test_the_draft_length_pays_for_itself():
    """k=auto, a row at a time: a short draft where drafting costs about what verifying does, a long
    one where drafting is cheap; longer with more acceptance; K = 0 (a plain target step) where a
    verify costs several target steps (a compute-bound batch); never past the row's limit."""
    from lvspec.draft_length import EVIDENCE, Costs, choose, expected_tokens

    def k_of(costs, reached, kept, limit=10):
        table = torch.tensor(costs.cycle_ms(10), dtype=torch.float64)
        return choose(torch.tensor(reached), torch.tensor(kept), table, torch.tensor(limit)).tolist()

    often = [[100] * 10], [[90] * 10]  # each slot kept 90 % of the time it was reached
    assert k_of(Costs(draft_step_ms=20, verify_0_ms=20, verify_1_ms=21, verify_max_ms=23), *often, [10]) == [0]
    assert k_of(Costs(14, 20, 21, 23), *often, [10])[0] in (1, 2)
    cheap = Costs(1, 20, 21, 23)
    assert k_of(cheap, *often, [10])[0] >= 8
    mid = Costs(6, 20, 21, 23)
    rarely, oftener = k_of(mid, [[100] * 10, [100] * 10], [[50] * 10, [95] * 10], [10, 10])  # one batch, two rows
    assert 1 <= rarely < oftener <= 10
    assert k_of(cheap, *often, [3]) == [3] and k_of(cheap, *often, [0]) == [0]
    assert k_of(Costs(1, 10, 25, 60), [[100] * 10], [[50] * 10], [10]) == [0]  # a 2-token verify: 2.5 target steps
    assert 1 <= k_of(mid, [[0] * 10], [[0] * 10], [10])[0] <= 10  # a new row: the prior alone
    # K = 0 only on the row's own evidence: a row that has drafted fewer than EVIDENCE cycles drafts.
    seen = [EVIDENCE - 1] + [0] * 9
    assert k_of(Costs(1, 10, 25, 60), [seen], [seen], [10])[0] >= 1 and k_of(Costs(1, 10, 25, 60), [seen], [seen], [0]) == [0]
    # Expected tokens follow the prefix walk: E(K) = 1 + S(1) + ... + S(K), S falling with each slot.
    e = expected_tokens(torch.tensor([[10, 10]]), torch.tensor([[5, 5]]))[0].tolist()
    assert e[0] == 1.0 and 1.0 < e[1] < e[2] < 3.0 and e[2] - e[1] < e[1] - e[0]


def test_a_stream_refills_slots_and_decodes_like_the_batch_api(pair):
    """3 slots, 10 rows of very different lengths (an early stop token for some): every row comes
    out once, token-identical to greedy generate; finished rows' slots take new rows at once."""
    _, processor, target, draft = pair
    prompts = [grammar.prompt_for(h) for h in (None, 0.5, 1.0, 0.25, 0.75)] * 2
    rows = make_rows(processor, [8, 4, 6, 8, 5, 8, 7, 4, 8, 6], seed=13, prompts=prompts)
    assert len(rows) == 10
    period = processor.tokenizer.convert_tokens_to_ids(".")
    full = hf_greedy(processor, target, rows)
    # A stop token that some captions say early and others late, or never: lengths from ~3 to ~40.
    stop = next(t for t in full[0][2:] if t != period and any(t not in ids for ids in full))
    expected = hf_greedy(processor, target, rows, eos=stop)
    lengths = sorted(len(ids) for ids in expected)
    assert lengths[-1] >= 3 * lengths[0]
    cfg = SpecConfig(mode="sd", k=4, max_new_tokens=48, stop_token_ids=(stop,))
    engine = Engine(target, draft, cfg, slots=3)
    order, outputs = [], {}
    for i, result in engine.stream(iter(rows)):  # an iterator: rows are read only as slots free up
        assert i not in outputs
        order.append(i)
        outputs[i] = result
    assert sorted(outputs) == list(range(len(rows)))
    assert [outputs[i].tokens for i in range(len(rows))] == expected
    assert order != sorted(order)  # rows finished out of order: short ones left early
    t = engine.timing
    assert t["rows"] == len(rows) and t["peak_active"] == 3 and t["prefills"] >= 4  # slots were refilled
    # Refills ran beside the cycles of the rows in flight (placed a step later, their slots parked
    # at the caches' tails meanwhile); without overlap, every refill waits: the same tokens.
    assert t["overlapped_prefills"] >= 3
    for i, result in outputs.items():
        assert_counters_add_up(result, cfg.k)
    serial = Engine(target, draft, dataclasses.replace(cfg, overlap_prefill=False), slots=3)
    assert [r.tokens for r in serial.generate(rows)] == expected and serial.timing["overlapped_prefills"] == 0
    # Prompt forwards through static copies of their inputs and fixed outputs (CUDA graphs on a GPU;
    # here the same plumbing, re-run): groups of several shapes reuse them, the same tokens.
    captured = Engine(target, draft, dataclasses.replace(cfg, prompt_graphs=True), slots=3)
    assert [r.tokens for r in captured.generate(rows)] == expected
    shapes = captured._state.prompts.captured
    if captured.adapter.capturable:
        assert captured.prompt_graphs == "static" and len(shapes) >= 3 and all(shapes.values())
        summary = captured.timing["prompt_graphs"]
        assert summary["replays"] == captured.timing["prefills"] and summary["eager"] == 0
        captured.prompt_graphs = "off"  # switched off on the same state (benchmarks): eager, the same tokens
        assert [r.tokens for r in captured.generate(rows)] == expected
        assert captured.timing["prompt_graphs"]["replays"] == summary["replays"]
    else:
        assert captured.prompt_graphs == "off" and not shapes
    batch = Engine(target, draft, cfg).generate(rows)  # one slot per row
    assert [r.tokens for r in batch] == expected
    # (Counters of drafting may differ by a token or two: near the end, K is capped by the largest
    # budget left among the rows sharing a cycle, and the two runs group rows differently.)


def test_replayed_lengths_end_each_row_at_its_recorded_length(pair):
    """Replay with lengths: row r stops after lengths[r mod R] tokens (what continuous batching is
    measured against), whatever its slot, the rest of the replay unchanged."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6])
    cfg = SpecConfig(mode="sd", k=4, max_new_tokens=48, stop_token_ids=())
    recorded = generate(target, draft, rows, cfg, trace=True)
    lengths = [7, 20, 13]
    replay = Replay([r.accepted_per_cycle for r in recorded], lengths=lengths)
    assert all(0 <= Replay.recorded_length(r.accepted_per_cycle) - len(r.tokens) <= cfg.k
               for r in recorded)  # the budget may cut the last cycle short
    out = Engine(target, draft, cfg, slots=2).generate(rows * 2, replay=replay)  # 6 rows through 2 slots
    assert [r.stats.num_tokens for r in out] == lengths * 2
    assert all(r.finished_by == "length" for r in out)
    assert [r.tokens for r in out[:3]] == [full.tokens[:n] for full, n in zip(recorded, lengths)]


def test_rows_marked_exact_decode_as_plain_sd_beside_loosened_rows(pair):
    """An audit twin: the same video marked EXACT in an lvspec batch is verified strictly (the
    target's greedy caption, as a plain sd run gives), while its unmarked twin is loosened."""
    from lvspec.engine import EXACT

    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 6, 8])
    cfg = SpecConfig(mode="lvspec", k=5, theta=0.45, max_new_tokens=48)
    twins = [{**row, EXACT: True} for row in rows]
    mixed = Engine(target, draft, cfg, slots=4).generate(rows + twins)
    loosened = generate(target, draft, rows, cfg)
    exact = generate(target, draft, rows, dataclasses.replace(cfg, mode="sd"))
    assert [r.tokens for r in mixed[:3]] == [r.tokens for r in loosened]
    assert [r.tokens for r in mixed[3:]] == [r.tokens for r in exact] == hf_greedy(processor, target, rows)
    assert all(r.stats.accepted_loose == r.stats.accepted_shift == 0 for r in mixed[3:])
    assert sum(r.stats.accepted_loose + r.stats.accepted_shift for r in mixed[:3]) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_compiled_prefill_decodes_the_same_tokens(family):
    """compile_prefill: both models' vision encoders and their layers' norms and MLPs compiled in
    place (inductor), once, for any group size; the engine then decodes exactly what it does eagerly
    (float64: compiled kernels round no differently enough to flip a token)."""
    processor, target, draft = load_pair(family, dtype=torch.float64)
    rows = make_rows(processor, [4, 4, 4])  # two slots: a group of two, then a refill of one
    cfg = SpecConfig(mode="sd", k=3, max_new_tokens=12)
    expected = [r.tokens for r in Engine(target, draft, cfg, slots=2).generate(rows)]
    engine = Engine(target, draft, dataclasses.replace(cfg, compile_prefill=True), slots=2)
    modules = [m for model in (target, draft)
               for m in (engine.adapter.vision(model), model.model.language_model.layers[0].mlp)]
    compiled = [m._compiled_call_impl for m in modules]
    assert all(c is not None for c in compiled)
    assert [r.tokens for r in engine.generate(rows)] == expected
    Engine(target, draft, dataclasses.replace(cfg, compile_prefill=True), slots=2)  # another engine, same models
    assert [m._compiled_call_impl for m in modules] == compiled  # not compiled again
