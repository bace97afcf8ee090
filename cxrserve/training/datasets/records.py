"""Records: one labelled image and the label vocabulary every data source maps onto."""
from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from cxrserve.core.options import parse_bool

log = logging.getLogger(__name__)

CLASS_LABELS = ("covid19", "normal", "pneumonia")
"""Triage classifier labels, in output order."""

# Folders of the shared data tree that hold no labelled image folder in the common layout.
NON_IMAGE_FOLDERS = ("dicom_samples", "fullres")

# Column names understood by read_folder, per field, first match wins.
_PATIENT_COLUMNS = ("patient_id", "patientid", "Patient ID", "kermany_patient_key")
_VIEW_COLUMNS = ("view", "view_position", "View Position", "projection")
_DEFAULT_MASK_COLUMNS = ("mask", "lung_mask", "mask_v7labs", "mask_generalblockchain_lungs")
"""Ground-truth lung masks, in order of preference. ``mask_lungVAE`` (model-predicted) is
deliberately absent: pass ``mask_column="mask_lungVAE"`` to use it."""

# Per-source facts that the csv does not state (from CATALOG.md).
_SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "kermany_pediatric_subset": {"is_adult": False, "is_frontal": True},
    "openist_normal_lungmasks": {"is_adult": True, "view": "PA", "is_frontal": True},
    "nih_cxr8_darkcovidnet": {"is_frontal": True},
}





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
    def site(self) -> str:
        """Where the film was taken: a ``site`` column when the csv has one, else its collection.

        Results are reported per site and left-out sites judge generalisation: a
        classifier can learn the hospital instead of the disease.
        """
        return str(self.extras.get("site") or "").strip() or self.source

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
    """A CSV cell: True / False, or None when blank or not a boolean word (unknown)."""
    if value is None or not str(value).strip():
        return None
    try:
        return parse_bool(value)
    except ValueError:
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


def _parse_survival(value: Any, died: Any = None) -> int | None:
    """1 survived, 0 died: a ``survival`` column (Y/N, 1/0), else the inverse of a ``died`` one."""
    b = _parse_bool(value)
    if b is None and died is not None:
        d = _parse_bool(died)
        return None if d is None else int(not d)
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
