"""Chest X-ray datasets: flat records, folder readers, public-format adapters, patient splits.

Every image becomes one :class:`Record` (path, source, raw label, patient, view, masks,
severity scores, survival, ...). Readers exist for

* the shared layout used by ``../shared/data`` and by the project's own phantom folders:
  ``root/labels.csv`` whose first two columns are ``filename,label`` (paths relative to
  ``root``) followed by optional, source-specific columns (:func:`read_folder`,
  :func:`read_shared`);
* three public formats: the ieee8023 covid-chestxray-dataset ``metadata.csv``
  (:func:`covid_chestxray_metadata`), NIH ChestX-ray14 ``Data_Entry_2017.csv``
  (:func:`nih_data_entry`) and the Kermany et al. folder tree (:func:`kermany_tree`).

Splits are always by patient (:func:`patient_split`, :func:`repeated_patient_splits`,
:func:`patient_kfold`). A patient is the pair ``(source, patient_id)``, so equal ids in
different sources are different people, unless a record names other patient keys in
``Record.links`` (the same person published twice under two ids, or the same image in
two collections): linked keys are merged into one group and always land in the same
part. :func:`find_duplicates` / :func:`link_duplicates` build such links from image
content, and :func:`read_shared` applies them by default.

Design follows torchxrayvision's datasets (one record per image, label mapping kept
apart from pixel loading) without its size: pixels are read only by
:class:`RecordDataset`, whose loader the caller can replace.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

try:  # torch is a hard dependency of the project, but keep the pure-metadata part importable
    from torch.utils.data import Dataset as _TorchDataset
except Exception:  # pragma: no cover - torch missing
    _TorchDataset = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

CLASS_LABELS = ("covid19", "normal", "pneumonia")
"""Triage classifier labels, in output order."""

# Folders of the shared data tree that hold no labelled image folder in the common layout.
NON_IMAGE_FOLDERS = ("dicom_samples", "fullres")

# Column names understood by read_folder, per field, first match wins.
_PATIENT_COLUMNS = ("patient_id", "patientid", "Patient ID", "kermany_patient_key")
_VIEW_COLUMNS = ("view", "view_position", "View Position")
_DEFAULT_MASK_COLUMNS = ("mask", "lung_mask", "mask_v7labs", "mask_generalblockchain_lungs")
"""Ground-truth lung masks, in order of preference. ``mask_lungVAE`` (model-predicted) is
deliberately absent: pass ``mask_column="mask_lungVAE"`` to use it."""

# Per-source facts that the csv does not state (from CATALOG.md).
_SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "kermany_pediatric_subset": {"is_adult": False, "is_frontal": True},
    "openist_normal_lungmasks": {"is_adult": True, "view": "PA", "is_frontal": True},
    "nih_cxr8_darkcovidnet": {"is_frontal": True},
}

_TRUE = {"1", "y", "yes", "true", "t"}
_FALSE = {"0", "n", "no", "false", "f"}


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """One image and what is known about it.

    ``extras`` holds every csv column other than ``filename`` and ``label``, as the raw
    strings, including those that were parsed into fields (so nothing is lost).
    ``filename`` is the path as written in the csv (relative to the folder root); it is
    what :func:`fingerprint` hashes. ``mask_source`` names the column the mask came from.
    ``links`` lists other ``(source, patient_id)`` keys known to be the same person.
    """

    path: Path
    source: str
    label: str
    patient_id: str
    view: str = ""
    is_frontal: bool | None = None
    mask_path: Path | None = None
    geographic_extent: float | None = None
    opacity: float | None = None
    survival: int | None = None
    is_adult: bool | None = None
    report: str = ""
    extras: Mapping[str, str] = field(default_factory=dict)
    filename: str = ""
    mask_source: str = ""
    links: tuple[tuple[str, str], ...] = ()

    @property
    def triage_label(self) -> str | None:
        """The label mapped onto :data:`CLASS_LABELS`, or None if it has no place there.

        covid -> ``covid19``; bacterial / viral / fungal / unspecified pneumonia ->
        ``pneumonia``; normal / No Finding -> ``normal``; anything else (``other``, ARDS,
        lateral, non-chest, ...) -> None. Non-frontal images (``is_frontal is False``)
        are None too: the triage model only scores frontal films. For the ambiguous
        ``other_pneumonia_or_ards`` class of ``gb_covid_segmentations`` the original
        ieee8023 finding (extras column ``ieee8023_finding``) decides.
        """
        if self.is_frontal is False:
            return None
        mapped = triage_label_for(self.label)
        if mapped is None and _norm_label(self.label) in _AMBIGUOUS_LABELS:
            finding = self.extras.get("ieee8023_finding") or self.extras.get("finding") or ""
            mapped = triage_label_for(finding_to_label(finding)) if finding else None
        return mapped

    @property
    def patient_key(self) -> tuple[str, str]:
        """``(source, patient_id)``: the identity used by the patient splits."""
        return (self.source, self.patient_id)

    @property
    def relpath(self) -> str:
        """``source/filename``: a machine-independent name for the image."""
        return f"{self.source}/{self.filename or self.path.name}"


_AMBIGUOUS_LABELS = {"other_pneumonia_or_ards"}
_PNEUMONIA_LABELS = {
    "pneumonia", "bacterial", "viral", "fungal", "unspecified_pneumonia",
    "bacterial_pneumonia", "viral_pneumonia", "fungal_pneumonia",
    "pneumonia_bacterial", "pneumonia_viral", "pneumonia_fungal", "pneumonia_unspecified",
    "pneumonia_bacteria", "pneumonia_virus", "bacteria", "virus",
}
_COVID_LABELS = {"covid", "covid19", "covid_19", "sars_cov_2", "pneumonia_viral_covid_19"}
_NORMAL_LABELS = {"normal", "no_finding", "no_findings", "nofinding"}


def _norm_label(label: str) -> str:
    return re.sub(r"[\s\-/,]+", "_", str(label).strip().lower()).strip("_")


def triage_label_for(label: str) -> str | None:
    """Map a raw label string onto :data:`CLASS_LABELS` (see :attr:`Record.triage_label`).

    Args:
        label: raw label as in a ``labels.csv`` (case and separators are ignored).

    Returns:
        ``"covid19"``, ``"normal"``, ``"pneumonia"`` or None.
    """
    key = _norm_label(label)
    if key in _COVID_LABELS:
        return "covid19"
    if key in _NORMAL_LABELS:
        return "normal"
    if key in _PNEUMONIA_LABELS:
        return "pneumonia"
    return None


# ieee8023 finding vocabulary (flat names of the 2020 releases and the later
# hierarchical "Pneumonia/Viral/COVID-19" form) -> labels used in ../shared/data.
_VIRAL = {"sars", "mers", "mers_cov", "varicella", "influenza", "herpes", "h1n1", "rsv", "viral"}
_BACTERIAL = {
    "streptococcus", "klebsiella", "legionella", "mycoplasma", "mycoplasma_bacterial_pneumonia",
    "staphylococcus", "e.coli", "e_coli", "ecoli", "chlamydophila", "nocardia", "bacterial",
    "pseudomonas", "haemophilus",
}
_FUNGAL = {"pneumocystis", "aspergillosis", "candida", "histoplasmosis", "fungal", "cryptococcus"}
_OTHER = {"ards", "lipoid", "tuberculosis", "todo", "unknown", ""}


def finding_to_label(finding: str) -> str:
    """Map an ieee8023 ``finding`` string onto the shared label vocabulary.

    Handles the flat 2020 names (``"COVID-19"``, ``"COVID-19, ARDS"``, ``"SARS"``,
    ``"Streptococcus"``, ``"No Finding"``) and the hierarchical later form
    (``"Pneumonia/Viral/COVID-19"``, ``"Pneumonia/Bacterial/Klebsiella"``,
    ``"Pneumonia/Lipoid"``, ``"Tuberculosis"``).

    Args:
        finding: the raw finding string.

    Returns:
        one of ``covid``, ``pneumonia_viral``, ``pneumonia_bacterial``,
        ``pneumonia_fungal``, ``pneumonia_unspecified``, ``normal``, ``other``.
    """
    text = str(finding).strip()
    low = text.lower()
    if "covid" in low or "sars-cov-2" in low:
        return "covid"
    if _norm_label(low) in _NORMAL_LABELS:
        return "normal"
    parts = [_norm_label(p) for p in re.split(r"[/,]", low) if p.strip()]
    if not parts:
        return "other"
    if any(p in _OTHER - {""} for p in parts) and not any(p in _VIRAL | _BACTERIAL | _FUNGAL for p in parts):
        return "other"
    for p in parts:
        if p in _VIRAL:
            return "pneumonia_viral"
        if p in _BACTERIAL or p.startswith("mycoplasma"):
            return "pneumonia_bacterial"
        if p in _FUNGAL:
            return "pneumonia_fungal"
    if parts[0] == "pneumonia":  # "Pneumonia" alone, or an unknown sub-type ("Aspiration")
        return "pneumonia_unspecified"
    return "other"


# --------------------------------------------------------------------------- parsing helpers
def _parse_bool(value: Any) -> bool | None:
    if value is None:
        return None
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    return None


def _parse_float(value: Any) -> float | None:
    if value is None:
        return None
    s = str(value).strip()
    if not s:
        return None
    try:
        out = float(s)
    except ValueError:
        return None
    return None if math.isnan(out) else out


def _parse_survival(value: Any) -> int | None:
    b = _parse_bool(value)
    return None if b is None else int(b)


def normalize_view(view: str) -> str:
    """Normalise a view string to ``"PA"``, ``"AP"``, ``"LATERAL"`` or ``""``.

    ``"AP Supine"``, ``"AP semi erect"``, ``"AP erect"`` -> ``AP``; ``"L"``, ``"LL"``,
    ``"RL"``, ``"Lateral"`` -> ``LATERAL``; anything unknown -> ``""``.

    Args:
        view: raw view / ViewPosition value.

    Returns:
        the normalised view.
    """
    s = str(view or "").strip().upper()
    if not s:
        return ""
    if s == "PA" or s.startswith("PA "):
        return "PA"
    if s == "AP" or s.startswith("AP ") or s.startswith("AP_"):
        return "AP"
    if s in {"L", "LL", "RL", "LAT", "LATERAL"} or s.startswith("LATERAL"):
        return "LATERAL"
    return ""


def _frontal_from_view(view: str) -> bool | None:
    if view in ("PA", "AP"):
        return True
    if view == "LATERAL":
        return False
    return None


def _adult_from_age(age: Any) -> bool | None:
    a = _parse_float(age)
    if a is None or a < 0 or a > 120:  # NIH has a few impossible ages (e.g. 414)
        return None
    return a >= 18


_KERMANY_PERSON = re.compile(r"(person\d+)_", re.IGNORECASE)
_KERMANY_IM = re.compile(r"(IM-\d+)", re.IGNORECASE)


def kermany_patient(filename: str) -> str:
    """Patient key from a Kermany file name.

    ``person123_bacteria_456.jpeg`` -> ``person123``; ``NORMAL2-IM-0123-0001.jpeg`` and
    ``IM-0123-0001-0002.jpeg`` and ``IM-0019-0001 (1).jpeg`` -> ``IM-0123`` /
    ``IM-0019``. The ``NORMAL2-`` prefix is dropped on purpose: whether ``IM-0401`` and
    ``NORMAL2-IM-0401`` are one child is not documented, and merging is the leak-safe
    choice.

    Args:
        filename: file name or path.

    Returns:
        the patient key, or ``""`` when the name does not follow either pattern.
    """
    name = Path(str(filename)).name
    m = _KERMANY_PERSON.search(name)
    if m:
        return m.group(1).lower()
    m = _KERMANY_IM.search(name)
    if m:
        return m.group(1).upper()
    return ""


def _first(row: Mapping[str, str], columns: Iterable[str]) -> tuple[str, str]:
    """First (column, non-empty value) among ``columns`` present in row, else ("", "")."""
    for c in columns:
        v = row.get(c)
        if v is not None and str(v).strip():
            return c, str(v).strip()
    return "", ""


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return [dict(r) for r in csv.DictReader(fh)]


# --------------------------------------------------------------------------- folder readers
def read_folder(
    root: str | os.PathLike,
    *,
    source: str | None = None,
    mask_column: str | Sequence[str] | None = None,
) -> list[Record]:
    """Read a folder in the shared layout (``root/labels.csv``, first columns ``filename,label``).

    Known optional columns: patient (``patient_id`` / ``patientid`` /
    ``kermany_patient_key``), view (``view`` / ``view_position``), ``is_frontal``,
    ``is_adult`` (else derived from ``age`` / ``patient_age`` when present),
    ``geographic_extent_mean`` (0-8), ``opacity_mean`` (0-6), ``survival`` (Y/N or 1/0),
    ``report``, and lung masks. The project's phantom folders use the same layout.

    Mask choice: ``mask_column`` (one name or a preference list) if given, else the
    first non-empty of ``mask``, ``lung_mask``, ``mask_v7labs`` (human polygons),
    ``mask_generalblockchain_lungs`` (radiologist). Model-predicted ``mask_lungVAE`` is
    never used unless named. Rows whose image is missing are skipped and counted (one
    warning); a missing mask file leaves ``mask_path`` None (counted likewise).

    Kermany: the csv's ``kermany_patient_key`` is unreliable (e.g. ``NORMAL2-IM`` for
    sixty different children), so the patient is parsed from the file name with
    :func:`kermany_patient`. Rows without a patient get ``patient_id = "img:<filename>"``.

    Args:
        root: folder that holds ``labels.csv``.
        source: source name; default the folder name.
        mask_column: mask column name or preference list, overriding the default.

    Returns:
        the records, in csv order.
    """
    root = Path(root).resolve()
    source = source or root.name
    csv_path = root / "labels.csv"
    rows = _read_csv(csv_path)
    if rows and ("filename" not in rows[0] or "label" not in rows[0]):
        raise ValueError(f"{csv_path}: first columns must be filename,label")
    if mask_column is None:
        mask_columns: tuple[str, ...] = _DEFAULT_MASK_COLUMNS
    elif isinstance(mask_column, str):
        mask_columns = (mask_column,)
    else:
        mask_columns = tuple(mask_column)
    defaults = _SOURCE_DEFAULTS.get(source, {})
    is_kermany = "kermany" in source.lower() or (bool(rows) and "kermany_patient_key" in rows[0])

    records: list[Record] = []
    missing = missing_masks = 0
    for row in rows:
        fname = (row.get("filename") or "").strip()
        path = root / fname
        if not fname or not path.is_file():
            missing += 1
            continue
        extras = {k: (v if v is not None else "") for k, v in row.items() if k not in ("filename", "label") and k is not None}

        pid = ""
        if is_kermany:
            pid = kermany_patient(fname)
        if not pid:
            pid = _first(row, _PATIENT_COLUMNS)[1]
        if not pid:
            pid = f"img:{fname}"

        raw_view = _first(row, _VIEW_COLUMNS)[1]
        view = normalize_view(raw_view) if raw_view else defaults.get("view", "")
        is_frontal = _parse_bool(row.get("is_frontal"))
        if is_frontal is None:
            is_frontal = _frontal_from_view(view)
        if is_frontal is None:
            is_frontal = defaults.get("is_frontal")

        is_adult = _parse_bool(row.get("is_adult"))
        if is_adult is None:
            is_adult = _adult_from_age(_first(row, ("age", "patient_age", "Patient Age"))[1])
        if is_adult is None:
            is_adult = defaults.get("is_adult")

        mask_path = None
        mcol, mval = _first(row, mask_columns)
        if mval:
            mp = root / mval
            if mp.is_file():
                mask_path = mp
            else:
                missing_masks += 1
                mcol = ""

        records.append(
            Record(
                path=path,
                source=source,
                label=(row.get("label") or "").strip(),
                patient_id=pid,
                view=view,
                is_frontal=is_frontal,
                mask_path=mask_path,
                geographic_extent=_parse_float(row.get("geographic_extent_mean")),
                opacity=_parse_float(row.get("opacity_mean")),
                survival=_parse_survival(row.get("survival")),
                is_adult=is_adult,
                report=(row.get("report") or "").strip(),
                extras=extras,
                filename=fname,
                mask_source=mcol if mask_path is not None else "",
            )
        )
    if missing:
        log.warning("%s: skipped %d of %d rows whose image file is missing", source, missing, len(rows))
    if missing_masks:
        log.warning("%s: %d mask files named in labels.csv are missing", source, missing_masks)
    log.debug("%s: %d records", source, len(records))
    return records


def shared_sources(data_root: str | os.PathLike) -> list[str]:
    """Names of the image folders under a shared data root (those with a ``labels.csv``).

    Args:
        data_root: e.g. ``../shared/data``.

    Returns:
        sorted folder names, without ``dicom_samples`` and ``fullres``.
    """
    root = Path(data_root)
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and p.name not in NON_IMAGE_FOLDERS and (p / "labels.csv").is_file()
    )


def read_shared(
    data_root: str | os.PathLike,
    sources: Iterable[str] | None = None,
    *,
    link: bool = True,
) -> list[Record]:
    """Read every image folder under the shared data root.

    Known trap handled here: the same radiographs appear under two patient ids inside
    ieee8023 (e.g. patients 97/178, 78/201, 137/202) and ``gb_covid_segmentations`` is a
    re-annotated subset of ieee8023 with its own patient numbering. With ``link`` the
    records are passed through :func:`link_duplicates` (image thumbnails, a few
    seconds), so patient splits keep such images together. Nothing is removed: combining
    ieee8023 and gb_covid_segmentations still counts those images twice.

    Args:
        data_root: the shared data folder.
        sources: folder names to read (default: all of :func:`shared_sources`).
        link: link near-identical images across patient ids (see above).

    Returns:
        records of all sources, sources in sorted order.
    """
    root = Path(data_root)
    names = shared_sources(root) if sources is None else list(sources)
    out: list[Record] = []
    for name in names:
        if name in NON_IMAGE_FOLDERS:
            raise ValueError(f"{name} is not an image folder in the labels.csv layout")
        out.extend(read_folder(root / name, source=name))
    if link and out:
        out = link_duplicates(out)
    return out


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


# --------------------------------------------------------------------------- patient grouping
def patient_groups(records: Sequence[Record]) -> list[int]:
    """Group index per record: ``(source, patient_id)`` keys merged through ``links``.

    Args:
        records: the records.

    Returns:
        one int per record; equal ints mean the same person.
    """
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(k: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for r in records:
        a = find(r.patient_key)
        for other in r.links:
            b = find(tuple(other))  # type: ignore[arg-type]
            if a != b:
                parent[max(a, b)] = min(a, b)
                a = find(a)
    ids: dict[tuple[str, str], int] = {}
    return [ids.setdefault(find(r.patient_key), len(ids)) for r in records]


def _thumbnail(path: Path, size: int) -> np.ndarray | None:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None
    t = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    t -= t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm > 0 else t


def find_duplicates(records: Sequence[Record], *, threshold: float = 0.985, size: int = 16) -> list[tuple[int, int, float]]:
    """Near-identical images: correlation of ``size`` x ``size`` grey thumbnails >= threshold.

    At the default settings on ``../shared/data`` this finds the ieee8023 /
    gb_covid_segmentations overlap, ieee8023 images filed under two patient ids, and a
    byte-identical Kermany pair, with no cross-collection false positives. It cannot
    tell a duplicate from two very similar films of one patient, which is harmless for
    splitting.

    Args:
        records: the records (images are read from disk).
        threshold: minimum Pearson correlation of the thumbnails.
        size: thumbnail side in pixels.

    Returns:
        ``(i, j, correlation)`` with ``i < j`` indexes into ``records``.
    """
    thumbs = [_thumbnail(r.path, size) for r in records]
    ok = [i for i, t in enumerate(thumbs) if t is not None]
    if len(ok) < 2:
        return []
    mat = np.stack([thumbs[i] for i in ok])
    pairs: list[tuple[int, int, float]] = []
    block = 1024
    for start in range(0, len(ok), block):
        sim = mat[start:start + block] @ mat.T
        rows, cols = np.nonzero(sim >= threshold)
        for a, b in zip(rows.tolist(), cols.tolist()):
            ia = start + a
            if ia < b:
                pairs.append((ok[ia], ok[b], float(sim[a, b])))
    return pairs


def link_duplicates(records: Sequence[Record], pairs: Iterable[tuple[int, int, float]] | None = None,
                    **kwargs: Any) -> list[Record]:
    """Return copies of the records whose ``links`` join the patients of duplicate images.

    Args:
        records: the records.
        pairs: ``(i, j, ...)`` index pairs; default :func:`find_duplicates` (``kwargs``
            are passed on to it).

    Returns:
        a new list; records that gained links are replaced, others are the same objects.
    """
    if pairs is None:
        pairs = find_duplicates(records, **kwargs)
    extra: dict[int, set[tuple[str, str]]] = defaultdict(set)
    n_cross = 0
    for i, j, *_ in pairs:
        a, b = records[i].patient_key, records[j].patient_key
        if a != b:
            extra[i].add(b)
            extra[j].add(a)
            n_cross += 1
    if n_cross:
        log.info("linked %d duplicate image pairs across patient ids", n_cross)
    out = list(records)
    for i, keys in extra.items():
        keys = set(out[i].links) | keys
        out[i] = dataclasses.replace(out[i], links=tuple(sorted(keys)))
    return out


# --------------------------------------------------------------------------- splits
def _strata(records: Sequence[Record], stratify: bool | Callable[[Record], Any]) -> list[Any]:
    if callable(stratify):
        return [stratify(r) for r in records]
    if stratify:
        return [(r.source, r.label) for r in records]
    return [0] * len(records)


def _assign_parts(records: Sequence[Record], fractions: Sequence[float], seed: int,
                  stratify: bool | Callable[[Record], Any]) -> list[int]:
    """Part index per record; whole patient groups go to one part.

    Greedy: groups are shuffled (seeded) and taken largest first; each goes to the part
    where it most reduces the squared gap between the part's per-stratum counts and
    their targets ``fraction * stratum total``. Ties are broken by the shuffled order.
    """
    fr = np.asarray(fractions, dtype=float)
    if np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"bad fractions {fractions}")
    fr = fr / fr.sum()
    groups = patient_groups(records)
    strata = _strata(records, stratify)
    s_index = {s: k for k, s in enumerate(sorted(set(strata), key=repr))}
    n_groups = max(groups) + 1 if groups else 0
    counts = np.zeros((n_groups, len(s_index)))
    for g, s in zip(groups, strata):
        counts[g, s_index[s]] += 1
    totals = counts.sum(axis=0)
    target = fr[:, None] * totals[None, :]
    current = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    sizes = counts.sum(axis=1)
    order = order[np.argsort(-sizes[order], kind="stable")]
    # Weight strata by 1/total so rare labels count as much as common ones.
    w = 1.0 / np.maximum(totals, 1.0)
    # Also keep overall part sizes on target.
    size_target = fr * sizes.sum()
    size_current = np.zeros(len(fr))
    part_of_group = np.zeros(n_groups, dtype=int)
    active = fr > 0
    for g in order:
        c = counts[g]
        delta = ((c[None, :] * (2 * (current - target) + c[None, :])) * w[None, :]).sum(axis=1)
        delta += sizes[g] * (2 * (size_current - size_target) + sizes[g]) / max(sizes.sum(), 1.0)
        delta[~active] = np.inf
        p = int(np.argmin(delta))
        part_of_group[g] = p
        current[p] += c
        size_current[p] += sizes[g]
    return [int(part_of_group[g]) for g in groups]


def patient_split(
    records: Sequence[Record],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    stratify: bool | Callable[[Record], Any] = True,
) -> dict[str, list[Record]]:
    """Split records into train / val (/ test) with no patient in two parts.

    A patient is a group of :func:`patient_groups` (``(source, patient_id)`` plus
    ``links``). With ``stratify`` (default: by ``(source, label)``; or pass a callable
    ``Record -> key``) whole patients are assigned greedily so each part's stratum mix
    is close to the overall mix. Deterministic for a given seed and record order.

    Args:
        records: the records.
        val_fraction: share of images for ``val``.
        test_fraction: share for ``test``; the key is present only when > 0.
        seed: RNG seed.
        stratify: True, False, or a callable giving the stratum of a record.

    Returns:
        ``{"train": [...], "val": [...]}`` (+ ``"test"``), each in input order.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("need 0 <= val_fraction, test_fraction and their sum < 1")
    names = ["train", "val"] + (["test"] if test_fraction > 0 else [])
    fr = [1 - val_fraction - test_fraction, val_fraction] + ([test_fraction] if test_fraction > 0 else [])
    out: dict[str, list[Record]] = {n: [] for n in names}
    if not records:
        return out
    parts = _assign_parts(records, fr, seed, stratify)
    for r, p in zip(records, parts):
        out[names[p]].append(r)
    return out


