"""Model registry: ``build_model(card.architecture, **card.arch_kwargs)``.

Each architecture lives in its own module and registers a factory under one name;
a duplicate name is an error (torchvision's rule, not timm's warning). Every model's
``forward`` returns what serving needs in one pass (probabilities, class activation
maps, embeddings), so eager, TorchScript and ONNX give the same outputs.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def decorator(factory: Callable[..., nn.Module]):
        if name in MODELS:
            raise KeyError(f"model {name!r} registered twice")
        MODELS[name] = factory
        return factory

    return decorator


def build_model(name: str, **kwargs) -> nn.Module:
    _import_all()
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(MODELS)}") from None
    return factory(**kwargs)


def _import_all() -> None:
    """Import every architecture module of this package (each registers itself); no list to keep."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "checkpoint":
            importlib.import_module(f"{__name__}.{info.name}")
