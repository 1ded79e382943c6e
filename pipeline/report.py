"""A job's report: one self-contained HTML page (charts embedded) plus the charts as PNG files.

    python -m jobs.report OUTPUT_DIR [--out DIR]

Reads the Parquet rows under a job's output directory (`<output.uri>/<job_id>`, a nightly run
partition, or any directory of caption rows; local or fsspec) and shows: videos ok / failed by
error kind, clips and hours of video, caption tokens per second over the job's time, the distribution of tau (tokens per
target forward), the exact / loose / shift / correction / bonus shares, the audit's agreement,
the slowest videos, captions beside their exact audit twins (words that differ marked), and per
caption how much of its wording the draft supplied through loose or shifted acceptance.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa

from lvspec.stats import totals
from pipeline import sources
from pipeline.audit import estimate, interval
from pipeline.clips import figures

def load_rows(uri: str, storage_options: dict | None = None) -> list[dict]:
    """Every caption row under `uri` (files and directories whose names start with '_' and the
    nightly `latest.parquet` view are not rows of this job)."""
    import pyarrow.parquet as pq

    fs, root = sources.filesystem(uri, storage_options)
    root = root.rstrip("/")
    paths = sorted(p for p in fs.find(root) if p.endswith(".parquet")
                   and not any(part.startswith("_") for part in p[len(root):].split("/"))
                   and not p.endswith("/latest.parquet"))
    if not paths:
        raise FileNotFoundError(f"no caption rows (.parquet) under {uri}")
    tables = [pq.read_table(p, filesystem=sources.arrow_filesystem(fs)) for p in paths]
    return pa.concat_tables(tables, promote_options="default").to_pylist()


def facts(rows: list[dict]) -> dict:
    """The numbers the page shows (also returned as JSON by jobs.report)."""
    ok = [r for r in rows if r.get("error") is None]
    failed = [r for r in rows if r.get("error") is not None]
    counted = totals(ok)
    tokens, shares = counted["num_tokens"], counted["shares"]
    taus = [r["mean_accepted_length"] for r in ok if r.get("mean_accepted_length") is not None and r.get("num_cycles")]
    audited = [r for r in ok if r.get("audit_agreement") is not None]
    slowest = sorted((r for r in ok if r.get("generate_ms") is not None), key=lambda r: -r["generate_ms"])[:10]
    return {
        **figures(rows), "rows": len(rows), "ok": len(ok), "failed": len(failed),
        "errors": dict(Counter(r["error"].split(":", 1)[0] for r in failed)),
        "tokens": tokens, "shares": shares,
        "tau_median": float(np.median(taus)) if taus else None,
        "draft_wording": shares["accepted_loose"] + shares["accepted_shift"],
        "audit": estimate([r["audit_agreement"] for r in audited]),
        "slowest": [{"video_id": r["video_id"], "clip": _clip(r), "generate_ms": r["generate_ms"],
                     "num_tokens": r["num_tokens"]} for r in slowest],
        "modes": sorted({r.get("mode") for r in ok if r.get("mode")}),
        "job_ids": sorted({r.get("job_id") for r in rows if r.get("job_id")}),
    }


def _clip(r: dict) -> str:
    """A row's clip and prompt as the page names them ("" for a whole video's default prompt)."""
    parts = []
    if r.get("start_s") is not None and (r.get("clip_index") or not r.get("last_clip", True)):
        parts.append(f"clip {r['clip_index']} ({r['start_s']:.0f}-{r['end_s']:.0f} s)")
    if (r.get("prompt_name") or "default") != "default":
        parts.append(r["prompt_name"])
    return ", ".join(parts)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def charts(rows: list[dict], f: dict) -> dict[str, bytes]:
    """PNG bytes by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("error") is None]
    out = {}
    fig, ax = plt.subplots(figsize=(6, 2.6))
    kinds = {"ok": f["ok"], **{f"failed: {k}": v for k, v in f["errors"].items()}}
    ax.barh(list(kinds), list(kinds.values()), color=["#3a7"] + ["#c54"] * len(f["errors"]))
    ax.set_xlabel("rows (a video's clip and prompt)")
    ax.set_title("Rows by outcome")
    out["outcomes"] = _png(fig)
    plt.close(fig)

    timed = sorted((r["captioned_at"], r["num_tokens"] or 0) for r in ok if r.get("captioned_at") is not None)
    fig, ax = plt.subplots(figsize=(6, 2.6))
    if len(timed) > 1:
        t = np.array([x for x, _ in timed]) - timed[0][0]
        n = np.array([y for _, y in timed])
        bins = max(1, min(30, len(timed) // 4))
        edges = np.linspace(0, max(t[-1], 1e-3), bins + 1)
        counts, _ = np.histogram(t, bins=edges, weights=n)
        ax.step(edges[1:], counts / np.diff(edges), where="pre", color="#36c")
    ax.set_xlabel("seconds since the first caption")
    ax.set_ylabel("caption tokens/s")
    ax.set_title("Throughput over the job")
    out["throughput"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 2.6))
    taus = [r["mean_accepted_length"] for r in ok if r.get("num_cycles")]
    if taus:
        ax.hist(taus, bins=20, color="#86c")
    ax.set_xlabel("tau: tokens per target forward")
    ax.set_ylabel("videos")
    ax.set_title("Tau per video")
    out["tau"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 1.6))
    left = 0.0
    for (name, share), color in zip(f["shares"].items(), ["#3a7", "#e93", "#c6c", "#c54", "#36c"]):
        ax.barh([0], [share], left=left, color=color, label=f"{name.replace('accepted_', '')} {share:.0%}")
        left += share
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.legend(ncol=5, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title("Where caption tokens came from")
    out["shares"] = _png(fig)
    plt.close(fig)
    return out


def _diff(caption: str, twin: str) -> tuple[str, str]:
    """Both texts as HTML, the words that differ marked."""
    a, b = caption.split(), twin.split()
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        wa, wb = html.escape(" ".join(a[i1:i2])), html.escape(" ".join(b[j1:j2]))
        if op == "equal":
            left.append(wa)
            right.append(wb)
        else:
            if wa:
                left.append(f"<mark>{wa}</mark>")
            if wb:
                right.append(f"<mark>{wb}</mark>")
    return " ".join(left), " ".join(right)


def page(rows: list[dict], f: dict, images: dict[str, bytes], title: str, samples: int = 12) -> str:
    """The HTML page (images embedded as data URIs: one file to open or mail)."""
    esc = html.escape
    img = lambda name: f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(images[name]).decode()}">'  # noqa: E731
    a = f["audit"]
    audit = (f"{a['videos']} videos also captioned exactly; mean agreement {esc(interval(a))}, "
             f"{a['identical']:.0%} identical"
             if a["videos"] else "no audited videos in these rows (audit.fraction = 0, or an exact mode)")
    ok = [r for r in rows if r.get("error") is None]
    twins = [r for r in ok if r.get("audit_caption") is not None][:samples]
    plain = [r for r in ok if r.get("audit_caption") is None][: max(0, samples - len(twins))]
    sample_rows = []
    for r in twins + plain:
        words = (r.get("accepted_loose") or 0) + (r.get("accepted_shift") or 0)
        share = words / max(r["num_tokens"] or 0, 1)
        if r.get("audit_caption") is not None:
            left, right = _diff(r["caption"] or "", r["audit_caption"])
            agree = f"{r['audit_agreement']:.3f}"
        else:
            left, right, agree = esc(r["caption"] or ""), "<i>not audited</i>", "&ndash;"
        where = f"<br><small>{esc(_clip(r))}</small>" if _clip(r) else ""
        sample_rows.append(f"<tr><td>{esc(r['video_id'])}{where}</td><td>{left}</td><td>{right}</td><td>{agree}</td>"
                           f"<td>{share:.0%}</td></tr>")
    errors = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in f["errors"].items()) or \
        "<tr><td colspan=2>none</td></tr>"
    slow = "".join(f"<tr><td>{esc(s['video_id'])} <small>{esc(s['clip'])}</small></td><td>{s['generate_ms']:.0f}</td>"
                   f"<td>{s['num_tokens']}</td></tr>" for s in f["slowest"])
    tau = f"{f['tau_median']:.2f}" if f["tau_median"] is not None else "&ndash;"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border-bottom: 1px solid #ddd; padding: 4px 6px;
  text-align: left; vertical-align: top; }}
