"""Writing phantom sets in the shared-data layout (PNG, masks, labels.csv, DICOM variants)."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from cxrserve.synthetic.phantoms.render import render
from cxrserve.synthetic.phantoms.spec import (
    CSV_COLUMNS,
    KINDS,
    LABELS,
    extent_score,
    sample_spec,
)

# ---------------------------------------------------------------------------- dataset

_DICOM_VARIANTS = (
    {"transfer_syntax": "explicit_le"},
    {"transfer_syntax": "implicit_le"},
    {"transfer_syntax": "rle"},
    {"transfer_syntax": "jpeg_lossless"},
    {"transfer_syntax": "explicit_le", "photometric": "MONOCHROME1"},
    {"transfer_syntax": "j2k_lossless", "bits_stored": 12},
    {"transfer_syntax": "deflated", "bits_stored": 10},
    {"transfer_syntax": "jpeg_baseline"},
    {"transfer_syntax": "explicit_le", "bits_stored": 16, "sop_class": "cr"},
    {"transfer_syntax": "j2k"},
)


def write_dataset(root, n: int, *, seed: int = 0, kinds: Sequence[str] = ("frontal",),
                  label_mix=None, height: int = 384, width: int = 384,
                  studies_per_patient: int = 1, dicom_every: int = 0,
                  min_extent: int = 1, progress: bool = False) -> Path:
    """Write ``n`` phantoms in the layout of ``/work/shared/data/<source>/``.

    ``root/labels.csv`` (columns :data:`CSV_COLUMNS`), ``root/images/NNNNNN.png`` (grey,
    or RGB for screenshots and natural images), ``root/masks/NNNNNN.png`` (lung mask,
    0/255, frontal only) and, with ``dicom_every=k``, every k-th image (index % k == 0)
    also as ``root/dicom/NNNNNN.dcm`` in a rotating set of DICOM variants (column
    ``dicom`` plus the syntax / photometric / bits stored used).

    Kinds cycle per patient through ``kinds``. ``label_mix``: ``None`` (uniform), a dict
    ``{label: weight}`` or a sequence of labels to draw from. With
    ``studies_per_patient > 1``, consecutive studies of one patient share ``anatomy_seed``,
    label, style and age, and draw new opacities (a PXS "change" pair). Severity columns
    are blank for non-frontal rows and ``label`` is the kind name there.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    if dicom_every:
        (root / "dicom").mkdir(parents=True, exist_ok=True)
        from cxrserve.synthetic import (
            dicomwrite,  # imported lazily: pydicom is only needed here
        )
    for kd in kinds:
        if kd not in KINDS:
            raise ValueError(f"unknown kind {kd!r}")
    if label_mix is None:
        labs, weights = list(LABELS), np.ones(len(LABELS))
    elif isinstance(label_mix, dict):
        labs, weights = list(label_mix), np.array([float(label_mix[k]) for k in label_mix])
    else:
        labs, weights = list(label_mix), np.ones(len(label_mix))
    for lb in labs:
        if lb not in LABELS:
            raise ValueError(f"unknown label {lb!r}")
    weights = weights / weights.sum()
    spp = max(1, int(studies_per_patient))
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=n, desc="phantoms")
    rows = []
    base = None
    for i in it:
        pi, j = divmod(i, spp)
        study_seed = int(seed) * 1_000_000 + i
        if j == 0:
            prng = np.random.default_rng([int(seed), pi, 11])
            kind = kinds[pi % len(kinds)]
            label = labs[int(prng.choice(len(labs), p=weights))]
            base = sample_spec(study_seed, kind=kind, label=label, height=height, width=width,
                               min_extent=min_extent)
            base = replace(base, anatomy_seed=study_seed, patient_id=f"PH{int(seed):03d}{pi:07d}")
            spec = base
        else:
            s2 = sample_spec(study_seed, kind=base.kind, label=base.label, height=height, width=width,
                             min_extent=min_extent)
            spec = replace(base, seed=study_seed, extent=s2.extent, opacity=s2.opacity)
        ph = render(spec)
        stem = f"{i:06d}"
        img_rel = f"images/{stem}.png"
        if ph.image_rgb is not None:
            _imwrite(root / img_rel, cv2.cvtColor(ph.image_rgb, cv2.COLOR_RGB2BGR))
            mode = "RGB"
        else:
            _imwrite(root / img_rel, ph.image)
            mode = "L"
        frontal = spec.kind == "frontal"
        mask_rel = ""
        if frontal:
            mask_rel = f"masks/{stem}.png"
            _imwrite(root / mask_rel, ph.lung_mask.astype(np.uint8) * 255)
        row = {
            "filename": img_rel, "label": ph.label, "patient_id": spec.patient_id,
            "view": ph.view, "is_frontal": int(frontal), "kind": spec.kind, "style": spec.style,
            "geographic_extent_mean": f"{ph.geographic_extent:g}" if frontal else "",
            "opacity_mean": f"{ph.opacity_score:g}" if frontal else "",
            "involvement_right": f"{ph.involvement[0]:.6f}" if frontal else "",
            "involvement_left": f"{ph.involvement[1]:.6f}" if frontal else "",
            "survival": ph.survival if frontal else "", "mask": mask_rel, "report": ph.report,
            "age": spec.age, "extent_right": extent_score(ph.involvement[0]) if frontal else "",
            "extent_left": extent_score(ph.involvement[1]) if frontal else "",
            "opacity_right": (spec.opacity[0] if ph.involvement[0] > 0 else 0) if frontal else "",
            "opacity_left": (spec.opacity[1] if ph.involvement[1] > 0 else 0) if frontal else "",
            "seed": spec.seed, "anatomy_seed": spec.anatomy_seed if spec.anatomy_seed is not None else spec.seed,
            "width": width, "height": height, "mode": mode,
            "dicom": "", "dicom_syntax": "", "dicom_photometric": "", "dicom_bits_stored": "",
        }
        if dicom_every and i % int(dicom_every) == 0:
            var = dict(_DICOM_VARIANTS[(i // int(dicom_every)) % len(_DICOM_VARIANTS)])
            dcm_rel = f"dicom/{stem}.dcm"
            vp = ph.view if ph.view in ("PA", "AP", "LATERAL") else ""
            body = "CHEST" if spec.kind in ("frontal", "lateral") else spec.kind.upper()
            if spec.kind == "natural":
                body = ""
            data = dicomwrite.to_dicom(ph.image, view_position=vp, body_part=body,
                                       patient_id=spec.patient_id, **var)
            (root / dcm_rel).write_bytes(data)
            row.update({"dicom": dcm_rel, "dicom_syntax": var["transfer_syntax"],
                        "dicom_photometric": var.get("photometric", "MONOCHROME2"),
                        "dicom_bits_stored": var.get("bits_stored", 8)})
        rows.append(row)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        wr.writeheader()
        wr.writerows(rows)
    return root


def _imwrite(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"could not encode {path}")
    Path(path).write_bytes(buf.tobytes())
