"""``cxrserve monitor report --site NAME --out DIR``: one HTML page per site, plots embedded.

Per model version the monitor has seen at the site: the combined drift score against its alert
threshold, every signal's standardised score, the label-free performance estimate and, where
``cxrserve monitor feedback`` matched returned labels, the realised sensitivity/specificity/AUC
with their intervals. Returns whether an alert is active (the latest window of any stream).
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

from cxrserve.core import monitor as M


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(windows: list[dict], feedback: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    x = [w["seen"] for w in windows]
    scores = sorted({k for w in windows for k in w.get("scores", {})} - {"combined"})
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.plot(x, [w.get("scores", {}).get("combined", float("nan")) for w in windows], label="combined", color="k")
    thr = [w.get("threshold") for w in windows]
    if any(t is not None for t in thr):
        ax.plot(x, [t if t is not None else float("nan") for t in thr], "--", color="r", label="alert threshold")
        for xi, w in zip(x, windows):
            if w.get("alert"):
                ax.axvspan(xi - 0.5, xi + 0.5, color="r", alpha=0.15, lw=0)
    ax.set_xlabel("studies")
    ax.set_ylabel("standardised score")
    ax.legend(loc="upper left")
    out.append(("Combined drift score", _png(fig)))
    plt.close(fig)
    for group in ("header.", "image.", "embedding", "output.", "score."):
        names = [s for s in scores if s.startswith(group)]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(9, 2.6))
        for s in names:
            ax.plot(x, [w.get("scores", {}).get(s, float("nan")) for w in windows], label=s)
        ax.set_xlabel("studies")
        ax.legend(fontsize=7, loc="upper left", ncol=2)
        out.append((f"Signals: {group.rstrip('.')}", _png(fig)))
        plt.close(fig)
    labels = sorted({k for w in windows for k in w.get("estimate", {})})
    if labels:
        fig, ax = plt.subplots(figsize=(9, 2.6))
        for label in labels:
            ax.plot(x, [w.get("estimate", {}).get(label, {}).get("sensitivity", float("nan")) for w in windows],
                    label=f"{label} (estimated)")
        ax.set_ylim(0, 1)
        ax.set_ylabel("sensitivity")
        ax.set_xlabel("studies")
        ax.legend(fontsize=7, loc="lower left", ncol=3)
        out.append(("Label-free sensitivity estimate", _png(fig)))
        plt.close(fig)
    done = [b for b in feedback if b.get("labelled")]
    if done:
        fig, axes = plt.subplots(1, 3, figsize=(12, 2.8))
        for ax, metric in zip(axes, ("sensitivity", "specificity", "auc")):
            for label in sorted({k for b in done for k in b["labels"]}):
                pts = [(b["block"], b["labels"][label][metric]) for b in done if label in b["labels"]
                       and b["labels"][label][metric][0] is not None]
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ax.errorbar(xs, [p[1][0] for p in pts], yerr=[[p[1][0] - p[1][1] for p in pts],
                                                              [p[1][2] - p[1][0] for p in pts]],
                            fmt="o-", capsize=2, label=label)
                if metric == "sensitivity":
                    ax.plot(xs, [next(b for b in done if b["block"] == xb)["labels"][label]["estimate"]
                                 .get("sensitivity", float("nan")) for xb in xs], ":", label=f"{label} est.")
            ax.set_title(metric)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("block of served studies")
        axes[0].legend(fontsize=7)
        out.append(("Realised performance from returned labels (95 % intervals)", _png(fig)))
        plt.close(fig)
    return out


def report(state: str | Path, site: str, out: str | Path, model: str | None = None) -> bool:
    from cxrserve.tools.monitor.feedback import streams

    state, out = Path(state), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    alert = False
    sections = []
    for folder in streams(state, site, model):
        windows = M.read_log(folder / "windows.jsonl")
        fb_path = folder / "feedback.json"
        feedback = json.loads(fb_path.read_text()) if fb_path.exists() else []
        if not windows:
            continue
        last = windows[-1]
        alert |= bool(last.get("alert"))
        head = (f"<h2>{html.escape(folder.parent.name)} {html.escape(folder.name)}</h2>"
                f"<p>{last['seen']} studies; latest combined score {last.get('scores', {}).get('combined', 'n/a')}"
                f" (threshold {last.get('threshold')}): <b>{'ALERT' if last.get('alert') else 'ok'}</b></p>")
        top = sorted(((k, v) for k, v in last.get("scores", {}).items() if k != "combined"), key=lambda kv: -kv[1])[:6]
        if top:
            head += "<p>Largest signals now: " + ", ".join(f"{html.escape(k)} {v:.1f}" for k, v in top) + "</p>"
        mix = last.get("header", {})
        if mix:
            head += "<p>Input mix of the latest window: " + "; ".join(
                f"{html.escape(f)}: " + ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(c.items()))
                for f, c in mix.items() if c) + "</p>"
        imgs = "".join(f"<h3>{html.escape(t)}</h3><img src='data:image/png;base64,{b}'>" for t, b in _plots(windows, feedback))
        sections.append(head + imgs)
    body = "".join(sections) or "<p>No monitored studies for this site yet.</p>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cxrserve monitor: {html.escape(site)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}</style></head><body>"
            f"<h1>Monitoring report, site {html.escape(site)}</h1><p>Made {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            f" from {html.escape(str(state))}. Alert active: <b>{'yes' if alert else 'no'}</b>.</p>{body}</body></html>")
    (out / "report.html").write_text(page)
    return alert
