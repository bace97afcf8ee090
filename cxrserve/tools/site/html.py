"""A small, self-contained HTML writer for the site reports (no external assets, every value escaped)."""
from __future__ import annotations

from html import escape
from typing import Any, Iterable

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:16px 0 6px}table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.met{background:#dff0d8;font-weight:600}.miss{background:#f2dede;font-weight:600}.na{background:#fcf8e3}
.note{color:#555;font-size:12px}.figs img{margin:4px 8px 4px 0;border:1px solid #eee}
.banner{padding:8px 12px;border-radius:4px;font-weight:600;display:inline-block}
"""


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return escape(str(x))


def ci(m: dict | None, digits: int = 2) -> str:
    """``0.91 (0.80-0.97)``."""
    if not m or m.get("estimate") is None:
        return "n/a"
    if m.get("low") is None:
        return fmt(m["estimate"], digits)
    return f"{fmt(m['estimate'], digits)} ({fmt(m['low'], digits)}-{fmt(m['high'], digits)})"


def table(header: Iterable[str], rows: Iterable[Iterable[Any]], classes: Iterable[Iterable[str]] | None = None) -> str:
    """Cells are escaped unless given as ``("raw", html)``."""
    out = ["<table><tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>"]
    classes = list(classes) if classes is not None else None
    for r, row in enumerate(rows):
        cells = []
        for c, cell in enumerate(row):
            cls = classes[r][c] if classes is not None and c < len(classes[r]) else ""
            attr = f' class="{cls}"' if cls else ""
            text = cell[1] if isinstance(cell, tuple) and cell and cell[0] == "raw" else escape(str(cell))
            cells.append(f"<td{attr}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def img(b64: str, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{b64}">'


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")
