"""`compactfusion bench` end to end: the toy backend in seconds (schema), the real `--quick` as slow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compactfusion.bench.methods import METHODS
from compactfusion.cli import main

REPO = Path(__file__).resolve().parents[2]
PER_METHOD = ("latency_s", "wire_bytes", "psnr_db", "ssim", "compression_ratio", "latency_unshaped_s")


def _check_schema(res: dict, ranks: int, timing: int) -> None:
    assert res["ranks"] == ranks
    assert set(res["methods"]) == set(METHODS)
    timed = res[f"ranks{timing}"]
    assert timed["ranks"] == timing and set(timed["methods"]) == set(METHODS)
    for block in (res["methods"], timed["methods"]):
        for name, row in block.items():
            assert "latency_s" in row and "wire_bytes" in row and "psnr_db" in row and "ssim" in row
            if METHODS[name].parallel:
                assert row["wire_bytes"] > 0
            else:
                assert row["wire_bytes"] == 0
            if METHODS[name].compressed:
                assert 0 < row["ssim"] <= 1 and row["psnr_db"] > 0
                assert row["kv_bytes"] < block[METHODS[name].reference]["kv_bytes"]
    for name, row in timed["methods"].items():
        assert row["latency_s"] > 0 and row["latency_unshaped_s"] > 0
    assert timed["search"]["history"] and timed["main_link_mbps"] > 0
    assert res["ablation"]["variants"].keys() == {"naive", "no_ef", "ef"}
    assert {r["method"] for r in res["projection"]["rows"]} >= {"ring", "ring+binary", "ring+int2"}
    assert all(t["met"] in (True, False, None) for t in res["targets"])
    _check_paper_bytes(res["paper_shape_bytes"], ranks)


def _check_paper_bytes(pb: dict, ranks: int) -> None:
    """Bytes counted by the transport at FLUX's K/V shape equal the exact payload arithmetic."""
    n, c = 4096 // ranks, 3072
    raw = 2 * n * c * 2 * (ranks - 1)  # K and V, fp16, P - 1 ring hops per call
    assert (pb["rows"], pb["channels"]) == (n, c)
    assert pb["methods"]["ring"]["bytes_per_call"] == [raw] * 3
    binary = pb["methods"]["ring+binary"]
    assert binary["bytes_per_call"] == [raw] + [2 * ((n + c) * 2 + n * c // 8) * (ranks - 1)] * 2
    assert binary["compression_ratio_steps"] == pytest.approx(binary["compression_ratio_formula"]) \
        and binary["compression_ratio_formula"] > 15
    int2 = pb["methods"]["ring+int2"]
    assert int2["bytes_per_call"][1:] == [2 * ((n + c) * 2 + n * c // 4) * (ranks - 1)] * 2
    # One raw step among 28 dominates a request's bytes: 28 / (1 + 27 / 15.8) = 10.4.
    assert 10 < binary["compression_ratio"] < 10.5


@pytest.mark.multiprocess
def test_toy_run_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {"name": "toy", "backend": "toy", "steps": 3, "labels": [1, 2], "ranks": [2], "repeats": 2,
           "link": {"bandwidth_mbps": "auto", "secant_steps": 1, "sweep": [2]}, "timeout_s": 120}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    _check_schema(res, 2, 2)
    for f in ("report.md", "images.png", "latency_vs_bandwidth.png", "ablation.png", "ablation.csv"):
        assert (out / f).stat().st_size > 0, f
    curves = res["ranks2"]["curves"]
    bws = [c["mbps_per_rank"] for c in curves]
    main_bw = res["ranks2"]["main_link_mbps"]
    assert bws[-1] is None and main_bw in bws and pytest.approx(2 * main_bw) in bws  # B*, 2 B*, unshaped
    full = [c for c in curves if len(c["latency_s"]) == len(METHODS)]
    assert len(full) == 3  # search probes time only single and ring
    assert len(res["ranks2"]["methods"]["ring"]["latency_samples"]) == 2
    md = (out / "report.md").read_text()
    assert "## Targets" in md and "ring+binary" in md
    assert "targets met" in capsys.readouterr().out


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 0\n")
    assert main(["bench", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_real_quick_run(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "quick"
    assert main(["bench", str(REPO / "examples/compactfusion/ethernet.yaml"), "--out", str(out), "--quick",
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["quick"] and res["steps"] == 8
    assert set(res["methods"]) == set(METHODS) and set(res["ranks2"]["methods"]) == set(METHODS)
    ring = res["methods"]["ring"]
    # P=2, 2 images (4 rows with CFG) x 64 tokens / 2 ranks = 128 rows, C=128, fp16: K and V, 4 layers, 8 steps;
    # plus one wire header (ccomm.header) per ring step.
    from ccomm.header import HEADER_BYTES

    assert ring["wire_bytes_by_tag"]["kv_ring"] == 8 * 4 * 2 * 128 * 128 * 2 + 8 * 4 * HEADER_BYTES
    binary = res["methods"]["ring+binary"]
    # Per layer and step: K and V travel as one payload (two binary matrices) with one header.
    raw = 2 * 128 * 128 * 2 + HEADER_BYTES
    packed = 2 * ((128 + 128) * 2 + 128 * 128 // 8) + HEADER_BYTES
    assert binary["compression_ratio_steps"] == pytest.approx(raw / packed)


def test_report_subcommand_rerenders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2  # no results.json
    assert "results.json: no such file" in capsys.readouterr().err
