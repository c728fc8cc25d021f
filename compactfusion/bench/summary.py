"""Turn the raw samples of a run into the ``results.json`` mapping.

Per group size and method (docs/design/compactfusion.md#metrics):

- ``latency_s``: median wall time of one request (all ``labels`` as one batch) on the main
  link, the slowest rank of each sample; ``latency_iqr_s``; ``latency_unshaped_s`` on the
  plain transport; ``speedup_vs_single`` = median(single) / median(method) on the same link.
- ``wire_bytes``: bytes one rank hands to torch.distributed per request (``ccomm.stats``,
  mean over ranks), ``wire_bytes_by_tag`` (``kv_ring``, ``kv_gather``, ``token_gather``),
  ``kv_bytes`` (the K/V exchange alone).
- ``compression_ratio``: K/V bytes of the uncompressed reference of the same mode over this
  method's, for the whole request; ``compression_ratio_steps``: the same over the compressed
  steps only (warm-up steps send raw tensors, as many bytes as the reference's).
- ``psnr_db`` / ``ssim`` against the uncompressed output of the same mode, P and seed;
  ``psnr_vs_single_db`` / ``ssim_vs_single`` against the single process.

At the top level, ``paper_shape_bytes`` (largest P, ``paper_bytes: true``): the ring methods'
bytes per call at FLUX.1's K/V shape and their ratios (:mod:`.paper_bytes`).
"""
from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from .methods import METHODS
from .paper_bytes import summarize_paper_bytes
from .project import PAPER_ETHERNET, PAPER_MAP, FluxSetting, project
from .runner import UNSHAPED, RunData, Samples

__all__ = ["summarize", "quality", "KV_TAGS"]


KV_TAGS = ("kv_ring", "kv_gather")


def quality(a: Any, b: Any) -> tuple[float, float]:
    """(PSNR dB, SSIM) of image batches ``a`` against ``b`` (in [-1, 1]) with :mod:`compactfusion.metrics`.

    Both are per-image values averaged over the batch; a PSNR of +inf (identical image) is left
    out of the mean unless every image is identical.
    """
    import torch

    from compactfusion.metrics import psnr, ssim

    ta, tb = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    p = psnr(ta, tb).double()
    fin = p[torch.isfinite(p)]
    return (float(fin.mean()) if fin.numel() else math.inf), float(ssim(ta, tb).double().mean())


