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
