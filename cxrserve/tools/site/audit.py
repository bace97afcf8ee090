"""``cxrserve site audit``: a hospital's acceptance test of the served models on its own films.

Per family and label, at the model's current operating point: sensitivity, specificity, PPV,
NPV, AUC and ECE with 95 % patient-bootstrap intervals, ROC and reliability plots, a confusion
matrix in the site's own words, the archive card's validation numbers beside the site's, the
gate's refusals on the site's frontal films, and each target met or not.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from pathlib import Path

import numpy as np

from cxrserve.core.site_profile import archive_info
from cxrserve.training.jsonable import to_jsonable
from cxrserve.training.metrics import roc_curve
from cxrserve.tools.site import html as H
from cxrserve.tools.site import plots
from cxrserve.tools.site.config import SiteFile
from cxrserve.tools.site.scoring import ScoreTable
from cxrserve.tools.site.stats import binary_report, rate_ci, reliability, target_met

AUDIT_FORMAT = "cxrserve-site-audit/1"


def gate_section(table: ScoreTable, *, n_boot: int, seed: int = 0) -> dict:
    """Refusals on the site's frontal films, per reason, and the share below the gate threshold."""
    fr = table.frontal
    refused = ~table.answered
    reasons = Counter(s for s, f in zip(table.status, fr) if f and s != "ok")
    out = {**table.gate, "frontal_films": int(fr.sum()),
           "refused": rate_ci(refused[fr], table.groups[fr], n_boot=n_boot, seed=seed),
           "refusals_by_reason": dict(reasons)}
    if table.gate:
        scored = fr & ~np.isnan(table.gate_score)
        below = table.gate_score[scored] < float(table.gate["threshold"])
        out["below_threshold"] = rate_ci(below, table.groups[scored], n_boot=n_boot, seed=seed)
        out["below_threshold"]["note"] = ("films the gate scores under its threshold; refused only where it is "
                                          "enforced" + ("" if table.gate.get("enforced") else " (it is not)"))
    nonfrontal = ~fr
    if nonfrontal.any():
        out["non_frontal_films"] = {"n": int(nonfrontal.sum()), "refused": int(refused[nonfrontal].sum())}
    return out


def family_section(table: ScoreTable, family: str, *, n_boot: int, seed: int = 0) -> dict:
    fs = table.families[family]
    use = table.answered & table.frontal
    labels = {}
    for j, label in enumerate(fs.labels):
        known = use & ~np.isnan(fs.truth[:, j])
        if not known.any():
            continue
        y = fs.truth[known, j].astype(int)
        s = fs.probs[known, j]
        rep = binary_report(y, s, fs.served_positive[known, j], table.groups[known], n_boot=n_boot, seed=seed)
        rep["reliability"] = reliability(y, s)
        rep["card"] = fs.card_metrics.get(label, {})
        refused_known = table.frontal & ~table.answered & ~np.isnan(fs.truth[:, j])
        rep["refused"] = {"positives": int(np.sum(fs.truth[refused_known, j] == 1)),
                          "negatives": int(np.sum(fs.truth[refused_known, j] == 0))}
        fpr, tpr, _ = roc_curve(y.astype(bool), s) if 0 < y.sum() < y.size else (None, None, None)
        rep["roc"] = None if fpr is None else {"fpr": fpr, "tpr": tpr}
        labels[label] = rep
    # confusion: rows are the site's words, columns the served answers (and refusals)
    if fs.output.kind == "multiclass":
        cols = list(fs.labels)
        answer = lambda i: fs.labels[int(np.argmax(fs.served_positive[i]))] if fs.served_positive[i].any() else None
    elif fs.output.kind == "binary":
        words = fs.answer_labels or {}
        cols = [words.get("positive", "positive"), words.get("negative", "negative")]
        answer = lambda i: cols[0] if fs.served_positive[i, 0] else cols[1]
    else:
        cols, answer = [], None
    confusion = None
    if answer is not None:
        rows = sorted({w for w, f, t in zip(table.words, table.frontal, fs.truth) if w and f and not np.all(np.isnan(t))})
        matrix = {w: Counter() for w in rows}
        for i in range(table.n):
            w = table.words[i]
            if w in matrix and table.frontal[i]:
                matrix[w][answer(i) if table.answered[i] else "refused"] += 1
        cols = cols + ["refused"]
        confusion = {"rows": rows, "columns": cols, "matrix": [[matrix[w][c] for c in cols] for w in rows]}
    return {"model": fs.output.model, "kind": fs.output.kind, "operating_point": "served",
            "served_thresholds": fs.served_thresholds, "card_source": fs.card_metrics.get("_source"),
            "labels": labels, "confusion": confusion}


