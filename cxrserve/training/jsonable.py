"""Results as plain JSON: numpy scalars and arrays, paths, dataclasses, NaN and inf.

Evaluation reports, model cards' metrics and run logs go through :func:`to_jsonable` before
``json.dump(..., allow_nan=False)``, so an undefined number is written as ``null``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np


def to_jsonable(obj: Any) -> Any:
    """Convert numpy types, arrays, tuples, sets, paths and dataclasses to plain JSON types.

    NaN and ±inf become None (JSON has no such numbers); mapping keys become strings
    (numpy keys are converted to their Python value first); sets become sorted lists.

    Args:
        obj: any nesting of dicts, lists, numbers, numpy objects.

    Returns:
        an object ``json.dumps`` accepts with ``allow_nan=False``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "_asdict") and isinstance(obj, tuple):
        return to_jsonable(obj._asdict())
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            k = k.item() if isinstance(k, np.generic) else k
            out[k if isinstance(k, str) else str(k)] = to_jsonable(v)
        return out
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(x) for x in obj]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if hasattr(obj, "tolist"):  # torch tensors and the like
        return to_jsonable(obj.tolist())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")
