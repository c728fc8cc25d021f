"""Adapters that run CompactFusion's compressed exchange inside other inference stacks.

- `compactfusion.adapters.xfuser`: xDiT (`xfuser` 0.7.0, the `xdit` extra). Its ring-attention
  call is replaced by CompactFusion's compressed ring; `cpu_env_patch()` makes xfuser importable
  and its ring mode runnable on hosts without an accelerator.

Importing this package never imports a third-party stack; each adapter module does so itself.
"""
from __future__ import annotations

__all__: list[str] = []