def repeated_patient_splits(
    records: Sequence[Record], n_splits: int, test_fraction: float = 0.5, seed: int = 0,
    *, stratify: bool | Callable[[Record], Any] = True,
) -> Iterator[tuple[list[Record], list[Record]]]:
    """``n_splits`` random train/test splits grouped by patient (Cohen et al. 2020 style).

    Args:
        records: the records.
        n_splits: number of splits.
        test_fraction: share of images in test (0.5: the ~50/50 splits of the paper).
        seed: base seed; split ``i`` uses a seed derived from it.
        stratify: as in :func:`patient_split`.

    Yields:
        ``(train, test)`` lists.
    """
    ss = np.random.SeedSequence(seed)
    for child in ss.spawn(n_splits):
        s = int(child.generate_state(1)[0])
        parts = _assign_parts(records, [1 - test_fraction, test_fraction], s, stratify)
        yield ([r for r, p in zip(records, parts) if p == 0], [r for r, p in zip(records, parts) if p == 1])


def patient_kfold(records: Sequence[Record], k: int, seed: int = 0, *,
                  stratify: bool | Callable[[Record], Any] = True) -> list[tuple[list[Record], list[Record]]]:
    """Grouped (and stratified) k-fold: each patient is in exactly one test fold.

    Args:
        records: the records.
        k: number of folds (>= 2).
        seed: RNG seed.
        stratify: as in :func:`patient_split`.

    Returns:
        ``k`` ``(train, test)`` pairs.
    """
    if k < 2:
        raise ValueError("k must be >= 2")
    parts = _assign_parts(records, [1.0 / k] * k, seed, stratify) if records else []
    return [
        ([r for r, p in zip(records, parts) if p != f], [r for r, p in zip(records, parts) if p == f])
        for f in range(k)
    ]