def _fin(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _median(xs: list[float] | None) -> float | None:
    return statistics.median(xs) if xs else None


def _iqr(xs: list[float] | None) -> float | None:
    if not xs or len(xs) < 2:
        return 0.0 if xs else None
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


def _mean_tags(per_rank: list[dict[str, int]]) -> dict[str, float]:
    tags = sorted({t for d in per_rank for t in d})
    return {t: statistics.mean(d.get(t, 0) for d in per_rank) for t in tags}


def _methods(s: Samples, steps: int, raw_steps: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    main = s.latency.get(s.main_link, {})
    unshaped = s.latency.get(UNSHAPED, {})
    single_main = _median(main.get("single"))
    for name in s.bytes_by_tag:
        m = METHODS[name]
        tags = _mean_tags(s.bytes_by_tag[name])
        kv = sum(v for t, v in tags.items() if t in KV_TAGS)
        row: dict[str, Any] = {
            "mode": m.mode, "codec": m.codec, "reference": m.reference,
            "latency_s": _median(main.get(name)), "latency_iqr_s": _iqr(main.get(name)),
            "latency_samples": list(main.get(name, [])),
            "latency_unshaped_s": _median(unshaped.get(name)),
            "wire_bytes": sum(tags.values()), "wire_bytes_by_tag": tags, "kv_bytes": kv,
            "wire_bytes_per_step": sum(tags.values()) / steps,
            "state_nbytes": s.state_nbytes.get(name, 0),
        }
        lat = row["latency_s"]
        row["speedup_vs_single"] = single_main / lat if single_main and lat else None
        ref = m.reference
        if ref is not None and ref in s.bytes_by_tag:
            ref_kv = sum(v for t, v in _mean_tags(s.bytes_by_tag[ref]).items() if t in KV_TAGS)
            row["compression_ratio"] = ref_kv / kv if kv else None
            raw_share = ref_kv * min(m.raw(raw_steps), steps) / steps if m.compressed else 0.0
            rest = kv - raw_share
            row["compression_ratio_steps"] = (ref_kv - raw_share) / rest if rest > 0 else None
        if ref is not None and ref in s.images and s.images.get(name) is not None:
            p, q = quality(s.images[name], s.images[ref])
            row["psnr_db"], row["ssim"] = _fin(p), q
        else:
            row["psnr_db"], row["ssim"] = None, None
        if name != "single" and "single" in s.images and s.images.get(name) is not None:
            p, q = quality(s.images[name], s.images["single"])
            row["psnr_vs_single_db"], row["ssim_vs_single"] = _fin(p), q
        out[name] = row
    return out


def _curves(s: Samples) -> list[dict[str, Any]]:
    rows = []
    for label, per in s.latency.items():
        if not per:
            continue
        rows.append({"link": label, "mbps_per_rank": s.links.get(label),
                     "latency_s": {m: _median(v) for m, v in per.items()}, "repeats": {m: len(v) for m, v in per.items()}})
    rows.sort(key=lambda r: math.inf if r["mbps_per_rank"] is None else r["mbps_per_rank"])
    return rows


def _ablation(s: Samples, cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"codec": cfg.ablation_codec, "ranks": s.ranks, "variants": {}}
    ref = s.images.get("ring")
    for variant, rows in s.errors.items():
        per_step: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            per_step.setdefault(int(r["step"]), []).append(r)
        steps = [{"step": k, "comp_err": statistics.mean(float(r["comp_err"]) for r in v),
                  "deviation": statistics.mean(float(r["deviation"]) for r in v), "rows": len(v)}
                 for k, v in sorted(per_step.items())]
        entry: dict[str, Any] = {"steps": steps}
        label = next((k for k in s.images if k.endswith(f"[{variant}]")), None)
        if ref is not None and label is not None:
            p, q = quality(s.images[label], ref)
            entry["psnr_db"], entry["ssim"] = _fin(p), q
        out["variants"][variant] = entry
    return out


def _search(s: Samples) -> dict[str, Any] | None:
    r = s.search
    if r is None:
        return None
    # The runner searches on ring/single slowdowns, so "time" here is in units of T_single.
    return {"bandwidth_Bps": r.bandwidth_Bps, "mbps_per_rank": r.bandwidth_Bps * 8 / 1e6, "slowdown": r.time_s,
            "target_slowdown": r.target_s, "history": [list(h) for h in r.history], "converged": r.converged,
            "reachable": r.reachable, "slowdown_error": r.slowdown_error}


def _targets(res: dict[str, Any], cfg: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, threshold: float, where: str) -> None:
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"target": name, "value": value, "op": op, "threshold": threshold, "met": met, "where": where})

    top = res["methods"]
    for meth, thr in (("ring+binary", 15.0), ("ring+int2", 7.5)):
        if meth in top:
            add(f"{meth} compression ratio (whole request)", top[meth].get("compression_ratio"), ">=", thr, "methods")
            add(f"{meth} compression ratio (compressed steps)", top[meth].get("compression_ratio_steps"), ">=", thr, "methods")
    paper = res.get("paper_shape_bytes", {}).get("methods", {})
    for meth, thr in (("ring+binary", 15.0), ("ring+int2", 7.5)):
        if paper.get(meth, {}).get("compression_ratio_steps") is not None:
            add(f"{meth} compression ratio at FLUX's K/V shape (compressed steps)",
                paper[meth]["compression_ratio_steps"], ">=", thr, "paper_shape_bytes")
    for where, group in (("methods", top), (f"ranks{cfg.timing_ranks}", res.get(f"ranks{cfg.timing_ranks}", {}).get("methods", {}))):
        if "ring+int2" in group:
            add("ring+int2 PSNR dB", group["ring+int2"].get("psnr_db"), ">=", 30.0, where)
            if "distrifusion" in group and group["distrifusion"].get("psnr_db") is not None:
                add("ring+int2 PSNR minus distrifusion PSNR (dB)",
                    (group["ring+int2"].get("psnr_db") or math.inf) - group["distrifusion"]["psnr_db"], ">=", 1e-9, where)
    timing = res.get(f"ranks{cfg.timing_ranks}", res)
    tm = timing.get("methods", {})
    if cfg.link.shaped and "ring" in tm and "single" in tm and tm["ring"].get("latency_s"):
        where = f"ranks{cfg.timing_ranks}, main link"
        add("ring / single latency (slow-link regime)", tm["ring"]["latency_s"] / tm["single"]["latency_s"], ">=", 4.0, where)
        if "ring+binary" in tm:
            add("ring / ring+binary latency", tm["ring"]["latency_s"] / tm["ring+binary"]["latency_s"], ">=", 5.0, where)
            if "distrifusion" in tm:
                add("distrifusion / ring+binary latency",
                    tm["distrifusion"]["latency_s"] / tm["ring+binary"]["latency_s"], ">=", 5.0, where)
    key = "latency_unshaped_s"
    for name, row in tm.items():
        m = METHODS[name]
        if m.compressed and m.reference in tm and row.get(key) and tm[m.reference].get(key):
            add(f"{name} / {m.reference} latency, unshaped", row[key] / tm[m.reference][key], "<=", 1.10,
                f"ranks{cfg.timing_ranks}, unshaped")
    return out


def summarize(data: RunData, *, command: str, quick: bool) -> dict[str, Any]:
    """The results mapping (see the module docstring); the largest P goes under ``methods``."""
    cfg = data.config
    top_p = max(data.per_ranks)
    res: dict[str, Any] = {"command": command, "quick": quick, "config": cfg.to_dict(), "elapsed_s": data.elapsed_s,
                           "ranks": top_p, "images_per_request": len(cfg.labels), "steps": cfg.steps,
                           "failures": list(data.failures)}
    for p, s in sorted(data.per_ranks.items()):
        block = {"ranks": p, "methods": _methods(s, cfg.steps, cfg.raw_steps), "curves": _curves(s),
                 "emulation": s.emulation,
                 "search": _search(s), "main_link": s.main_link, "main_link_mbps": s.links.get(s.main_link)}
        if p == top_p:
            res.update({k: v for k, v in block.items() if k != "ranks"})
            if s.errors:
                res["ablation"] = _ablation(s, cfg)
            if s.paper_bytes:
                res["paper_shape_bytes"] = summarize_paper_bytes(s.paper_bytes, FluxSetting(), p)
        if p != top_p or len(data.per_ranks) == 1:
            res[f"ranks{p}"] = block
    ratios = {n: r.get("compression_ratio_steps") for n, r in res["methods"].items() if n != "patch+int2"}
    res["projection"] = {"rows": [vars(r) for r in project(ratios)], "paper": {k: {str(b): t for b, t in v.items()}
                                                                                for k, v in PAPER_ETHERNET.items()},
                         "paper_names": PAPER_MAP}
    res["targets"] = _targets(res, cfg)
    return res
