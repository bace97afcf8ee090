"""The site profiles a store serves with, and a profile applied to one served answer.

``cxrserve site install DIR --store S`` puts a profile at ``S/sites/<name>/profile.json``;
``S/sites/sites.json`` (``{"default": "<name>"}``) may name the site of requests that name
none. Every pipeline reads its store's profiles once, when it loads (a restart picks up new
ones): TorchServe workers from ``$CXRSERVE_SITES`` (``cxrserve serve`` sets it to the store's
``sites/``) or the handler setting ``sites_dir``; in-process pipelines from the ``sites/``
beside the archive they load (:func:`cxrserve.core.loading.load_pipeline`).

A request names its site with the option ``site`` (form field, JSON field, ``X-CXR-Site``
header, v2 input or parameter). A name the store does not have is a 400; a profile made for
another version or other weights of a model (:func:`cxrserve.core.site_profile.check_binding`)
is refused when the worker loads, and a request naming it is a 409 that says to re-calibrate.
No site and no default: the answer is exactly what it was without sites.

A served model says where its answer keeps what a profile recalibrates with a
:class:`SiteOutput` (``Pipeline.SITE_OUTPUT``); :func:`apply_to_answer` replaces those fields
with the site's and keeps the served ones under ``uncalibrated``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cxrserve.core.errors import CXRInputError, MalformedInput
from cxrserve.core.site_profile import (PROFILE_FILE, ArchiveBinding, ProfileError, ProfileMismatch, SiteProfile,
                                        apply, check_binding, load_profile)

log = logging.getLogger(__name__)

#: Request option naming the site (also the header ``X-CXR-Site``).
SITE_OPTION = "site"
#: Environment variable giving a TorchServe worker its store's ``sites/`` folder.
SITES_ENV = "CXRSERVE_SITES"
#: Folder of a store holding one sub-folder per installed site.
SITES_FOLDER = "sites"
#: File in that folder naming the store's default site.
SITES_FILE = "sites.json"
#: Digits of the profile digest an answer names (enough to tell two profiles apart).
DIGEST_CHARS = 16
#: What a site name looks like (its folder under ``sites/``).
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_NAME = SITE_NAME


class SiteProfileRefused(CXRInputError):
    """409: the site's profile was made for another archive; the message says to re-calibrate."""

    status = 409
    code = "site_profile_mismatch"


@dataclass(frozen=True)
class SiteOutput:
    """Where a served model's answer keeps what a site profile recalibrates.

    ``kind`` is the profile's (:data:`cxrserve.core.site_profile.KINDS`); ``scores`` is the
    field with the probabilities (a ``{label: p}`` map; binary: one number); ``answer`` the
    field with the coded answer the scores decide, if the model has one; ``threshold`` the field
    with a binary model's served cut-off, which a site threshold replaces.
    """

    kind: str
    scores: str
    answer: str | None = None
    threshold: str | None = None


#: digests of the profiles this process loaded, by identity (a profile is immutable once loaded)
_DIGESTS: dict[int, tuple[SiteProfile, str]] = {}


