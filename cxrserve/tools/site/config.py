"""The site file (``SITE.yaml``): what a hospital's labels mean in the models' terms, and what it
needs from them.

```yaml
name: stmary                                    # profile name: [a-z0-9][a-z0-9_-]*
labels: {pcr_pos: covid19, pcr_neg: "not:covid19", unclear: ignore}   # the site's words (column `label`)
label_column: label                             # optional: which labels.csv column holds them
columns:                                        # optional: more columns, value -> term
  died: {"1": mortality.risk, "0": "not:mortality.risk"}
targets: {triage.covid19.sensitivity: 0.90, triage.covid19.specificity: 0.80, gate.refusal_rate: 0.02}
target_rule: estimate                           # or lower_bound: a target is met by the 95 % interval's bound
ae_titles: [STMARY_CR1]                         # for the DICOM node
gate_max_refusal: 0.02                          # site calibrate: the gate may refuse at most this share of frontal films
priority:                                       # optional: worklist priority rules (else the store's defaults)
  rules:
    - {field: triage.label, equals: covid19, code: CXR0120, meaning: COVID-19 suspected at the operating point}
```

``priority`` is checked here (:func:`cxrserve.core.priority.parse_rules`) and copied as written
into ``profile.json``; a request naming the site is prioritised by it instead of the store's
defaults (``cxrserve/families/study/cxr-study.model-config.yaml``).

A term is ``ignore``, ``<label>`` or ``<family>.<label>`` (a positive) or ``not:<...>`` (a negative
for that label only, one-vs-rest: a PCR-negative film is not COVID-19 but may be either normal or
pneumonia). A bare label must belong to exactly one family the tools score. Every word found in
the data must be in the mapping, so a film is never counted under a guessed meaning.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from cxrserve.core.priority import PriorityRuleError, parse_rules
from cxrserve.tools.site.models import outputs, resolve_label

#: Metrics a target may name, and whether larger is better.
TARGET_METRICS = {"sensitivity": True, "specificity": True, "ppv": True, "npv": True, "auc": True,
                  "ece": False}
TARGET_RULES = ("estimate", "lower_bound")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_AE = re.compile(r"^[\x20-\x7e]{1,16}$")


class SiteConfigError(ValueError):
    """A site file that cannot be used (exit status 2)."""


@dataclass(frozen=True)
class Term:
    """What one site word means: positive or negative for ``family.label``, or ignored."""

    family: str = ""
    label: str = ""
    positive: bool = True
    ignore: bool = False

    def __str__(self) -> str:
        if self.ignore:
            return "ignore"
        return f"{'' if self.positive else 'not:'}{self.family}.{self.label}"


@dataclass(frozen=True)
class Target:
    key: str  # as written, e.g. triage.covid19.sensitivity or gate.refusal_rate
    family: str
    label: str
    metric: str
    value: float

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "refusal_rate" and TARGET_METRICS.get(self.metric, True)


@dataclass(frozen=True)
class SiteFile:
    name: str
    labels: Mapping[str, Term]
    label_column: str = "label"
    columns: Mapping[str, Mapping[str, Term]] = field(default_factory=dict)
    targets: tuple[Target, ...] = ()
    target_rule: str = "estimate"
    ae_titles: tuple[str, ...] = ()
    gate_max_refusal: float = 0.02
    #: worklist priority rules as written (``{"rules": [...]}``), or None: the store's defaults
    priority: Mapping[str, Any] | None = None
    path: Path | None = None

    @property
    def families(self) -> tuple[str, ...]:
        """Families the site's words or targets name, in registry order of :data:`OUTPUTS`."""
        named = {t.family for t in self.labels.values() if not t.ignore}
        named |= {t.family for m in self.columns.values() for t in m.values() if not t.ignore}
        named |= {t.family for t in self.targets if t.family != "gate"}
        return tuple(f for f in outputs() if f in named)

    def labels_of(self, family: str) -> tuple[str, ...]:
        """The family's labels: its classes, or (multi-label) those the site names, in order."""
        fixed = outputs()[family].labels
        if fixed:
            return fixed
        named = [t.label for t in self.labels.values() if t.family == family]
        named += [t.label for m in self.columns.values() for t in m.values() if t.family == family]
        named += [t.label for t in self.targets if t.family == family]
        return tuple(dict.fromkeys(named))


def parse_term(text: Any, where: str) -> Term:
    s = str(text).strip()
    if s.lower() == "ignore":
        return Term(ignore=True)
    positive = True
    if s.lower().startswith("not:"):
        positive, s = False, s[4:].strip()
    try:
        family, label = resolve_label(s)
    except KeyError as err:
        raise SiteConfigError(f"{where}: {err.args[0]}") from None
    return Term(family=family, label=label, positive=positive)


