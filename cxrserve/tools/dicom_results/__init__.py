"""DICOM result objects from a ``cxr-study`` response: SR (TID 1500), SEGs of masks, SCs of heatmaps.

>>> objs = build_results(source_ds, study_response)      # list[pydicom.Dataset]
>>> write_results(objs, "out/")                            # one .dcm per object

Every object is placed in the source's study (Study Instance UID, patient and study
modules copied from the source by highdicom) in a new series. Series and SOP Instance
UIDs are derived from the source SOP Instance UID, the response's model version and the
object kind (:func:`result_uid`), so scoring the same instance with the same models again
produces the same UIDs: a PACS replaces (or ignores) the second copy instead of holding
two result sets.

Objects (``kind`` -> what):

* ``sr``: Comprehensive SR, TID 1500 Measurement Report referencing the source image;
  one measurement group (TID 1501) per section whose family declares a ``Report``, each
  with its TID 4019 algorithm identification (name, version, parameters: weights
  demo/trained, research use only), plus one group for the input gate verdict.
* one object per declared result picture present in the response (``Picture.kind``): a
  binary Segmentation at the source geometry for a mask (``Picture.segment``), else an
  RGB Secondary Capture labelled in SeriesDescription, ImageComments and
  DerivationDescription.

What each family's section becomes (its NUM and CODE items, codes, pictures, series
numbers) is declared in its folder (``presentation.py``) and read through the registry;
this module holds only what every report shares (:data:`SHARED_CODES`, the gate group,
the research-use statement). Codes: :data:`CODES` (``docs/DICOM.md``).

Responses that are a 4xx error body (decode or gate rejection, lateral, non-chest) make

One module per idea: :mod:`.codes`, :mod:`.response` (reading the response),
:mod:`.identity` (UIDs, series numbers), :mod:`.source` (the copied header),
:mod:`.sr`, :mod:`.pictures` (SEG and SC); here, all of one response, and writing them.
"""
from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from cxrserve.tools.dicom_results.identity import kind_of
from cxrserve.tools.dicom_results.pictures import build_heatmaps, build_segs
from cxrserve.tools.dicom_results.response import NotProcessed, not_processed_reason
from cxrserve.tools.dicom_results.source import clean_source
from cxrserve.tools.dicom_results.sr import build_sr

__all__ = ["NotProcessed", "build_results", "kind_of", "not_processed_reason", "write_results"]


def build_results(source: Dataset, response: dict) -> list[Dataset]:
    """SR, SEG and heatmap SCs for one source instance; raises :class:`NotProcessed` for a 4xx."""
    reason = not_processed_reason(response)
    if reason is not None:
        raise NotProcessed(reason, int(response.get("status") or 422))
    source = clean_source(source)
    objects = [build_sr(source, response)]
    objects.extend(build_segs(source, response))
    objects.extend(build_heatmaps(source, response))
    return objects


def write_results(objects: list[Dataset], out_dir: str | Path, *, fsync: bool = False) -> list[Path]:
    """Write each object as ``<kind>.dcm`` under ``out_dir`` (atomically; optionally fsynced)."""
    import os

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in objects:
        path = out_dir / f"{kind_of(ds)}.dcm"
        tmp = path.with_suffix(".tmp")
        # 0600: result objects carry the patient's name, ID and birth date
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        paths.append(path)
    if fsync:
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return paths