def profile_digest(profile: SiteProfile) -> str:
    """Which profile answered: the first :data:`DIGEST_CHARS` hex of the sha256 of its content
    (computed once per loaded profile: a profile with its cross-validation tables is ~50 KB)."""
    known = _DIGESTS.get(id(profile))
    if known is not None and known[0] is profile:
        return known[1]
    raw = json.dumps(profile.raw, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(raw).hexdigest()[:DIGEST_CHARS]
    _DIGESTS[id(profile)] = (profile, digest)
    return digest


class SiteBook:
    """The profiles one pipeline serves with: usable ones, refused ones (why), the default."""

    def __init__(self, profiles: dict[str, SiteProfile] | None = None, refused: dict[str, str] | None = None,
                 default: str | None = None, folder: Path | None = None):
        self.profiles = dict(profiles or {})
        self.refused = dict(refused or {})
        self.default = default
        self.folder = folder

    @classmethod
    def empty(cls) -> "SiteBook":
        return cls()

    @classmethod
    def load(cls, folder: str | Path | None, model: str = "",
             binding: Callable[[], ArchiveBinding] | None = None) -> "SiteBook":
        """Every ``<folder>/<name>/profile.json`` that reads; one made for another version or other
        weights of ``model`` is refused (kept by name with the reason, logged). ``binding`` gives
        the model's :class:`ArchiveBinding`, computed only when a profile is bound to ``model``
        (it hashes the weights)."""
        if not folder:
            return cls()
        folder = Path(folder)
        if not folder.is_dir():
            return cls(folder=folder)
        profiles, refused = {}, {}
        bound: list[ArchiveBinding] = []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / PROFILE_FILE).is_file()):
            try:
                profile = load_profile(sub)
                if profile.name != sub.name:
                    raise ProfileError(f"{sub / PROFILE_FILE}: profile of site {profile.name!r} "
                                       f"installed as {sub.name!r}: install it with cxrserve site install")
                if binding is not None and model in profile.archives:
                    if not bound:
                        bound.append(binding())
                    check_binding(profile, bound[0])
            except ProfileMismatch as err:
                refused[sub.name] = str(err)
            except ProfileError as err:
                refused[sub.name] = f"site profile {sub.name!r} cannot be read: {err}"
            else:
                profiles[profile.name] = profile
                continue
            log.warning("site profile refused: %s", refused[sub.name])
        default = None
        if (folder / SITES_FILE).is_file():
            try:
                default = json.loads((folder / SITES_FILE).read_text()).get("default") or None
            except (json.JSONDecodeError, AttributeError) as err:
                raise ProfileError(f"{folder / SITES_FILE}: not a json object ({err})") from None
            if default is not None and default not in profiles and default not in refused:
                refused[str(default)] = (f"the store's default site {default!r} has no profile in {folder}: "
                                         f"install it (cxrserve site install) or change {SITES_FILE}")
        return cls(profiles, refused, default, folder)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted({*self.profiles, *self.refused}))

    def resolve(self, name: Any) -> SiteProfile | None:
        """The profile a request's ``site`` option names (the default when it names none).

        Raises :class:`MalformedInput` (400) for a site this store does not have and
        :class:`SiteProfileRefused` (409) for one whose profile was refused.
        """
        if isinstance(name, (bytes, bytearray)):
            name = name.decode("utf-8", "replace")
        text = str(name).strip() if name is not None else ""
        if not text:
            if self.default is None:
                return None
            text = self.default
        if text in self.refused:
            raise SiteProfileRefused(self.refused[text])
        if text not in self.profiles:
            shown = text if _NAME.match(text) else "(not a site name)"
            known = (f"this store's sites are {', '.join(sorted(self.profiles))}" if self.profiles
                     else "this store has no site profiles installed")
            raise MalformedInput(f"unknown site {shown!r}: {known} (cxrserve site install DIR --store STORE)")
        return self.profiles[text]

    def describe(self) -> dict:
        return {"sites": {n: {"profile": profile_digest(p), "created": p.created} for n, p in self.profiles.items()},
                "refused": dict(self.refused), "default": self.default}


def sites_folder(config: dict) -> Path | None:
    """Where a pipeline finds its store's profiles: handler ``sites_dir`` (empty: none), else
    ``$CXRSERVE_SITES``, else none."""
    if "sites_dir" in config:
        value = config["sites_dir"]
        return Path(value) if value else None
    env = os.environ.get(SITES_ENV)
    return Path(env) if env else None


def apply_to_answer(answer: dict, profile: SiteProfile, model: str, output: SiteOutput | None) -> dict:
    """``answer`` under ``profile``: recalibrated fields, ``site``, ``operating_point``,
    ``site_profile`` and the served values under ``uncalibrated``. A model the profile does not
    calibrate only gains ``site``."""
    answer["site"] = profile.name
    family = next((f for f in profile.families.values() if f.model == model), None)
    if family is None or output is None:
        return answer
    served_scores = answer[output.scores]
    if output.kind == "binary":
        probs = {family.labels[0]: float(served_scores)}
    else:
        probs = {k: float(v) for k, v in served_scores.items()}
    calibrated, label, op = apply(profile, family.family, probs)
    uncalibrated: dict[str, Any] = {output.scores: served_scores}
    if output.kind == "binary":
        answer[output.scores] = round(calibrated[family.labels[0]], 6)
        site_t = family.thresholds.get(family.labels[0])
        if output.threshold and output.threshold in answer and site_t is not None:
            uncalibrated[output.threshold] = answer[output.threshold]
            answer[output.threshold] = round(float(site_t["threshold"]), 6)
    else:
        answer[output.scores] = {k: round(float(calibrated[k]), 6) for k in served_scores}
    if output.answer and output.answer in answer:
        uncalibrated[output.answer] = answer[output.answer]
        answer[output.answer] = list(label) if isinstance(label, tuple) else label
    answer["operating_point"] = op
    answer["site_profile"] = profile_digest(profile)
    answer["uncalibrated"] = uncalibrated
    return answer
