"""`cpu_env_patch()`: make xfuser 0.7.0 importable, and its ring mode constructible, without an accelerator.

xfuser assumes CUDA (or another accelerator) while it imports and builds its groups; the
reasons and what each step changes are findings 1, 3, 4 and 5 of
docs/compactfusion.md#xfuser-070-findings. `compactfusion.adapters.xfuser` re-exports `cpu_env_patch`;
the compressed ring (`patch()`) is what then makes ring mode usable on CPU.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import sys
from typing import Any

import torch

__all__ = ["cpu_env_patch", "xfuser_version"]

logger = logging.getLogger(__name__)

_CPU_MARK = "_compactfusion_cpu_env"
_RING_REFUSAL = "does not support ring parallelism"


def xfuser_version() -> str:
    """Installed xfuser version ("unknown" if its metadata is missing)."""
    try:
        return importlib.metadata.version("xfuser")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _has_accelerator() -> bool:
    return bool(torch.cuda.is_available())


def cpu_env_patch() -> bool:
    """Make xfuser importable and its ring mode constructible on a host without an accelerator.

    Steps:
    1. With CUDA available, do nothing and return False (xfuser works as shipped).
    2. If already applied, return True. If xfuser was imported without it (possible only
       where its own checks passed), raise RuntimeError rather than half-patch it.
    3. Create the `xfuser` package object without running `__init__`, import `xfuser.envs`,
       make `get_device_version` return None and `get_torch_distributed_backend` "gloo",
       and force `has_long_ctx_attn` so ring/Ulysses groups are built.
    4. Run the package `__init__`; on failure remove every half-imported `xfuser*` module.
    5. Let `RuntimeState`'s "backend does not support ring parallelism" refusal pass for
       SDPA / SDPA_MATH (the compressed ring brings its own LSE); other refusals still raise.
    6. Bind `usp.PROCESS_GROUP` (None without CUDA) to yunchang's group singleton, so the
       Ulysses all-to-all finds its group.
    Process-wide and irreversible for the imported modules, so call it once, before any
    `import xfuser`, in every process that builds an xfuser pipeline.
    """
    if _has_accelerator():
        logger.info("cpu_env_patch: an accelerator is available, xfuser is left unpatched")
        return False
    loaded = sys.modules.get("xfuser")
    if loaded is not None:
        if getattr(loaded, _CPU_MARK, False):
            return True
        raise RuntimeError("cpu_env_patch(): xfuser was already imported; call cpu_env_patch() before importing xfuser")
    spec = importlib.util.find_spec("xfuser")
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("xfuser is not installed (pip install 'ccomm[xdit]' for xfuser 0.7.0 and triton)", name="xfuser")
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["xfuser"] = pkg
    try:
        # Package init reads these (config.py reads envs.CUDA_VERSION; parallel_state and the
        # attention processors copy has_long_ctx_attn), so they change before it runs.
        envs = importlib.import_module("xfuser.envs")
        envs.get_device_version = lambda: None
        envs.get_torch_distributed_backend = lambda: "gloo"
        envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True
        spec.loader.exec_module(pkg)
        _relax_ring_backend_check()
        _bind_ulysses_groups()
    except BaseException:
        for name in [n for n in sys.modules if n == "xfuser" or n.startswith("xfuser.")]:
            del sys.modules[name]
        raise
    setattr(pkg, _CPU_MARK, True)
    logger.info("cpu_env_patch: xfuser %s imported for CPU (gloo, long-context groups on)", xfuser_version())
    return True


def _bind_ulysses_groups() -> None:
    from yunchang.globals import PROCESS_GROUP
    from xfuser.model_executor.layers import usp

    if usp.PROCESS_GROUP is None:
        usp.PROCESS_GROUP = PROCESS_GROUP


def _relax_ring_backend_check() -> None:
    from xfuser.core.distributed import attention_backend as ab
    from xfuser.core.distributed.runtime_state import RuntimeState

    original = RuntimeState._check_if_backend_compatible_with_current_configuration
    if getattr(original, _CPU_MARK, False):
        return
    allowed = (ab.AttentionBackendType.SDPA, ab.AttentionBackendType.SDPA_MATH)

    def check(self: Any, attention_backend: Any) -> None:
        try:
            original(self, attention_backend)
        except RuntimeError as exc:
            # Only the ring-capability refusal of the CPU backends is waived: the compressed
            # ring never calls xfuser's attention function.
            if attention_backend not in allowed or _RING_REFUSAL not in str(exc):
                raise
            logger.info("cpu_env_patch: %s with ring_degree > 1 accepted; run compactfusion.adapters.xfuser.patch() "
                        "before the first call (xfuser has no CPU ring)", attention_backend.name)

    setattr(check, _CPU_MARK, True)
    RuntimeState._check_if_backend_compatible_with_current_configuration = check