def evaluate_targets(site: SiteFile, families: dict, gate: dict) -> list[dict]:
    out = []
    for t in site.targets:
        if t.family == "gate":
            m = gate.get("refused")
        else:
            m = families.get(t.family, {}).get("labels", {}).get(t.label, {}).get(t.metric)
        met = target_met(m, t.value, t.higher_is_better, site.target_rule)
        out.append({"target": t.key, "value": t.value, "direction": ">=" if t.higher_is_better else "<=",
                    "estimate": (m or {}).get("estimate"), "low": (m or {}).get("low"), "high": (m or {}).get("high"),
                    "met": met, "rule": site.target_rule,
                    **({} if met is not None else {"reason": "not measurable on this sample (no films of a class)"})})
    return out


def build_audit(table: ScoreTable, site: SiteFile, *, n_boot: int = 1000, seed: int = 0) -> dict:
    gate = gate_section(table, n_boot=n_boot, seed=seed)
    fams = {f: family_section(table, f, n_boot=n_boot, seed=seed) for f in table.families}
    targets = evaluate_targets(site, fams, gate)
    archives = {}
    for fs in table.families.values():
        info = archive_info(fs.archive)
        archives[info.model] = {"version": info.version, "sha256": info.sha256, "content_sha256": info.content_sha256}
    return to_jsonable({
        "format": AUDIT_FORMAT, "site": site.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": {"films": table.n, "patients": int(np.unique(table.groups).size), "frontal_films": int(table.frontal.sum()),
                 "answered": int(table.answered.sum()), "label_counts": table.label_counts},
        "archives": archives, "gate": gate, "families": fams, "targets": targets,
        "target_rule": site.target_rule, "bootstrap": {"replicates": n_boot, "by": "patient", "seed": seed},
        "all_met": bool(targets) and all(t["met"] is True for t in targets),
    })


# --------------------------------------------------------------------------- report
def _target_rows(targets):
    rows, cls = [], []
    for t in targets:
        state = {True: "met", False: "NOT met", None: "not measurable"}[t["met"]]
        rows.append([t["target"], f"{t['direction']} {t['value']:g}",
                     H.ci({"estimate": t["estimate"], "low": t["low"], "high": t["high"]}), state])
        cls.append(["", "", "", {True: "met", False: "miss", None: "na"}[t["met"]]])
    return rows, cls


