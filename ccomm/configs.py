"""One way to serialise and digest a frozen dataclass config.

`config_dict` walks `dataclasses.fields`, so a field added to a config is serialised and
digested without anyone remembering to list it (a hand-written field list goes stale).
`fingerprint` is the SHA-256 hex of the canonical JSON of that dict: stable across
processes, Python versions and list-vs-tuple spellings, unlike the built-in `hash`.

A config that must leave a field out of its digest names it, with the reason, in a class
attribute ``FINGERPRINT_EXCLUDE: Mapping[str, str]``; tests check that every other field
changes the digest. Callables (e.g. CompactFusion's ``policy``) are digested by qualified
name: the code behind the name is each rank's own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

__all__ = ["config_dict", "digest_dict", "fingerprint", "fingerprint_excluded"]


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return config_dict(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def config_dict(cfg: Any) -> dict[str, Any]:
    """The init fields of dataclass `cfg` as plain data: nested configs become dicts,
    tuples become lists (so the dict is what a YAML or JSON file would hold)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def fingerprint_excluded(cfg: Any) -> Mapping[str, str]:
    """``{field: reason}`` of the fields `cfg`'s class leaves out of its fingerprint."""
    return dict(getattr(type(cfg), "FINGERPRINT_EXCLUDE", {}))


def _by_name(v: Any) -> Any:
    if callable(v):
        return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__qualname__)}"
    raise TypeError(f"fingerprint: {type(v).__name__} value {v!r} is not JSON-serialisable")


def digest_dict(cfg: Any) -> dict[str, Any]:
    """What `fingerprint` digests, as JSON data: `config_dict(cfg)` minus the excluded fields,
    callables by qualified name. Ranks can compare it field by field to name a difference."""
    skip = fingerprint_excluded(cfg)
    data = {k: v for k, v in config_dict(cfg).items() if k not in skip}
    return json.loads(json.dumps(data, default=_by_name))


def fingerprint(cfg: Any, **extra: Any) -> str:
    """SHA-256 hex of the canonical JSON of `digest_dict(cfg)` plus `extra` (e.g. a schema
    number that changes when a field changes meaning)."""
    blob = json.dumps({**extra, **digest_dict(cfg)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
