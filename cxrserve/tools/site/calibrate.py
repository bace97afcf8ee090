"""``cxrserve site calibrate``: fit what a site's small labelled sample supports, measure each
step's effect with patient-grouped cross-validation, and write a profile serving can apply.

Steps, in the order serving applies them (:func:`cxrserve.core.site_profile.adjust` / ``decide``):

1. calibration: temperature (multi-class) or Platt per label (binary / multi-label); adopted only
   where its cross-validated log-likelihood beats the served probabilities;
2. prior shift from the site's **unlabelled** studies (``--unlabelled``; EM, Saerens et al. 2002);
   without labelled films of a family the reference priors are its card's validation support
   (uniform if the card has none) and the prior shift is the only step;
3. operating points: per-label thresholds for the site's sensitivity / specificity targets,
   fitted on the training folds and judged on the held-out fold;
4. the gate's threshold: the largest that refuses at most ``gate_max_refusal`` (2 %) of the site's
   frontal films.

Head adaptation (refitting the final layer on frozen features) is not offered: the served
archives export only the final softmax and class activation maps (``CAMResNet``: ``(probabilities,
cams)``), not the pooled features the final layer reads, and the serving code is not changed here.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from cxrserve.core.site_profile import (PROFILE_FILE, PROFILE_FORMAT, FamilyProfile, adjust, archive_info, decide,
                                        profile_from_dict)
from cxrserve.training.jsonable import to_jsonable
from cxrserve.tools.site import html as H
from cxrserve.tools.site import plots
from cxrserve.tools.site.config import SiteFile
from cxrserve.tools.site.fitting import (binary_nll, em_priors, fit_platt, fit_temperature, gate_threshold,
                                         mixed_nll, threshold_for)
from cxrserve.tools.site.folds import patient_folds
from cxrserve.tools.site.scoring import FamilyScores, ScoreTable
from cxrserve.tools.site.stats import binary_report, rate_ci, reliability

HEAD_ADAPTATION = ("not offered: the served archives export only the final probabilities and class activation "
                   "maps, not the final layer's input features, and serving code is left unchanged")
STEPS = ("served", "calibrated", "prior_shift", "operating_points")


def _strata(truth: np.ndarray) -> np.ndarray:
    """A stratum per film for the folds: its positive class, else 'negatives only'."""
    out = np.full(truth.shape[0], truth.shape[1], dtype=int)
    pos = np.nan_to_num(truth, nan=0) == 1
    has = pos.any(axis=1)
    out[has] = pos[has].argmax(axis=1)
    return out



def card_prior(fs: FamilyScores) -> dict[str, float]:
    """Reference priors without labels: the card's validation support, else uniform."""
    labels = fs.labels
    support = [fs.card_metrics.get(c, {}).get("support") for c in labels]
    if fs.output.kind == "multiclass":
        if all(isinstance(s, (int, float)) and s > 0 for s in support):
            tot = float(sum(support))
            return {c: s / tot for c, s in zip(labels, support)}
        return {c: 1.0 / len(labels) for c in labels}
    return {c: 0.5 for c in labels}


def _fit_calibration(fam: FamilyProfile, P, Y) -> dict | None:
    if fam.kind == "multiclass":
        return {"method": "temperature", "T": fit_temperature(P, Y)}
    params = {}
    for j, c in enumerate(fam.labels):
        known = ~np.isnan(Y[:, j])
        if known.sum() >= 2:
            params[c] = list(fit_platt(P[known, j], Y[known, j]))
    return {"method": "platt", "params": params} if params else None


def _nll(fam: FamilyProfile, P, Y) -> float | None:
    if fam.kind == "multiclass":
        return mixed_nll(P, Y)
    vals = [binary_nll(P[~np.isnan(Y[:, j]), j], Y[~np.isnan(Y[:, j]), j]) for j in range(len(fam.labels))
            if (~np.isnan(Y[:, j])).any()]
    return float(np.mean(vals)) if vals else None


