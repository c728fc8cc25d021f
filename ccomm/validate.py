"""Checks for configuration values, with one error format for every package.

A bad value raises ``ValueError("<field>: must be <allowed values>, got <value!r>")``: the
message names the field (dotted for nested settings, e.g. ``network.rtt_ms`` or
``topk.ratio``) and what would have been accepted, so a user can fix the config without
reading the code. Each check returns the value in its canonical type (an int, a float, the
choice itself), so a frozen dataclass can validate and normalise a field in one line.

Every package may import ccomm, so the front-ends (`deco_sgd`, `compactfusion`) and `netsim`
use these checks instead of private copies. A caller with its own exception type (e.g. a
checkpoint error that subclasses `ValueError`) passes it as ``error=``.

`deprecated_key` is the one way a renamed config key or value keeps working for a while: it
warns with `DeprecationWarning` naming the new spelling (see ``docs/glossary.md``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, MutableMapping, NoReturn, Sequence, TypeVar

__all__ = [
    "fail",
    "check_int",
    "check_number",
    "check_ratio",
    "check_bool",
    "check_choice",
    "deprecated_key",
    "deprecated_value",
]

T = TypeVar("T")


def fail(field: str, allowed: str, value: Any, error: type[ValueError] = ValueError) -> NoReturn:
    """Raise `error` in the common format: ``<field>: must be <allowed>, got <value!r>``."""
    raise error(f"{field}: must be {allowed}, got {value!r}")


def _bound(x: float) -> str:
    return ("-inf" if x < 0 else "inf") if math.isinf(x) else f"{x:g}"


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open or math.isinf(lo) else '['}{_bound(lo)}, {_bound(hi)}{')' if hi_open or math.isinf(hi) else ']'}"


def check_int(field: str, value: Any, lo: int | None = None, hi: int | None = None, *,
              error: type[ValueError] = ValueError) -> int:
    """`value` as an int in [lo, hi] (either bound may be None).

    A bool is refused although it is an int subclass: ``True`` in a count is a typo, not a 1.
    """
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        if lo is None and hi is None:
            rng = ""
        elif hi is None:
            rng = f" >= {lo}"
        elif lo is None:
            rng = f" <= {hi}"
        else:
            rng = f" in [{lo}, {hi}]"
        fail(field, f"an integer{rng}", value, error)
    return int(value)


def check_number(field: str, value: Any, lo: float = -math.inf, hi: float = math.inf, *,
                 lo_open: bool = False, hi_open: bool = False, error: type[ValueError] = ValueError) -> float:
    """`value` (int or float, never bool, never inf/NaN) as a float in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        x = float(value)
        ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        fail(field, f"a finite number in {_interval(lo, hi, lo_open, hi_open)}", value, error)
    return float(value)


def check_ratio(field: str, value: Any, *, error: type[ValueError] = ValueError) -> float:
    """A *ratio* in the glossary's sense: the fraction of elements kept, in (0, 1]."""
    return check_number(field, value, 0.0, 1.0, lo_open=True, error=error)


def check_bool(field: str, value: Any, *, error: type[ValueError] = ValueError) -> bool:
    """`value` if it is a real bool (YAML ``true``/``false``); 0, 1 and "yes" are refused."""
    if not isinstance(value, bool):
        fail(field, "a bool (true or false)", value, error)
    return value


def check_choice(field: str, value: T, allowed: Sequence[Any], *, error: type[ValueError] = ValueError) -> T:
    """`value` if it is one of `allowed`."""
    if value not in allowed:
        fail(field, f"one of {list(allowed)}", value, error)
    return value


def deprecated_key(data: Mapping[str, Any], old: str, new: str, where: str = "config",
                   convert: Any = None) -> dict[str, Any]:
    """A copy of `data` with key `old` renamed to `new`, warning that `old` is deprecated.

    `convert` (optional) maps the old value to the new key's unit. Giving both keys is an
    error: which one was meant cannot be guessed. `stacklevel` points past the config loader.
    """
    out: MutableMapping[str, Any] = dict(data)
    if old not in out:
        return dict(out)
    if new in out:
        raise ValueError(f"{where}: give {new!r} only ({old!r} is its deprecated name), got both")
    warnings.warn(f"{where}: {old!r} is deprecated, use {new!r} (see docs/glossary.md)",
                  DeprecationWarning, stacklevel=3)
    value = out.pop(old)
    out[new] = convert(value) if convert is not None else value
    return dict(out)


def deprecated_value(field: str, value: T, renamed: Mapping[Any, Any]) -> T:
    """`value`, or its new spelling (with a `DeprecationWarning`) if it is an old one in `renamed`."""
    try:
        new = renamed[value]
    except (KeyError, TypeError):
        return value
    warnings.warn(f"{field}: {value!r} is deprecated, use {new!r} (see docs/glossary.md)",
                  DeprecationWarning, stacklevel=3)
    return new  # type: ignore[no-any-return]
