"""jobs.report: a real job's rows (one of them a corrupt video) rendered to HTML and checked in
headless Chromium (Debian's package)."""

import io
import json
import shutil
import subprocess
import tarfile

from conftest import ROOT
from pipeline.config import load_config
from toyworld.shards import write_shards


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "the report test renders in Chromium: apt-get install chromium (make test does it)"
    return found


def test_the_report_shows_outcomes_audit_and_twins_in_a_browser(tmp_path, ray_cluster):
    from jobs.report import main
    from pipeline.job import run

    videos = tmp_path / "videos"
    write_shards(str(videos), videos=5, seed=81, shard_size=5)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # a shard holding one corrupt video
        info = tarfile.TarInfo("broken_000001.mp4")
        info.size = 3000
        tar.addfile(info, io.BytesIO(b"\x00" * 3000))
    (videos / "shard-broken.tar").write_bytes(buf.getvalue())
    cfg = load_config(ROOT / "jobs/configs/local.yaml", [
        "job_id=reported", f"source.uri={videos}", f"output.uri={tmp_path / 'out'}", "decode.batch_size=2",
        "caption.batch_size=2", "generation.max_new_tokens=40", "decode.max_side=256", "generation.k=4",
        "generation.theta=0.45", "audit.fraction=1.0"])
    summary = run(cfg)
    assert summary["ok"] == 5 and summary["failed"] == 1

    job_dir = tmp_path / "out" / "reported"
    assert main([str(job_dir)]) == 0
    report = job_dir / "_report"
    facts = json.loads((report / "facts.json").read_text())
    assert facts["videos"] == 6 and facts["ok"] == 5 and facts["errors"] == {"decode": 1}
    assert facts["audit"]["videos"] == 5 and 0.0 < facts["draft_wording"] < 1.0
    for name in ("outcomes", "throughput", "tau", "shares"):
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    page = (report / "index.html").as_uri()
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert '<b id="videos">6</b>' in dom and '<b id="failed">1</b>' in dom
    assert "5 videos also captioned exactly" in dom and "decode" in dom
    assert dom.count('src="data:image/png;base64,') == 4  # the charts travel inside the page
    assert dom.count("<tr><td>toy81_") >= 5 and "<mark>" in dom  # captions beside their twins, differences marked
    shot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,1600", page], capture_output=True,
                   timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_directory_without_rows_is_a_clear_error(tmp_path, capsys):
    from jobs.report import main

    assert main([str(tmp_path)]) == 2 and "no caption rows" in capsys.readouterr().err