def _prior(fam: FamilyProfile, P_ref, U, source: str) -> dict:
    """Reference priors = mean calibrated probability on the fitting data (what calibrated posteriors
    assume), site priors = EM on the unlabelled films' calibrated probabilities."""
    if fam.kind == "multiclass":
        ref = P_ref.mean(axis=0) if P_ref is not None else None
        if ref is None:
            raise ValueError("no reference")
        site, it = em_priors(U, ref)
        return {"reference": dict(zip(fam.labels, map(float, ref))), "site": dict(zip(fam.labels, map(float, site))),
                "source": source, "iterations": it, "unlabelled_films": int(U.shape[0])}
    refd, sited = {}, {}
    for j, c in enumerate(fam.labels):
        r = float(np.clip(P_ref[:, j].mean(), 1e-4, 1 - 1e-4))
        s, _ = em_priors(np.stack([1 - U[:, j], U[:, j]], axis=1), [1 - r, r])
        refd[c], sited[c] = r, float(np.clip(s[1], 1e-4, 1 - 1e-4))
    return {"reference": refd, "site": sited, "source": source, "unlabelled_films": int(U.shape[0])}


def _thresholds(fam: FamilyProfile, site: SiteFile, P, Y) -> dict:
    out = {}
    for t in site.targets:
        if t.family != fam.family or t.metric not in ("sensitivity", "specificity"):
            continue
        if t.label in out and out[t.label]["metric"] == "sensitivity":
            continue  # a sensitivity target decides when a label has both (the other is reported)
        j = fam.labels.index(t.label)
        known = ~np.isnan(Y[:, j])
        thr = threshold_for(Y[known, j], P[known, j], t.metric, t.value)
        if thr is not None:
            out[t.label] = {"threshold": float(thr), "metric": t.metric, "target": t.value,
                            "operating_point": f"{site.name}:{t.key}>={t.value:g}"}
    return out


def _decisions(fam: FamilyProfile, P) -> np.ndarray:
    D = np.zeros(P.shape, dtype=bool)
    for i, row in enumerate(P):
        label, _ = decide(fam, row)
        if fam.kind == "multiclass":
            D[i, fam.labels.index(label)] = True
        elif fam.kind == "binary":
            D[i, 0] = label == fam.answer_labels.get("positive", fam.labels[0])
        else:
            D[i] = [c in label for c in fam.labels]
    return D


def _base_family(fs: FamilyScores) -> FamilyProfile:
    return FamilyProfile(family=fs.output.family, model=fs.output.model, kind=fs.output.kind, labels=fs.labels,
                         served_thresholds=dict(fs.served_thresholds), answer_labels=dict(fs.answer_labels or {}))


def _with(fam: FamilyProfile, **kw) -> FamilyProfile:
    d = {**fam.__dict__, **kw}
    return FamilyProfile(**d)


def fit_steps(fs: FamilyScores, site: SiteFile, P, Y, U, adopt: dict | None = None) -> dict:
    """Fit every step on ``(P, Y)`` (and unlabelled ``U``); returns the FamilyProfile of each stage.

    Each stage adds its step to the one before; ``adopt`` (``{"calibration": bool, "prior_shift":
    bool}``) leaves steps out of the chain the operating points are fitted on."""
    adopt = adopt or {"calibration": True, "prior_shift": True}
    base = _base_family(fs)
    stages = {"served": base}
    calib = _fit_calibration(base, P, Y) if (~np.isnan(Y)).any() else None
    cal = _with(base, calibration=calib) if calib else base
    stages["calibrated"] = cal
    pri = cal
    if U is not None and U.shape[0]:
        pri = _with(cal, prior=_prior(cal, adjust(cal, P), adjust(cal, U), "EM on unlabelled films"))
    stages["prior_shift"] = pri
    chain = _with(base, calibration=cal.calibration if adopt["calibration"] else None)
    if adopt["prior_shift"] and pri.prior is not None:
        # reference priors as the adopted chain gives them
        chain = _with(chain, prior=_prior(chain, adjust(chain, P), adjust(chain, U), "EM on unlabelled films"))
    stages["operating_points"] = _with(chain, thresholds=_thresholds(chain, site, adjust(chain, P), Y))
    return stages


