"""Site profiles: what ``cxrserve site calibrate`` fitted for one hospital, and the pure math
that applies it to a family's probabilities at run time.

A profile (``<dir>/profile.json``, written by :mod:`cxrserve.tools.site.calibrate`) holds, per
family (``triage``, ``mortality``, ...), up to three steps that serving applies in this order:

1. **calibration**: ``temperature`` (multi-class: ``softmax(log p / T)``) or ``platt`` (binary and
   multi-label, per label: ``sigmoid(a logit(p) + b)``);
2. **prior shift**: the site's class priors against the reference priors the calibrated
   probabilities assume (Saerens et al. 2002: ``p'(c|x) ∝ p(c|x) π_site(c) / π_ref(c)``);
3. **operating points**: per-label thresholds on the adjusted probability, each named (e.g.
   ``stmary:covid19.sensitivity>=0.90``); without one the family's own rule stands (``argmax``,
   the card's threshold).

It is bound to the archives it was fitted with (:func:`archive_info`, :func:`check_binding`):
a profile made for another archive version or other weights is refused, since its thresholds
mean nothing for a different model. Only numpy here: TorchServe workers, the KServe server,
batch jobs and the DICOM node import this module (core layer).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: File name of a profile inside its folder.
PROFILE_FILE = "profile.json"
#: ``format`` field of a profile this code reads.
PROFILE_FORMAT = "cxrserve-site-profile/1"
#: Family output kinds: one softmax over labels, one binary risk, independent labels.
KINDS = ("multiclass", "binary", "multilabel")
#: Files of an archive whose bytes decide what it answers (weights, cards, handler settings).
_CONTENT_NAMES = ("metadata.json", "model.pt", "model.onnx")
#: The input gate's component folder: shipped in every archive, not part of a model's version.
GATE = "gate"
_EPS = 1e-7
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class ProfileError(ValueError):
    """A profile folder that cannot be read or does not fit this code."""


class ProfileMismatch(ProfileError):
    """A profile made for another archive (version or weights digest)."""


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ArchiveBinding:
    """The archive a profile was fitted with: served name, version (MANIFEST) and digests."""

    model: str
    version: str
    content_sha256: str  # over its components' cards and weights (component_digest)
    sha256: str | None = None  # of the .mar file itself, when the profile was fitted from one


@dataclass(frozen=True)
class FamilyProfile:
    """One family's fitted steps (any of them may be absent: that step is left as served)."""

    family: str
    model: str
    kind: str
    labels: tuple[str, ...]
    #: ``{"method": "temperature", "T": 1.3}`` or ``{"method": "platt", "params": {label: [a, b]}}``
    calibration: Mapping[str, Any] | None = None
    #: ``{"reference": {label: π}, "site": {label: π}, "source": "..."}``
    prior: Mapping[str, Any] | None = None
    #: ``{label: {"threshold": t, "operating_point": name}}``
    thresholds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: the family's own decision rule when a label has no site threshold: binary/multilabel
    #: thresholds ``{label: t}`` (multiclass: argmax)
    served_thresholds: Mapping[str, float] = field(default_factory=dict)
    #: binary families answer in their own words (``mortality``: ``{"positive": "high", "negative": "low"}``)
    answer_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteProfile:
    name: str
    archives: Mapping[str, ArchiveBinding]
    families: Mapping[str, FamilyProfile]
    #: ``{"model": "cxr-triage", "threshold": t, "max_refusal": 0.02}`` or None (archive default)
    gate: Mapping[str, Any] | None = None
    ae_titles: tuple[str, ...] = ()
    created: str = ""
    path: Path | None = None
    #: the whole json (cross-validated numbers, notes) for reports
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------- loading
def _need(data: Mapping, key: str, kind, where: str):
    if key not in data:
        raise ProfileError(f"{where}: missing {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        raise ProfileError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _family_from_dict(name: str, d: Mapping) -> FamilyProfile:
    where = f"profile family {name!r}"
    kind = _need(d, "kind", str, where)
    if kind not in KINDS:
        raise ProfileError(f"{where}: kind {kind!r} is not one of {KINDS}")
    labels = tuple(str(x) for x in _need(d, "labels", list, where))
    if not labels:
        raise ProfileError(f"{where}: no labels")
    calib = d.get("calibration")
    if calib is not None:
        method = calib.get("method")
        if method == "temperature":
            t = float(calib.get("T", 0))
            if not (t > 0 and math.isfinite(t)):
                raise ProfileError(f"{where}: temperature must be > 0, got {calib.get('T')!r}")
        elif method == "platt":
            params = calib.get("params") or {}
            bad = [k for k in params if k not in labels]
            if bad:
                raise ProfileError(f"{where}: platt parameters for unknown labels {bad}")
        else:
            raise ProfileError(f"{where}: unknown calibration method {method!r}")
    prior = d.get("prior")
    if prior is not None:
        for part in ("reference", "site"):
            vals = prior.get(part) or {}
            if (set(vals) != set(labels)) if kind == "multiclass" else not set(vals) <= set(labels):
                raise ProfileError(f"{where}: prior {part} must give every label (multiclass) or known labels")
            if any(not (0 < float(v) < 1) for v in vals.values()):
                raise ProfileError(f"{where}: prior {part} values must lie in (0, 1)")
    thresholds = d.get("thresholds") or {}
    for label, op in thresholds.items():
        if label not in labels:
            raise ProfileError(f"{where}: threshold for unknown label {label!r}")
        if not 0 <= float(op.get("threshold", -1)) <= 1:
            raise ProfileError(f"{where}: threshold of {label!r} must lie in [0, 1]")
    return FamilyProfile(
        family=name, model=str(d.get("model", "")), kind=kind, labels=labels, calibration=calib, prior=prior,
        thresholds={k: dict(v) for k, v in thresholds.items()},
        served_thresholds={k: float(v) for k, v in (d.get("served_thresholds") or {}).items()},
        answer_labels=dict(d.get("answer_labels") or {}),
    )


def profile_from_dict(data: Mapping, path: Path | None = None) -> SiteProfile:
    """Build a :class:`SiteProfile` from its json (raises :class:`ProfileError` naming the field)."""
    where = str(path or "profile")
    if data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{where}: format {data.get('format')!r} is not {PROFILE_FORMAT!r}: "
                           "re-calibrate with this cxrserve (cxrserve site calibrate)")
    name = _need(data, "site", str, where)
    if not _NAME.match(name):
        raise ProfileError(f"{where}: site name {name!r} must be lower-case letters, digits, '-' or '_'")
    archives = {}
    for model, a in _need(data, "archives", dict, where).items():
        archives[model] = ArchiveBinding(model=model, version=str(_need(a, "version", str, f"{where} archive {model}")),
                                         content_sha256=str(_need(a, "content_sha256", str, f"{where} archive {model}")),
                                         sha256=a.get("sha256"))
    fams = {n: _family_from_dict(n, f) for n, f in _need(data, "families", dict, where).items()}
    for fam in fams.values():
        if fam.model not in archives:
            raise ProfileError(f"{where}: family {fam.family!r} names archive {fam.model!r} that it is not bound to")
    gate = data.get("gate")
    if gate is not None and not 0 <= float(gate.get("threshold", -1)) <= 1:
        raise ProfileError(f"{where}: gate threshold must lie in [0, 1]")
    return SiteProfile(name=name, archives=archives, families=fams, gate=gate,
                       ae_titles=tuple(str(a) for a in data.get("ae_titles") or ()),
                       created=str(data.get("created", "")), path=path, raw=dict(data))


