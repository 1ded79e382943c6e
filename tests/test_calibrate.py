"""jobs.calibrate: a theta grid on the job's own videos, the documented choice, lvspec.json written."""

import json
import shutil

from conftest import ROOT
from lvspec.config import RELEVANCE_KEYS
from toyworld.families import MODELS_DIR
from toyworld.shards import write_shards


def test_calibration_picks_the_fastest_point_that_meets_the_target_and_writes_it(tmp_path, ray_cluster):
    from jobs.calibrate import main
    from pipeline.calibrate import choose

    target = tmp_path / "target"
    shutil.copytree(MODELS_DIR / "llava_onevision-target", target)
    shipped = json.loads((target / "lvspec.json").read_text())
    write_shards(str(tmp_path / "videos"), videos=8, seed=71, shard_size=4)
    code = main(["--config", str(ROOT / "jobs/configs/local.yaml"), "--videos", "8", "--target-agreement", "0.8",
                 "--thetas", "0.3,0.6,1.0", "--write", "--json", str(tmp_path / "grid.json"),
                 f"source.uri={tmp_path / 'videos'}", f"model.target={target}", "generation.k=4",
                 "generation.max_new_tokens=40", "decode.max_side=256"])
    assert code == 0
    grid = json.loads((tmp_path / "grid.json").read_text())
    points = grid["points"]
    assert grid["videos"] == 8 and {p["theta"] for p in points} == {0.0, 0.3, 0.6, 1.0}
    assert {p["probe"] for p in points} == {"configured", "all_layers"}  # the shipped heads, and every layer
    for p in points:
        if p["theta"] == 0.0:  # every slot an anchor: exactly the sd captions
            assert p["agreement"] == 1.0 and p["identical"] == 1.0
    loosest = max(p["tau"] for p in points if p["theta"] == 1.0)
    assert loosest > max(p["tau"] for p in points if p["theta"] == 0.0)  # loosening buys tokens per forward
    chosen = grid["chosen"]
    meeting = [p for p in points if p["agreement"] >= 0.8]
    assert chosen == choose(points, 0.8) and chosen["tau"] == max(p["tau"] for p in meeting)
    written = json.loads((target / "lvspec.json").read_text())
    assert written["theta"] == chosen["theta"] and written["agreement_calibration"]["agreement"] == chosen["agreement"]
    assert written["precision"] == shipped["precision"]  # other keys kept
    for key in RELEVANCE_KEYS:
        assert written[key] == (shipped.get(key) if chosen["probe"] == "configured" else None)


def test_calibration_arguments_are_checked_before_any_work(tmp_path, capsys):
    from jobs.calibrate import main

    assert main(["--config", str(ROOT / "jobs/configs/local.yaml"), "--target-agreement", "1.5"]) == 2
    assert "--target-agreement" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "jobs/configs/local.yaml"), "--thetas", "0.1,x"]) == 2
    assert main(["--config", str(ROOT / "jobs/configs/local.yaml"), "--measure", "no_such_module:f"]) == 2
    assert "--measure" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "jobs/configs/local.yaml"), "--write", "model.target=some/hub-id"]) == 2
    assert "model.target" in capsys.readouterr().err
