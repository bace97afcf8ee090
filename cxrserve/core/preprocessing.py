"""Named, versioned preprocessing pipelines: the table a card's ``preprocessing`` names.

A card stores a pipeline's ``name`` and ``version``; training, evaluation, export and
serving build it with :func:`cxrserve.core.transforms.build_transform`. Whoever owns a
pipeline registers it (:func:`register_preprocessing`, as ``@register_model`` fills the
architecture table): the core only the input gate's (``core.transforms.GATE``: its
component is chained into every archive), each family its own from its folder
(``<family>/preprocessing.py``, imported by the family's ``__init__``, so importing any
module of the family registers them, in a worker's archive as anywhere else).

No torch or OpenCV here: a family's ``__init__`` stays light to import (reading the
registry loads no torch), and ``build`` imports the transforms only when it is called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Preprocessing:
    """A named, versioned pipeline; cards store ``name`` and ``version``."""

    name: str
    version: int
    input_size: int
    channels: int
    build: Callable[[], Callable]  # -> a fresh ``transforms.Compose`` (CLAHE objects are not thread-safe)
    value_range: tuple[float, float]
    description: str
    #: shorter side of the source the fast decoder must keep for the output to match the
    #: full-resolution path's; 0: twice ``input_size`` (``core.fastdecode.decode_need``)
    source_need: int = 0


PREPROCESSING: dict[str, Preprocessing] = {}


def register_preprocessing(p: Preprocessing) -> Preprocessing:
    """Add ``p`` to the table; a second pipeline under a taken name is an error.

    Registering again from the same function (its module imported a second time, as a
    test re-imports a throwaway family) replaces the entry.
    """
    old = PREPROCESSING.get(p.name)
    if old is not None and _origin(old) != _origin(p):
        raise KeyError(f"preprocessing {p.name!r} registered twice ({_origin(old)} and {_origin(p)})")
    PREPROCESSING[p.name] = p
    return p


def get_preprocessing(name: str) -> Preprocessing:
    try:
        return PREPROCESSING[name]
    except KeyError:
        raise KeyError(f"unknown preprocessing {name!r}; registered: {sorted(PREPROCESSING)} (a family's "
                       "are registered when its package is imported: read the registry first)") from None


def _origin(p: Preprocessing) -> str:
    return f"{getattr(p.build, '__module__', '?')}.{getattr(p.build, '__qualname__', '?')}"
