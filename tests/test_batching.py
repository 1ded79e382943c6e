"""Batching for bulk jobs: bounded prefill groups, each row's own draft length (so a caption never
depends on its batch), K = 0 cycles with the draft's catch-up, and slots sized from memory.
Float64 toy pairs, as in test_lvspec.py: a mismatch is a bug, not float luck."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lvspec import Engine, RowFeed, SpecConfig, memory
from lvspec.state import catch_ups
from lvspec.draft_length import EVIDENCE, Costs
from lvspec.state import CATCH_UP
from test_lvspec import FAMILIES, assert_counters_add_up, hf_greedy, make_rows
from toyworld import grammar
from toyworld.families import load_pair

# Pinned k=auto cost tables: one where drafting pays (cheap draft steps), one where no row drafts
# (a verify of two tokens costs ten target steps).
PAYS = Costs(draft_step_ms=1.0, verify_0_ms=10.0, verify_1_ms=10.5, verify_max_ms=13.0)
NEVER = Costs(draft_step_ms=5.0, verify_0_ms=1.0, verify_1_ms=10.0, verify_max_ms=20.0)
PROMPTS = [grammar.prompt_for(h) for h in (None, 0.5, 1.0, 0.25, 0.75, None)]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    processor, target, draft = load_pair(request.param, dtype=torch.float64)
    return request.param, processor, target, draft


def test_rows_prefilled_in_bounded_groups_decode_what_one_group_decodes(pair):
    """generation.prefill_tokens: with room for one prompt a group, six rows enter in six groups,
    all before the first cycle; with room for two, four slots take them two at a time, refills
    beside decoding: token-identical to one group of all, and to greedy generate."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6, 8, 5, 7], prompts=PROMPTS)
    expected = hf_greedy(processor, target, rows)
    width = max(r["input_ids"].shape[-1] for r in rows)
    cfg = SpecConfig(mode="sd", k=4, max_new_tokens=48)
    whole = Engine(target, draft, cfg, slots=6)
    assert [r.tokens for r in whole.generate(rows)] == expected and whole.timing["prefills"] == 1
    single = Engine(target, draft, dataclasses.replace(cfg, prefill_tokens=width), slots=6)
    assert [r.tokens for r in single.generate(rows)] == expected
    assert single.timing["prefills"] == 6 and single.timing["peak_active"] == 6
    two = Engine(target, draft, dataclasses.replace(cfg, prefill_tokens=2 * width), slots=4)
    assert [r.tokens for r in two.generate(rows)] == expected
    assert two.timing["prefills"] >= 3 and two.timing["overlapped_prefills"] >= 1
    lv = SpecConfig(mode="lvspec", k="auto", k_costs=PAYS, theta=0.45, max_new_tokens=48)
    grouped = Engine(target, draft, dataclasses.replace(lv, prefill_tokens=width), slots=6).generate(rows)
    assert [r.tokens for r in grouped] == [r.tokens for r in Engine(target, draft, lv, slots=6).generate(rows)]


def test_slots_freed_in_one_cycle_are_all_refilled_at_the_next():
    """Beside decoding rows, as many prefill groups are queued as there are free slots (not one a
    cycle): two identical rows end in the same cycle while others decode, and both their slots
    take new rows at once. With prompt graphs (one group at a time: a replay overwrites the last
    one's outputs) a slot waits a cycle. Same tokens either way; fuller slots without graphs."""
    processor, target, draft = load_pair("llava_onevision", dtype=torch.float64)  # its prompts capture
    a, b, c = make_rows(processor, [8, 5, 7], prompts=[PROMPTS[0], PROMPTS[1], PROMPTS[2]])
    rows = [a, a, b, c] * 3
    width = max(r["input_ids"].shape[-1] for r in rows)
    cfg = SpecConfig(mode="sd", k=4, max_new_tokens=24, stop_token_ids=(), prefill_tokens=width)
    many = Engine(target, draft, cfg, slots=4)
    one = Engine(target, draft, dataclasses.replace(cfg, prompt_graphs=True), slots=4)
    assert one.prompt_graphs == "static" and many.prompt_graphs == "off"
    assert [r.tokens for r in many.generate(rows)] == [r.tokens for r in one.generate(rows)]
    assert many.timing["prefills"] == one.timing["prefills"] == len(rows)  # a row a group
    assert many.timing["steady_slot_use"] > one.timing["steady_slot_use"]