# --------------------------------------------------------------------------- bookkeeping
def fingerprint(records: Iterable[Record]) -> str:
    """Short stable hash of the records' ``(source/filename, label, file size)``.

    Independent of record order and of where the data lives on disk; changes when an
    image is added, removed, relabelled or replaced by one of another size.

    Args:
        records: the records.

    Returns:
        16 hex characters.
    """
    lines = []
    for r in records:
        try:
            size = r.path.stat().st_size
        except OSError:
            size = -1
        lines.append(f"{r.relpath}\t{r.label}\t{size}")
    h = hashlib.sha256("\n".join(sorted(lines)).encode("utf-8"))
    return h.hexdigest()[:16]


def summarize(records: Sequence[Record]) -> dict:
    """Counts for logs and checkpoint metadata.

    Args:
        records: the records.

    Returns:
        ``{"images", "patients", "labels", "triage_labels", "sources": {source: {images,
        patients, labels, masks, severity, survival, frontal, lateral, adult,
        paediatric}}}``; ``patients`` counts linked groups once.
    """
    groups = patient_groups(records)
    by_source: dict[str, dict[str, Any]] = {}
    src_groups: dict[str, set[int]] = defaultdict(set)
    for r, g in zip(records, groups):
        s = by_source.setdefault(r.source, {
            "images": 0, "patients": 0, "labels": Counter(), "masks": 0, "severity": 0,
            "survival": Counter(), "frontal": 0, "lateral": 0, "adult": 0, "paediatric": 0,
        })
        s["images"] += 1
        s["labels"][r.label] += 1
        s["masks"] += r.mask_path is not None
        s["severity"] += r.geographic_extent is not None and r.opacity is not None
        if r.survival is not None:
            s["survival"][{1: "survived", 0: "died"}[r.survival]] += 1
        s["frontal"] += r.is_frontal is True
        s["lateral"] += r.is_frontal is False
        s["adult"] += r.is_adult is True
        s["paediatric"] += r.is_adult is False
        src_groups[r.source].add(g)
    for name, s in by_source.items():
        s["patients"] = len(src_groups[name])
        s["labels"] = dict(sorted(s["labels"].items()))
        s["survival"] = dict(sorted(s["survival"].items()))
    return {
        "images": len(records),
        "patients": len(set(groups)),
        "labels": dict(sorted(Counter(r.label for r in records).items())),
        "triage_labels": dict(sorted(Counter(str(r.triage_label) for r in records).items())),
        "sources": dict(sorted(by_source.items())),
    }


