"""Report pictures (matplotlib, Agg backend), each returned as base64 PNG for a self-contained page."""
from __future__ import annotations

import base64
import io

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def roc_png(curves: list[dict], title: str) -> str:
    """``curves``: ``{"label", "fpr", "tpr", "auc", "point": (fpr, tpr) or None}`` each."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    for c in curves:
        auc = f" (AUC {c['auc']:.2f})" if c.get("auc") is not None else ""
        line, = ax.step(c["fpr"], c["tpr"], where="post", lw=1.6, label=f"{c['label']}{auc}")
        if c.get("point") is not None:
            ax.plot(*c["point"], "o", color=line.get_color(), ms=6, mec="black")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def reliability_png(series: list[dict], title: str) -> str:
    """``series``: ``{"label", "bins": [{"confidence", "frequency", "n"}], "ece"}`` each."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    for s in series:
        conf = [b["confidence"] for b in s["bins"]]
        freq = [b["frequency"] for b in s["bins"]]
        size = [12 + 4 * np.sqrt(b["n"]) for b in s["bins"]]
        ece = f" (ECE {s['ece']:.3f})" if s.get("ece") is not None else ""
        line, = ax.plot(conf, freq, "-", lw=1.2, label=f"{s['label']}{ece}")
        ax.scatter(conf, freq, s=size, color=line.get_color(), alpha=0.7)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def curve_png(x, ys: dict, title: str, xlabel: str, ylabel: str, marks: dict | None = None) -> str:
    """Simple lines (e.g. the gate's refusal rate against its threshold)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 3.0))
    for name, y in ys.items():
        ax.plot(x, y, lw=1.4, label=name)
    for name, xv in (marks or {}).items():
        ax.axvline(xv, color="#555", lw=0.8, ls=":")
        ax.text(xv, ax.get_ylim()[1] * 0.95, f" {name}", fontsize=7, va="top")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)
