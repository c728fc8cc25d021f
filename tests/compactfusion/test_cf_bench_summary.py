"""compactfusion.bench.summary/report on fabricated samples: ratios, medians, targets, files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compactfusion.bench.config import config_from_dict
from compactfusion.bench.methods import METHODS
from compactfusion.bench.report import write_outputs
from compactfusion.bench.runner import UNSHAPED, RunData, Samples
from compactfusion.bench.search import SearchResult
from compactfusion.bench.summary import summarize

STEPS = 10
RAW = 1000  # K/V bytes per step of an uncompressed method


def _samples(p: int) -> Samples:
    rng = np.random.default_rng(0)
    base = rng.uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32)
    s = Samples(p)
    s.links = {UNSHAPED: None, "40Mbps": 40.0}
    s.main_link = "40Mbps"
    s.search = SearchResult(5e6, 4.9, 4.87, ((5e6, 4.9),), True, True)
    lat_main = {"single": 1.0, "ring": 5.0, "patch": 5.2, "distrifusion": 5.1, "ring+binary": 0.9, "ring+int2": 1.2,
                "ring+lowrank": 0.8, "ring+lowrank_int4": 0.85, "patch+int2": 1.3}
    s.latency = {"40Mbps": {m: [t, t * 1.1, t * 0.9] for m, t in lat_main.items()},
                 UNSHAPED: {m: [0.5] for m in lat_main}}
    s.latency[UNSHAPED]["single"] = [1.0]
    s.latency[UNSHAPED]["ring+binary"] = [0.6]  # 20 % slower than ring unshaped: must be reported missed
    per_step = {"ring+binary": 80, "ring+int2": 140, "ring+lowrank": 20, "ring+lowrank_int4": 25, "patch+int2": 140}
    noise = {"ring": 0.0, "patch": 0.0, "distrifusion": 0.2, "ring+binary": 0.05, "ring+int2": 0.01,
             "ring+lowrank": 0.1, "ring+lowrank_int4": 0.1, "patch+int2": 0.01, "single": 0.0}
    for m, spec in METHODS.items():
        if not spec.parallel:
            s.bytes_by_tag[m] = [{}] * p
        else:
            tag = "kv_ring" if spec.mode == "ring" else "kv_gather"
            kv = RAW * STEPS if not spec.compressed else RAW + per_step[m] * (STEPS - 1)  # step 0 raw
            s.bytes_by_tag[m] = [{tag: kv, "token_gather": 64}] * p
        s.images[m] = np.clip(base + noise[m] * rng.standard_normal(base.shape).astype(np.float32), -1, 1)
    s.errors = {v: [{"step": k, "layer": layer, "key": "x", "comp_err": 1.0 + k, "deviation": 2.0 + k}
                    for k in range(STEPS) for layer in range(2)] for v in ("naive", "no_ef", "ef")}
    for v in ("naive", "no_ef", "ef"):
        s.images[f"ring+int2[{v}]"] = s.images["ring+int2"]
    return s


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp_path = tmp_path_factory.mktemp("bench_summary")
    cfg = config_from_dict({"steps": STEPS, "labels": [1, 2], "ranks": [2, 4]})
    data = RunData(cfg, {2: _samples(2), 4: _samples(4)}, 12.0)
    res = summarize(data, command="test", quick=False)
    write_outputs(data, res, tmp_path, data.per_ranks[4].images)
    return res, tmp_path


def test_ratios_medians_and_quality(result: tuple[dict, Path]) -> None:
    res, _ = result
    m = res["methods"]
    assert res["ranks"] == 4 and res["ranks2"]["ranks"] == 2
    b = m["ring+binary"]
    assert b["kv_bytes"] == RAW + 80 * (STEPS - 1) and b["wire_bytes"] == b["kv_bytes"] + 64
    assert b["compression_ratio"] == pytest.approx(RAW * STEPS / (RAW + 80 * (STEPS - 1)))
    assert b["compression_ratio_steps"] == pytest.approx(RAW / 80)
    assert m["distrifusion"]["compression_ratio"] == pytest.approx(1.0)
    assert b["latency_s"] == pytest.approx(0.9) and b["latency_unshaped_s"] == pytest.approx(0.6)
    assert m["ring"]["speedup_vs_single"] == pytest.approx(0.2)
    assert m["ring"]["psnr_db"] is None and m["ring"]["psnr_vs_single_db"] is None  # identical images: inf -> null
    assert m["ring+int2"]["psnr_db"] > m["ring+binary"]["psnr_db"] > m["distrifusion"]["psnr_db"]
    assert 0 < m["distrifusion"]["ssim"] < m["ring+int2"]["ssim"] <= 1


def test_targets_report_met_and_missed(result: tuple[dict, Path]) -> None:
    res, _ = result
    t = {(x["target"], x["where"]): x for x in res["targets"]}
    assert t[("ring+binary compression ratio (compressed steps)", "methods")]["met"] is False  # 12.5 < 15
    assert t[("ring+int2 compression ratio (compressed steps)", "methods")]["met"] is False  # 7.14 < 7.5
    assert t[("ring / single latency (slow-link regime)", "ranks2, main link")]["value"] == pytest.approx(5.0)
    assert t[("ring / ring+binary latency", "ranks2, main link")]["met"] is True  # 5 / 0.9
    assert t[("ring+binary / ring latency, unshaped", "ranks2, unshaped")]["met"] is False
    assert t[("ring+int2 / ring latency, unshaped", "ranks2, unshaped")]["met"] is True
    assert t[("ring+int2 PSNR minus distrifusion PSNR (dB)", "methods")]["met"] is True


def test_files_and_ablation(result: tuple[dict, Path]) -> None:
    res, out = result
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"].keys() == res["methods"].keys()
    steps = on_disk["ablation"]["variants"]["ef"]["steps"]
    assert [r["step"] for r in steps] == list(range(STEPS)) and steps[3]["comp_err"] == 4.0 and steps[3]["rows"] == 2
    assert (out / "ablation.csv").read_text().count("\n") == 1 + 3 * STEPS
    md = (out / "report.md").read_text()
    assert "## P = 4 ranks" in md and "## P = 2 ranks" in md and "Compact-1bit" in md and "**no**" in md
    for f in ("images.png", "latency_vs_bandwidth.png", "ablation.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"


def test_busy_note_reads_the_load_before_the_run(result: tuple[dict, Path]) -> None:
    from compactfusion.bench.report import _notes

    res, _ = result
    busy = "busy before the run"
    quiet = {**res, "host": {**res["host"], "cpus": 2, "loadavg_at_start": [0.2, 0.3, 0.3], "loadavg_at_end": [2.0, 1.5, 1.0]}}
    assert not any(busy in n or "was busy" in n for n in _notes(quiet))  # the end load is the run's own ranks
    loaded = {**quiet, "host": {**quiet["host"], "loadavg_at_start": [1.6, 1.0, 0.8]}}
    assert any(busy in n for n in _notes(loaded))
    old = {**quiet, "host": {**quiet["host"], "loadavg_at_start": None}}  # results written before the field existed
    assert any("was busy" in n for n in _notes(old))
    assert res["host"]["loadavg_at_start"] is None  # this fixture's RunData has no start load


def test_report_rerenders_results_written_before_the_glossary(tmp_path: Path) -> None:
    # A committed results.json from before the renames (ratio_* / target_ratio keys) still renders.
    import shutil

    from compactfusion.bench.report import rerender

    src = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "compactfusion" / "ethernet" / "results.json"
    assert '"target_ratio"' in src.read_text() and '"ratio_request"' in src.read_text()
    shutil.copy(src, tmp_path / "results.json")
    text = rerender(tmp_path).read_text()
    assert "target slowdown 4.87" in text and "compression ratio, request" in text and "raw steps 1" in text
