"""Request options and ``NAME=VALUE`` arguments: parsed here, once, for every layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable


TRUE_WORDS = ("1", "true", "yes", "on", "y", "t")
FALSE_WORDS = ("0", "false", "no", "off", "n", "f")


def parse_bool(value: Any) -> bool:
    """A request option or a CSV cell as a boolean: the one vocabulary (empty text is false)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS or text == "":
        return False
    raise ValueError(f"expected true/false, got {text[:40]!r}")


@dataclass(frozen=True)
class Option:
    parse: Callable[[Any], Any]
    default: Any
    help: str = ""
    #: a bool option that asks for a picture (heatmap, overlay, mask PNG): ``cxr-study``
    #: leaves these off unless asked (``pictures=true`` or the option itself)
    picture: bool = False


def parse_pairs(values: Iterable[str] | None, what: str = "NAME=VALUE") -> dict[str, str]:
    """``["a=1", "b=x=y"]`` -> ``{"a": "1", "b": "x=y"}``; anything without ``=`` is an error."""
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"expected {what}, got {item!r}")
        out[key.strip()] = value
    return out