mark {{ background: #fde68a; }} .kpi {{ display: inline-block; margin-right: 2em; }} .kpi b {{ font-size: 1.3em; }}
.charts img {{ max-width: 49%; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p id="kpis"><span class="kpi">videos <b id="videos">{f['videos']}</b></span>
<span class="kpi">clips <b id="clips">{f['clips']}</b> ({f['clips_per_video']:.1f} a video)</span>
<span class="kpi">hours of video <b id="hours">{f['video_hours']:.2f}</b></span>
<span class="kpi">rows ok <b id="ok">{f['ok']}</b></span><span class="kpi">failed <b id="failed">{f['failed']}</b></span>
<span class="kpi">prompts <b id="prompts">{esc(', '.join(f['prompts']))}</b></span>
<span class="kpi">caption tokens <b>{f['tokens']}</b></span><span class="kpi">median tau <b>{tau}</b></span>
<span class="kpi">mode <b>{esc(', '.join(f['modes']))}</b></span></p>
<h2>Audit</h2><p id="audit">{audit}</p>
<h2>Charts</h2><div class="charts">{img('outcomes')}{img('throughput')}{img('tau')}{img('shares')}</div>
<h2>Failed rows by kind</h2><table id="errors"><tr><th>kind</th><th>rows</th></tr>{errors}</table>
<h2>Wording from the draft</h2>
<p id="wording">{f['draft_wording']:.1%} of caption tokens were the draft's, accepted loosely or shifted
(fillers verified leniently): the facts are checked strictly, the style is partly the draft's.
Audited captions below mark the words that differ from the target's own (exact) caption.</p>
<h2>Captions and their exact twins</h2>
<table id="samples"><tr><th>video</th><th>caption (lvspec)</th><th>exact twin (sd)</th><th>agreement</th>
<th>draft's wording</th></tr>{''.join(sample_rows)}</table>
<h2>Slowest videos</h2><table id="slowest"><tr><th>video</th><th>caption ms (its share of decoding)</th><th>tokens</th></tr>{slow}</table>
<p><small>jobs: {esc(', '.join(f['job_ids']))}. Generated by <code>python -m jobs.report</code>.</small></p>
</body></html>
"""


def write(uri: str, out: str | None = None, storage_options: dict | None = None) -> dict:
    """Write index.html, the PNGs and facts.json to `out` (default `<uri>/_report`); returns the facts."""
    rows = load_rows(uri, storage_options)
    f = facts(rows)
    images = charts(rows, f)
    fs, root = sources.filesystem(out or f"{uri.rstrip('/')}/_report", storage_options)
    fs.makedirs(root, exist_ok=True)
    title = f"Caption job report: {', '.join(f['job_ids']) or uri}"
    with fs.open(f"{root}/index.html", "w") as fh:
        fh.write(page(rows, f, images, title))
    for name, data in images.items():
        with fs.open(f"{root}/{name}.png", "wb") as fh:
            fh.write(data)
    with fs.open(f"{root}/facts.json", "w") as fh:
        json.dump(f, fh, indent=1)
    f["report"] = fs.unstrip_protocol(f"{root}/index.html")
    return f