def load_profile(folder: str | Path) -> SiteProfile:
    """Read ``<folder>/profile.json`` (or the file itself) into a :class:`SiteProfile`."""
    path = Path(folder)
    if path.is_dir():
        path = path / PROFILE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"no site profile at {path}") from None
    except json.JSONDecodeError as err:
        raise ProfileError(f"{path}: not valid json ({err})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a json object")
    return profile_from_dict(data, path)


# --------------------------------------------------------------------------- binding
def _sha256_stream(fh, h=None):
    h = h or hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h


def _content_entry(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) == 2 and parts[1] in _CONTENT_NAMES


def component_digest(digests: Mapping[str, str]) -> str:
    """One digest over ``{"<component>/<file>": sha256}`` (cards and weights of the components a
    model reads): the same from a ``.mar``, its unpacked folder, or the same components packed
    into ``cxr-study``, so one profile serves a model alone and in a study."""
    h = hashlib.sha256()
    for rel in sorted(digests):
        h.update(f"{rel}\0{digests[rel]}\n".encode())
    return h.hexdigest()


def folder_digests(folders: Mapping[str, Path]) -> dict[str, str]:
    """``{"<component>/<file>": sha256}`` of each component folder's card and weights."""
    out = {}
    for name, folder in folders.items():
        for fname in _CONTENT_NAMES:
            f = Path(folder) / fname
            if f.is_file():
                with open(f, "rb") as fh:
                    out[f"{name}/{fname}"] = _sha256_stream(fh).hexdigest()
    return out


