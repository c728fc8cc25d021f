"""``netsim trace`` subcommands and the plugin hook of ``python -m netsim``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import netsim.cli.main as cli_main
from netsim.cli import EXIT_BAD_INPUT, parse_size
from netsim.model.link import Link
from netsim.model.trace import Trace

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = cli_main.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_gen_steps_show_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "s.csv"
    rc, out, _ = run(["trace", "gen", "steps", "--points", "0:100,30:0,40:10", "-o", str(f)], capsys)
    assert rc == 0 and Trace.from_csv(f) == Trace.steps([(0, 100), (30, 0), (40, 10)])
    rc, out, _ = run(["trace", "show", str(f)], capsys)
    assert rc == 0
    fields = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert {k.strip(): v.strip() for k, v in fields.items()}["max_outage_s"] == "10"
    rc, out, _ = run(["trace", "predict", str(f), "--bytes", "400MB", "--start-s", "1", "--latency-ms", "20"], capsys)
    want = Link(None, 20, trace=Trace.from_csv(f)).transfer_time(400e6, 1.0)
    assert rc == 0 and float(out) == pytest.approx(want, abs=1e-6)


def test_mahimahi_one_line_predicts_12_mbps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "one.mahi"
    f.write_text("1\n")
    rc, out, _ = run(["trace", "predict", str(f), "--bytes", "1.5MB"], capsys)
    assert rc == 0 and float(out) == pytest.approx(1.5e6 * 8 / 12e6, abs=1e-6)


def test_walk_convert_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv, mahi, back = tmp_path / "w.csv", tmp_path / "w.mahi", tmp_path / "back.csv"
    argv = ["trace", "gen", "walk", "--start", "20", "--low", "5", "--high", "50", "--step-s", "0.5",
            "--duration-s", "20", "--seed", "4", "-o", str(csv)]
    assert run(argv, capsys)[0] == 0
    walk = Trace.from_csv(csv)
    assert walk == Trace.random_walk(20, 5, 50, 0.5, 20, seed=4)
    assert run(["trace", "convert", str(csv), str(mahi), "--duration-s", "20"], capsys)[0] == 0
    assert run(["trace", "convert", str(mahi), str(back)], capsys)[0] == 0
    again = Trace.from_csv(back)
    assert again.loop and again.period_s == pytest.approx(20.0)
    # Mahimahi keeps the integral within a packet (12,000 bits) plus 1 ms of rounding.
    slack = 12_000 + max(walk.mbps) * 1e6 * 1e-3
    for t in (1.0, 7.3, 19.9):
        assert abs(again.bits_between(0, t) - walk.bits_between(0, t)) <= slack


def test_plot_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f, png = tmp_path / "l.csv", tmp_path / "l.png"
    Trace.steps([(0, 10), (1, 0), (2, 30)], loop=True, period_s=3).to_csv(f)
    rc, _, _ = run(["trace", "plot", str(f), "-o", str(png), "--until-s", "7"], capsys)
    data = png.read_bytes()
    assert rc == 0 and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    png2 = tmp_path / "show.png"
    assert run(["trace", "show", str(f), "--png", str(png2)], capsys)[0] == 0 and png2.exists()


def test_bad_input_exits_2_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "bad.csv"
    f.write_text("time_s,mbps\n0,10\n1,-3\n")
    rc, _, err = run(["trace", "show", str(f)], capsys)
    assert rc == EXIT_BAD_INPUT and f"{f}:3:" in err
    rc, _, err = run(["trace", "show", str(tmp_path / "missing.csv")], capsys)
    assert rc == EXIT_BAD_INPUT and "No such file" in err
    # Non-looping traces need a length to become Mahimahi.
    rc, _, err = run(["trace", "gen", "constant", "--mbps", "5", "-o", str(tmp_path / "c.mahi")], capsys)
    assert rc == EXIT_BAD_INPUT and "duration_s" in err
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["trace", "predict", str(f), "--bytes", "lots"])
    assert exc.value.code == 2


def test_parse_size() -> None:
    assert parse_size("4MiB") == 4 * 2**20
    assert parse_size("2MB") == 2_000_000
    assert parse_size("1500") == 1500
    assert parse_size("1.5kb") == 1500


def test_plugins_register_skip_missing_and_survive_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "nsplug_good.py").write_text(
        "def add_cli(sub):\n"
        "    p = sub.add_parser('hello')\n"
        "    p.add_argument('--x', type=int, default=1)\n"
        "    p.set_defaults(func=lambda a: print('hi', a.x) or 0)\n"
    )
    (tmp_path / "nsplug_broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli_main, "CLI_PLUGINS", ("nsplug_missing", "nsplug_broken", "nsplug_good"))
    rc, out, _ = run(["hello", "--x", "3"], capsys)
    assert rc == 0 and out.strip() == "hi 3"
    assert "nsplug_broken" in caplog.text and "boom" in caplog.text
    assert run(["trace", "gen", "constant", "--mbps", "3", "-o", str(tmp_path / "c.csv")], capsys)[0] == 0


def test_module_entry_point_runs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "netsim", "trace", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "predict" in out.stdout
