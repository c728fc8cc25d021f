"""Codec registry and the spec parser behind `make_codec`.

A spec is `name` or `name:key=value,key=value`; stages of a chain are joined by `|`,
e.g. `"randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4"`.

Codec modules import this one to register themselves; it never imports them back (no import
cycle). The built-in codecs are registered by `ccomm/__init__.py` importing `ccomm.codecs`,
which Python runs before any module of the package, so they are always in the table.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from .codecs.base import Codec

__all__ = ["register", "make_codec", "available_codecs", "parse_spec"]

_CODECS: dict[str, type["Codec"]] = {}
C = TypeVar("C", bound=type)


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make a codec constructible by `name` in specs."""

    def deco(cls: C) -> C:
        if name in _CODECS and _CODECS[name] is not cls:
            raise ValueError(f"codec name {name!r} is already registered by {_CODECS[name].__name__}")
        cls.name = name  # type: ignore[attr-defined]
        _CODECS[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def available_codecs() -> list[str]:
    """Registered codec names, sorted."""
    return sorted(_CODECS)


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Split a spec into `(name, kwargs)` stages without constructing anything."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec: expected a non-empty string like 'topk:ratio=0.01', got {spec!r}")
    stages: list[tuple[str, dict[str, Any]]] = []
    for part in spec.split("|"):
        part = part.strip()
        name, _, args = part.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"spec: empty codec name in {spec!r}")
        kwargs: dict[str, Any] = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"spec: expected key=value in {part!r}, got {item!r}")
            kwargs[key.strip()] = _parse_value(value)
        stages.append((name, kwargs))
    return stages


def _construct(name: str, kwargs: dict[str, Any]) -> "Codec":
    cls = _CODECS.get(name)
    if cls is None:
        raise ValueError(f"codec: unknown name {name!r}; available: {', '.join(available_codecs())}")
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"{name}: unknown keyword {key!r}; allowed: {', '.join(allowed) if allowed else '(none)'}"
            )
    return cls(**kwargs)


def make_codec(spec: "str | Codec", **kwargs: Any) -> "Codec":
    """Build a codec from a spec string (or return a codec instance unchanged).

    Keyword arguments override the spec's values for a single codec; chains take their
    parameters in the spec only, since a keyword could apply to several stages.
    """
    from .codecs.base import Codec

    if isinstance(spec, Codec):
        if kwargs:
            raise ValueError("kwargs: not accepted together with a codec instance")
        return spec
    stages = parse_spec(spec)
    if len(stages) == 1:
        name, skw = stages[0]
        return _construct(name, {**skw, **kwargs})
    if kwargs:
        raise ValueError(
            f"kwargs: {sorted(kwargs)} given for the chain {spec!r}; put parameters in the spec of each stage"
        )
    from .codecs.chain import Chain

    return Chain([_construct(name, skw) for name, skw in stages])
