"""``loso.json`` / ``loso.md`` / the curve PNG from finished folds (``<out>/<site>/scores.npz``).

Per held-out site, at the served operating point (argmax), each with a 95 % interval from a
patient-level bootstrap (:func:`cxrserve.tools.site.stats.binary_report`): sensitivity for the
positive label (COVID-19), its specificity (non-COVID films not called COVID-19), the share of
normal films answered normal ("normal specificity": the specificity of calling any finding),
pneumonia sensitivity, the positive label's AUC and ECE. Then the N-film calibration curve
(:mod:`.curve`) and whether the issue's targets are met with at most 50 films.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxrserve.tools.loso.curve import MAX_ECE, SENSITIVITY, SPECIFICITY, curve
from cxrserve.tools.site.stats import binary_report


def site_metrics(meta: dict, probs, truth, groups, n_boot: int = 1000, seed: int = 0) -> dict:
    labels = list(meta["labels"])
    pred = probs.argmax(1)
    out = {"films": int(truth.size), "patients": int(np.unique(groups).size),
           "labels": {c: int(np.sum(truth == j)) for j, c in enumerate(labels) if np.any(truth == j)}}

    def rep(y, s, p):
        return binary_report(y, s, p, groups, n_boot=n_boot, seed=seed)

    j = labels.index(meta["positive"])
    pos = rep(truth == j, probs[:, j], pred == j)
    out["positive_sensitivity"] = pos["sensitivity"] if pos["positives"] else None
    out["positive_specificity"] = pos["specificity"] if pos["negatives"] else None
    out["positive_auc"] = pos["auc"] if pos["positives"] and pos["negatives"] else None
    out["positive_ece"] = pos["ece"]
    k = labels.index(meta["normal"])
    abn = rep(truth != k, 1 - probs[:, k], pred != k)
    out["normal_specificity"] = abn["specificity"] if abn["negatives"] else None
    m = labels.index(meta["pneumonia"])
    pn = rep(truth == m, probs[:, m], pred == m)
    out["pneumonia_sensitivity"] = pn["sensitivity"] if pn["positives"] else None
    return out


def targets_met(site: dict) -> dict:
    """With at most 50 films (any N of the curve, medians): sensitivity >= 0.90 where the site
    has positives, specificity >= 0.80 where it has negatives, ECE <= 0.05."""
    best = None
    for n, c in site["curve"].items():
        if not c.get("draws"):
            continue
        a = c["after"]
        checks = {"ece": a["ece"]["median"] is not None and a["ece"]["median"] <= MAX_ECE}
        if a["sensitivity"]["median"] is not None:
            checks["sensitivity"] = a["sensitivity"]["median"] >= SENSITIVITY
        if a["specificity"]["median"] is not None:
            checks["specificity"] = a["specificity"]["median"] >= SPECIFICITY
        if all(checks.values()) and best is None:
            best = int(n)
        site.setdefault("checks", {})[n] = checks
    negatives = any(c.get("after", {}).get("specificity", {}).get("median") is not None for c in site["curve"].values())
    return {"met": best is not None, "first_n": best,
            "note": None if negatives else "no negatives: specificity not measurable"}


def _fmt(ci, digits=2) -> str:
    if not ci or ci.get("estimate", ci.get("median")) is None:
        return "-"
    est = ci.get("estimate", ci.get("median"))
    return f"{est:.{digits}f} ({ci['low']:.{digits}f}-{ci['high']:.{digits}f})"


def markdown(summary: dict) -> str:
    rows = ["| held-out site | films (patients) | trained on (films) | COVID-19 sens. | COVID-19 spec. | normal spec. "
            "| pneumonia sens. | COVID-19 AUC | COVID-19 ECE |", "|---|---|---|---|---|---|---|---|---|"]
    for site, s in summary["sites"].items():
        m = s["served"]
        rows.append(f"| {site} | {m['films']} ({m['patients']}) | {s['fold']['train']['films']} | "
                    f"{_fmt(m['positive_sensitivity'])} | {_fmt(m['positive_specificity'])} | "
                    f"{_fmt(m['normal_specificity'])} | {_fmt(m['pneumonia_sensitivity'])} | "
                    f"{_fmt(m['positive_auc'])} | {_fmt(m['positive_ece'], 3)} |")
    rows += ["", "| held-out site | N | draws | COVID-19 sens. before -> after | COVID-19 spec. before -> after "
                 "| ECE before -> after | target met |", "|---|---|---|---|---|---|---|"]
    for site, s in summary["sites"].items():
        for n, c in s["curve"].items():
            if not c.get("draws"):
                rows.append(f"| {site} | {n} | 0 | {c.get('note', '')} | | | |")
                continue
            b, a = c["before"], c["after"]
            ok = s.get("checks", {}).get(n, {})
            rows.append(f"| {site} | {n} | {c['draws']} | {_fmt(b['sensitivity'])} -> {_fmt(a['sensitivity'])} | "
                        f"{_fmt(b['specificity'])} -> {_fmt(a['specificity'])} | {_fmt(b['ece'], 3)} -> "
                        f"{_fmt(a['ece'], 3)} | {'yes' if ok and all(ok.values()) else 'no'} |")
    return "\n".join(rows) + "\n"


def plot(summary: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("sensitivity", "COVID-19 sensitivity", SENSITIVITY, True), ("specificity", "COVID-19 specificity",
               SPECIFICITY, True), ("ece", "ECE (COVID-19 probability)", MAX_ECE, False)]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.7), dpi=80)
    for ax, (key, title, target, higher) in zip(axes, metrics):
        for k, (site, s) in enumerate(summary["sites"].items()):
            xs, med, lo, hi = [], [], [], []
            base = s["served"]["positive_" + key]
            if base and base.get("estimate") is not None:
                xs.append(0), med.append(base["estimate"]), lo.append(base["low"]), hi.append(base["high"])
            for n, c in s["curve"].items():
                v = c.get("after", {}).get(key) if c.get("draws") else None
                if v and v["median"] is not None:
                    xs.append(int(n)), med.append(v["median"]), lo.append(v["low"]), hi.append(v["high"])
            if not xs:
                continue
            x = np.array(xs) + (k - 1.5) * 0.6
            ax.errorbar(x, med, yerr=[np.subtract(med, lo), np.subtract(hi, med)], marker="o", ms=3, capsize=2,
                        lw=1, color=f"C{k}", label=site)
        ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("labelled films of the left-out site (0 = served)", fontsize=8)
        ax.set_xticks([0, 10, 20, 50])
        ax.set_ylim(0, 1.02 if higher else max(0.3, ax.get_ylim()[1]))
        ax.tick_params(labelsize=7)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_summary(out, *, ns=(10, 20, 50), draws: int = 50, n_boot: int = 1000, seed: int = 0,
                  image: str | Path | None = None) -> dict:
    out = Path(out)
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    sites = {}
    for fold_file in sorted(out.glob("*/fold.json")):
        fold = json.loads(fold_file.read_text())
        z = np.load(fold_file.parent / "scores.npz")
        probs, truth, groups = z["probs"], z["truth"], z["groups"]
        s = {"fold": fold, "served": site_metrics(fold, probs, truth, groups, n_boot=n_boot, seed=seed),
             "curve": curve(fold, probs, truth, groups, ns=ns, draws=draws, seed=seed)}
        s["targets"] = targets_met(s)
        sites[fold["site"]] = s
    summary = {"sites": sites, "segmentation": run.get("segmentation"), "skipped": run.get("skipped", {}),
               "budget_per_fold_s": run.get("budget_per_fold_s"),
               "targets": {site: s["targets"] for site, s in sites.items()},
               "method": {"draws": draws, "n": list(ns), "bootstrap": {"replicates": n_boot, "by": "patient"},
                          "curve_interval": "2.5-97.5 percentiles over patient-grouped draws",
                          "targets": {"sensitivity": SENSITIVITY, "specificity": SPECIFICITY, "ece": MAX_ECE}}}
    (out / "loso.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "loso.md").write_text(markdown(summary))
    plot(summary, out / "loso_calibration.png")
    if image:
        plot(summary, image)
    return summary