def cards_version(cards: Mapping[str, Mapping]) -> str:
    """A model's version as a pipeline states it: its components' card versions (the shared input
    gate left out), sorted and joined with ``+``."""
    versions = sorted({str(c.get("version", "")) for name, c in cards.items() if name != GATE})
    return "+".join(versions) if versions else "unknown"


def archive_info(path: str | Path) -> ArchiveBinding:
    """Name, version and digests of an archive (``.mar``) or of its unpacked folder.

    ``version`` is what the served pipeline states (:func:`cards_version`); ``content_sha256``
    is :func:`component_digest` over every component folder of the archive, which is what a
    worker computes for that model (``Pipeline.binding``); ``sha256`` hashes the ``.mar`` file.
    """
    path = Path(path)
    digests: dict[str, str] = {}
    cards: dict[str, dict] = {}
    spec = None
    mar_sha = None
    if path.is_file():
        with open(path, "rb") as fh:
            mar_sha = _sha256_stream(fh).hexdigest()
        with zipfile.ZipFile(path) as zf:
            for rel in zf.namelist():
                if rel == "pipeline.json":
                    spec = json.loads(zf.read(rel))
                elif _content_entry(rel):
                    with zf.open(rel) as fh:
                        digests[rel] = _sha256_stream(fh).hexdigest()
                    if rel.endswith("/metadata.json"):
                        cards[rel.split("/")[0]] = json.loads(zf.read(rel))
    elif path.is_dir():
        for f in sorted(path.glob("*/*")):
            rel = f.relative_to(path).as_posix()
            if f.is_file() and _content_entry(rel):
                with open(f, "rb") as fh:
                    digests[rel] = _sha256_stream(fh).hexdigest()
                if rel.endswith("/metadata.json"):
                    cards[rel.split("/")[0]] = json.loads(f.read_text())
        if (path / "pipeline.json").is_file():
            spec = json.loads((path / "pipeline.json").read_text())
    else:
        raise ProfileError(f"no archive at {path}")
    if spec is None:
        raise ProfileError(f"{path}: no pipeline.json, not a cxrserve archive")
    name = str(spec.get("name") or path.stem)
    return ArchiveBinding(model=name, version=cards_version(cards), content_sha256=component_digest(digests),
                          sha256=mar_sha)


def check_binding(profile: SiteProfile, archive: ArchiveBinding) -> None:
    """Refuse a profile made for another version or other weights of ``archive.model``.

    Raises :class:`ProfileMismatch` with a message that says to re-calibrate. A model the
    profile does not cover is not an error (its answers stay as served).
    """
    bound = profile.archives.get(archive.model)
    if bound is None:
        return
    what = []
    if bound.version != archive.version:
        what.append(f"version {bound.version} (now {archive.version})")
    if bound.content_sha256 != archive.content_sha256:
        what.append(f"weights digest {bound.content_sha256[:12]} (now {archive.content_sha256[:12]})")
    # A rebuilt .mar with the same weights and cards (another sha256 of the file, new handler
    # code) answers the same numbers, so only version and content digest bind.
    if what:
        raise ProfileMismatch(
            f"site profile {profile.name!r} was calibrated for {archive.model} {', '.join(what)}: "
            f"re-calibrate it for this archive (cxrserve site calibrate DATA --site-file SITE.yaml --out DIR)")


# --------------------------------------------------------------------------- math
def _clip(p):
    return np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)


def logit(p):
    p = _clip(p)
    return np.log(p) - np.log1p(-p)


def sigmoid(z):
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def temperature_scale(probs, temperature: float):
    """``softmax(log p / T)`` over the last axis (``T > 1`` softens, ``< 1`` sharpens)."""
    z = np.log(_clip(probs)) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def platt(p, a: float, b: float):
    """``sigmoid(a logit(p) + b)``."""
    return sigmoid(float(a) * logit(p) + float(b))


def shift_priors(probs, reference, site):
    """Prior shift of multi-class posteriors: ``p(c|x) π_site(c) / π_ref(c)``, renormalised.

    ``probs`` is ``(..., C)``; ``reference`` and ``site`` are length-C priors.
    """
    w = np.asarray(site, dtype=np.float64) / np.asarray(reference, dtype=np.float64)
    q = _clip(probs) * w
    return q / q.sum(axis=-1, keepdims=True)


