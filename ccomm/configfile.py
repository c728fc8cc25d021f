"""Files a command reads and writes: configs reported as `file:line: message`, output dirs checked first.

The command lines (`deco-sgd`, `compactfusion`, `netsim`) turn a `ConfigFileError` (a
`ValueError`) into exit code 2, the documented bad-input code, instead of a parser
traceback. An empty file or a document that is not a mapping is an error too: an empty
YAML would otherwise silently mean "every default".
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigFileError", "load_mapping", "writable_dir"]


class ConfigFileError(ValueError):
    """A config file is missing, unreadable, malformed, empty or not a mapping."""


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigFileError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = " ".join(filter(None, (exc.context, exc.problem)))
        raise ConfigFileError(f"{path}:{line}: invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}:1: invalid YAML: {exc}") from None


def load_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The mapping a YAML (or, by suffix, JSON) file holds; `ConfigFileError` otherwise.

    `what` names the file's role in messages (e.g. "results").
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigFileError(f"{p}: no such file (the {what} file)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{p}: cannot read the {what} file: {exc}") from None
    data = _parse(p, text)
    if data is None:
        raise ConfigFileError(f"{p}:1: the {what} file is empty; expected a mapping of keys")
    if not isinstance(data, dict):
        raise ConfigFileError(f"{p}:1: the {what} file must hold a mapping of keys, got a {type(data).__name__}")
    return data


def writable_dir(path: str | Path, what: str = "--out") -> Path:
    """Create `path` if needed and prove a file can be written there; `ConfigFileError` otherwise.

    Long commands call it before any work, so a wrong output directory costs nothing.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigFileError(f"{what} {str(p)!r}: not a writable directory ({exc.strerror or exc})") from None
    return p
