"""Lazy re-exports for package ``__init__`` modules (PEP 562 module ``__getattr__``).

``import netsim`` must stay cheap and free of torch: the wire daemon and the probe agent
(``python -m netsim.namespaces.wire``, ``python -m netsim.probe.agent``) run with the standard
library only, and Python imports every parent package first. Packages therefore name their
public objects here and import the defining module on first attribute access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``; ``exports`` maps a name to ``"module"`` (the
    attribute of that module with the same name) or ``"module:"`` (the module itself).

    A resolved name is cached in ``namespace`` (the package's globals), so the hook runs once.
    """

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, _, attr = target.partition(":")
        module = importlib.import_module(module_name)
        value = module if attr == "" and target.endswith(":") else getattr(module, attr or name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
