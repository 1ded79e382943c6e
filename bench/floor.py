"""Where a frontier point's time goes: each stage against the fewest seconds the chip allows it.

    python -m bench.floor --json bench/frontier_bulk_h100.json        # a table per pair, from its JSON

A decoding forward reads its weights once and each decoding row's keys and values once, and
multiplies every token it runs through every weight. Kernels run one after another (a GEMM, then
the attention, then the next GEMM), so the least time a forward can take is, per layer stack,
max(weight bytes / HBM bandwidth, linear FLOPs / bf16 peak) for the GEMMs plus cache bytes / HBM
bandwidth for the attention (decode attention is a read: a few query rows per key). Summed over a
run's forwards this is its *floor*; measured time over floor is the share of the chip a stage
reaches, and the floors of two modes at their measured acceptance say what ratio the chip permits
before any kernel is tuned (a floor ratio under a target means no kernel work reaches it).

What a run's JSON holds (bench.frontier `point`) fixes the counts: cycles (one target forward
each: ar's step, sd's and lvspec's verify), tokens a verify (packed: each decoding row's own K + 1),
decoding rows a cycle (slots busy), draft forwards (the cycles' K summed) and draft row-steps (a
row drafts its own K: the verify's tokens less one a row; rows past their own K read no keys).
Weights are the shapes' (`bench.shapes.TEXT`), bf16; the caches hold the prompt plus half the new
tokens on average. Left out, so floors are lower bounds: the draft's catch-up forwards, the
vocabulary head's argmax, attention FLOPs (at 5-10 query rows a key, far under the chip's ridge),
and that GEMM shapes vary cycle to cycle (the mean verify's is used).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from bench.realsize import hbm_bytes_per_s as hbm
from bench.shapes import TEXT

BF16_PEAK = 989e12  # H100 / H200 SXM dense bf16 FLOP/s (datasheet)
BYTES = 2  # bf16


@dataclass(frozen=True)
class Stack:
    """One text decoder's sizes, as a decoding forward reads them."""
    params: int  # weights a forward reads (layers, final norm, vocabulary head): `TextDecoder.weight_bytes` / 2
    kv_token: int  # cache bytes a token holds over all layers (keys and values)

    @classmethod
    def of(cls, family: str, size: str) -> Stack:
        hidden, inter, layers, heads, kv, vocab = TEXT[family][size]
        hd = hidden // heads
        layer = (hidden * (heads + 2 * kv) * hd + (heads + 2 * kv) * hd + heads * hd * hidden + 3 * hidden * inter
                 + 2 * hidden)  # qkv with its bias, o, gate_up, down, two norms
        return cls(layers * layer + hidden + vocab * hidden, layers * 2 * kv * hd * BYTES)

    @classmethod
    def named(cls, name: str) -> Stack:
        """From a frontier label such as "llava_onevision-7b"."""
        family, size = name.rsplit("-", 1)
        return cls.of(family, size)

    def linear_s(self, tokens: float, bw: float) -> float:
        """Least seconds for one forward's GEMMs over `tokens` tokens: its weights read, or its FLOPs."""
        return max(self.params * BYTES / bw, 2 * self.params * tokens / BF16_PEAK)


def known(pair: dict) -> bool:
    """Whether both of a pair's models are real sizes of `bench.shapes.TEXT` (not toys)."""
    return all(name.rsplit("-", 1)[-1] in TEXT.get(name.rsplit("-", 1)[0], {}) for name in (pair["target"], pair["draft"]))


def stages(run: dict, pair: dict, machine: str) -> dict | None:
    """A run's measured seconds and floor per stage (verify or step, draft, the rest), its floor
    tokens/s and the share of it reached; None for a run out of memory or without the counts."""
    if run.get("out_of_memory") or "cycles" not in run:
        return None
    bw = hbm(machine)
    T, D = Stack.named(pair["target"]), Stack.named(pair["draft"])
    bs, cycles = run["batch_size"], run["cycles"]
    ctx = pair["prompt_tokens"] + pair["new_tokens"] / 2
    stride = pair.get("draft_frame_stride") or 1
    draft_ctx = run.get("draft_prompt_tokens", pair["prompt_tokens"] if stride == 1 else None)
    rows = run["slot_use"] * bs  # decoding rows a cycle
    verify_tokens = run.get("tokens_per_verify") or rows * (1 + (run["k_mean"] if run["mode"] != "ar" else 0))
    decode_s = run["cycle_ms"] * cycles / 1e3
    floor = {"verify": cycles * (T.linear_s(verify_tokens, bw) + rows * T.kv_token * ctx / bw)}
    measured = {"verify": run["ms_per_verify"] * cycles / 1e3}
    if run["mode"] != "ar":
        if draft_ctx is None:
            return None  # a thinned draft's prompt length is not in this JSON
        forwards = run.get("draft_steps", run["k_mean"] * cycles)
        row_steps = max(verify_tokens - rows, 0) * cycles  # each row's own K
        floor["draft"] = (max(forwards * D.params * BYTES / bw, 2 * D.params * row_steps / BF16_PEAK)
                          + row_steps * D.kv_token * (draft_ctx + pair["new_tokens"] / 2) / bw)
        measured["draft"] = (run["ms_per_draft_step"] or 0) * forwards / 1e3
    measured["rest"] = max(decode_s - sum(measured.values()), 0.0)
    floor["rest"] = 0.0
    tokens = run["decode_tokens_per_s"] * decode_s
    total = sum(floor.values())
    return {"measured_s": measured, "floor_s": floor, "floor_tokens_per_s": tokens / total, "share": total / decode_s}


def table(pair: dict, machine: str) -> list[str]:
    """Markdown: per run, each stage's milliseconds a cycle measured / floor, and the run's share."""
    lines = [f"#### {pair['target']} / {pair['draft']}: milliseconds a cycle, measured / floor "
             f"(HBM {hbm(machine) / 1e12:.2f} TB/s, bf16 {BF16_PEAK / 1e12:.0f} TFLOP/s)", "",
             "| batch | mode | decode tok/s | floor tok/s | share of floor | verify (or step) | draft | rest |",
             "|---|---|---|---|---|---|---|---|"]
    best = {}
    for run in sorted(pair["runs"], key=lambda r: (r["batch_size"], r["mode"])):
        s = stages(run, pair, machine)
        if s is None:
            continue
        best[run["mode"]] = max(best.get(run["mode"], 0), s["floor_tokens_per_s"])
        per = {k: 1e3 * v / run["cycles"] for k, v in s["measured_s"].items()}
        low = {k: 1e3 * v / run["cycles"] for k, v in s["floor_s"].items()}
        cell = {k: f"{per[k]:.1f} / {low[k]:.1f}" for k in per}
        lines.append(f"| {run['batch_size']} | {run['mode']} | {run['decode_tokens_per_s']:.0f} | "
                     f"{s['floor_tokens_per_s']:.0f} | {s['share']:.0%} | {cell['verify']} | {cell.get('draft', '-')} | "
                     f"{per['rest']:.1f} |")
    if "ar" in best:
        lines += ["", "Floor over floor (each mode's best batch measured here): " + ", ".join(
            f"{m} / ar = {best[m] / best['ar']:.2f}" for m in ("sd", "lvspec") if m in best)]
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="+", required=True, help="bench.frontier JSONs (a run's, or a report's)")
    args = ap.parse_args(argv)
    for path in args.json:
        report = json.load(open(path))
        pairs = report["pairs"] if "pairs" in report else [report]
        machine = report.get("machine", "")
        for pair in pairs:
            print("\n".join(table(pair, machine)) + "\n")


if __name__ == "__main__":
    main()
