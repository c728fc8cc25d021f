"""`deco-sgd realtime` forwards to the real-time mode's own parser (deco_sgd.bench.realtime_cli)."""
from __future__ import annotations

import pytest

from deco_sgd.cli import main


def test_realtime_subcommand_uses_the_realtime_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["realtime", "--help"])
    assert exc.value.code == 0
    assert "--bench" in capsys.readouterr().out


def test_realtime_subcommand_rejects_a_missing_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["realtime", "--out", "x"])  # neither --bench nor --config
    assert exc.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_bench_requires_out() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "examples/deco_sgd/high_latency.yaml"])
    assert exc.value.code == 2


# --- bad input: `file:line: message`, exit 2, before any work -----------------------------

from pathlib import Path  # noqa: E402


@pytest.mark.parametrize(
    "text, expect",
    [
        ("", "the scenario file is empty"),
        ("scenario: x\nnetwork: {latency_ms: 1\n", r"cfg\.yaml:\d+: invalid YAML"),
        ("- a\n", "must hold a mapping of keys, got a list"),
    ],
)
def test_bench_bad_yaml_exits_2_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   text: str, expect: str) -> None:
    import re

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    assert main(["bench", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(expect, err) and str(cfg) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bench_unwritable_out_exits_2_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "examples/deco_sgd/high_latency.yaml", "--out", str(blocker / "out")]) == 2
    assert "not a writable directory" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["[1, 2, 3]", "{\"methods\": [1]}", "{\"methods\": {\"dsgd\": 3}}", "not json"])
def test_calibrate_on_a_wrong_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    res = tmp_path / "results.json"
    res.write_text(text)
    assert main(["calibrate", str(res)]) == 2
    err = capsys.readouterr().err
    assert str(res) in err and "Traceback" not in err


def test_realtime_bad_yaml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "rt.yaml"
    cfg.write_text("methods: [\n")
    assert main(["realtime", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert f"{cfg}:" in capsys.readouterr().err


def test_unknown_codec_is_named_as_unknown() -> None:
    from deco_sgd import DecoConfig

    with pytest.raises(ValueError, match="codec: unknown codec 'nosuch'.*available: .*topk"):
        DecoConfig(codec="nosuch:ratio=0.1")
    with pytest.raises(ValueError, match="unknown codec 'nosuch'"):
        DecoConfig(codec="topk:ratio=0.1|nosuch")