def render_report(audit: dict) -> str:
    b = [f"<h1>Site audit: {H.escape(audit['site'])}</h1>",
         f"<p class=note>{H.escape(audit['created'])} &middot; {audit['data']['films']} films, "
         f"{audit['data']['patients']} patients, {audit['data']['frontal_films']} frontal, "
         f"{audit['data']['answered']} answered &middot; 95 % intervals: patient-level bootstrap "
         f"({audit['bootstrap']['replicates']} replicates)</p>"]
    ok = audit["all_met"]
    b.append(f"<p class='banner {'met' if ok else 'miss'}'>"
             f"{'Every target met' if ok else 'Not every target met'} (rule: {H.escape(audit['target_rule'])})</p>")
    if audit["targets"]:
        rows, cls = _target_rows(audit["targets"])
        b.append("<h2>Targets</h2>" + H.table(["target", "wanted", "site (95 % CI)", "result"], rows, cls))
    b.append("<h2>Archives</h2>" + H.table(
        ["archive", "version", "sha256 (archive)"],
        [[m, a["version"], (a.get("sha256") or "")[:16]] for m, a in audit["archives"].items()]))
    g = audit["gate"]
    b.append("<h2>Input gate on the site's frontal films</h2>")
    grow = [["frontal films", g["frontal_films"]], ["refused (any 4xx)", H.ci(g["refused"], 3)]]
    if "below_threshold" in g:
        grow.append([f"below the gate threshold {g.get('threshold', 0):g} (enforced: {g.get('enforced')})",
                     H.ci(g["below_threshold"], 3)])
    for reason, n in sorted(g["refusals_by_reason"].items()):
        grow.append([f"refused: {reason}", n])
    if "non_frontal_films" in g:
        grow.append(["non-frontal films refused", f"{g['non_frontal_films']['refused']} of {g['non_frontal_films']['n']}"])
    b.append(H.table(["", "value"], grow))
    for fam, f in audit["families"].items():
        b.append(f"<h2>{H.escape(fam)} ({H.escape(f['model'])}), at the served operating point</h2>")
        rows = []
        for label, r in f["labels"].items():
            card = r.get("card") or {}
            rows.append([label, r["n"], r["positives"], r["negatives"], r["patients"],
                         H.ci(r["sensitivity"]), H.fmt(card.get("sensitivity")),
                         H.ci(r["specificity"]), H.fmt(card.get("specificity")),
                         H.ci(r["ppv"]), H.fmt(card.get("ppv")), H.ci(r["npv"]),
                         H.ci(r["auc"]), H.fmt(card.get("auc")), H.ci(r["ece"], 3)])
        b.append(H.table(["label", "films", "pos", "neg", "patients", "sensitivity", "card", "specificity", "card",
                          "PPV", "card", "NPV", "AUC", "card", "ECE"], rows))
        if f.get("card_source"):
            b.append(f"<p class=note>card: {H.escape(f['card_source'])}. PPV and NPV depend on the site's "
                     "prevalence in this sample.</p>")
        curves, series = [], []
        for label, r in f["labels"].items():
            if r.get("roc"):
                se, sp = r["sensitivity"]["estimate"], r["specificity"]["estimate"]
                curves.append({"label": label, "fpr": r["roc"]["fpr"], "tpr": r["roc"]["tpr"],
                               "auc": r["auc"]["estimate"],
                               "point": None if se is None or sp is None else (1 - sp, se)})
            series.append({"label": label, "bins": r["reliability"]["bins"], "ece": r["ece"]["estimate"]})
        figs = []
        if curves:
            figs.append(H.img(plots.roc_png(curves, f"{fam}: ROC (dot: served operating point)"), f"{fam} ROC"))
        if series:
            figs.append(H.img(plots.reliability_png(series, f"{fam}: reliability"), f"{fam} reliability"))
        if figs:
            b.append("<div class=figs>" + "".join(figs) + "</div>")
        c = f.get("confusion")
        if c:
            b.append("<h3>Films by the site's label (rows) and the served answer (columns)</h3>")
            b.append(H.table(["site label", *c["columns"]], [[w, *row] for w, row in zip(c["rows"], c["matrix"])]))
    b.append("<p class=note>Research use only. Generated by <code>cxrserve site audit</code>; "
             "no patient identifier is stored in this report.</p>")
    return H.page(f"Site audit: {audit['site']}", "\n".join(b))


def write_audit(table: ScoreTable, site: SiteFile, out: str | Path, *, n_boot: int = 1000) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    audit = build_audit(table, site, n_boot=n_boot)
    (out / "audit.json").write_text(json.dumps(audit, indent=2, allow_nan=False) + "\n")
    (out / "report.html").write_text(render_report(audit), encoding="utf-8")
    return audit
