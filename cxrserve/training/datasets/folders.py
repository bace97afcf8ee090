"""Readers of the shared-data layout: one labels.csv folder, or a data root of them."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from cxrserve.training.datasets.grouping import link_duplicates
from cxrserve.training.datasets.records import (
    _DEFAULT_MASK_COLUMNS,
    _PATIENT_COLUMNS,
    _SOURCE_DEFAULTS,
    _VIEW_COLUMNS,
    NON_IMAGE_FOLDERS,
    Record,
    _adult_from_age,
    _first,
    _frontal_from_view,
    _parse_bool,
    _parse_float,
    _parse_survival,
    _read_csv,
    kermany_patient,
    normalize_view,
)

log = logging.getLogger(__name__)


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
    ``geographic_extent_mean`` (0-8), ``opacity_mean`` (0-6), ``survival`` (Y/N or 1/0; else
    the inverse of ``died``), ``projection`` as a view column, ``site`` (else the folder),
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
                survival=_parse_survival(row.get("survival"), row.get("died")),
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
