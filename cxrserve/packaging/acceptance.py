"""Acceptance bars: what a real store's component must show on its own validation split to ship.

``cxrserve store build --recipe real`` (:mod:`cxrserve.packaging.real_store`) judges every
component it trained with :func:`judge` before it puts the component's archive in the store
(issue 22, item 5). A budget-starved build once shipped a gate that refused 43 % of ordinary
frontal films and a mortality model with an AUC of 0.27, each answering as ``real``; these
bars are the floor below which a component is not shipped at all.

The bars are data: ``store.acceptance.bars`` in ``training/real.yaml`` (:data:`DEFAULTS_FILE`,
read by ``--recipe real`` too; a recipe file's own block is merged over them by bar name); each
names the component it judges and a regex over the component's
flattened evaluation dict (the ``eval/<archive>.json`` the build writes, or the gate's
:func:`gate_evidence`). Three tests:

* ``lower_above``: the 95 % interval's lower bound is above the bound (a fixed number, or the
  value of another key such as the majority-class baseline). Chance-level bars use this: a
  point estimate on 30 films beats chance by luck half the time.
* ``at_least`` / ``at_most``: the value itself (lung Dice; the gate's frontal refusal rate,
  which sets its threshold on this very split, so its point value is the constraint).

A bar that cannot be measured (no value, or no interval for ``lower_above``) is not met:
the build fails closed. Per-label bars (``each_measured``) skip labels the split has no truth
for, as long as one label is measured.

Also here, because they produce the numbers only these bars read: the gate's threshold sweep
(:func:`gate_threshold`, :func:`gate_evidence`) and the classifier's patient-bootstrap
macro-F1 against its majority-class baseline (:func:`classifier_evidence`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

#: z for a two-sided 95 % interval
Z95 = 1.959964


@dataclass(frozen=True)
class Bar:
    """One minimum bar: ``what`` is the card's wording ({label} from the key's named group)."""

    name: str
    component: str
    what: str
    key: str
    test: str  # "lower_above" | "at_least" | "at_most"
    bound: float | None = None
    baseline: str | None = None  # regex of the key whose value is the bound (e.g. the majority baseline)
    each_measured: bool = False  # per-label bars: unmeasured labels are listed, not failed
    # AUC bars: count keys (found beside the value or in a parent) for the rank test, see _rank_p
    positives: str | None = None
    total: str | None = None

    def __post_init__(self):
        if self.test not in ("lower_above", "at_least", "at_most"):
            raise ValueError(f"bar {self.name}: unknown test {self.test!r}")
        if (self.bound is None) == (self.baseline is None):
            raise ValueError(f"bar {self.name}: needs exactly one of bound, baseline")

    def describe(self) -> str:
        against = f"{self.bound:g}" if self.bound is not None else "majority-class baseline"
        return {"lower_above": f"95 % CI lower bound > {against}", "at_least": f">= {against}",
                "at_most": f"<= {against}"}[self.test]


#: where the default bars are written down, as data: ``store.acceptance`` of the real recipe (the
#: bars name families' components and metrics, which this shared layer does not spell out itself)
DEFAULTS_FILE = Path(__file__).resolve().parents[2] / "training" / "real.yaml"


def default_config() -> dict:
    return dict((yaml.safe_load(DEFAULTS_FILE.read_text()) or {}).get("store", {}).get("acceptance") or {})


def load_bars(config: Mapping | None = None) -> tuple[Bar, ...]:
    """The default bars with ``config["bars"][name]`` merged over each (a new name adds a bar)."""
    bars = {name: dict(spec) for name, spec in (default_config().get("bars") or {}).items()}
    for name, spec in ((config or {}).get("bars") or {}).items():
        bars[name] = {**bars.get(name, {}), **dict(spec or {})}
    fields = {f.name for f in dataclasses.fields(Bar)} - {"name"}
    out = []
    for name, spec in bars.items():
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ValueError(f"acceptance bar {name}: unknown setting(s) {unknown}; known: {sorted(fields)}")
        try:
            out.append(Bar(name=name, **{k: (float(v) if k == "bound" and v is not None else v)
                                        for k, v in spec.items()}))
        except TypeError as err:
            raise ValueError(f"acceptance bar {name}: {err}") from None
    return tuple(out)


def gate_settings(config: Mapping | None = None) -> dict:
    """How the gate is checked (phantoms of other kinds): the defaults' ``gate`` block, ``config``'s over it."""
    return {**dict(default_config().get("gate") or {}), **dict((config or {}).get("gate") or {})}


def classifiers(config: Mapping | None = None) -> dict[str, dict]:
    """Components held to the majority-class bar: ``{component: {truth, label, probabilities}}`` (the
    record attribute with the true label, the answer's fields with the label and probabilities)."""
    return {**dict(default_config().get("classifiers") or {}), **dict((config or {}).get("classifiers") or {})}


# --------------------------------------------------------------------------- judging
@dataclass(frozen=True)
class Check:
    """One bar on one measured key: its value, interval, the bound it was held to, the outcome."""

    bar: Bar
    label: str
    value: float | None
    interval: tuple[float, float] | None
    bound: float | None
    passed: bool
    reason: str  # why it failed ("" when passed)

    def value_text(self) -> str:
        if self.value is None:
            return "not measured"
        ci = f" ({self.interval[0]:.3f}-{self.interval[1]:.3f})" if self.interval else ""
        return f"{self.value:.3f}{ci}"

    def summary(self) -> str:
        bound = f"{self.bound:.3f}" if self.bound is not None else "?"
        return f"{self.bar.name} [{self.label}]: {self.value_text()}, needs {self.bar.describe()} ({bound}): {self.reason}"


@dataclass
class Verdict:
    """Every bar of one component on its evaluation."""

    component: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        """Why it is not shipped, one line per failed bar (a component no bar applies to fails too)."""
        if not self.checks:
            return [f"{self.component}: no acceptance bar applies to it"]
        return [c.summary() for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"component": self.component, "passed": self.passed,
                "checks": [{"bar": c.bar.name, "what": c.label, "value": c.value,
                            "ci95": list(c.interval) if c.interval else None, "test": c.bar.describe(),
                            "bound": c.bound, "passed": c.passed, "reason": c.reason} for c in self.checks]}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values: intervals stay ``[low, high]``)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def interval(flat: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    """The 95 % interval the evaluation stored beside ``key``: ``<key>_ci95`` / ``<key>_ci``, a sibling
    ``ci95`` (``{"auc": x, "ci95": [lo, hi]}``), either as ``[lo, hi]`` or ``{low, high}``; for a
    ``<x>.mean`` with an ``<x>.std`` (repeated splits), mean +- 1.96 sd."""
    for name in (key + "_ci95", key + "_ci", key.rsplit(".", 1)[0] + ".ci95"):
        ci = flat.get(name)
        if ci is None and f"{name}.low" in flat:
            ci = [flat.get(f"{name}.low"), flat.get(f"{name}.high")]
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            low, high = _number(ci[0]), _number(ci[1])
            if low is not None and high is not None:
                return low, high
    if key.endswith(".mean"):
        mean, sd = _number(flat.get(key)), _number(flat.get(key[: -len(".mean")] + ".std"))
        if mean is not None and sd is not None:
            return mean - Z95 * sd, mean + Z95 * sd
    return None


def _count(flat: Mapping[str, Any], key: str, name: str) -> float | None:
    """``name`` beside ``key`` or in the nearest parent that has it."""
    parts = key.split(".")[:-1]
    while True:
        value = _number(flat.get(".".join(parts + [name])))
        if value is not None or not parts:
            return value
        parts = parts[:-1]


def rank_p(auc: float, positives: int, negatives: int) -> float:
    """One-sided p-value of ``auc`` against 0.5 (Mann-Whitney U, normal approximation, continuity
    corrected). A percentile bootstrap on one or two positives is degenerate (one death ranked
    first gives AUC 1.0 in every replicate, an interval of [1, 1]); this is not."""
    n = positives * negatives
    if n <= 0:
        return 1.0
    sd = math.sqrt(n * (positives + negatives + 1) / 12.0)
    z = (auc * n - n / 2.0 - 0.5) / sd
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _check(bar: Bar, label: str, flat: Mapping[str, Any], key: str) -> Check:
    value = _number(flat.get(key))
    bound = bar.bound
    if bar.baseline is not None:
        found = [k for k in flat if re.search(bar.baseline, k)]
        bound = _number(flat.get(found[0])) if found else None
    ci = interval(flat, key)
    if value is None:
        return Check(bar, label, None, ci, bound, False, "not measured (no scorable films)")
    if bound is None:
        return Check(bar, label, value, ci, None, False, "its baseline was not measured")
    if bar.test == "lower_above":
        if ci is None:
            return Check(bar, label, value, None, bound, False, "no 95 % interval measured")
        if ci[0] <= bound:
            return Check(bar, label, value, ci, bound, False, f"interval reaches {ci[0]:.3f} <= {bound:.3f}")
        if bar.positives:  # the interval must not be a bootstrap artefact of a handful of positives
            pos, total = _count(flat, key, bar.positives), _count(flat, key, bar.total or "n")
            if pos is None or total is None:
                return Check(bar, label, value, ci, bound, False, "no positive/negative counts to test it on")
            p = rank_p(value, int(pos), int(total - pos))
            if p >= (1 - 0.95) / 2:
                return Check(bar, label, value, ci, bound, False,
                             f"{int(pos)} positives / {int(total - pos)} negatives: rank test p = {p:.3f}, "
                             "too few to tell from chance")
        return Check(bar, label, value, ci, bound, True, "")
    ok = value >= bound if bar.test == "at_least" else value <= bound
    return Check(bar, label, value, ci, bound, ok,
                 "" if ok else f"{value:.3f} {'<' if bar.test == 'at_least' else '>'} {bound:.3f}")


def judge(evaluation: Mapping, bars: Sequence[Bar] | None = None, component: str | None = None) -> Verdict:
    """Hold ``evaluation`` (a component's evaluation dict) to every bar of its component (default:
    :func:`load_bars`)."""
    bars = load_bars() if bars is None else bars
    component = component or evaluation.get("component")
    flat = flatten(evaluation)
    verdict = Verdict(component)
    for bar in (b for b in bars if b.component == component):
        matches = [(k, re.search(bar.key, k)) for k in sorted(flat)]
        matches = [(k, m) for k, m in matches if m]
        if not matches:
            verdict.checks.append(Check(bar, bar.what.format_map(_Every()), None, None, bar.bound, False,
                                        "not measured (the evaluation has no such number)"))
            continue
        checks = [_check(bar, bar.what.format_map(_Every(m.groupdict())), flat, k) for k, m in matches]
        if bar.each_measured:
            measured = [c for c in checks if c.value is not None]
            if measured:  # labels the split holds no truth for are listed, not failed
                checks = measured + [replace(c, passed=True, reason="not measured: no truth in this split (skipped)")
                                     for c in checks if c.value is None]
        verdict.checks += checks
    return verdict


class _Every(dict):
    def __missing__(self, key):
        return "every one"


# --------------------------------------------------------------------------- intervals
def wilson(k: int, n: int) -> tuple[float, float] | None:
    """Wilson 95 % interval of a proportion ``k / n`` (None for n = 0)."""
    if n <= 0:
        return None
    p, z2 = k / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(refused: Sequence[bool]) -> dict:
    refused = np.asarray(refused, dtype=bool)
    n, k = int(refused.size), int(refused.sum())
    ci = wilson(k, n)
    return {"n": n, "refused": k, "refused_rate": k / n if n else None, "refused_rate_ci95": list(ci) if ci else None}


def macro_f1(truth: np.ndarray, predicted: np.ndarray, k: int) -> float:
    """Macro-F1 over ``k`` classes given as indices (a class with no truth and no prediction counts 0)."""
    truth, predicted = np.asarray(truth, dtype=int), np.asarray(predicted, dtype=int)
    cm = np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    den = cm.sum(0) + cm.sum(1)
    return float(np.mean(np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)))


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, k: int) -> float | None:
    truth, predicted = np.asarray(truth, dtype=int), np.asarray(predicted, dtype=int)
    present = [c for c in range(k) if (truth == c).any()]
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in present])) if present else None


