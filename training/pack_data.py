"""Compact copy of the real data for a GPU machine that only receives a small working tree.

Usage (from the repository root)::

    python training/pack_data.py ../shared/data .gpu_data            # writes, then verifies
    python training/pack_data.py ../shared/data .gpu_data --verify   # verify an existing copy

The copy keeps the shared layout (``labels.csv`` + images + masks per folder), so the
dataset adapters read it unchanged, for the folders the models train on (``dicom_samples``
and ``fullres`` stay behind). Masks, PNGs and CSVs are copied byte for byte; JPEGs of the
folders named by ``--reencode`` (default: the NIH and Kermany subsets, the two largest
that no severity, survival or mask target lives in) are re-encoded at ``--quality`` so the
copy fits a transfer limit of about 55 MiB. ieee8023, gb_covid and OpenIST images stay
untouched.

``--verify`` checks that :func:`cxrserve.training.datasets.read_shared` gives the same records
(count per source, labels, patients, duplicate links) and the same patient-level splits
as the original: duplicate links come from image thumbnails, so re-encoding must not
move any of them. The destination must be git-ignored (``/.gpu_data/`` in
``.git/info/exclude``): this is data from ``../shared`` and is never committed.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SKIP = ("dicom_samples", "fullres")
DEFAULT_REENCODE = ("nih_cxr8_darkcovidnet", "kermany_pediatric_subset")


def pack(src: Path, dst: Path, reencode: tuple[str, ...], quality: int) -> None:
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and p.name not in SKIP):
        if not (folder / "labels.csv").is_file():
            continue
        n_copied = n_encoded = 0
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            out = dst / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            if folder.name in reencode and path.suffix.lower() in (".jpg", ".jpeg"):
                img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                if img is None:
                    raise ValueError(f"cannot decode {path}")
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not ok:
                    raise ValueError(f"cannot encode {path}")
                out.write_bytes(buf.tobytes())
                n_encoded += 1
            else:
                shutil.copy2(path, out)
                n_copied += 1
        print(f"{folder.name}: {n_copied} files copied, {n_encoded} JPEGs re-encoded at quality {quality}")
    (dst / "README.txt").write_text(
        f"Compact copy of {src} made by training/pack_data.py (JPEGs of {', '.join(reencode)} re-encoded at "
        f"quality {quality}). Research data: never commit it.\n")


def _summary(records) -> list[tuple]:
    from cxrserve.training.datasets import patient_groups

    groups = patient_groups(records)
    return [(r.source, r.relpath, r.label, r.patient_id, tuple(sorted(map(tuple, r.links))), g,
             r.mask_path is not None, r.geographic_extent, r.opacity, r.survival)
            for r, g in zip(records, groups)]


def verify(src: Path, dst: Path) -> bool:
    from collections import Counter

    from cxrserve.training.datasets import patient_split, read_shared

    a, b = read_shared(src), read_shared(dst)
    ca, cb = Counter(r.source for r in a), Counter(r.source for r in b)
    print("records per source (original / copy):")
    for source in sorted(ca | cb):
        print(f"  {source}: {ca[source]} / {cb[source]}")
    same_records = _summary(a) == _summary(b)
    split_a = {k: [r.relpath for r in v] for k, v in patient_split(a, val_fraction=0.2, seed=0).items()}
    split_b = {k: [r.relpath for r in v] for k, v in patient_split(b, val_fraction=0.2, seed=0).items()}
    same_split = split_a == split_b
    print(f"same records, labels, patients and duplicate links: {same_records}")
    print(f"same patient split (val 0.2, seed 0): {same_split}")
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"copy size: {size / 2**20:.1f} MiB")
    return same_records and same_split


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the shared data root (../shared/data)")
    parser.add_argument("dst", type=Path, help="git-ignored destination, e.g. .gpu_data")
    parser.add_argument("--reencode", nargs="*", default=list(DEFAULT_REENCODE))
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--verify", action="store_true", help="only verify an existing copy")
    args = parser.parse_args(argv)
    if not args.verify:
        if args.dst.exists():
            raise SystemExit(f"{args.dst} exists: remove it first or pass --verify")
        pack(args.src, args.dst, tuple(args.reencode), args.quality)
    return 0 if verify(args.src, args.dst) else 1


if __name__ == "__main__":
    raise SystemExit(main())
