"""A torch Dataset over records (decoded with the serving decoder)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.utils.data import Dataset as _TorchDataset

from cxrserve.training.datasets.records import CLASS_LABELS, Record


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