def cross_validate(fs: FamilyScores, site: SiteFile, groups, use, U=None, *, k: int = 5, seed: int = 0,
                   n_boot: int = 1000, adopt: dict | None = None) -> dict:
    """Out-of-fold probabilities and decisions of every step, and their metrics per label."""
    idx = np.flatnonzero(use & ~np.all(np.isnan(fs.truth), axis=1))
    P, Y, g = fs.probs[idx], fs.truth[idx], groups[idx]
    folds = patient_folds(g, _strata(Y), k=k, seed=seed)
    oof_p = {s: np.full(P.shape, np.nan) for s in STEPS}
    oof_d = {s: np.zeros(P.shape, dtype=bool) for s in STEPS}
    fold_info = []
    for tr, te in folds:
        stages = fit_steps(fs, site, P[tr], Y[tr], U, adopt)
        for s, fam in stages.items():
            q = adjust(fam, P[te])
            oof_p[s][te] = q
            oof_d[s][te] = fs.served_positive[idx][te] if s == "served" else _decisions(fam, q)
        fold_info.append({"train_films": int(tr.size), "test_films": int(te.size),
                          "train_patients": int(np.unique(g[tr]).size), "test_patients": int(np.unique(g[te]).size),
                          "thresholds": {c: v["threshold"] for c, v in stages["operating_points"].thresholds.items()},
                          "temperature": (stages["calibrated"].calibration or {}).get("T"),
                          "platt": (stages["calibrated"].calibration or {}).get("params")})
    steps = {}
    base = _base_family(fs)
    for s in STEPS:
        labels = {}
        for j, c in enumerate(fs.labels):
            known = ~np.isnan(Y[:, j])
            if not known.any():
                continue
            rep = binary_report(Y[known, j].astype(int), oof_p[s][known, j], oof_d[s][known, j], g[known],
                                n_boot=n_boot, seed=seed)
            rep["reliability"] = reliability(Y[known, j], oof_p[s][known, j])
            labels[c] = rep
        steps[s] = {"nll": _nll(base, oof_p[s], Y), "labels": labels}
    return {"films": int(idx.size), "patients": int(np.unique(g).size), "folds": fold_info, "steps": steps,
            "_folds_idx": [(idx[tr], idx[te]) for tr, te in folds]}


