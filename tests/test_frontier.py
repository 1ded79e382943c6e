"""The bulk-throughput benchmark's own machinery, on a CPU with the toy pairs (its figures come from
GPUs: bench/gpu_frontier.sh): prompts prefilled once decode as if prefilled every time, and a climb
writes every point, each mode's peak and the report."""

import json
import subprocess
import sys

import torch

from bench.frontier import PromptsOnce
from conftest import ROOT
from lvspec import Engine, SpecConfig
from test_lvspec import make_rows
from toyworld import grammar
from toyworld.families import load_pair


def test_prompts_prefilled_once_decode_like_prompts_prefilled_every_time():
    """Seven rows repeating three videos, prefilled in groups of two: three prefills run for real
    (the groups holding a video not seen yet), every other slot's keys are copied, and call after
    call the engine decodes exactly what an engine that prefills every row decodes."""
    processor, target, draft = load_pair("qwen2_5_vl", dtype=torch.float64)
    base = make_rows(processor, [8, 8, 8], prompts=[grammar.PROMPT] * 3)  # one shape, as a benchmark batch's rows
    rows = [base[i % 3] for i in range(7)]
    width = rows[0]["input_ids"].shape[-1]
    cfg = SpecConfig(mode="lvspec", k=4, theta=0.45, max_new_tokens=24, prefill_tokens=2 * width)
    expected = [r.tokens for r in Engine(target, draft, cfg, slots=7).generate(rows)]
    engine = Engine(target, draft, cfg, slots=7)
    once = PromptsOnce(engine, period=3)
    for _ in range(3):
        assert [r.tokens for r in engine.generate(rows)] == expected
    assert once.prefills == 2 and engine.timing["prefills"] == 4  # groups {0,1} and {2,3} ran, {4,5} and {6} copied


def test_a_frontier_climb_writes_every_point_and_each_modes_peak(tmp_path):
    out = tmp_path / "frontier.json"
    run = subprocess.run([sys.executable, "-m", "bench.realsize", "frontier", "--pair", "llava_onevision:7b:0.5b",
                          "--device", "cpu", "--toy", "--batch-sizes", "1", "2", "--repeats", "2", "--new-tokens", "12",
                          "--frames", "4", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    pair = json.loads(out.read_text())["pairs"][0]
    points = {(r["mode"], r["batch_size"]) for r in pair["runs"]}
    assert points == {(m, b) for m in ("ar", "sd", "lvspec") for b in (1, 2)}
    assert all(r["prefills"] == 1 and len(r["runs_tokens_per_s"]) == 2 and 0 < r["slot_use"] <= 1 for r in pair["runs"])
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