def _word_map(raw: Any, where: str) -> dict[str, Term]:
    if not isinstance(raw, Mapping) or not raw:
        raise SiteConfigError(f"{where}: a mapping of the site's words to terms, e.g. {{pcr_pos: covid19}}")
    return {str(k).strip(): parse_term(v, f"{where}.{k}") for k, v in raw.items()}


def parse_target(key: str, value: Any, where: str) -> Target:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SiteConfigError(f"{where}.{key}: {value!r} is not a number") from None
    if not (math.isfinite(v) and 0 <= v <= 1):
        raise SiteConfigError(f"{where}.{key}: {v} must lie in [0, 1]")
    if key == "gate.refusal_rate":
        return Target(key, "gate", "", "refusal_rate", v)
    parts = key.rsplit(".", 1)
    if len(parts) != 2 or parts[1] not in TARGET_METRICS:
        raise SiteConfigError(f"{where}.{key}: write <family>.<label>.<metric> with metric one of "
                              f"{sorted(TARGET_METRICS)}, or gate.refusal_rate")
    try:
        family, label = resolve_label(parts[0])
    except KeyError as err:
        raise SiteConfigError(f"{where}.{key}: {err.args[0]}") from None
    return Target(key, family, label, parts[1], v)


def site_from_dict(data: Any, path: Path | None = None) -> SiteFile:
    where = str(path or "site file")
    if not isinstance(data, Mapping):
        raise SiteConfigError(f"{where}: a site file is a YAML mapping (name, labels, targets, ...)")
    known = {"name", "labels", "label_column", "columns", "targets", "target_rule", "ae_titles", "gate_max_refusal",
             "priority"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SiteConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    name = str(data.get("name") or "")
    if not _NAME.match(name):
        raise SiteConfigError(f"{where}: name {name!r} must be lower-case letters, digits, '-' or '_' (1-64)")
    if "labels" not in data:
        raise SiteConfigError(f"{where}: 'labels' is required (what each word of the label column means)")
    labels = _word_map(data["labels"], f"{where}: labels")
    columns = {}
    raw_cols = data.get("columns") or {}
    if not isinstance(raw_cols, Mapping):
        raise SiteConfigError(f"{where}: columns must map a column name to {{value: term}}")
    for col, mapping in raw_cols.items():
        columns[str(col)] = _word_map(mapping, f"{where}: columns.{col}")
    raw_targets = data.get("targets") or {}
    if not isinstance(raw_targets, Mapping):
        raise SiteConfigError(f"{where}: targets must map <family>.<label>.<metric> to a number")
    targets = tuple(parse_target(str(k), v, f"{where}: targets") for k, v in raw_targets.items())
    rule = str(data.get("target_rule", "estimate"))
    if rule not in TARGET_RULES:
        raise SiteConfigError(f"{where}: target_rule {rule!r} is not one of {TARGET_RULES}")
    ae = data.get("ae_titles") or []
    if isinstance(ae, str) or not isinstance(ae, list) or not all(isinstance(a, str) and _AE.match(a.strip()) for a in ae):
        raise SiteConfigError(f"{where}: ae_titles must be a list of AE titles (1-16 printable characters)")
    try:
        gmax = float(data.get("gate_max_refusal", 0.02))
    except (TypeError, ValueError):
        raise SiteConfigError(f"{where}: gate_max_refusal must be a number") from None
    if not 0 <= gmax < 1:
        raise SiteConfigError(f"{where}: gate_max_refusal must lie in [0, 1)")
    priority = data.get("priority")
    try:
        parse_rules(priority, f"{where}: priority")
    except PriorityRuleError as err:
        raise SiteConfigError(str(err)) from None
    site = SiteFile(name=name, labels=labels, label_column=str(data.get("label_column", "label")), columns=columns,
                    targets=targets, target_rule=rule, ae_titles=tuple(a.strip() for a in ae), gate_max_refusal=gmax,
                    priority=dict(priority) if priority is not None else None, path=path)
    if not site.families:
        raise SiteConfigError(f"{where}: no word or target names a model label: nothing to audit")
    return site


def load_site(path: str | Path) -> SiteFile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteConfigError(f"no site file at {path}") from None
    except yaml.YAMLError as err:
        raise SiteConfigError(f"{path}: not valid YAML ({err})") from None
    return site_from_dict(data, path)
