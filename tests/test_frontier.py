"""The bulk-throughput benchmark's own machinery, on a CPU with the toy pairs (its figures come from
GPUs: bench/gpu_frontier.sh): prompts prefilled once decode as if prefilled every time, and a climb
writes every point, each mode's peak and the report."""

import json
import subprocess
import sys

import torch

from bench.frontier import SOURCE, PromptsOnce
from conftest import ROOT
from lvspec import Engine, SpecConfig
from test_lvspec import make_rows
from toyworld import grammar
from toyworld.families import load_pair


def test_prompts_prefilled_once_decode_like_prompts_prefilled_every_time():
    """Rows repeating three videos: each video is prefilled for real once, for every engine over the
    same models (a draft's keys too, once an engine has one); every other row gets its keys copied
    into its slot. A batch of seven in groups of two, the same seven streamed through two slots,
    an ar engine after: each decodes, call after call, what an engine that prefills every row does."""
    processor, target, draft = load_pair("qwen2_5_vl", dtype=torch.float64)
    videos = make_rows(processor, [8, 8, 8], prompts=[grammar.PROMPT] * 3)  # one shape, as a benchmark's rows
    rows = [{**videos[i % 3], SOURCE: i % 3} for i in range(7)]
    width = rows[0]["input_ids"].shape[-1]
    once = PromptsOnce()
    for mode, slots in (("lvspec", 7), ("lvspec", 2), ("ar", 7)):
        cfg = SpecConfig(mode=mode, k=4, theta=0.45, max_new_tokens=24, prefill_tokens=2 * width)
        expected = [r.tokens for r in Engine(target, draft, cfg, slots=slots).generate(rows)]
        engine = Engine(target, draft, cfg, slots=slots)
        once.attach(engine)
        for _ in range(2):
            assert [r.tokens for r in engine.generate(rows)] == expected, (mode, slots)
    # Groups {0, 1} and {2, 3} held new videos for the lvspec engines, {0, 1} and {2} for ar (no draft keys).
    assert once.prefills == 4 and len(once.kept) == 6


def test_a_frontier_climb_writes_every_point_and_each_modes_peak(tmp_path):
    out = tmp_path / "frontier.json"
    run = subprocess.run([sys.executable, "-m", "bench.realsize", "frontier", "--pair", "llava_onevision:7b:0.5b",
                          "--device", "cpu", "--toy", "--batch-sizes", "1", "2", "--repeats", "2", "--new-tokens", "12",
                          "--frames", "4", "--videos", "2", "--stream", "2", "--auto", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    pair = json.loads(out.read_text())["pairs"][0]
    points = {(r["mode"], r["batch_size"]) for r in pair["runs"]}
    assert points == {(m, b) for m in ("ar", "sd", "lvspec") for b in (1, 2)}
    # Two videos, each prefilled once for the engines without a draft (ar) and once for those with one.
    assert sum(r["prefills"] for r in pair["runs"]) == 4
    assert all(len(r["runs_tokens_per_s"]) == 2 and 0 < r["slot_use"] <= 1 for r in pair["runs"])
    # Streamed: each point's steady part (until its rows ran out) timed too, and its peaks.
    assert all(r["steady_tokens_per_s"] > 0 for r in pair["runs"]) and set(pair["steady_peak"]) == {"ar", "sd", "lvspec"}
    assert pair["auto"]["slots"] == 2 and pair["auto"]["rows"] == 4  # the most slots asked for; twice as many rows
    best = max((r for r in pair["runs"] if r["mode"] == "lvspec"), key=lambda r: r["decode_tokens_per_s"])
    assert pair["peak"]["lvspec"]["batch_size"] == best["batch_size"]
    assert pair["peak_lvspec_over_peak_ar"] == best["decode_tokens_per_s"] / pair["peak"]["ar"]["tokens_per_s"]
    # Modes split over two calls (as bench/gpu_frontier.sh splits a big pair) report as one pair.
    whole = json.loads(out.read_text())
    parts = []
    for i, modes in enumerate((("ar", "sd"), ("lvspec",))):
        part = tmp_path / f"part{i}.json"
        part.write_text(json.dumps({**whole, "pairs": [{**pair, "runs": [r for r in pair["runs"] if r["mode"] in modes]}]}))
        parts.append(str(part))
    md = tmp_path / "B.md"
    report = subprocess.run([sys.executable, "-m", "bench.frontier", "report", "--json", *parts, "--out",
                             str(tmp_path / "merged.json"), "--markdown", str(md)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    merged = json.loads((tmp_path / "merged.json").read_text())["pairs"]
    assert len(merged) == 1 and merged[0]["peak"] == pair["peak"]
    assert merged[0]["peak_lvspec_over_peak_ar"] == pair["peak_lvspec_over_peak_ar"]
    text = md.read_text()
    assert "## Bulk throughput" in text and "peak lvspec / peak ar" in text and "xychart-beta" in text
    assert "slots=auto (lvspec): 2 slots" in text
