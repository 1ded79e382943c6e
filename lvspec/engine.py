"""Batched greedy decoding of video prompts: `ar`, exact speculative `sd`, and `lvspec`.

    repeat: place new rows in free slots (prefill both models: HF modules, eager)
            the draft proposes K tokens -> the target verifies them in one forward -> commit what
            each row kept plus one target token, roll both caches back -> one small host read

`Engine` holds the models and their stages (`cycle.Cycle`), the decode state between calls
(`state.DecodeState`: fixed slots and capacity, set up once and reused, its stages captured as
CUDA graphs on a GPU), and runs streams of rows through it (`stream.Stream`: a finished row's
slot takes the next row). Each row drafts its own K, chosen on the device from its own
acceptance and one cost table (`draft_length`), so a caption never depends on its neighbours.
A row carrying `EXACT: True` is verified strictly whatever the mode (an audit's exact twin). A
target sharded over ranks (`parallel`) runs the same loop on every rank: rank 0 reads the rows,
the others `follow`.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lvspec import memory
from lvspec.adapter import check_pair
from lvspec.config import SpecConfig
from lvspec.cycle import Cycle
from lvspec.decoder import attention_paths
from lvspec.draft_length import Costs
from lvspec.graphs import PromptGraphs, Stages
from lvspec.replay import Replay
from lvspec.state import CATCH_UP, DecodeState, margin
from lvspec.stream import EXACT, REPLAY_KEY, Clock, RowOutput, Stream

__all__ = ["EXACT", "REPLAY_KEY", "Engine", "RowOutput", "generate"]

# cuDNN's attention rebuilds its execution plan whenever the key length changes (every prefill
# shape, and every step of a growing cache): measured 1.25 ms of CPU per layer call on an H200.
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Engine:
    """A target (and draft) ready to decode batches of prepared video prompts with `cfg.mode`.

    Holds the decode state between calls, so that calls of one shape reuse its caches and captured
    graphs. `slots` fixes how many rows decode at once (more rows stream through the slots, fewer
    leave slots idle); "auto" takes as many as the device's memory holds (`memory.plan`), at most
    `max_slots` and the rows of a call; None sizes the state to each `generate` call. Note: the
    models' q/k/v and gate/up weights are packed into one tensor each, the modules keeping views
    (same values, no extra memory).
    """

    def __init__(self, target, draft, cfg: SpecConfig = SpecConfig(), slots: int | str | None = None,
                 max_slots: int | None = None):
        if cfg.mode != "ar":
            if draft is None:
                raise ValueError(f"mode {cfg.mode!r} needs a draft model")
            check_pair(target, draft)
        if not (slots is None or slots == "auto" or (isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1)):
            raise ValueError(f"slots must be an integer >= 1, 'auto' or None, got {slots!r}")
        if max_slots is not None and (not isinstance(max_slots, int) or max_slots < 1):
            raise ValueError(f"max_slots must be an integer >= 1, got {max_slots!r}")
        self.cycle = Cycle(target, draft if cfg.mode != "ar" else None, cfg)
        c = self.cycle
        self.adapter, self.cfg, self.target, self.draft = c.adapter, cfg, target, c.draft_model
        self.T, self.D, self.tp, self.k_max = c.T, c.D, c.tp, c.k_max
        if self.D is not None and self.D.tp is not None:
            raise ValueError("the draft must be whole on every rank: load it without tensor parallelism")
        self.device = target.device
        self.graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.slots, self.max_slots = slots, max_slots
        # Prefill beside decoding (continuous batching): decoding on a high-priority stream, prompts
        # on a low-priority one. CPU: the same steps, run in order. Not under tensor parallelism
        # (its collectives keep one order).
        self.overlap = cfg.overlap_prefill and self.tp is None
        cuda = self.device.type == "cuda"
        self.decode_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self.prefill_stream = torch.cuda.Stream(self.device, priority=0) if cuda else None
        capturable = cfg.prompt_graphs and self.tp is None and getattr(self.adapter, "capturable", False)
        self.prompt_graphs = ("cuda" if self.graphs else "static") if capturable else "off"
        if cfg.compile_prefill:
            self.compile_prefill()
        self._state: DecodeState | None = None
        # k=auto's cost table: pinned by the config, else measured on this engine's first state.
        self.costs: Costs | None = cfg.k_costs if c.auto else None
        self.plan: memory.Plan | None = None  # slots="auto": the latest state's plan
        self.timing: dict = {}  # of the latest call: prefill and decode seconds, K per cycle, costs
        self.attention_timings: dict = {}  # (model, forward size) -> seconds per attention path, when tuned
        self.attention_errors: dict = {}  # (model, forward size, path) -> why that path could not run

    # ---- the API ---------------------------------------------------------------------------------
    def compile_prefill(self) -> None:
        """Compile what a prefill runs through HF's modules, in place (torch.compile, inductor): both
        models' vision encoders, and in their language models every part of a layer but its attention
        (the norms and MLPs, where eager HF launches one kernel per elementwise op): attention writes
        the caches, which a compiled graph would copy whole. Decoding runs `TextDecoder`'s own graphs,
        not these. Each module once (engines over the same models share them); compiles on first use."""
        for model in (self.target, self.draft):
            if model is None:
                continue
            lm = model.model.language_model
            sharded = model is self.target and self.tp is not None  # its MLPs all-reduce: left eager (unmeasured)
            parts = [] if sharded else [lm.norm] + [m for layer in lm.layers
                                                    for name, m in layer.named_children() if name != "self_attn"]
            for module in [self.adapter.vision(model), *parts]:
                if getattr(module, "_compiled_call_impl", None) is None:
                    module.compile()

    def generate(self, rows: list[dict], tokenizer=None, trace: bool = False,
                 replay: Replay | None = None, static: bool = False) -> list[RowOutput]:
        """Caption prepared video prompts (one processor output per row); outputs in row order.

        With `tokenizer`, outputs carry decoded text; with `trace`, every verified slot's relevance
        and tokens, and the drafts kept per cycle. With `replay` (speed measurement of
        random-weight models), each cycle keeps the recorded number of drafts instead. More rows
        than slots stream through them (see `stream`).
        """
        out: list[RowOutput | None] = [None] * len(rows)
        for i, result in self.stream(rows, tokenizer, trace, replay, static):
            out[i] = result
        return out

    def stream(self, rows: Iterable[dict], tokenizer=None, trace: bool = False,
               replay: Replay | None = None, static: bool = False) -> Iterator[tuple[int, RowOutput]]:
        """Continuous batching: each slot takes the next row the moment its row finishes (rows are
        prefilled into free slots between cycles). Yields (index among `rows`, output) as rows
        finish. Rows are read from `rows` only when a slot is free for them; `rows` may be a
        `RowFeed` that other threads keep filling (its keys replace the indices). With `static`,
        new rows enter only once every slot is free (static batches: what continuous batching is
        measured against)."""
        if self.tp is not None and not self.tp.leader:
            raise RuntimeError(f"rank {self.tp.rank} of a tensor-parallel target decodes through follow(); "
                               "rows go to rank 0")
        count = len(rows) if hasattr(rows, "__len__") else None
        if self.slots == "auto":
            caps = [c for c in (self.max_slots, count) if c is not None]
            if not caps:
                raise ValueError("streaming rows of unknown count with slots='auto' needs Engine(..., max_slots=N)")
            slots, cap = None, min(caps)
        else:
            slots, cap = self.slots or count, None
            if slots is None:
                raise ValueError("streaming rows of unknown count needs Engine(..., slots=N)")
        if not (slots or cap):
            return
        if self.tp is not None:  # the peers start the same stream; its rows reach them as rank 0 reads them
            self.tp.share({"slots": slots, "cap": cap, "trace": trace, "replay": replay, "static": static})
        yield from self._run(Stream(self, rows, slots, cap, tokenizer, trace, replay, static))

    def follow(self) -> None:
        """A peer rank of a tensor-parallel target: decode every stream rank 0 runs, in step with it,
        until rank 0 calls `close`. A stream that fails fails on every rank alike (same rows, same
        state); the peer then waits for the next one, as rank 0 goes on."""
        if self.tp is None or self.tp.leader:
            raise RuntimeError("follow() is for ranks other than 0 of a tensor-parallel target")
        while (call := self.tp.share()) is not None:
            try:
                for _ in self._run(Stream(self, None, call["slots"], call["cap"], None, call["trace"],
                                          call["replay"], call["static"])):
                    pass
            except Exception as e:  # noqa: BLE001 - rank 0 sees the same error and reports it
                print(f"lvspec rank {self.tp.rank}: stream failed as on rank 0: {type(e).__name__}: {e}", flush=True)

    def close(self) -> None:
        """Rank 0 of a tensor-parallel target: let the peers' `follow` return."""
        if self.tp is not None and self.tp.leader:
            self.tp.share(None)

    @property
    def state_slots(self) -> int | None:
        """The slots of the state held now (None before any): what slots="auto" chose."""
        return self._state.slots if self._state is not None else None

    def prompt_group(self, st: DecodeState, rows: list[dict], slots: torch.Tensor):
        """A group's prompt forwards (`Cycle.prompt_group`); what a stream runs to prefill rows."""
        return self.cycle.prompt_group(st, rows, slots)

    def on(self, stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _run(self, run: Stream) -> Iterator[tuple[int, RowOutput]]:
        if self.decode_stream is not None:  # what the caller queued (e.g. weights) comes first
            self.decode_stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            while True:
                with torch.inference_mode(), sdpa_kernel(_ATTENTION_BACKENDS), self.on(self.decode_stream):
                    finished = run.step()
                if finished is None:
                    break
                yield from finished
        finally:
            self.timing = run.timing()

    # ---- state ----------------------------------------------------------------------------------
    def fits(self, st: DecodeState | None, slots: int | None, cap: int | None, width: int,
             draft_width: int | None = None) -> bool:
        """Whether `st` takes prompts `width` tokens long (the draft's `draft_width`, default the
        same) for a stream of `slots` slots (None: slots="auto", at most `cap`)."""
        room = self.cfg.max_new_tokens + margin(self.k_max)
        if st is None or st.capacity < width + room or (st.D is not None and st.D.capacity < (draft_width or width) + room):
            return False
        return st.slots == slots if slots is not None else st.slots >= cap or st.memory_bound

    def state_for(self, slots: int | None, cap: int | None, width: int, draft_width: int | None = None) -> DecodeState:
        """The held state if it `fits`, else a new one (the old one freed first): `slots` slots, or
        with None as many as memory holds, at most `cap`."""
        st = self._state
        if self.fits(st, slots, cap, width, draft_width):
            return st
        self._state = st = None  # free the old caches before allocating new ones
        draft_width = draft_width or width
        # Similar prompt lengths share a state (and its graphs).
        capacity, draft_capacity = (-(-(w + self.cfg.max_new_tokens + margin(self.k_max)) // 128) * 128
                                    for w in (width, draft_width))
        plan = None
        if slots is None:
            plan = self.plan = memory.plan(self.T, self.D, capacity, self.k_max, self.cfg.prefill_tokens, cap,
                                           self.device, self.tp, draft_capacity=draft_capacity)
            slots = plan.slots
            if self.tp is None or self.tp.leader:
                print(f"lvspec: slots=auto: {plan.describe()}", flush=True)
        st = self._state = self.cycle.new_state(slots, capacity, draft_capacity)
        st.memory_bound = plan is not None and plan.memory_bound
        st.stages = Stages(self.graphs, _snapshot(st.small()))
        st.prompts = PromptGraphs(self.prompt_graphs)  # they write into this state's caches
        # Until the first rows come (Stream resets the state), every slot decodes, drafting k_max, at
        # a typical length, half-way through a caption: the attention paths and the cost table are
        # timed on the work decoding does ("split" reads only the band of keys of each row that
        # uses its result: a fresh state's idle rows would read nothing).
        for cache, w in ((st.T, width), (st.D, draft_width)):
            if cache is not None:
                cache.length.fill_(w + self.cfg.max_new_tokens // 2)
        st.active.fill_(True)
        st.k_row.fill_(self.k_max)
        if self.graphs:
            self._tune_attention(st)
        self._capture_all(st)
        if self.cycle.auto:
            if self.costs is None:
                self.costs = self._measure_costs(st)
            st.cycle_ms.copy_(torch.tensor(self.costs.cycle_ms(self.k_max), dtype=torch.float64))
        return st

    def _tune_attention(self, st: DecodeState) -> None:
        """Per decoder and forward size, keep the attention path that runs fastest on this state's
        shapes (one captured forward each; the fresh state is reset before any prefill)."""
        jobs = [("target", self.T, st.T, "step", 1)]
        if self.D is not None:
            jobs += [("target", self.T, st.T, "verify", self.k_max + 1), ("draft", self.D, st.D, "step", 2),
                     ("draft", self.D, st.D, "verify", CATCH_UP)]
        for name, decoder, cache, size, q in jobs:
            tokens = torch.zeros(st.slots, q, dtype=torch.long, device=self.device)
            timed = {}
            for mode in attention_paths(self.device):
                decoder.attention[size] = mode
                try:
                    timed[mode] = Stages.seconds(lambda: decoder.forward(cache, tokens))
                except Exception as e:  # noqa: BLE001 - a path this device or build cannot run: never chosen
                    timed[mode] = float("inf")
                    self.attention_errors[(name, size, mode)] = f"{type(e).__name__}: {e}"[:300]
            decoder.attention[size] = min(timed, key=timed.get)
            self.attention_timings[(name, size)] = timed
        if self.tp is not None:  # one choice for all ranks (timings differ a little between GPUs)
            chosen = self.tp.share({"T": dict(self.T.attention), "D": dict(self.D.attention) if self.D else None})
            self.T.attention.update(chosen["T"])
            if self.D is not None:
                self.D.attention.update(chosen["D"])

    def _capture_all(self, st: DecodeState) -> None:
        """Capture every stage a cycle may run (each K up to k_max, 0 included: rows choose any), so
        that no batch stalls mid-decode on a capture; a packed verify (`SpecConfig.pack_verify`) is
        captured the first time a cycle needs its (K, width): a few widths a K, once per state."""
        c = self.cycle
        for k in range(self.k_max + 1):
            if k:
                st.stages.capture(("draft", k), lambda: c.draft(st, k))
            st.stages.capture(("verify", k, None), lambda: c.verify(st, k))
            st.stages.capture(("commit", k), lambda: c.commit(st, k))
        if self.D is not None:
            st.stages.capture(("ingest",), lambda: c.ingest(st))

    def _measure_costs(self, st: DecodeState) -> Costs:
        """k=auto's cost table, timed on the fresh state (before any prefill: whatever these runs
        write is reset): the draft loop at K = 1 and k_max, the verify at K = 0, 1 and k_max; five
        rounds over all of them (a burst of other work on the machine then slows one round, not one
        stage), medians, rounded; a verify never cheaper than a narrower one. Rank 0's under tensor
        parallelism (every rank chooses the same K)."""
        cuda, c, km = self.device.type == "cuda", self.cycle, self.k_max
        stages = {("draft", k): (lambda k=k: c.draft(st, k)) for k in sorted({1, km})}
        stages |= {("verify", k, None): (lambda k=k: c.verify(st, k)) for k in sorted({0, 1, km})}
        for key, stage in stages.items():
            st.stages.run(key, stage)  # capture (or warm up)
        ms = {key: [] for key in stages}
        for _ in range(5):
            for key, stage in stages.items():
                clock = Clock(cuda)
                a = clock.mark()
                st.stages.run(key, stage)
                b = clock.mark()
                if cuda:
                    torch.cuda.synchronize()
                ms[key].append(clock.seconds(a, b) * 1e3)
        m = {key: statistics.median(runs) for key, runs in ms.items()}
        d1, dm = m[("draft", 1)], m[("draft", km)]
        v0 = max(m[("verify", 0, None)], 1e-6)
        v1 = max(m[("verify", 1, None)], v0)
        costs = Costs(draft_step_ms=max((dm - d1) / (km - 1) if km > 1 else d1, 1e-6), verify_0_ms=v0,
                      verify_1_ms=v1, verify_max_ms=max(m[("verify", km, None)], v1)).rounded()
        return self.tp.share(costs) if self.tp is not None else costs


def generate(target, draft, rows: list[dict], cfg: SpecConfig = SpecConfig(), tokenizer=None,
             trace: bool = False, replay: Replay | None = None) -> list[RowOutput]:
    """One batch with a fresh `Engine` (hold an Engine to reuse its state and graphs across batches)."""
    return Engine(target, draft, cfg).generate(rows, tokenizer=tokenizer, trace=trace, replay=replay)


def _snapshot(tensors: list[torch.Tensor]):
    """A function that saves `tensors` and returns the function restoring them (no reference back
    to the state, so a dropped state frees its caches at once)."""
    def save():
        saved = [(t, t.clone()) for t in tensors]
        return lambda: [t.copy_(s) for t, s in saved]
    return save
