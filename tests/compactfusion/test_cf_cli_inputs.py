"""`compactfusion` CLI: bad input exits 2 before any work; an interrupted bench keeps its samples."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from compactfusion.cli import main

TOY = {"name": "toy", "backend": "toy", "steps": 3, "labels": [1, 2], "ranks": [2], "repeats": 2,
       "link": {"bandwidth_mbps": "auto", "secant_steps": 1, "sweep": [2]}, "timeout_s": 120}


@pytest.mark.parametrize(
    "text, expect",
    [
        ("", r"cfg\.yaml:1: the config file is empty"),
        ("steps: [1,\n", r"cfg\.yaml:\d+: invalid YAML"),
        ("- 1\n", r"cfg\.yaml:1: the config file must hold a mapping of keys, got a list"),
    ],
)
def test_bench_bad_yaml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expect: str) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    assert main(["bench", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.search(expect, err) and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bench_checks_out_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(TOY))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", str(cfg), "--out", str(blocker / "o"), "--no-progress"]) == 2
    assert "not a writable directory" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "junk: [", "[1, 2]", '{"ranks": 2}', '{"methods": 3, "ranks": 2}'])
def test_report_on_junk_results_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    (tmp_path / "results.json").write_text(text)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "Traceback" not in err
    assert (tmp_path / "results.json").read_text() == text  # left as it was


@pytest.mark.multiprocess
def test_interrupted_bench_keeps_the_finished_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the second round: partial.json holds both rounds of every method."""
    from compactfusion.bench import runner
    from compactfusion.bench.methods import METHODS

    rounds = {"n": 0}
    original = runner._Runner.round

    def round_then_interrupt(self, pool, s, label, keep=False):  # type: ignore[no-untyped-def]
        if rounds["n"] == 2:
            raise KeyboardInterrupt
        rounds["n"] += 1
        return original(self, pool, s, label, keep)

    monkeypatch.setattr(runner._Runner, "round", round_then_interrupt)
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(TOY))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", str(cfg), "--out", str(out), "--no-progress"])
    doc = json.loads((out / "partial.json").read_text())
    assert doc["complete"] is False and doc["config"]["backend"] == "toy"
    lat = doc["ranks"]["2"]["latency"]
    # Round 1 was the warm-up (kept for bytes, not latency); round 2 the first unshaped round.
    assert set(lat["unshaped"]) == set(METHODS) and all(len(v) == 1 for v in lat["unshaped"].values())
    assert set(doc["ranks"]["2"]["bytes_by_tag"]) == set(METHODS)
    assert not (out / "results.json").exists()
