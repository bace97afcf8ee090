"""Which served models the site tools can judge, read from the families' own declarations.

Nothing here names a family: a served model's structured-report declaration
(:func:`cxrserve.families.report`) says which response fields are its numbers and coded answers,
and the output kind follows from their shape:

* multi-class: numbers ``<prefix>.<class>`` for every value of one coded answer (a softmax over
  classes and the class it answers);
* binary: one required unitless number and a two-valued coded answer (a risk and its
  high / low call); an optional number whose field ends in ``threshold`` is the served cut-off;
* multi-label: a number per key of one response mapping (independent probabilities, 0.5 each).

Site terms name ``<family>.<label>`` where the label is a class (multi-class), the number's field
(binary) or a key (multi-label).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping

from cxrserve.core.family import Coded, Num, NumEach


def _get(response: Mapping[str, Any], path: str):
    value: Any = response
    for part in path.split("."):
        value = value[part]
    return value


@dataclass(frozen=True)
class Output:
    family: str
    model: str  # the served model / archive name
    kind: str  # multiclass | binary | multilabel (cxrserve.core.site_profile.KINDS)
    labels: tuple[str, ...]  # empty for multilabel: any key the answer has
    read: Callable[[Mapping[str, Any]], dict[str, float]]
    #: the coded answer (multiclass: a class; binary: one of two words), or None
    answer: Callable[[Mapping[str, Any]], Any] = lambda r: None
    served_thresholds: Callable[[Mapping[str, Any]], dict[str, float]] = lambda r: {}
    answer_values: tuple[str, ...] = field(default=())


def _from_report(family: str, model: str, report) -> Output | None:
    nums = [i for i in report.items if isinstance(i, Num) and not i.when]
    coded = [i for i in report.items if isinstance(i, Coded) and not i.when]
    each = [i for i in report.items if isinstance(i, NumEach)]
    for c in coded:
        classes = tuple(c.values)
        prefixes = {n.field.rsplit(".", 1)[0] for n in nums if "." in n.field and n.field.rsplit(".", 1)[1] in classes}
        for prefix in prefixes:
            labels = tuple(n.field.rsplit(".", 1)[1] for n in nums if n.field.startswith(prefix + "."))
            if set(labels) == set(classes):
                return Output(family, model, "multiclass", labels,
                              read=lambda r, p=prefix, ls=labels: {k: float(_get(r, p)[k]) for k in ls},
                              answer=lambda r, f=c.field: _get(r, f))
    scores = [n for n in nums if not n.optional and "." not in n.field]
    two = [c for c in coded if len(c.values) == 2]
    if len(scores) == 1 and len(two) == 1:
        score, call = scores[0].field, two[0].field
        cut = next((n.field for n in nums if n.field.endswith("threshold")), None)
        return Output(family, model, "binary", (score,), read=lambda r, f=score: {f: float(_get(r, f))},
                      answer=lambda r, f=call: _get(r, f),
                      served_thresholds=(lambda r, f=cut, s=score: {s: float(_get(r, f))}) if cut else (lambda r: {}),
                      answer_values=tuple(two[0].values))
    if len(each) == 1:
        f = each[0].field
        return Output(family, model, "multilabel", (), read=lambda r, f=f: {k: float(v) for k, v in _get(r, f).items()},
                      served_thresholds=lambda r, f=f: {k: 0.5 for k in _get(r, f)})
    return None


@lru_cache(maxsize=1)
def outputs() -> dict[str, Output]:
    """Family name -> its first served model whose answer is a class probability, per the registry."""
    from cxrserve import families as registry

    found: dict[str, Output] = {}
    for name, fam in registry.families().items():
        for served in fam.served:
            if served.compose:
                continue
            report = registry.report(served.name)
            out = _from_report(name, served.name, report) if report is not None else None
            if out is not None and name not in found:
                found[name] = out
    return found


def resolve_label(text: str) -> tuple[str, str]:
    """``covid19`` or ``<family>.covid19`` -> ``(family, label)``; KeyError naming the choices."""
    outs = outputs()
    s = str(text).strip()
    if "." in s and s.split(".", 1)[0] in outs:
        family, label = s.split(".", 1)
        o = outs[family]
        if o.labels and label not in o.labels:
            raise KeyError(f"{family} has no label {label!r}; its labels: {list(o.labels)}")
        return family, label
    owners = [f for f, o in outs.items() if s in o.labels]
    if len(owners) == 1:
        return owners[0], s
    if owners:
        raise KeyError(f"{s!r} is a label of {owners}: write <family>.{s}")
    known = {f: list(o.labels) or ["<any finding it scores>"] for f, o in outs.items()}
    raise KeyError(f"{s!r} is no model label; write ignore, a label or not:<label> from {known}")
