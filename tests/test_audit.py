"""The online audit: which videos it picks, what an exact twin is, and the job's estimate."""

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from pipeline.audit import agreement, below, estimate, interval, selected
from pipeline.config import load_config
from toyworld.shards import write_shards


def test_the_audited_sample_is_chosen_by_video_id_alone():
    ids = [f"clip_{i:06d}" for i in range(20000)]
    picked = [v for v in ids if selected(v, 0.1)]
    assert picked == [v for v in ids if selected(v, 0.1)]  # same answer every time (and on every node)
    assert 0.09 < len(picked) / len(ids) < 0.11
    assert set(v for v in ids if selected(v, 0.05)) <= set(picked)  # a smaller fraction is a subset
    assert not any(selected(v, 0.0) for v in ids) and all(selected(v, 1.0) for v in ids)


def test_agreement_is_a_word_sequence_similarity():
    assert agreement("a red ball moves left", "a red ball moves left") == 1.0
    assert agreement("", "") == 1.0
    assert agreement("a b c d", "e f g h") == 0.0
    # one word of four replaced: 2 * 3 matched / 8 words
    assert agreement("the square slid smoothly", "the square drifted smoothly") == pytest.approx(0.75)
    # an order change costs: the matched run is shorter than the words in common
    assert agreement("first left then up", "first up then left") < agreement("first left then up", "first left then up")


def test_the_estimate_has_an_interval_that_narrows_with_more_videos():
    few, many = estimate([1.0, 0.9, 0.8, 1.0]), estimate([1.0, 0.9, 0.8, 1.0] * 50)
    assert few["low"] <= few["agreement"] <= few["high"] and many["agreement"] == pytest.approx(0.925)
    assert (many["high"] - many["low"]) < (few["high"] - few["low"])
    assert estimate([])["agreement"] is None
    one = estimate([0.8])
    assert one["agreement"] == 0.8 and one["low"] is None and "no interval" in interval(one)
    assert below({"audit": many}, 0.95) and below({"audit": many}, 0.9) is None and below({"audit": many}, None) is None


def _rows(path):
    return {r["video_id"]: r for f in sorted(path.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def test_audit_twins_are_the_exact_captions_and_a_low_agreement_fails_the_job(tmp_path, ray_cluster, capsys):
    """Every video audited (fraction 1): each row's audit_caption is what a plain sd job writes for
    that video; the summary's estimate covers them; audit.min_agreement=1.0 then exits with 4."""
    from jobs.caption import main
    from pipeline.job import run

    write_shards(str(tmp_path / "videos"), videos=6, seed=61, shard_size=2)
    common = [f"source.uri={tmp_path / 'videos'}", f"output.uri={tmp_path / 'out'}", "decode.batch_size=2",
              "caption.batch_size=2", "generation.max_new_tokens=40", "decode.max_side=256", "generation.k=4",
              "generation.theta=0.45"]
    cfg = lambda *extra: load_config(ROOT / "jobs/configs/local.yaml", [*common, *extra])  # noqa: E731
    audited = run(cfg("job_id=audited", "audit.fraction=1.0"))
    run(cfg("job_id=exact", "generation.mode=sd"))
    lv, sd = _rows(tmp_path / "out" / "audited"), _rows(tmp_path / "out" / "exact")
    assert sorted(lv) == sorted(sd) and len(lv) == 6
    for vid, row in lv.items():
        assert row["audit_caption"] == sd[vid]["caption"], vid
        assert row["audit_agreement"] == pytest.approx(agreement(row["caption"], sd[vid]["caption"]))
    assert any(r["caption"] != r["audit_caption"] for r in lv.values())  # loosening changed some wording
    a = audited["audit"]
    assert a["videos"] == 6 and a["low"] <= a["agreement"] <= a["high"] < 1.0
    assert all(r["audit_caption"] is None for r in sd.values())  # sd is exact: nothing to audit

    code = main(["--config", str(ROOT / "jobs/configs/local.yaml"), "--quality", "toyworld.score:job_quality",
                 *common, "job_id=strict", "audit.fraction=1.0", "audit.min_agreement=1.0"])
    printed = capsys.readouterr()
    assert code == 4 and "below audit.min_agreement 1.0" in printed.err
    assert "quality: attribute accuracy" in printed.out  # the --quality hook ran on this run's rows
