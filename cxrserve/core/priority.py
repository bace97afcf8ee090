"""A worklist priority per study: ``urgent``, ``routine`` or ``not assessed``, with coded reasons.

The rules are data, never code per family: a list of conditions on dotted fields of a composed
answer's ``results`` (``<section>.<field>...``), each with the coded reason it gives when it fires.
The defaults ship in the composed model's archive (its ``model-config.yaml`` ``handler.priority``
block); a site profile's ``priority`` block (``cxrserve site calibrate`` copies it from the site
file) replaces them for requests that name that site.

```yaml
priority:
  rules:
    - field: <section>.<field>       # dotted path in results
      equals: <value>                # or in: [..], at_least: n, at_most: n (several: all must hold)
      optional: false                # true: an answered section without the field does not fire
      code: CXR0121                  # the reason: code value (SH, 16 at most) ...
      scheme: 99CXRSRV               # ... its scheme (default the private one) ...
      meaning: <what it means>       # ... and meaning (LO, 64 at most)
```

A rule is *evaluable* when its section answered (present, no ``error``) and its field is there
(or the rule is ``optional``). The level is ``urgent`` when any rule fires, else ``not assessed``
when any rule could not be evaluated (a section left out by ``models=``, or one that failed),
else ``routine``. Only the standard library here (core layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from cxrserve.core.family import PRIVATE_SCHEME

URGENT, ROUTINE, NOT_ASSESSED = "urgent", "routine", "not assessed"
LEVELS = (URGENT, ROUTINE, NOT_ASSESSED)
#: ``rules`` of an answer whose rules came from the archive
STORE_DEFAULT = "store default"
OPERATORS = ("equals", "in", "at_least", "at_most")
_RULE_KEYS = {"field", "code", "meaning", "scheme", "optional", *OPERATORS}
_MISSING = object()


class PriorityRuleError(ValueError):
    """A priority block that cannot be used (unknown key, no condition, a code too long)."""


@dataclass(frozen=True)
class Rule:
    field: str
    code: str
    meaning: str
    scheme: str = PRIVATE_SCHEME
    equals: Any = _MISSING
    in_: tuple = ()
    at_least: float | None = None
    at_most: float | None = None
    has_in: bool = False
    optional: bool = False

    @property
    def section(self) -> str:
        return self.field.split(".", 1)[0]

    def holds(self, value: Any) -> bool:
        """Every condition of the rule holds for ``value``."""
        if self.equals is not _MISSING and value != self.equals:
            return False
        if self.has_in and value not in self.in_:
            return False
        for bound, above in ((self.at_least, True), (self.at_most, False)):
            if bound is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return False
            if (value < bound) if above else (value > bound):
                return False
        return True

    def reason(self, value: Any) -> dict:
        return {"code": self.code, "scheme": self.scheme, "meaning": self.meaning, "field": self.field,
                "value": value}


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PriorityRuleError(f"{where}: {value!r} is not a finite number")
    return float(value)


def parse_rule(data: Any, where: str = "priority rule") -> Rule:
    if not isinstance(data, Mapping):
        raise PriorityRuleError(f"{where}: a rule is a mapping (field, a condition, code, meaning)")
    unknown = sorted(set(map(str, data)) - _RULE_KEYS)
    if unknown:
        raise PriorityRuleError(f"{where}: unknown keys {unknown}; known: {sorted(_RULE_KEYS)}")
    for key in ("field", "code", "meaning"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise PriorityRuleError(f"{where}: {key!r} is required (a non-empty string)")
    field = data["field"].strip()
    if "." not in field or any(not p for p in field.split(".")):
        raise PriorityRuleError(f"{where}: field {field!r} must be <section>.<field> (a dotted path in results)")
    code, meaning, scheme = data["code"].strip(), data["meaning"].strip(), str(data.get("scheme") or PRIVATE_SCHEME)
    if len(code) > 16 or len(meaning) > 64 or len(scheme) > 16:
        raise PriorityRuleError(f"{where}: code (16), scheme (16) and meaning (64 characters) must fit DICOM")
    if not any(op in data for op in OPERATORS):
        raise PriorityRuleError(f"{where}: no condition; give one of {list(OPERATORS)}")
    values = data.get("in", ())
    if "in" in data and (isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple))):
        raise PriorityRuleError(f"{where}: 'in' takes a list of values")
    return Rule(field=field, code=code, meaning=meaning, scheme=scheme, equals=data.get("equals", _MISSING),
                in_=tuple(values), has_in="in" in data,
                at_least=_number(f"{where}.at_least", data["at_least"]) if "at_least" in data else None,
                at_most=_number(f"{where}.at_most", data["at_most"]) if "at_most" in data else None,
                optional=bool(data.get("optional", False)))


def parse_rules(block: Any, where: str = "priority") -> tuple[Rule, ...]:
    """The rules of a ``priority`` block (``{"rules": [...]}``); an empty tuple when there is none."""
    if block is None:
        return ()
    if not isinstance(block, Mapping) or set(block) - {"rules"}:
        raise PriorityRuleError(f"{where}: a mapping with one key, 'rules' (a list)")
    rules = block.get("rules") or []
    if not isinstance(rules, list):
        raise PriorityRuleError(f"{where}.rules: a list of rules")
    return tuple(parse_rule(r, f"{where}.rules[{i}]") for i, r in enumerate(rules))


def _at(node: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def assess(results: Mapping[str, Any], rules: tuple[Rule, ...], source: str = STORE_DEFAULT) -> dict:
    """``{"level", "reasons", "rules"}`` of one composed answer's ``results`` (see the module)."""
    reasons, unassessed = [], False
    for rule in rules:
        section = results.get(rule.section) if isinstance(results, Mapping) else None
        if not isinstance(section, Mapping) or "error" in section:
            unassessed = True
            continue
        value = _at(section, rule.field.split(".")[1:])
        if value is _MISSING or value is None:
            unassessed = unassessed or not rule.optional
            continue
        if rule.holds(value):
            reasons.append(rule.reason(value))
    level = URGENT if reasons else NOT_ASSESSED if unassessed or not rules else ROUTINE
    return {"level": level, "reasons": reasons, "rules": source}


def site_source(name: str) -> str:
    """``rules`` of an answer whose rules came from a site profile."""
    return f"site {name}"