# --------------------------------------------------------------------------- evidence
def classifier_evidence(truth: Sequence[str], predicted: Sequence[str], probabilities: np.ndarray,
                        labels: Sequence[str], groups: Sequence, n_boot: int = 2000, seed: int = 0) -> dict:
    """Macro-F1 and balanced accuracy with patient-bootstrap intervals, the majority-class baseline
    (the best constant answer on this very split), and one-vs-rest AUCs with intervals."""
    from cxrserve.training.bootstrap import bootstrap_ci
    from cxrserve.training.metrics import roc_auc

    labels = list(labels)
    k = len(labels)
    t = np.array([labels.index(x) for x in truth], dtype=int)
    p = np.array([labels.index(x) for x in predicted], dtype=int)
    groups = np.asarray(groups)
    out: dict = {"n": int(t.size), "n_patients": int(len(set(groups.tolist()))), "labels": labels}
    if not t.size:
        return {**out, "macro_f1": None, "majority_macro_f1": None, "per_class": {}}
    majority = int(np.bincount(t, minlength=k).argmax())
    constant = np.full_like(t, majority)
    f1 = bootstrap_ci(lambda a, b: macro_f1(a, b, k), t, p, n=n_boot, seed=seed, groups=groups)
    bacc = bootstrap_ci(lambda a, b: balanced_accuracy(a, b, k), t, p, n=n_boot, seed=seed, groups=groups)
    out.update(majority_class=labels[majority], majority_macro_f1=macro_f1(t, constant, k),
               majority_balanced_accuracy=balanced_accuracy(t, constant, k),
               macro_f1=f1["estimate"], macro_f1_ci95=[f1["low"], f1["high"]],
               balanced_accuracy=bacc["estimate"], balanced_accuracy_ci95=[bacc["low"], bacc["high"]], per_class={})
    probabilities = np.asarray(probabilities, dtype=float).reshape(t.size, k)
    for j, label in enumerate(labels):
        positive = t == j
        entry: dict = {"positives": int(positive.sum()), "auc": None}
        if 0 < positive.sum() < t.size:
            ci = bootstrap_ci(roc_auc, positive, probabilities[:, j], n=n_boot, seed=seed, groups=groups)
            entry.update(auc=ci["estimate"], auc_ci95=[ci["low"], ci["high"]])
        out["per_class"][label] = entry
    return out


