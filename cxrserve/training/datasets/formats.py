"""Readers of public collections in their own formats: covid-chestxray, NIH, Kermany."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from cxrserve.training.datasets.records import (
    Record,
    _adult_from_age,
    _frontal_from_view,
    _parse_float,
    _parse_survival,
    _read_csv,
    finding_to_label,
    kermany_patient,
    normalize_view,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- public formats
def covid_chestxray_metadata(csv_path: str | os.PathLike, images_dir: str | os.PathLike, *,
                             source: str = "ieee8023", severity_csv: str | os.PathLike | None = None) -> list[Record]:
    """Read the public ieee8023/covid-chestxray-dataset ``metadata.csv``.

    Keeps X-ray rows only (``modality == "X-ray"``; CT rows dropped). ``finding`` is
    mapped with :func:`finding_to_label` (``"Pneumonia/Viral/COVID-19"`` -> ``covid``);
    ``report`` is ``clinical_notes``; ``survival`` Y/N -> 1/0. Rows whose file is missing
    from ``images_dir`` are skipped and counted in a warning.

    Args:
        csv_path: path of ``metadata.csv``.
        images_dir: folder holding the files named in the ``filename`` column (a
            ``folder`` column, e.g. ``images``, is tried too).
        source: source name for the records.
        severity_csv: optional ``covid-severity-scores.csv`` (columns ``filename``,
            ``geographic_extent_mean``, ``opacity_mean``; ``#`` comment lines allowed).

    Returns:
        the records, in csv order.
    """
    images_dir = Path(images_dir).resolve()
    rows = _read_csv(Path(csv_path))
    severity: dict[str, tuple[float | None, float | None]] = {}
    if severity_csv is not None:
        with open(severity_csv, newline="", encoding="utf-8-sig") as fh:
            lines = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
        for r in csv.DictReader(lines):
            severity[(r.get("filename") or "").strip()] = (
                _parse_float(r.get("geographic_extent_mean")), _parse_float(r.get("opacity_mean")))

    out: list[Record] = []
    missing = 0
    for row in rows:
        modality = (row.get("modality") or "").strip().lower().replace("-", "").replace(" ", "")
        if modality and modality != "xray":
            continue
        fname = (row.get("filename") or "").strip()
        candidates = [images_dir / fname]
        if row.get("folder"):
            candidates.append(images_dir / row["folder"].strip() / fname)
            candidates.append(images_dir.parent / row["folder"].strip() / fname)
        path = next((c for c in candidates if fname and c.is_file()), None)
        if path is None:
            missing += 1
            continue
        view = normalize_view(row.get("view", ""))
        pid = (row.get("patientid") or "").strip() or f"img:{fname}"
        ge, op = severity.get(fname, (None, None))
        out.append(
            Record(
                path=path,
                source=source,
                label=finding_to_label(row.get("finding", "")),
                patient_id=pid,
                view=view,
                is_frontal=_frontal_from_view(view),
                geographic_extent=ge,
                opacity=op,
                survival=_parse_survival(row.get("survival")),
                is_adult=_adult_from_age(row.get("age")),
                report=(row.get("clinical_notes") or "").strip(),
                extras={k: (v or "") for k, v in row.items() if k not in ("filename",) and k is not None},
                filename=fname,
            )
        )
    if missing:
        log.warning("%s: skipped %d X-ray rows whose image file is missing", source, missing)
    return out


def _index_files(root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            index.setdefault(f, Path(dirpath) / f)
    return index


def nih_data_entry(csv_path: str | os.PathLike, images_dir: str | os.PathLike, *,
                   source: str = "nih") -> list[Record]:
    """Read NIH ChestX-ray14 ``Data_Entry_2017.csv``.

    Label: ``"normal"`` for ``No Finding``, ``"pneumonia"`` when ``Pneumonia`` is among
    the ``|``-separated findings, else the raw finding string (e.g.
    ``"Effusion|Infiltration"``). All ChestX-ray14 images are frontal (AP/PA).
    Images are looked up in ``images_dir`` and, failing that, anywhere below it (the
    official release spreads them over ``images_001/images`` ...).

    Args:
        csv_path: path of ``Data_Entry_2017.csv``.
        images_dir: folder holding the PNGs (searched recursively if needed).
        source: source name for the records.

    Returns:
        the records whose image exists, in csv order.
    """
    images_dir = Path(images_dir).resolve()
    rows = _read_csv(Path(csv_path))
    index: dict[str, Path] | None = None
    out: list[Record] = []
    missing = 0
    for row in rows:
        fname = (row.get("Image Index") or "").strip()
        path = images_dir / fname
        if not path.is_file():
            if index is None:
                index = _index_files(images_dir)
            path = index.get(fname)  # type: ignore[assignment]
            if path is None:
                missing += 1
                continue
        findings = [f.strip() for f in (row.get("Finding Labels") or "").split("|") if f.strip()]
        raw = "|".join(findings)
        if findings == ["No Finding"]:
            label = "normal"
        elif "Pneumonia" in findings:
            label = "pneumonia"
        else:
            label = raw
        view = normalize_view(row.get("View Position", ""))
        age = (row.get("Patient Age") or "").strip().rstrip("Yy")  # old releases wrote "058Y"
        out.append(
            Record(
                path=path,
                source=source,
                label=label,
                patient_id=(row.get("Patient ID") or "").strip().lstrip("0") or f"img:{fname}",
                view=view,
                is_frontal=True,
                is_adult=_adult_from_age(age),
                extras={k: (v or "") for k, v in row.items() if k is not None and k != "Image Index"},
                filename=str(path.relative_to(images_dir)),
            )
        )
    if missing:
        log.warning("%s: skipped %d rows whose image file is missing", source, missing)
    return out


_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def kermany_tree(root: str | os.PathLike, *, source: str = "kermany") -> list[Record]:
    """Read the Kermany et al. 2018 layout ``root/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg``.

    Patient from the file name (:func:`kermany_patient`); ``extras`` holds ``split``
    (the original folder) and ``pneumonia_type`` (``bacteria`` / ``virus`` / ``""``).
    All images are paediatric frontal films (``is_adult=False``, ``is_frontal=True``). The original train/test/val folders
    are NOT patient-disjoint in every release: use :func:`patient_split`.

    Args:
        root: folder holding ``train``, ``test`` and/or ``val``.
        source: source name for the records.

    Returns:
        records sorted by relative path.
    """
    root = Path(root).resolve()
    out: list[Record] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        rel = path.relative_to(root)
        parts = [p.upper() for p in rel.parts[:-1]]
        if "NORMAL" in parts:
            label = "normal"
        elif "PNEUMONIA" in parts:
            label = "pneumonia"
        else:
            continue
        split = next((p.lower() for p in rel.parts[:-1] if p.lower() in ("train", "test", "val")), "")
        low = path.name.lower()
        ptype = "bacteria" if "bacteria" in low else "virus" if "virus" in low else ""
        pid = kermany_patient(path.name) or f"img:{rel.as_posix()}"
        out.append(
            Record(
                path=path, source=source, label=label, patient_id=pid, is_frontal=True, is_adult=False,
                extras={"split": split, "pneumonia_type": ptype}, filename=rel.as_posix(),
            )
        )
    return out
