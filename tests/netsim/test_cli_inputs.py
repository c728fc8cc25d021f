"""netsim CLI bad input: a one-host net, config files, unknown tags, huge Mahimahi timestamps."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import netsim.cli.main as cli_main
from netsim.cli import EXIT_BAD_INPUT
from netsim.model.trace import MAHIMAHI_MAX_MS, Trace


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = cli_main.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_up_with_one_host_is_bad_input(capsys: pytest.CaptureFixture) -> None:
    # --dry-run only plans: nothing is created, so this runs without root.
    rc, _, err = run(["up", "-n", "1", "--bandwidth-mbps", "10", "--latency-ms", "1", "--dry-run"], capsys)
    assert rc == EXIT_BAD_INPUT and "n=1" in err and "[2, 250]" in err


@pytest.mark.parametrize(
    "text, expect",
    [("", r"t\.yaml:1: the topology file is empty"), ("n: [2\n", r"t\.yaml:\d+: invalid YAML"),
     ("- 2\n", r"t\.yaml:1: .*mapping of keys, got a list")],
)
def test_topology_file_errors_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 text: str, expect: str) -> None:
    (tmp_path / "t.yaml").write_text(text)
    rc, _, err = run(["up", "--topo", str(tmp_path / "t.yaml"), "--dry-run"], capsys)
    assert rc == EXIT_BAD_INPUT and re.search(expect, err) and "Traceback" not in err


@pytest.mark.skipif(__import__("shutil").which("ip") is None, reason="needs iproute2's `ip` to list namespaces")
def test_down_of_an_unknown_tag_says_so_and_exits_0(capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run(["down", "--tag", "zq9never"], capsys)
    assert rc == 0 and "nothing to remove for tag 'zq9never'" in err


def test_down_of_a_malformed_tag_is_bad_input(capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run(["down", "--tag", "Not/A-Tag"], capsys)
    assert rc == EXIT_BAD_INPUT and "--tag" in err


def test_huge_mahimahi_timestamp_is_refused_at_once(tmp_path: Path) -> None:
    f = tmp_path / "huge.mahi"
    f.write_text(f"{MAHIMAHI_MAX_MS + 1}\n")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=rf"huge\.mahi:1: timestamp {MAHIMAHI_MAX_MS + 1} ms is beyond"):
        Trace.from_mahimahi(f)
    assert time.monotonic() - t0 < 5  # was 44 s and 1 GB (or MemoryError)


def _dense_reference(stamps: list[int], bin_ms: int) -> tuple[list[float], list[float]]:
    """The original dense binning (one list entry per bin), kept here as the reference."""
    end = stamps[-1]
    counts = [0] * -(-end // bin_ms)
    for ms in stamps:
        counts[max(0, -(-ms // bin_ms) - 1)] += 1
    times, rates = [], []
    for b, c in enumerate(counts):
        rate = 12000 * c / (min(bin_ms, end - b * bin_ms) * 1e-3) / 1e6
        if not (rates and rates[-1] == rate):
            times.append(b * bin_ms / 1000.0)
            rates.append(rate)
    return times, rates


@pytest.mark.parametrize("bin_ms", [1, 3, 10])
def test_sparse_mahimahi_binning_equals_the_dense_one(tmp_path: Path, bin_ms: int) -> None:
    import random

    rng = random.Random(bin_ms)
    stamps = sorted(rng.choice([0, 1, 2, 5, 9, 40, 41, 300, 301, 302, 999]) for _ in range(60)) + [1000]
    f = tmp_path / "t.mahi"
    f.write_text("".join(f"{s}\n" for s in stamps))
    t = Trace.from_mahimahi(f, bin_ms=bin_ms)
    times, rates = _dense_reference(stamps, bin_ms)
    assert list(t.times_s) == times and list(t.mbps) == pytest.approx(rates, rel=0, abs=0)


def test_a_long_but_legal_mahimahi_period_is_cheap(tmp_path: Path) -> None:
    f = tmp_path / "long.mahi"
    f.write_text(f"1\n{MAHIMAHI_MAX_MS}\n")
    t0 = time.monotonic()
    t = Trace.from_mahimahi(f)
    assert time.monotonic() - t0 < 5
    assert t.mbps == (12.0, 0.0, 12.0) and t.period_s == pytest.approx(MAHIMAHI_MAX_MS / 1000)
