"""The CompactFusion benchmark (``compactfusion bench CONFIG.yaml --out DIR [--quick]``).

Modules: :mod:`.config` (YAML), :mod:`.methods` (what is compared), :mod:`.backend` (model,
parallelize, sample), :mod:`.pool` (gloo ranks), :mod:`.worker` (per-rank jobs),
:mod:`.search` (bandwidth search), :mod:`.runner` (the protocol), :mod:`.summary`
(results mapping), :mod:`.project` (FLUX projection), :mod:`.plots` and :mod:`.report`.
"""
from .config import BenchConfig, LinkConfig, config_from_dict, load_config
from .methods import METHODS, Method
from .runner import RunData, run_benchmark
from .search import SearchResult, secant_bandwidth

__all__ = [
    "BenchConfig", "LinkConfig", "load_config", "config_from_dict", "METHODS", "Method",
    "RunData", "run_benchmark", "SearchResult", "secant_bandwidth", "bench",
]


def _model_info(backend: str) -> dict:
    """Which weights the run used (the checkpoint may be retrained later)."""
    import hashlib
    import json

    if backend != "tiny_dit":
        return {"backend": backend}
    from compactfusion.models.tiny_dit import CHECKPOINT_DIR

    info: dict = {"backend": backend}
    weights = CHECKPOINT_DIR / "model.safetensors"
    if weights.is_file():
        info["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta = CHECKPOINT_DIR / "train.json"
    if meta.is_file():
        doc = json.loads(meta.read_text())
        info["train"] = {k: v for k, v in doc.items() if not isinstance(v, (list, dict))}
        gate = doc.get("gate")
        if isinstance(gate, dict):
            info["gate"] = {k: v for k, v in gate.items() if not isinstance(v, (list, dict))}
    return info


def bench(config: BenchConfig, out: "str | object", *, quick: bool = False, progress: bool = True,
          command: str = "") -> dict:
    """Run the benchmark described by ``config`` and write its outputs to ``out``; returns the results."""
    from pathlib import Path

    from .report import write_outputs
    from .summary import summarize

    from ccomm.configfile import writable_dir

    cfg = config.quick_version() if quick else config
    out_dir = writable_dir(str(out))  # fail before the run, not after it
    partial = out_dir / "partial.json"
    data = run_benchmark(cfg, progress=progress, partial=partial)
    res = summarize(data, command=command, quick=quick)
    res["model"] = _model_info(cfg.backend)
    top = data.per_ranks[max(data.per_ranks)]
    write_outputs(data, res, out_dir, top.images)
    partial.unlink(missing_ok=True)  # results.json now holds everything
    return res