def shift_binary(p, reference: float, site: float):
    """Prior shift of a binary P(positive): the two-class case of :func:`shift_priors`."""
    p = _clip(p)
    q1 = p * site / reference
    q0 = (1 - p) * (1 - site) / (1 - reference)
    return q1 / (q0 + q1)


def adjust(family: FamilyProfile, probs: np.ndarray) -> np.ndarray:
    """Calibration then prior shift of an ``(N, C)`` array in ``family.labels`` order."""
    p = np.asarray(probs, dtype=np.float64)
    calib = family.calibration
    if calib is not None:
        if calib["method"] == "temperature":
            p = temperature_scale(p, calib["T"]) if family.kind == "multiclass" else p
        else:
            p = p.copy()
            for j, label in enumerate(family.labels):
                if label in calib.get("params", {}):
                    a, b = calib["params"][label]
                    p[..., j] = platt(p[..., j], a, b)
    if family.prior is not None:
        ref, site = family.prior["reference"], family.prior["site"]
        if family.kind == "multiclass":
            p = shift_priors(p, [ref[c] for c in family.labels], [site[c] for c in family.labels])
        else:
            p = p.copy()
            for j, label in enumerate(family.labels):
                if label in site:
                    p[..., j] = shift_binary(p[..., j], float(ref[label]), float(site[label]))
    return p


def decide(family: FamilyProfile, p: np.ndarray) -> tuple[Any, str]:
    """The label for one adjusted probability vector and the operating point that chose it.

    * multiclass: labels whose probability reaches their site threshold are candidates, the one
      furthest above its threshold wins (a lowered COVID-19 threshold therefore overrides a
      larger pneumonia probability: that is what a sensitivity target asks); with no candidate,
      argmax over the labels without a site threshold (a raised threshold keeps its label out),
      or over all labels when every label has one.
    * binary: ``answer_labels.positive`` when P(positive) reaches the site threshold, else the
      served one; otherwise ``negative``.
    * multilabel: the tuple of labels at or above their threshold (site, else served, else 0.5).
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    labels = family.labels
    site = {k: float(v["threshold"]) for k, v in family.thresholds.items()}
    names = {k: str(v.get("operating_point", k)) for k, v in family.thresholds.items()}
    if family.kind == "multiclass":
        cands = [(p[j] - site[c], c) for j, c in enumerate(labels) if c in site and p[j] >= site[c]]
        if cands:
            label = max(cands)[1]
            return label, names[label]
        free = [j for j, c in enumerate(labels) if c not in site] or list(range(len(labels)))
        j = max(free, key=lambda k: p[k])
        return labels[j], "argmax"
    if family.kind == "binary":
        label = labels[0]
        t = site.get(label, family.served_thresholds.get(label, 0.5))
        positive = bool(p[0] >= t)
        word = family.answer_labels.get("positive" if positive else "negative", label if positive else f"not:{label}")
        return word, names.get(label, "served")
    out, used = [], []
    for j, c in enumerate(labels):
        t = site.get(c, family.served_thresholds.get(c, 0.5))
        if p[j] >= t:
            out.append(c)
        if c in site:
            used.append(names[c])
    return tuple(out), ",".join(used) or "served"


def apply(profile: SiteProfile, family: str, probabilities: Mapping[str, float]):
    """A family's answer under a site profile: ``(calibrated probabilities, label, operating point)``.

    ``probabilities`` maps each of the family's labels to the served probability (triage's
    ``probabilities``; mortality's ``{"died": risk}``). Labels the profile does not know are
    passed through untouched. A family the profile does not cover raises KeyError: the caller
    then answers as served. Pure: the caller keeps the uncalibrated probabilities beside these.
    """
    fam = profile.families[family]
    missing = [c for c in fam.labels if c not in probabilities]
    if missing:
        raise ProfileError(f"site {profile.name!r}, family {family!r}: no probability for {missing}")
    vec = np.array([[float(probabilities[c]) for c in fam.labels]])
    adj = adjust(fam, vec)[0]
    label, op = decide(fam, adj)
    calibrated = dict(probabilities)
    calibrated.update({c: float(v) for c, v in zip(fam.labels, adj)})
    return calibrated, label, op