@pytest.mark.parametrize("k", ["auto", 4])
def test_a_rows_lvspec_caption_is_the_same_alone_batched_streamed_or_reordered(pair, k):
    """Each row drafts its own K (k=auto: from its own acceptance and one pinned cost table; a fixed
    k: capped by its own budget) and keeps at most that many loosely verified drafts: its caption
    and counters are the same decoded alone, in one batch, streamed through fewer slots, or in
    another order, while K differs between rows and cycles."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6, 8, 5, 7], prompts=PROMPTS)
    cfg = SpecConfig(mode="lvspec", k=k, k_max=6, k_costs=PAYS if k == "auto" else None, theta=0.45,
                     max_new_tokens=40)
    alone = Engine(target, draft, cfg, slots=1)
    expected = alone.generate(rows)  # one slot: each row decodes by itself
    assert sum(r.stats.accepted_loose + r.stats.accepted_shift for r in expected) > 0
    if k == "auto":
        assert len(set(alone.timing["k"])) > 2
    for slots, order in ((None, rows), (2, rows), (4, rows[::-1])):
        out = Engine(target, draft, cfg, slots=slots).generate(order)
        out = out if order is rows else out[::-1]
        assert [r.tokens for r in out] == [r.tokens for r in expected], (slots, order is rows)
        assert [r.stats for r in out] == [r.stats for r in expected]
    for r in expected:
        assert_counters_add_up(r, cfg.longest_draft)


def draft_next(draft, row: dict, emitted: list[int], vocab: int) -> int:
    """The draft model's greedy next token after the prompt and `emitted`, by HF's own forward."""
    ids = torch.cat([row["input_ids"], torch.tensor([emitted])], 1)
    extra = {k: v for k, v in row.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in row:
        extra["mm_token_type_ids"] = F.pad(row["mm_token_type_ids"], (0, len(emitted)))
    with torch.no_grad():
        logits = draft(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1]
    return int(logits[:vocab].argmax())


@pytest.mark.parametrize("lazy", [False, True], ids=["bounded", "lazy"])
def test_a_draft_that_sat_out_cycles_catches_up_and_drafts_what_it_would_have(pair, lazy):
    """K = 0 cycles (plain target steps) leave the draft behind; before it drafts again it reads
    what it missed in catch-up forwards (bounded: one whenever it would fall further behind than
    one reads; lazy, sd's batch choice: only when it drafts again, as many forwards as it takes),
    then proposes exactly the draft model's greedy next token for every row's sequence so far. The
    stages run as a stream runs them; the tokens stay greedy generate's."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 6, 4])
    expected = hf_greedy(processor, target, rows)
    engine = Engine(target, draft, SpecConfig(mode="sd", k=3, max_new_tokens=48))
    engine.generate(rows)  # builds the state
    st, cycle, vocab = engine._state, engine.cycle, engine.D.head.shape[0]
    if lazy:  # 13 tokens missed: three forwards before the K = 2 cycle
        schedule = [0] * (2 * CATCH_UP + 1) + [2] + [1] * 40
    else:
        schedule = [0] * (CATCH_UP + 1) + [0, 2, 0, 0, 3] + [1] * 40  # toy captions: 15-20 tokens
    ingests, checked = [], 0
    with torch.inference_mode():
        st.reset()
        slots = torch.arange(len(rows))
        prompts = engine.adapter.prompt(target, rows), engine.adapter.prompt(draft, rows)
        cycle.place(st, cycle.prompt_keys(st, *prompts, slots), *prompts, slots)
        for k in schedule:
            status = st.read()
            if not status.decoding:
                break
            for _ in range(catch_ups(k, status.lag, lazy)):
                cycle.ingest(st)
                ingests.append(k)
            assert lazy or status.lag <= CATCH_UP + 2
            if k:
                assert int((st.lag * st.active).max()) == 2  # caught up before drafting
                cycle.draft(st, k)
                for i, row in enumerate(rows):
                    if st.active[i]:
                        emitted = st.tokens[i, :int(st.length[i])].tolist()
                        assert int(st.drafted[i, 0]) == draft_next(draft, row, emitted, vocab), (i, len(emitted))
                        checked += 1
            cycle.verify(st, k)
            cycle.commit(st, k)
    # bounded: one in a K = 0 cycle, two before drafts
    assert not st.read().decoding and ingests == ([2, 2, 2] if lazy else [0, 2, 3]) and checked >= 6
    assert [st.tokens[i, :int(st.length[i])].tolist() for i in range(len(rows))] == expected


@pytest.mark.parametrize("mode", ["sd", "lvspec"])
def test_k_auto_drafts_nothing_where_a_verify_costs_more_than_its_tokens(pair, mode):
    """The K = 0 fallback: under a cost table where drafting cannot pay, an lvspec row drafts in its
    first EVIDENCE cycles (what it accepts is its evidence), then runs plain target steps, its draft
    catching up now and then; an sd batch (its choice the batch's, from the prior) never drafts, nor
    does its draft read anything past the prompt. So k=auto does not lose to ar. sd stays greedy-identical."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6])
    engine = Engine(target, draft, SpecConfig(mode=mode, k="auto", k_costs=NEVER, theta=0.45, max_new_tokens=48))
    out = engine.generate(rows)
    ks = engine.timing["k"]
    assert all(r.stats.draft_forwards == 1 + r.stats.drafted + r.stats.catch_ups for r in out)
    if mode == "sd":  # never drafts, so its draft never catches up either (it would when the batch drafts)
        assert [r.tokens for r in out] == hf_greedy(processor, target, rows)
        assert set(ks) == {0} and engine.timing["ingests"] == 0
        assert all(r.stats.drafted == r.stats.catch_ups == 0 and r.stats.draft_forwards == 1 for r in out)
    else:
        assert min(ks[:EVIDENCE]) >= 1 and set(ks[EVIDENCE:]) == {0}
        assert all(EVIDENCE <= r.stats.drafted <= EVIDENCE * 10 for r in out)
        assert engine.timing["ingests"] >= 1 and sum(r.stats.catch_ups for r in out) >= 1


def test_an_exact_batch_chooses_one_k_for_the_most_tokens_of_all_its_rows():
    """sd's k=auto: one K for the batch, the best expected tokens of all decoding rows per ms (a
    brute-force check), each row capped by its own limit; a batch of rows that keep their drafts
    drafts where a lone poor row would not, and where drafting cannot pay nobody drafts."""
    from lvspec.draft_length import choose, choose_batch, expected_tokens

    k_max = 6
    reached = torch.tensor([[20.0] * k_max, [20.0] * k_max, [20.0, 2, 0, 0, 0, 0], [0.0] * k_max], dtype=torch.float64)
    kept = torch.tensor([[19.0] * k_max, [18.0] * k_max, [2.0, 0, 0, 0, 0, 0], [0.0] * k_max], dtype=torch.float64)
    limit = torch.tensor([6, 6, 6, 2])
    active = torch.tensor([True, True, True, False])
    for costs in (PAYS, NEVER, Costs(draft_step_ms=2.0, verify_0_ms=10.0, verify_1_ms=12.0, verify_max_ms=30.0)):
        cycle_ms = torch.tensor(costs.cycle_ms(k_max), dtype=torch.float64)
        got = choose_batch(reached, kept, cycle_ms, limit, active)
        gain = expected_tokens(reached, kept)
        rate = [sum(float(gain[i, min(k, int(limit[i]))]) for i in range(3)) / float(cycle_ms[k]) for k in range(k_max + 1)]
        best = max(range(k_max + 1), key=lambda k: (rate[k], -k))
        assert got.tolist() == [min(best, int(n)) for n in limit], (costs, rate)
    cycle_ms = torch.tensor(PAYS.cycle_ms(k_max), dtype=torch.float64)
    assert int(choose_batch(reached, kept, cycle_ms, limit, active)[0]) == k_max
    # Alone, the poor row (2 of 20 kept) would draft less than the batch has it draft.
    assert int(choose(reached[2:3], kept[2:3], cycle_ms, limit[2:3])) < k_max
    assert set(choose_batch(reached, kept, torch.tensor(NEVER.cycle_ms(k_max), dtype=torch.float64), limit,
                            active).tolist()) == {0}


def test_sd_k_auto_drafts_one_k_a_cycle_for_every_row_and_stays_greedy(pair):
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6, 5])
    engine = Engine(target, draft, SpecConfig(mode="sd", k="auto", k_max=6, k_costs=PAYS, max_new_tokens=48))
    out = engine.generate(rows)
    assert [r.tokens for r in out] == hf_greedy(processor, target, rows)
    assert max(engine.timing["k"]) > 1  # drafting pays this batch: it drafts


def test_slots_auto_takes_what_memory_holds_and_decodes_like_fixed_slots(pair):
    """slots="auto": a CPU's RAM holds far more toy slots than the three asked for at most, so the
    state has three, and five rows stream through them as through three fixed slots; the plan's
    bytes a slot cover the state's own caches, and with a given amount of free memory the plan
    takes as many slots as fit beside the reserve (at least one)."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6, 8, 5], prompts=PROMPTS[:5])
    cfg = SpecConfig(mode="sd", k=4, max_new_tokens=48)
    auto = Engine(target, draft, cfg, slots="auto", max_slots=3)
    assert [r.tokens for r in auto.generate(rows)] == hf_greedy(processor, target, rows)
    plan, st = auto.plan, auto._state
    assert plan.slots == st.slots == auto.state_slots == auto.timing["slots"] == 3 and not plan.memory_bound
    assert plan.free_bytes > plan.reserve_bytes > 0 and "3 slots" in plan.describe()
    assert st.cache_bytes() / st.slots <= plan.slot_bytes
    assert len(auto.generate(rows[:2])) == 2 and auto._state is st  # fewer rows: the same state
    per, total = plan.slot_bytes, 2**34
    reserve = int(memory.RESERVE_FRACTION * total) + memory.prefill_bytes(auto.T, auto.D, cfg.prefill_tokens)

    def fits(free: int) -> memory.Plan:
        return memory.plan(auto.T, auto.D, st.capacity, auto.k_max, cfg.prefill_tokens, 64, auto.device,
                           free=(free, total))

    assert fits(reserve + 7 * per + per // 2).slots == 7 and fits(reserve + 7 * per).memory_bound
    assert fits(0).slots == 1 and fits(reserve + 100 * per).slots == 64


def test_bad_batching_settings_fail_clearly():
    _, target, draft = load_pair("qwen2_5_vl")
    with pytest.raises(ValueError, match="prefill_tokens"):
        SpecConfig(prefill_tokens=0)
    with pytest.raises(ValueError, match="k_costs must map exactly"):
        SpecConfig(k_costs={"draft_step_ms": 1.0})
    with pytest.raises(ValueError, match="k_costs.verify_0_ms"):
        SpecConfig(k_costs=dict(draft_step_ms=1, verify_0_ms=-1, verify_1_ms=1, verify_max_ms=1))
    for slots in (0, "many", 2.5):
        with pytest.raises(ValueError, match="slots"):
            Engine(target, draft, SpecConfig(mode="sd"), slots=slots)
    with pytest.raises(ValueError, match="max_slots"):
        next(Engine(target, draft, SpecConfig(mode="sd"), slots="auto").stream(RowFeed()))


def test_a_stream_times_its_steady_part_until_its_rows_run_out(pair):
    """timing's steady_* cover the stream until a free slot first found no row (a bulk job's state:
    its slots never drain); after it only the drain is left."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6, 5])
    engine = Engine(target, draft, SpecConfig(mode="lvspec", k="auto", k_costs=PAYS, theta=0.45, max_new_tokens=24),
                    slots=2)
    out = engine.generate(rows)
    t = engine.timing
    decoded = sum(len(r.tokens) - 1 for r in out)
    assert 0 < t["steady_cycles"] < t["cycles"] and 0 < t["steady_tokens"] < decoded and 0 < t["steady_s"] < t["decode_s"]
    # The last row enters once all but two rows (the slots) have finished: their tokens at least.
    assert len(out) > 2 and t["steady_tokens"] >= sum(sorted(len(r.tokens) - 1 for r in out)[:len(out) - 2])
    # Slot use: decoding rows per cycle over slots; the steady part's is its own, the drain's empty slots excluded.
    assert 0 < t["slot_use"] < t["steady_slot_use"] <= 1


def test_k_autos_cost_table_is_timed_on_busy_rows_at_a_typical_length(pair):
    """The cost table (and on a GPU the attention paths) is timed before any row is placed: on a
    state whose every slot decodes, drafting k_max, half-way through a caption. An idle fresh state
    would time forwards whose split attention reads no keys (GPU: a verify at half its cost)."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4])
    cfg = SpecConfig(mode="lvspec", k="auto", k_max=4, theta=0.45, max_new_tokens=24)
    engine = Engine(target, draft, cfg, slots=2)
    seen, timing = [], [False]
    for name in ("draft", "verify"):
        stage = getattr(engine.cycle, name)

        def wrapped(st, k, *width, stage=stage):
            if timing[0]:
                seen.append((bool(st.active.all()), int(st.k_row.min()), st.T.length.tolist()))
            return stage(st, k, *width)
        setattr(engine.cycle, name, wrapped)
    state_for = engine.state_for

    def timed_state_for(*args):
        timing[0] = True
        try:
            return state_for(*args)
        finally:
            timing[0] = False
    engine.state_for = timed_state_for
    out = engine.generate(rows)
    width = max(r["input_ids"].shape[-1] for r in rows)
    assert seen and all(active and k_row == 4 for active, k_row, _ in seen)
    assert all(lengths == [width + 12] * 2 for *_, lengths in seen)
    assert engine.costs is not None and all(len(r.tokens) > 1 for r in out)  # the stream began on a reset state


@pytest.mark.parametrize("cfg", [
    SpecConfig(mode="lvspec", k="auto", k_max=6, k_costs=PAYS, theta=0.45),
    SpecConfig(mode="lvspec", k="auto", k_max=6, k_costs=PAYS, theta=0.45, shift_window=2),
    SpecConfig(mode="sd", k=4),
    SpecConfig(mode="ar"),
], ids=["lvspec-auto", "lvspec-auto-window2", "sd", "ar"])
def test_a_packed_verify_decodes_what_a_padded_verify_decodes(pair, cfg):
    """pack_verify: the verify's weights run over each decoding row's own [last, drafts] only (idle
    slots and a loosened row's drafts past its own K are left out): the same tokens and counters as
    every slot at the cycle's K, in a batch with idle slots and streamed through fewer slots, while
    the packed forwards ran fewer tokens wherever there were any to leave out."""
    _, processor, target, draft = pair
    rows = make_rows(processor, [8, 4, 6, 8, 5, 7], prompts=PROMPTS)
    cfg = dataclasses.replace(cfg, max_new_tokens=40)
    draft = draft if cfg.mode != "ar" else None
    for slots in (4, 16):
        padded = Engine(target, draft, dataclasses.replace(cfg, pack_verify=False), slots=slots)
        expected = padded.generate(rows)
        packed = Engine(target, draft, cfg, slots=slots)
        out = packed.generate(rows)
        assert [r.tokens for r in out] == [r.tokens for r in expected]
        assert [r.stats for r in out] == [r.stats for r in expected]
        t = packed.timing
        assert padded.timing["verify_tokens"] == slots * (t["cycles"] + sum(t["k"]))  # every slot, K + 1 each
        # Sixteen slots for six rows: ten always idle, left out of every verify (eight-token granules).
        assert t["verify_tokens"] < padded.timing["verify_tokens"] or (slots == 4 and cfg.mode == "ar")
    if cfg.mode == "lvspec":
        assert sum(r.stats.accepted_loose + r.stats.accepted_shift for r in out) > 0


def test_packed_tokens_take_the_wanted_tokens_in_order_then_fillers():
    from lvspec.decoder import packed_tokens, packed_width

    want = torch.tensor([[True, True, False], [False, False, False], [True, False, False], [True, True, True]])
    assert packed_tokens(want, 8).tolist() == [0, 1, 6, 9, 10, 11, 12, 12]  # 12 = S * q: fillers
    assert packed_tokens(want, 6).tolist() == [0, 1, 6, 9, 10, 11]
    assert packed_width(9, 12) is None and packed_width(3, 12) == 8  # at least a granule of 8
    assert packed_width(600, 1408) == 640 and packed_width(1400, 1408) is None  # granules of 64 from 512
    assert all(w >= n and w - n < max(8, n / 8) for n in range(1, 2000) if (w := packed_width(n, 10**6)))


def test_a_packed_verifys_scores_are_the_full_logits_scores_where_its_tokens_ran():
    """A packed verify's logits ([N, V], no [S, K + 1, V] tensor made) reduce to what the full
    logits give at the slots it ran (choice, best logit, the draft token's logit and rank), zeros
    elsewhere (as all-zero logits), fillers dropped."""
    from lvspec.decoder import packed_tokens
    from lvspec.verify import scores

    g = torch.Generator().manual_seed(0)
    S, k, V = 5, 4, 50
    logits = torch.randn(S, k + 1, V, generator=g, dtype=torch.float64)
    draft = torch.randint(0, V, (S, k), generator=g)
    want = torch.rand(S, k + 1, generator=g) < 0.6
    pack = packed_tokens(want, int(want.sum()) + 3)  # three fillers
    full = scores(logits, draft, top_k=3)
    packed = scores(logits.flatten(0, 1)[pack.clamp(max=S * (k + 1) - 1)], draft, top_k=3, pack=pack)
    for name in ("choice", "best", "drafted", "above"):
        a, b = getattr(full, name), getattr(packed, name)
        assert torch.equal(a[want], b[want]) and not b[~want].any(), name
    assert torch.equal(full.drafted[:, :k], logits[:, :k].gather(-1, draft[..., None])[..., 0])


def test_a_shift_never_matches_the_targets_choice_past_the_rows_own_k():
    """Position-shift tolerance over two slots: a row drafting its own K = 1 in a cycle of K = 3
    must not keep its draft because the target would say it two slots later, after drafts the row
    never keeps (the batch's K would decide its caption; a packed verify does not compute them). The
    same row alone (limit = K = 3) may."""
    from lvspec.verify import SHIFT, verify

    cfg = SpecConfig(mode="lvspec", theta=0.5, shift_window=2, alpha=1.0)
    draft = torch.tensor([[7, 1, 2]])
    t = torch.tensor([5, 6, 7, 8])  # the target's choices: the draft's 7 two slots later
    logits = F.one_hot(t, 10).double()[None] * 10
    relevance = torch.zeros(1, 4)  # every slot a filler: shifts allowed
    assert verify(draft, logits, relevance, cfg).kind[0, 0] == SHIFT
    assert verify(draft, logits, relevance, cfg).accepted.item() >= 1
    cut = verify(draft, logits, relevance, cfg, limit=torch.tensor([1]))
    assert cut.accepted.item() == 0 and cut.next_token.item() == 5