def calibrate(table: ScoreTable, site: SiteFile, *, unlabelled: dict | None = None, folds: int = 5,
              n_boot: int = 1000, seed: int = 0) -> dict:
    """The profile (json-ready dict) with its cross-validated report under ``cv``."""
    use = table.answered & table.frontal
    families, cv, archives = {}, {}, {}
    for name, fs in table.families.items():
        info = archive_info(fs.archive)
        archives[info.model] = {"version": info.version, "sha256": info.sha256, "content_sha256": info.content_sha256}
        U = None if unlabelled is None else unlabelled.get(name)
        labelled = use & ~np.all(np.isnan(fs.truth), axis=1)
        base = _base_family(fs)
        if labelled.sum() == 0:  # no labels: prior shift against the card's priors is all a site can do
            fam = base
            if U is not None and U.shape[0]:
                ref = card_prior(fs)
                if fs.output.kind == "multiclass":
                    site_p, it = em_priors(U, [ref[c] for c in fs.labels])
                    prior = {"reference": ref, "site": dict(zip(fs.labels, map(float, site_p))), "iterations": it}
                else:
                    prior = {"reference": ref, "site": {c: float(np.clip(em_priors(
                        np.stack([1 - U[:, j], U[:, j]], 1), [1 - ref[c], ref[c]])[0][1], 1e-4, 1 - 1e-4))
                        for j, c in enumerate(fs.labels)}}
                fam = _with(base, prior={**prior, "source": "EM on unlabelled films; reference: card validation "
                                                            "support (uniform without one)",
                                         "unlabelled_films": int(U.shape[0])})
            families[name] = fam
            cv[name] = {"films": 0, "note": "no labelled films: nothing cross-validated"}
            continue
        res = cross_validate(fs, site, table.groups, use, U, k=folds, seed=seed, n_boot=n_boot)
        # adopt calibration / prior shift only where held-out likelihood improves on the step before
        nll = {s: res["steps"][s]["nll"] for s in STEPS}
        adopted = {"calibration": False, "prior_shift": False}
        cal_fitted = res["steps"]["calibrated"]["nll"] is not None and any(f["temperature"] is not None or f["platt"]
                                                                            for f in res["folds"])
        if cal_fitted and nll["calibrated"] < nll["served"]:
            adopted["calibration"] = True
        if U is not None and U.shape[0] and nll["prior_shift"] is not None:
            adopted["prior_shift"] = nll["prior_shift"] <= (nll["calibrated"] if adopted["calibration"] else nll["served"])
        if adopted != {"calibration": True, "prior_shift": True}:
            # the operating points' held-out numbers must come from the chain the profile applies
            again = cross_validate(fs, site, table.groups, use, U, k=folds, seed=seed, n_boot=n_boot, adopt=adopted)
            res["steps"]["operating_points"] = again["steps"]["operating_points"]
            for f, g in zip(res["folds"], again["folds"]):
                f["thresholds"] = g["thresholds"]
        res.pop("_folds_idx")
        final = fit_steps(fs, site, fs.probs[labelled], fs.truth[labelled], U, adopted)["operating_points"]
        adopted["operating_points"] = bool(final.thresholds)
        families[name] = final
        res["adopted"] = adopted
        res["head_adaptation"] = HEAD_ADAPTATION
        cv[name] = res
    gate = None
    gate_cv = None
    if table.gate:
        fr = table.frontal & ~np.isnan(table.gate_score)
        t = gate_threshold(table.gate_score[fr], site.gate_max_refusal)
        if t is not None:
            gate = {"model": table.gate["model"], "threshold": t, "max_refusal": site.gate_max_refusal,
                    "archive_threshold": table.gate["threshold"], "frontal_films": int(fr.sum())}
            idx = np.flatnonzero(fr)
            if np.unique(table.groups[idx]).size >= 2:
                refused = np.zeros(idx.size, dtype=bool)
                for tr, te in patient_folds(table.groups[idx], np.zeros(idx.size, int), k=folds, seed=seed):
                    tt = gate_threshold(table.gate_score[idx[tr]], site.gate_max_refusal)
                    refused[te] = table.gate_score[idx[te]] < tt
                gate_cv = rate_ci(refused, table.groups[idx], n_boot=n_boot, seed=seed)
                gate["cv_refusal"] = gate_cv
    profile = {
        "format": PROFILE_FORMAT, "site": site.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ae_titles": list(site.ae_titles), "archives": archives,
        "families": {n: {"model": f.model, "kind": f.kind, "labels": list(f.labels), "calibration": f.calibration,
                         "prior": f.prior, "thresholds": f.thresholds, "served_thresholds": f.served_thresholds,
                         "answer_labels": f.answer_labels} for n, f in families.items()},
        "gate": gate,
        "head_adaptation": {"adopted": False, "reason": HEAD_ADAPTATION},
        # the site file's worklist priority rules, as written (absent: the store's defaults)
        **({"priority": site.priority} if site.priority is not None else {}),
        "data": {"films": table.n, "patients": int(np.unique(table.groups).size), "frontal_films": int(table.frontal.sum()),
                 "answered": int(table.answered.sum()), "label_counts": table.label_counts},
        "cv": {"folds_requested": folds, "seed": seed, "bootstrap": {"replicates": n_boot, "by": "patient"},
               "families": cv},
    }
    profile = to_jsonable(profile)
    profile_from_dict(profile)  # the profile must load as serving will load it
    return profile


