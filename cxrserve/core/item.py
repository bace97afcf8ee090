"""What a request becomes on its way through a pipeline's stages.

:class:`Decoded` is what decoding a request gives (:meth:`~cxrserve.core.pipeline.Pipeline.decode_request`);
:class:`Item` is one study as the screening, gating and scoring stages pass it along, with
the extra images they set aside (:meth:`Item.refuse`). Both are plain data: the rules that
fill them are the pipeline's (:mod:`cxrserve.core.pipeline`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cxrserve.core.errors import CXRInputError, MalformedInput
from cxrserve.core.imageio import XRay

#: The request field of the main image.
MAIN_IMAGE = "image"


def request_image(images: dict[str, bytes]) -> bytes:
    """The main file of a request, or the 400 every endpoint gives without one."""
    main = images.get(MAIN_IMAGE)
    if main is None:
        raise MalformedInput("no image in the request: post the file as the body or as form field 'image'")
    return main


@dataclass
class Item:
    """One study to score: the decoded image, named extra images, parsed options."""

    xray: XRay
    options: dict = field(default_factory=dict)
    images: dict[str, XRay] = field(default_factory=dict)  # e.g. {"prior": XRay}
    gate: dict | None = None  # input gate verdict for the main image, set by Pipeline.run_gate
    #: extra images that failed decoding, screening or the gate, by name, each with its 4xx:
    #: out of ``images``, they fail only what reads them (:meth:`Pipeline.refusal`)
    refused: dict[str, CXRInputError] = field(default_factory=dict)
    #: findings computed once and reused by every pipeline scoring this study in one
    #: process (``cxr-study``), e.g. ``{"lungs": (component, LungFinding)}``
    shared: dict = field(default_factory=dict)
    #: the site profile the request named (or the store's default), None for the archive's own rule
    site: Any = None

    def refuse(self, name: str, err: CXRInputError) -> None:
        """Set extra image ``name`` aside with its error (the first error of an image stays)."""
        self.images.pop(name, None)
        self.refused.setdefault(name, err)


@dataclass
class Decoded:
    """Stage 1's output: a request's images, decoded once at one resolution."""

    xray: XRay
    images: dict[str, XRay]
    refused: dict[str, CXRInputError]  # extra images that could not be decoded
    seconds: float
