"""``cxrserve site install DIR --store STORE``: put a calibrated profile where serving reads it.

The profile (``DIR/profile.json`` from ``cxrserve site calibrate``) is checked against the
store's archives before anything is written: a profile made for another version or other
weights of an archive in the store is refused with the message to re-calibrate, as serving
would refuse it. It is copied with its reports to ``STORE/sites/<name>/`` through a temporary
folder and one rename, so a worker that starts meanwhile reads the old profile or the new one,
never half of one. ``--default`` makes it the site of requests that name none
(``STORE/sites/sites.json``). Servers read profiles when they start: restart them afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cxrserve.core.priority import PriorityRuleError, parse_rules
from cxrserve.core.site_profile import PROFILE_FILE, ProfileError, archive_info, check_binding, load_profile
from cxrserve.core.sites import SITES_FILE, SITES_FOLDER

#: Files of a calibration folder that go with the profile (the rest, e.g. scored tables, stays).
REPORT_FILES = (PROFILE_FILE, "calibration.html", "audit.json", "report.html")


def check_against_store(profile, store: Path) -> list[str]:
    """The store's archives the profile is bound to, checked; raises ProfileMismatch/ProfileError."""
    checked = []
    for model in profile.archives:
        mar = store / f"{model}.mar"
        if not mar.is_file():
            raise ProfileError(f"site profile {profile.name!r} is bound to {model}, which {store} does not serve")
        check_binding(profile, archive_info(mar))
        checked.append(model)
    return checked


def install(source: str | Path, store: str | Path, *, default: bool = False) -> Path:
    """Check and copy a profile folder into ``store/sites/<name>/``; returns that folder."""
    source, store = Path(source), Path(store)
    profile = load_profile(source)
    if profile.raw.get("priority") is not None:  # a hand-edited rule block fails here, not per study
        try:
            parse_rules(profile.raw["priority"], f"site profile {profile.name!r}: priority")
        except PriorityRuleError as err:
            raise ProfileError(str(err)) from None
    check_against_store(profile, store)
    sites = store / SITES_FOLDER
    sites.mkdir(parents=True, exist_ok=True)
    target = sites / profile.name
    folder = source if source.is_dir() else source.parent
    staging = Path(tempfile.mkdtemp(prefix=f".{profile.name}-", dir=sites))
    try:
        for name in REPORT_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)
        os.chmod(staging, 0o755)
        if target.exists():
            old = sites / f".{profile.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if default:
        set_default(store, profile.name)
    return target


def set_default(store: str | Path, name: str | None) -> None:
    """Name the store's default site (None: no default), written atomically."""
    sites = Path(store) / SITES_FOLDER
    sites.mkdir(parents=True, exist_ok=True)
    tmp = sites / f".{SITES_FILE}.tmp"
    tmp.write_text(json.dumps({"default": name}, indent=2) + "\n")
    os.replace(tmp, sites / SITES_FILE)


def listing(store: str | Path) -> list[dict]:
    """Every installed site with its state against the store's archives (for ``site list``)."""
    from cxrserve.core.sites import SiteBook

    store = Path(store)
    book = SiteBook.load(store / SITES_FOLDER)
    rows = []
    for name in book.names:
        if name in book.refused:
            rows.append({"site": name, "state": "refused", "why": book.refused[name]})
            continue
        profile = book.profiles[name]
        try:
            models = check_against_store(profile, store)
            state, why = "ok", ""
        except ProfileError as err:
            models, state, why = list(profile.archives), "refused", str(err)
        rows.append({"site": name, "state": state, "why": why, "models": models,
                     "default": name == book.default, "ae_titles": list(profile.ae_titles),
                     "created": profile.created})
    return rows
