"""`ccomm.validate`: one error format, naming the field and the allowed values."""
from __future__ import annotations

import math
import warnings

import pytest

from ccomm.validate import (check_bool, check_choice, check_int, check_number, check_ratio, deprecated_key,
                            deprecated_value, fail)


@pytest.mark.parametrize("call,message", [
    (lambda: check_int("n", -1, 0), "n: must be an integer >= 0, got -1"),
    (lambda: check_int("n", 9, 0, 8), "n: must be an integer in [0, 8], got 9"),
    (lambda: check_int("n", 9, None, 8), "n: must be an integer <= 8, got 9"),
    (lambda: check_int("n", True, 0), "n: must be an integer >= 0, got True"),
    (lambda: check_int("n", 2.0, 0), "n: must be an integer >= 0, got 2.0"),
    (lambda: check_number("x", 0, 0.0, lo_open=True), "x: must be a finite number in (0, inf), got 0"),
    (lambda: check_number("x", 0.5, 0.0, 0.5, hi_open=True), "x: must be a finite number in [0, 0.5), got 0.5"),
    (lambda: check_number("x", math.nan), "x: must be a finite number in (-inf, inf), got nan"),
    (lambda: check_number("x", math.inf, 0.0), "x: must be a finite number in [0, inf), got inf"),
    (lambda: check_number("x", "1", 0.0), "x: must be a finite number in [0, inf), got '1'"),
    (lambda: check_number("x", False, 0.0), "x: must be a finite number in [0, inf), got False"),
    (lambda: check_ratio("topk.ratio", 0), "topk.ratio: must be a finite number in (0, 1], got 0"),
    (lambda: check_ratio("topk.ratio", 1.5), "topk.ratio: must be a finite number in (0, 1], got 1.5"),
    (lambda: check_bool("flag", 1), "flag: must be a bool (true or false), got 1"),
    (lambda: check_choice("mode", "x", ("a", "b")), "mode: must be one of ['a', 'b'], got 'x'"),
    (lambda: fail("layers", "None or distinct integers >= 0", [1, 1]),
     "layers: must be None or distinct integers >= 0, got [1, 1]"),
])
def test_one_error_format_names_field_and_allowed_values(call, message: str) -> None:
    with pytest.raises(ValueError) as ei:
        call()
    assert str(ei.value) == message


def test_checks_return_the_canonical_value() -> None:
    assert check_int("n", 3, 0) == 3 and type(check_int("n", 3, 0)) is int
    assert check_number("x", 2, 0.0) == 2.0 and type(check_number("x", 2, 0.0)) is float
    assert check_ratio("r", 1) == 1.0
    assert check_bool("b", False) is False
    assert check_choice("c", "a", ["a"]) == "a"


def test_caller_exception_type() -> None:
    class CheckpointLike(ValueError):
        pass

    with pytest.raises(CheckpointLike, match=r"^state\.step: must be an integer >= 0, got -1$"):
        check_int("state.step", -1, 0, error=CheckpointLike)


def test_deprecated_key_warns_names_new_key_and_converts() -> None:
    with pytest.warns(DeprecationWarning, match="'old' is deprecated, use 'new'"):
        out = deprecated_key({"old": 4, "x": 1}, "old", "new", "cfg", convert=lambda v: v / 2)
    assert out == {"new": 2.0, "x": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert deprecated_key({"new": 1}, "old", "new") == {"new": 1}  # no warning for the new name
    with pytest.raises(ValueError, match="give 'new' only"):
        deprecated_key({"old": 1, "new": 1}, "old", "new")


def test_deprecated_value_warns_and_maps() -> None:
    with pytest.warns(DeprecationWarning, match="nonfinite: 'error' is deprecated, use 'raise'"):
        assert deprecated_value("nonfinite", "error", {"error": "raise"}) == "raise"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert deprecated_value("nonfinite", "raise", {"error": "raise"}) == "raise"
        assert deprecated_value("layers", [1], {"error": "raise"}) == [1]  # unhashable: not an old spelling
