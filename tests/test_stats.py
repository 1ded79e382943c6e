"""One stats vocabulary (issue 19): the engine's counters, the verifier's kind codes, the Parquet schema,
the job's summary and the report all speak `lvspec.stats`."""

import pyarrow as pa
import pytest

from lvspec import verify
from lvspec.stats import COUNTERS, KINDS, RowStats, tau, totals


def _row(tokens, cycles, exact, loose, shift, corrections, bonus, drafted, error=None):
    return {"video_id": f"v{tokens}", "error": error, "num_tokens": tokens, "num_cycles": cycles,
            "target_forwards": cycles + 1, "draft_forwards": drafted + 1, "accepted_exact": exact,
            "accepted_loose": loose, "accepted_shift": shift, "corrections": corrections, "bonus": bonus,
            "rejected_anchor": 0, "drafted": drafted, "mean_accepted_length": tau(tokens, 1, cycles),
            "num_frames": 4, "decode_ms": 10.0, "generate_ms": 100.0, "mode": "lvspec", "audit_agreement": None}


def test_the_verifiers_kind_codes_index_the_kind_names():
    codes = (verify.EXACT, verify.LOOSE, verify.SHIFT, verify.CORRECTION, verify.BONUS)
    assert [KINDS[c] for c in codes] == ["accepted_exact", "accepted_loose", "accepted_shift", "corrections", "bonus"]
    assert set(KINDS) <= set(COUNTERS)


def test_a_rows_stats_and_the_totals_of_rows():
    stats = RowStats.of([11, 4, 5, 14, 3, 4, 1, 1, 2, 0, 12])  # in COUNTERS order
    assert stats.num_tokens == 11 and stats.bonus == 2 and stats.drafted == 12
    assert stats.mean_accepted_length == pytest.approx(10 / 4) and stats.mean_draft_length == pytest.approx(3.0)
    assert RowStats.of([1] + [0] * (len(COUNTERS) - 1)).mean_accepted_length == 0.0  # no cycle: no tau

    rows = [_row(11, 4, 3, 4, 1, 1, 2, 12), _row(21, 5, 10, 5, 0, 2, 4, 20)]
    got = totals(rows)
    assert got["num_tokens"] == 32 and got["num_cycles"] == 9
    assert got["tau"] == pytest.approx((32 - 2) / 9) and got["mean_draft_length"] == pytest.approx(32 / 9)
    assert got["shares"] == pytest.approx({"accepted_exact": 13 / 32, "accepted_loose": 9 / 32,
                                           "accepted_shift": 1 / 32, "corrections": 3 / 32, "bonus": 6 / 32})
    assert sum(got["shares"].values()) == pytest.approx(1.0)


def test_the_parquet_schema_the_summary_and_the_report_use_the_same_counters():
    from pipeline.caption import CAPTIONED
    from pipeline.job import summarize
    from pipeline.report import facts

    assert set(COUNTERS) <= set(CAPTIONED.names)
    rows = [_row(11, 4, 3, 4, 1, 1, 2, 12), _row(21, 5, 10, 5, 0, 2, 4, 20),
            {**_row(0, 0, 0, 0, 0, 0, 0, 0), "error": "decode: broken"}]
    table = pa.Table.from_pylist(rows)
    summary, page = summarize(table, wall_s=2.0), facts(rows)
    assert summary["caption"]["shares"] == page["shares"] == totals(rows[:2])["shares"]
    assert summary["caption"]["tokens"] == page["tokens"] == 32
    assert summary["caption"]["mean_accepted_length"] == pytest.approx((32 - 2) / 9)