# --------------------------------------------------------------------------- report
def render_calibration(profile: dict) -> str:
    b = [f"<h1>Site calibration: {H.escape(profile['site'])}</h1>",
         f"<p class=note>{H.escape(profile['created'])} &middot; {profile['data']['films']} films, "
         f"{profile['data']['patients']} patients. Every number below the 'profile' table is cross-validated: "
         f"patient-grouped folds, each step fitted on the other folds and scored on the held-out one; 95 % "
         f"intervals by patient bootstrap.</p>"]
    b.append("<h2>Profile</h2>" + H.table(["archive", "version", "sha256"],
                                          [[m, a["version"], (a.get("sha256") or "")[:16]] for m, a in profile["archives"].items()]))
    for name, f in profile["families"].items():
        rows = [["calibration", json.dumps(f["calibration"]) if f["calibration"] else "none (served probabilities)"],
                ["prior shift", json.dumps({k: f["prior"][k] for k in ("reference", "site")}) if f["prior"] else "none"]]
        for c, op in (f["thresholds"] or {}).items():
            rows.append([f"threshold {c}", f"{op['threshold']:.4f} ({op['operating_point']})"])
        b.append(f"<h3>{H.escape(name)}</h3>" + H.table(["step", "fitted on all labelled films"], rows))
        cvf = profile["cv"]["families"].get(name, {})
        if not cvf.get("steps"):
            b.append(f"<p class=note>{H.escape(cvf.get('note', ''))}</p>")
            continue
        b.append(f"<p class=note>{cvf['films']} labelled films, {cvf['patients']} patients, {len(cvf['folds'])} folds; "
                 f"adopted: {H.escape(json.dumps(cvf['adopted']))}. Head adaptation: {H.escape(cvf['head_adaptation'])}.</p>")
        rows = []
        for s in STEPS:
            st = cvf["steps"][s]
            for c, r in st["labels"].items():
                rows.append([s, c, H.fmt(st["nll"], 3), H.ci(r["sensitivity"]), H.ci(r["specificity"]),
                             H.ci(r["auc"]), H.ci(r["ece"], 3)])
        b.append(H.table(["step (cumulative)", "label", "NLL", "sensitivity", "specificity", "AUC", "ECE"], rows))
        figs = []
        for c in f["labels"]:
            series = [{"label": s, "bins": cvf["steps"][s]["labels"][c]["reliability"]["bins"],
                       "ece": cvf["steps"][s]["labels"][c]["ece"]["estimate"]}
                      for s in ("served", "calibrated", "prior_shift") if c in cvf["steps"][s]["labels"]]
            if series:
                figs.append(H.img(plots.reliability_png(series, f"{name}.{c}: held-out reliability"), f"{c} reliability"))
        b.append("<div class=figs>" + "".join(figs) + "</div>")
    g = profile.get("gate")
    b.append("<h2>Input gate</h2>")
    if g:
        b.append(H.table(["", "value"], [["site threshold (refuses at most "
                                          f"{g['max_refusal']:.0%} of frontal films)", f"{g['threshold']:.4f}"],
                                         ["archive threshold", g["archive_threshold"]],
                                         ["held-out refusal rate with fold thresholds", H.ci(g.get("cv_refusal"), 3)]]))
    else:
        b.append("<p>The archives have no gate score: no site threshold.</p>")
    b.append("<p class=note>Research use only. Generated by <code>cxrserve site calibrate</code>; "
             "no patient identifier is stored here.</p>")
    return H.page(f"Site calibration: {profile['site']}", "\n".join(b))


def write_calibration(table: ScoreTable, site: SiteFile, out: str | Path, *, unlabelled=None, folds: int = 5,
                      n_boot: int = 1000, seed: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    profile = calibrate(table, site, unlabelled=unlabelled, folds=folds, n_boot=n_boot, seed=seed)
    (out / PROFILE_FILE).write_text(json.dumps(profile, indent=2, allow_nan=False) + "\n")
    (out / "calibration.html").write_text(render_calibration(profile), encoding="utf-8")
    return profile