# --------------------------------------------------------------------------- torch dataset
def default_load(record: Record) -> dict[str, Any]:
    """Read the image as grey uint8 (and the mask, if any) with OpenCV.

    EXIF orientation is ignored so images stay aligned with their PNG masks.

    Args:
        record: the record.

    Returns:
        ``{"image": HxW uint8}`` plus ``"mask": HxW uint8 (0/255)`` when the record has one.

    Raises:
        OSError: when a file cannot be decoded.
    """
    import cv2

    flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imread(str(record.path), flags)
    if img is None:
        raise OSError(f"cannot decode {record.path}")
    sample: dict[str, Any] = {"image": img}
    if record.mask_path is not None:
        mask = cv2.imread(str(record.mask_path), flags)
        if mask is None:
            raise OSError(f"cannot decode {record.mask_path}")
        sample["mask"] = mask
    return sample


def default_target(record: Record) -> int:
    """Index of the record's triage label in :data:`CLASS_LABELS`, -1 when it has none."""
    t = record.triage_label
    return CLASS_LABELS.index(t) if t is not None else -1


class RecordDataset(_TorchDataset):  # type: ignore[misc,valid-type]
    """A torch ``Dataset`` over records.

    ``__getitem__(i)`` calls ``load(record)`` (a dict with at least ``"image"``, maybe
    ``"mask"``), then ``augment(sample)`` (random; give it only to the training set),
    then ``transform(sample)`` (deterministic), and adds ``"target": target(record)``
    and ``"index": i``. ``augment`` and ``transform`` take and return the whole dict so
    image and mask stay aligned.

    Args:
        records: the records.
        load: ``Record -> dict``; default :func:`default_load`.
        transform: deterministic ``dict -> dict``.
        augment: random ``dict -> dict``, applied before ``transform``.
        target: ``Record -> label``; default :func:`default_target`.
    """

    def __init__(
        self,
        records: Sequence[Record],
        load: Callable[[Record], dict[str, Any]] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        target: Callable[[Record], Any] | None = None,
    ) -> None:
        self.records = list(records)
        self.load = load or default_load
        self.transform = transform
        self.augment = augment
        self.target = target or default_target

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        sample = dict(self.load(record))
        if self.augment is not None:
            sample = self.augment(sample)
        if self.transform is not None:
            sample = self.transform(sample)
        sample["target"] = self.target(record)
        sample["index"] = index
        return sample
