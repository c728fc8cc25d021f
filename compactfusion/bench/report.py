"""Write a run's outputs: ``results.json``, ``report.md``, the PNGs and the ablation CSV."""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from .plots import ablation_csv, ablation_plot, image_grid, latency_plot
from .runner import RunData

__all__ = ["write_outputs", "to_markdown", "host_info", "rerender"]


_ABLATION_STEPS = (0, 1, 2, 5, 10, 20, 26, 27)


def host_info(load_at_start: Any = None) -> dict[str, Any]:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "loadavg_at_start": None if load_at_start is None else list(load_at_start),
            "loadavg_at_end": load}


def _f(x: Any, fmt: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "∞"
    return format(x, fmt)


def _load(load: Any) -> str:
    return "–" if not load else " / ".join(f"{x:.2f}" for x in load)


def _model_lines(model: Any) -> list[str]:
    if not model or "weights_sha256" not in model:
        return []
    text = f"Model: tiny DiT checkpoint sha256 `{model['weights_sha256'][:16]}…`"
    gate = model.get("gate")
    if gate:
        verdict = "passed" if gate.get("passed") else "**failed**"
        text += (f"; its training sanity gate (a digit classifier labels class-conditioned samples) {verdict}: "
                 f"accuracy {gate.get('accuracy', float('nan')):.2f} (threshold {gate.get('threshold')}). "
                 "Quality numbers compare outputs of the same model, so they measure the fidelity of the exchange, "
                 "not image quality")
    return [text + ".", ""]


def _kib(x: Any) -> str:
    return "–" if x is None else f"{x / 1024:.1f}"


def _method_table(block: dict[str, Any], steps: int) -> list[str]:
    link = block.get("main_link_mbps")
    lines = [f"Main link: {'unshaped (plain gloo)' if link is None else f'{link:.4g} Mbit/s per rank, no added latency'}.",
             "",
             "| method | latency s (median) | IQR | speed-up vs single | unshaped s | wire KiB/rank | KV KiB | compression ratio (request) | compression ratio (compressed steps) | PSNR dB | SSIM | PSNR vs single | base memory KiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in block["methods"].items():
        lines.append(
            f"| {name} | {_f(r['latency_s'], '.4f')} | {_f(r['latency_iqr_s'], '.4f')} | {_f(r['speedup_vs_single'], '.2f')} "
            f"| {_f(r['latency_unshaped_s'], '.4f')} | {_kib(r['wire_bytes'])} | {_kib(r['kv_bytes'])} "
            f"| {_f(r.get('compression_ratio'), '.2f')} | {_f(r.get('compression_ratio_steps'), '.2f')} "
            f"| {_f(r['psnr_db'], '.2f')} | {_f(r['ssim'], '.4f')} | {_f(r.get('psnr_vs_single_db'), '.2f')} "
            f"| {_kib(r['state_nbytes'])} |")
    return lines


def _curve_table(curves: list[dict[str, Any]]) -> list[str]:
    if not curves:
        return []
    methods = list(curves[0]["latency_s"])
    for c in curves:
        methods += [m for m in c["latency_s"] if m not in methods]
    head = ["link (Mbit/s per rank)"] + methods
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in curves:
        mb = "unshaped" if c["mbps_per_rank"] is None else f"{c['mbps_per_rank']:.4g}"
        lines.append("| " + " | ".join([mb] + [_f(c["latency_s"].get(m), ".4f") for m in methods]) + " |")
    return lines


def _projection_table(proj: dict[str, Any]) -> list[str]:
    rows = proj["rows"]
    bws = sorted({r["mbps_per_rank"] for r in rows})
    lines = ["| method | basis | " + " | ".join(f"{b:g} MB/s: ours / paper" for b in bws) + " |",
             "|---|---|" + "---|" * len(bws)]
    seen: dict[tuple[str, str], dict[float, float]] = {}
    for r in rows:
        seen.setdefault((r["method"], r["basis"]), {})[r["mbps_per_rank"]] = r["time_s"]
    for (method, basis), times in seen.items():
        paper = proj["paper"].get(method, {})
        name = f"{method} ({proj['paper_names'][method]})" if method in proj["paper_names"] else method
        cells = [f"{times[b]:.2f} / {_f(paper.get(str(b)), '.2f')}" for b in bws]
        lines.append(f"| {name} | {basis} | " + " | ".join(cells) + " |")
    return lines


def _ablation_table(abl: dict[str, Any]) -> list[str]:
    variants = list(abl["variants"])
    lines = ["| step | " + " | ".join(f"{v}: comp. error / deviation" for v in variants) + " |",
             "|---|" + "---|" * len(variants)]
    steps = sorted({r["step"] for e in abl["variants"].values() for r in e["steps"]})
    last = steps[-1] if steps else 0
    for st in steps:
        if st not in _ABLATION_STEPS and st != last:
            continue
        cells = []
        for v in variants:
            row = next((r for r in abl["variants"][v]["steps"] if r["step"] == st), None)
            cells.append("–" if row is None else f"{row['comp_err']:.4g} / {row['deviation']:.4g}")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines += ["", "Final images vs ring (uncompressed): " + ", ".join(
        f"{v} PSNR {_f(e.get('psnr_db'), '.2f')} dB, SSIM {_f(e.get('ssim'), '.4f')}" for v, e in abl["variants"].items()) + "."]
    return lines


def _key(d: dict[str, Any], new: str, old: str) -> Any:
    """`d[new]`, or `d[old]` for a results.json written before the rename."""
    return d.get(new, d.get(old))


def _paper_bytes_table(pb: dict[str, Any]) -> list[str]:
    lines = [f"Each rank's own K and V are {pb['rows']} × {pb['channels']} fp16 (FLUX.1 1024² split over "
             f"P = {pb['ranks']}); bytes per ring call are what one rank handed to torch.distributed (`kv_ring`, "
             f"`ccomm.stats`) over {pb['calls']} calls (the first raw, W = 1). Request: 1 raw + 27 compressed steps.",
             "", "| method | bytes per call (raw, compressed…) | compression ratio, compressed steps | compression ratio, request | formula |",
             "|---|---|---|---|---|"]
    for name, e in pb["methods"].items():
        calls = ", ".join(f"{b:.0f}" for b in e["bytes_per_call"])
        # results.json files written before the glossary (docs/glossary.md) used ratio_* keys.
        steps, request, formula = (_key(e, new, old) for new, old in (
            ("compression_ratio_steps", "ratio_compressed_steps"), ("compression_ratio", "ratio_request"),
            ("compression_ratio_formula", "ratio_formula")))
        lines.append(f"| {name} | {calls} | {_f(steps, '.2f')} | {_f(request, '.2f')} | {_f(formula, '.2f')} |")
    return lines


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | where | measured | required | met |", "|---|---|---|---|---|"]
    for t in targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['where']} | {_f(t['value'], '.3f')} | {t['op']} {t['threshold']:g} | {met} |")
    return lines


def _raw_step_exceptions(cfg: dict[str, Any]) -> str:
    from .methods import METHODS

    own = [f"{n}: {METHODS[n].raw_steps}" for n in cfg["methods"]
           if n in METHODS and METHODS[n].raw_steps is not None]
    return "; ".join(own) + " (DistriFusion's original default)" if own else "every method"


def to_markdown(res: dict[str, Any], notes: list[str]) -> str:
    cfg = res["config"]
    lines = [f"# CompactFusion benchmark: {cfg['name']}", "",
             f"Command: `{res['command']}`{' (quick)' if res['quick'] else ''}. Wall time {res['elapsed_s']:.0f} s. "
             f"Host: {res['host']['cpus']} CPUs, torch {res['host']['torch']}, load average (1/5/15 min) "
             f"before the run {_load(res['host'].get('loadavg_at_start'))}, at the end "
             f"{_load(res['host']['loadavg_at_end'])} (the run's own ranks included).",
             ""] + _model_lines(res.get("model")) + [
             f"Setup: backend `{cfg['backend']}`, {res['steps']} DDIM steps, guidance {cfg['guidance']}, seed {cfg['seed']}, "
             f"one request = {res['images_per_request']} images (labels {cfg['labels']}) in one batch, wire dtype "
             f"{cfg['wire_dtype']}, raw steps {cfg.get('raw_steps', cfg.get('warmup_steps'))} ({_raw_step_exceptions(cfg)}), {cfg['threads']} thread(s) per rank; the single "
             f"process is one rank of the same pool with the same thread count. Latencies are medians over "
             f"{cfg['repeats']} interleaved rounds (methods round-robin) after {cfg['warmup_loops']} discarded round(s); "
             "each sample is the slowest rank's time from a common start instant.", ""]
    lines += [f"- {n}" for n in notes] + [""]
    blocks = [(res["ranks"], res)] + [(res[k]["ranks"], res[k]) for k in sorted(res) if k.startswith("ranks") and k != "ranks"
                                       and res[k]["ranks"] != res["ranks"]]
    for p, block in blocks:
        lines += [f"## P = {p} ranks" + (" (`methods`)" if block is res else f" (`ranks{p}`)"), ""]
        lines += _method_table(block, res["steps"]) + [""]
        lines += ["Wire bytes are what one rank hands to torch.distributed per request (`ccomm.stats`): every ring hop "
                  "counts, an all-gather counts the rank's own contribution once (the network then carries it to the "
                  "P − 1 peers), so ring and patch/distrifusion bytes are equal at P = 2 only. Ratios compare each "
                  "method with the uncompressed reference of its own mode; PSNR/SSIM are against that reference's "
                  "images (same P and seed), averaged over the images of the request.", ""]
        if block.get("search"):
            s = block["search"]
            hist = ", ".join(f"{b * 8 / 1e6:.4g} Mbit/s → {t:.2f}" for b, t in s["history"])
            target, got, err = (_key(s, new, old) for new, old in (
                ("target_slowdown", "target_ratio"), ("slowdown", "ratio"), ("slowdown_error", "ratio_error")))
            lines += [f"Bandwidth search on ring / single (target slowdown {target:.2f}; each probe times both, "
                      f"interleaved): {hist}; chosen {s['mbps_per_rank']:.4g} Mbit/s per rank (slowdown {got:.2f}, "
                      f"{100 * err:+.1f} % from target, converged: {s['converged']}).", ""]
        if len(block.get("curves", [])) > 1:
            lines += ["Latency (s, median) per link:", ""] + _curve_table(block["curves"]) + [""]
    if res.get("ablation"):
        lines += [f"## Error accumulation (codec {res['ablation']['codec']}, P = {res['ablation']['ranks']})", "",
                  "Frobenius norms averaged over layers and keys (`ablation.csv` has every step; `ablation.png`). "
                  "naive: C(x) without a base; no_ef: residual against the sender's true previous value; "
                  "ef: residual against the mirrored base (CompactFusion).", ""]
        lines += _ablation_table(res["ablation"]) + [""]
    if res.get("paper_shape_bytes"):
        lines += ["## Wire bytes at FLUX.1's K/V shape (measured)", ""] + _paper_bytes_table(res["paper_shape_bytes"]) + [""]
    lines += ["## Projection to the paper's setting (FLUX.1-dev 1024², 28 steps, 4 ranks)", "",
              "netsim cost model (`compactfusion/bench/project.py`): paper's single-GPU time split over 4 ranks plus "
              "ring/all-gather transfer time at the per-rank bandwidth; `formula` uses the codec's exact bytes at the "
              "FLUX shape (1024 × 3072 per rank), `measured` our measured compressed-step ratio (tiny shape, larger "
              "scale overhead). Paper: repo data (docs/design/compactfusion.md#paper-ethernet-numbers). Seconds per image.", ""]
    lines += _projection_table(res["projection"]) + [""]
    lines += ["## Targets (issue #5)", ""] + _targets_table(res["targets"]) + [""]
    lines += ["## Figures", "", "![images](images.png)", "", "![latency vs bandwidth](latency_vs_bandwidth.png)", ""]
    if res.get("ablation"):
        lines += ["![ablation](ablation.png)", ""]
    return "\n".join(lines)


def _notes(res: dict[str, Any]) -> list[str]:
    notes = ["Absolute seconds are this machine's; only ratios within the run are meaningful."]
    notes += list(res.get("failures", []))
    if res["config"]["backend"] in ("tiny_dit_random", "wide_dit_random"):
        notes.append(f"Backend `{res['config']['backend']}` has seeded random weights: its images mean nothing, and "
                     "PSNR/SSIM measure the fidelity of the exchange on an untrained network, not image quality.")
    cpus = res["host"]["cpus"] or 1
    start = res["host"].get("loadavg_at_start")
    if start:  # before the run's own ranks: other work on the host
        if start[0] > 0.5 * cpus:
            notes.append(f"The machine was busy before the run (1-min load {start[0]:.2f} on {cpus} CPUs): "
                         "latency ratios are noisy.")
    else:  # older results: only the end load, which includes the run's own ranks
        load = res["host"]["loadavg_at_end"]
        if load and load[0] > 0.5 * cpus:
            notes.append(f"The machine was busy (1-min load {load[0]:.2f} on {cpus} CPUs): latency ratios are noisy.")
    blocks = [res] + [res[k] for k in res if k.startswith("ranks") and isinstance(res[k], dict)
                      and res[k]["ranks"] != res["ranks"]]
    for block in blocks:
        for label, per_rank in (block.get("emulation") or {}).items():
            ops, late = sum(r["ops"] for r in per_rank), sum(r["late_ops"] for r in per_rank)
            if late:
                notes.append(f"P = {block['ranks']}, link {label}: {late} of {ops} emulated operations finished after "
                             f"their modeled time (max {1e3 * max(r['max_late_s'] for r in per_rank):.1f} ms late): "
                             "the real transport on this busy host was slower than the link model there.")
    if res["ranks"] > (res["host"]["cpus"] or 1):
        notes.append(f"P = {res['ranks']} runs {res['ranks']} one-thread ranks on {cpus} CPUs (oversubscribed): its "
                     "latencies are not comparable; it is reported for bytes and quality.")
    return notes


def write_outputs(data: RunData, res: dict[str, Any], out: Path, images: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, report.md, images.png, latency_vs_bandwidth.png and the ablation files."""
    out.mkdir(parents=True, exist_ok=True)
    res["host"] = host_info(data.load_at_start)
    notes = _notes(res)
    res["notes"] = notes
    paths = {"results": out / "results.json", "report": out / "report.md"}
    paths["images"] = image_grid(images, out / "images.png", f"P={res['ranks']}, seed {res['config']['seed']}")
    timing = res.get(f"ranks{data.config.timing_ranks}", res)
    paths["latency"] = latency_plot(timing.get("curves", []), out / "latency_vs_bandwidth.png",
                                    f"P={data.config.timing_ranks}: median seconds per request")
    if res.get("ablation"):
        paths["ablation_png"] = ablation_plot(res["ablation"], out / "ablation.png")
        paths["ablation_csv"] = ablation_csv(res["ablation"], out / "ablation.csv")
    paths["results"].write_text(json.dumps(res, indent=1, default=float) + "\n")
    paths["report"].write_text(to_markdown(res, notes) + "\n")
    return paths


def rerender(out: Path) -> Path:
    """Write ``report.md`` again from ``results.json`` in ``out`` (after a change of the report layout)."""
    from ccomm.configfile import load_mapping

    res = load_mapping(out / "results.json", "results")
    try:
        notes = _notes(res)  # derived from the results, so a new note rule applies to old runs too
        text = to_markdown(res, notes)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{out / 'results.json'}: not a `compactfusion bench` results file "
                         f"({type(e).__name__}: {e})") from e
    res["notes"] = notes
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    path = out / "report.md"
    path.write_text(text + "\n")
    return path
