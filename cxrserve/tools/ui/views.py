"""What the viewer shows for each served model, read from the family registry.

The options that turn a model's pictures on are the server's choice per model, so the
browser can ask for nothing but a known model with an image; each model's card is its
family's declared ``CardLine``s and pictures, rendered by the page's generic code. When a
composed model (``cxr-study``) is served the page sends that one request and shows each
family's section in that family's card.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelView:
    """How the page asks one model and shows its answer, from its family's declarations."""

    name: str
    title: str
    seed: str
    options: dict = field(default_factory=dict)  # request options the page sends (its pictures, on by default)
    inputs: tuple[str, ...] = ()  # the extra inputs it takes (``ViewerInput`` names)
    composes: bool = False  # answers every family in one request (its sections fill their cards)
    section: str = ""  # its section's key in a composed answer
    card: tuple[dict, ...] = ()  # ``CardLine``s, rendered by the page's generic code
    pictures: tuple[dict, ...] = ()  # ``{"option", "field", "caption"}`` of each picture it can show


def views() -> tuple[ModelView, ...]:
    """Every served model of the family registry, as the page asks for it and shows it."""
    from cxrserve import families

    # every declared picture is asked for unless the model's viewer_options say otherwise
    return tuple(ModelView(s.name, s.title or s.name, s.seed,
                           {**{p.option: True for p in families.pictures(s.name)}, **s.viewer_options},
                           tuple(s.viewer_inputs),
                           composes=s.compose, section=s.key, card=tuple(asdict(c) for c in families.card(s.name)),
                           pictures=tuple({"option": p.option, "field": p.field, "caption": p.caption or p.label}
                                          for p in families.pictures(s.name)))
                 for _, s in families.served().values())


def viewer_inputs(views_: tuple[ModelView, ...]) -> dict:
    """The extra inputs some model takes, by name (``ViewerInput`` as a dict), for the page's form."""
    from cxrserve import families

    declared = families.viewer_inputs()
    wanted = {name for v in views_ for name in v.inputs}
    return {name: asdict(spec) for name, spec in declared.items() if name in wanted}