def gate_threshold(frontal_scores: Sequence[float], trained: float, max_refused: float) -> float | None:
    """The gate's accept threshold: the trained one, lowered only as far as needed for at most
    ``max_refused`` of the frontal films to score below it (None without frontal films).

    A film is accepted when its P(frontal) >= threshold, so the threshold at the
    ``floor(max_refused * n)``-th lowest frontal score refuses at most that many films.
    """
    scores = np.sort(np.asarray(frontal_scores, dtype=float))
    if not scores.size:
        return None
    allowed = int(math.floor(max_refused * scores.size + 1e-9))
    return float(min(trained, scores[allowed])) if allowed < scores.size else float(trained)


def gate_evidence(frontal: Sequence[float], non_frontal: Sequence[float], phantoms: Mapping[str, Sequence[float]],
                  trained: float, max_refused: float) -> dict:
    """The gate's acceptance numbers at the threshold :func:`gate_threshold` sets: refusal rates (Wilson
    95 % intervals) of the validation frontal films, the validation non-frontal images and the
    held-out phantoms of other kinds (pooled and per kind). Scores are P(frontal_cxr)."""
    threshold = gate_threshold(frontal, trained, max_refused)
    cut = trained if threshold is None else threshold

    def refused(scores):
        return np.asarray(scores, dtype=float) < cut

    pooled = [s for scores in phantoms.values() for s in scores]
    return {"component": "gate", "trained_threshold": trained, "threshold": threshold,
            "frontal": rate(refused(frontal)), "non_frontal": rate(refused(non_frontal)),
            "phantom_kinds": {**rate(refused(pooled)),
                              "by_kind": {kind: rate(refused(s)) for kind, s in sorted(phantoms.items())}}}
