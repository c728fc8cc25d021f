"""CompactConfig: one digest derived from its fields (`ccomm.configs`), renamed values still accepted."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ccomm.configs import fingerprint_excluded
from compactfusion import CompactConfig


def _policy(layer: int, step: int) -> bool:
    return True


#: For every field: (base kwargs, changed kwargs), both valid. A new field without an entry
#: fails `test_every_field_changes_the_fingerprint`, so the digest cannot go stale.
CHANGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mode": ({}, {"mode": "patch"}),
    "codec": ({}, {"codec": "binary"}),
    "raw_steps": ({}, {"raw_steps": 2}),
    "variant": ({}, {"variant": "naive"}),
    "wire_dtype": ({}, {"wire_dtype": "fp16"}),
    "layers": ({}, {"layers": (0,)}),
    "calls_per_step": ({}, {"calls_per_step": 2}),
    "patch_exact_local": ({"mode": "patch"}, {"mode": "patch", "patch_exact_local": True}),
    "on_shape_change": ({}, {"on_shape_change": "reset"}),
    "new_request": ({}, {"new_request": "off"}),
    "nonfinite": ({}, {"nonfinite": "ignore"}),
    "check_every": ({}, {"check_every": 3}),
    "record_errors": ({}, {"record_errors": True}),
    "max_state_mb": ({}, {"max_state_mb": 64.0}),
    "seed": ({}, {"seed": 1}),
    "policy": ({}, {"policy": _policy}),
}


def test_every_field_changes_the_fingerprint() -> None:
    excluded = fingerprint_excluded(CompactConfig())
    fields = [f.name for f in dataclasses.fields(CompactConfig) if f.init and f.name not in excluded]
    assert sorted(CHANGES) == sorted(fields), "add the new field to CHANGES"
    for name, (base, changed) in CHANGES.items():
        assert CompactConfig(**base).fingerprint() != CompactConfig(**changed).fingerprint(), name


def test_fingerprint_is_stable_and_names_the_policy() -> None:
    assert CompactConfig().fingerprint() == CompactConfig().fingerprint()
    assert len(CompactConfig().fingerprint()) == 64
    assert CompactConfig(policy=_policy).fingerprint() == CompactConfig(policy=_policy).fingerprint()
    assert CompactConfig(layers=[1, 0]).fingerprint() == CompactConfig(layers=(1, 0)).fingerprint()
    assert CompactConfig().to_dict()["layers"] is None and CompactConfig(layers=(2,)).to_dict()["layers"] == [2]


def test_warmup_steps_is_a_deprecated_name_of_raw_steps() -> None:
    with pytest.warns(DeprecationWarning, match="'warmup_steps' is deprecated, use 'raw_steps'"):
        c = CompactConfig(warmup_steps=3)
    assert c.raw_steps == 3 and c.warmup_steps is None and c == CompactConfig(raw_steps=3)
    assert c.fingerprint() == CompactConfig(raw_steps=3).fingerprint()


@pytest.mark.parametrize("field", ["nonfinite", "on_shape_change"])
def test_old_error_spelling_is_deprecated_for_raise(field: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{field}: 'error' is deprecated, use 'raise'"):
        c = CompactConfig(**{field: "error"})
    assert getattr(c, field) == "raise" and c == CompactConfig(**{field: "raise"})
