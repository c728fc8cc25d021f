"""Traces: validation (a bad file per rule), Mahimahi semantics, round trips, operations."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.model.trace import MAHIMAHI_PACKET_BITS, Trace

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
REL = 1e-9  # relative slack for float integrals


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- validation, one bad file per rule
BAD_CSV = [
    # (name, content, line the error must name, words the message must contain)
    ("empty", "# nothing here\n", 1, "empty"),
    ("header_only", "time_s,mbps\n", 1, "empty"),
    ("negative", "time_s,mbps\n0,10\n1,-5\n", 3, ">= 0"),
    ("nan", "time_s,mbps\n0,nan\n", 2, "finite"),
    ("inf", "time_s,mbps\n0,10\n2,inf\n", 3, "finite"),
    ("neg_time", "time_s,mbps\n0,10\n-1,5\n", 3, "time_s"),
    ("not_increasing", "time_s,mbps\n0,10\n2,5\n2,7\n", 4, "increase"),
    ("decreasing", "time_s,mbps\n# c\n0,10\n3,5\n1,7\n", 5, "increase"),
    ("first_not_zero", "time_s,mbps\n0.5,10\n1,5\n", 2, "must be 0"),
    ("zero_capacity", "time_s,mbps\n0,0\n1,0\n", 3, "zero total capacity"),
    ("ends_at_zero", "time_s,mbps\n0,10\n1,0\n", 3, "must not end at rate 0"),
    ("unparsable", "time_s,mbps\n0,10\n1,fast\n", 3, "unparsable"),
    ("columns", "time_s,mbps\n0,10,3\n", 2, "2 columns"),
    ("bad_header", "t,rate\n0,10\n", 1, "header"),
    ("period_not_after", "# loop period_s=1.0\ntime_s,mbps\n0,10\n1,5\n", 4, "period_s"),
    ("loop_zero_capacity", "# loop period_s=3\ntime_s,mbps\n0,0\n1,0\n", 4, "zero total capacity"),
]


@pytest.mark.parametrize("name,text,line,words", BAD_CSV, ids=[b[0] for b in BAD_CSV])
def test_bad_csv_names_file_and_line(tmp_path: Path, name: str, text: str, line: int, words: str) -> None:
    p = write(tmp_path, f"{name}.csv", text)
    with pytest.raises(ValueError) as err:
        Trace.from_csv(p)
    msg = str(err.value)
    assert f"{p}:{line}:" in msg, msg
    assert words in msg, msg


BAD_MAHI = [
    ("empty", "\n\n", 2, "empty"),
    ("decreasing", "1\n5\n3\n", 3, "decreases"),
    ("negative", "1\n-2\n", 2, ">= 0"),
    ("float", "1\n2.5\n", 2, "integer"),
    ("text", "1\nabc\n", 2, "integer"),
    ("zero_period", "0\n0\n", 2, "> 0"),
]


@pytest.mark.parametrize("name,text,line,words", BAD_MAHI, ids=[b[0] for b in BAD_MAHI])
def test_bad_mahimahi_names_file_and_line(tmp_path: Path, name: str, text: str, line: int, words: str) -> None:
    p = write(tmp_path, f"{name}.mahi", text)
    with pytest.raises(ValueError) as err:
        Trace.from_mahimahi(p)
    msg = str(err.value)
    assert f"{p}:{line}:" in msg, msg
    assert words in msg, msg


def test_mahimahi_repeated_timestamps_are_legal(tmp_path: Path) -> None:
    # Repeats add packets: only decreasing timestamps are errors.
    tr = Trace.from_mahimahi(write(tmp_path, "rep.mahi", "1\n1\n1\n"))
    assert tr.rate_mbps(0.0) == pytest.approx(36.0)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(times_s=[], mbps=[]), "empty"),
        (dict(times_s=[0, 1], mbps=[1]), "length"),
        (dict(times_s=[0, 1], mbps=[1, 2], loop=True), "period_s is required"),
        (dict(times_s=[0, 1], mbps=[1, 2], loop=True, period_s=1.0), "after the last time"),
        (dict(times_s=[0, 1], mbps=[1, 2], period_s=3.0), "only allowed with loop"),
    ],
)
def test_constructor_validation(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Trace(**kwargs)


# --------------------------------------------------------------------------- Mahimahi semantics
def test_mahimahi_single_line_is_12_mbps(tmp_path: Path) -> None:
    tr = Trace.from_mahimahi(write(tmp_path, "one.mahi", "1\n"))
    assert tr.loop and tr.period_s == pytest.approx(0.001)
    for t in (0.0, 0.0004, 0.5, 123.4567):
        assert tr.rate_mbps(t) == pytest.approx(12.0)
    # One second carries exactly 1000 packets of 12,000 bits.
    assert tr.bits_between(0.0, 1.0) == pytest.approx(1000 * MAHIMAHI_PACKET_BITS)


def test_mahimahi_bins_count_toward_previous_ms(tmp_path: Path) -> None:
    # The opportunity at t=3 counts toward (2, 3] ms; the period is 3 ms.
    tr = Trace.from_mahimahi(write(tmp_path, "gap.mahi", "1\n3\n3\n"))
    assert tr.period_s == pytest.approx(0.003)
    assert tr.rate_mbps(0.0005) == pytest.approx(12.0)
    assert tr.rate_mbps(0.0015) == 0.0
    assert tr.rate_mbps(0.0025) == pytest.approx(24.0)
    coarse = Trace.from_mahimahi(write(tmp_path, "gap2.mahi", "1\n3\n3\n4\n"), bin_ms=2)
    # Bins (0,2] holds 1 packet, (2,4] holds 3: 6 and 18 Mbit/s.
    assert coarse.rate_mbps(0.001) == pytest.approx(6.0)
    assert coarse.rate_mbps(0.003) == pytest.approx(18.0)


@SETTINGS
@given(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=80))
def test_mahimahi_round_trip_is_exact(tmp_path_factory: pytest.TempPathFactory, gaps: list[int]) -> None:
    # Random non-decreasing timestamps (gaps may be 0 = repeats, after the first).
    stamps, t = [], 0
    for k, g in enumerate(gaps):
        t += g if k == 0 or g % 3 else 0
        stamps.append(t)
    d = tmp_path_factory.mktemp("mm")
    tr = Trace.from_mahimahi(write(d, "in.mahi", "".join(f"{s}\n" for s in stamps)))
    assert tr.mahimahi_lines() == stamps
    tr.to_mahimahi(d / "out.mahi")
    assert Trace.from_mahimahi(d / "out.mahi") == tr


step_traces = st.lists(
    st.tuples(st.integers(min_value=1, max_value=40), st.sampled_from([0.0, 0.5, 3.0, 12.0, 17.5, 100.0])),
    min_size=1,
    max_size=10,
)


def build_steps(raw: list[tuple[int, float]], unit_s: float, loop: bool) -> Trace:
    times, rates, t = [], [], 0
    for width, rate in raw:
        times.append(t * unit_s)
        rates.append(rate)
        t += width
    if all(r == 0 for r in rates):
        rates[-1] = 1.0
    if not loop and rates[-1] == 0:
        rates[-1] = 2.0
    return Trace(times, rates, loop=loop, period_s=t * unit_s if loop else None)


@SETTINGS
@given(step_traces, st.booleans())
def test_trace_to_mahimahi_keeps_integral_within_a_packet(
    tmp_path_factory: pytest.TempPathFactory, raw: list[tuple[int, float]], loop: bool
) -> None:
    tr = build_steps(raw, 0.01, loop)
    duration = None if loop else tr.times_s[-1] + 0.05
    try:
        lines = tr.mahimahi_lines(duration)
    except ValueError:
        assert tr.bits_between(0, tr.end_s if loop else duration) < MAHIMAHI_PACKET_BITS
        return
    d = tmp_path_factory.mktemp("mm")
    p = d / "t.mahi"
    tr.to_mahimahi(p, duration)
    back = Trace.from_mahimahi(p, loop=False)
    end_ms = lines[-1]
    peak = max(tr.mbps) * 1e6
    rounding = peak * 1e-3 + 1e-6  # timestamps are whole ms
    # A looping trace's last line sits on the period (Mahimahi's period is the last line), so
    # after that packet's natural time the file may lag by one more packet.
    natural_ms = math.ceil(tr.time_to_send(len(lines) * MAHIMAHI_PACKET_BITS) * 1000 - 1e-6)
    for ms in sorted(set(range(0, end_ms + 1, max(1, end_ms // 25))) | {natural_ms - 1, end_ms - 1}):
        t = ms / 1000.0
        bound = MAHIMAHI_PACKET_BITS * (2 if ms >= natural_ms else 1) + rounding
        assert abs(back.bits_between(0, t) - tr.bits_between(0, t)) <= bound
    if loop:
        assert Trace.from_mahimahi(p).period_s == pytest.approx(tr.period_s)
        assert lines[-1] == round(tr.period_s * 1000)


# --------------------------------------------------------------------------- CSV
@SETTINGS
@given(step_traces, st.booleans())
def test_csv_round_trip(tmp_path_factory: pytest.TempPathFactory, raw: list[tuple[int, float]], loop: bool) -> None:
    tr = build_steps(raw, 0.37, loop)
    p = tmp_path_factory.mktemp("csv") / "t.csv"
    tr.to_csv(p)
    assert Trace.from_csv(p) == tr
    assert Trace.load(p) == tr


def test_csv_comments_and_blank_lines(tmp_path: Path) -> None:
    p = write(tmp_path, "c.csv", "# a trace\n\ntime_s,mbps  # header\n0,100 # fast\n\n30,10\n")
    assert Trace.from_csv(p) == Trace.steps([(0, 100), (30, 10)])


# --------------------------------------------------------------------------- operations
def test_steps_integral_and_outages() -> None:
    tr = Trace.steps([(0, 100), (30, 0), (40, 10)])
    assert tr.bits_between(0, 45) == pytest.approx(100e6 * 30 + 10e6 * 5)
    assert tr.outages() == [(30.0, 40.0)]
    # 5 Mbit left after the fast phase waits out the outage, then takes 0.5 s at 10 Mbit/s.
    assert tr.time_to_send(100e6 * 30 + 5e6, 0.0) == pytest.approx(40.5)
    assert tr.time_to_send(1e6, 35.0) == pytest.approx(5.1)


def test_looping_outage_join_and_mean() -> None:
    tr = Trace.steps([(0, 0), (1, 10), (2, 0)], loop=True, period_s=4.0)
    assert tr.outages() == [(0.0, 1.0), (2.0, 4.0)]
    assert tr.max_outage_s() == pytest.approx(3.0)  # 2..4 joins 4..5 of the next period
    assert tr.mean_mbps() == pytest.approx(2.5)


def test_scale_clip_validation() -> None:
    tr = Trace.steps([(0, 10), (1, 40)])
    assert tr.scale(0.5).mbps == (5.0, 20.0)
    assert tr.clip(high=20).mbps == (10.0, 20.0)
    assert tr.clip(low=15).mbps == (15.0, 40.0)
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="factor"):
            tr.scale(bad)
    with pytest.raises(ValueError, match="clip"):
        tr.clip(low=5, high=1)


@SETTINGS
@given(step_traces, step_traces, st.booleans())
def test_min_is_pointwise(raw_a: list[tuple[int, float]], raw_b: list[tuple[int, float]], loop: bool) -> None:
    a = build_steps(raw_a, 0.1, loop)
    b = build_steps(raw_b, 0.1 if not loop else 0.2, loop)
    m = Trace.min(a, b)
    horizon = 3 * max(a.end_s, b.end_s) + 1
    rng = random.Random(1)
    for _ in range(200):
        t = rng.uniform(0, horizon)
        assert m.rate_mbps(t) == min(a.rate_mbps(t), b.rate_mbps(t))


def test_min_with_constant_and_unsupported_mix() -> None:
    loop = Trace.steps([(0, 10), (1, 30)], loop=True, period_s=2)
    assert Trace.min(loop, Trace.constant(20)).mbps == (10.0, 20.0)
    with pytest.raises(ValueError, match="cannot combine"):
        Trace.min(loop, Trace.steps([(0, 5), (3, 50)]))
    with pytest.raises(ValueError, match="no common period"):
        Trace.min(loop, Trace.steps([(0, 5), (1, 50)], loop=True, period_s=math.pi))
    dense = Trace([k * 1e-3 for k in range(60_000)], [1 + k % 7 for k in range(60_000)], loop=True, period_s=60.0)
    other = Trace([k * 1e-3 for k in range(45_300)], [1 + k % 5 for k in range(45_300)], loop=True, period_s=45.3)
    with pytest.raises(ValueError, match="resample"):
        Trace.min(dense, other)


@SETTINGS
@given(step_traces, st.booleans(), st.sampled_from([0.05, 0.13, 0.5, 1.0]))
def test_resample_keeps_integral_at_bin_edges(raw: list[tuple[int, float]], loop: bool, step: float) -> None:
    tr = build_steps(raw, 0.07, loop)
    rs = tr.resample(step)
    edges = [k * step for k in range(int(2 * tr.end_s / step) + 3)]
    if loop:
        edges = [e for e in edges if e <= tr.end_s] + [tr.end_s, 2 * tr.end_s]
    for e in edges:
        want = tr.bits_between(0, e)
        assert rs.bits_between(0, e) == pytest.approx(want, rel=REL, abs=1e-3)


def test_random_walk_bounded_deterministic_and_seeded() -> None:
    kw = dict(start=50.0, low=10.0, high=80.0, step_s=0.5, duration_s=200.0, sigma=0.3)
    a = Trace.random_walk(**kw, seed=3)
    assert a == Trace.random_walk(**kw, seed=3)
    assert a != Trace.random_walk(**kw, seed=4)
    assert len(a.mbps) == 400 and a.mbps[0] == 50.0
    assert all(10.0 <= r <= 80.0 for r in a.mbps)
    steps = [abs(math.log(y / x)) for x, y in zip(a.mbps, a.mbps[1:])]
    assert max(steps) <= 0.3 + 1e-12
    # Hits both bounds' neighbourhoods over 400 steps with sigma 0.3 (reflection, not clamping).
    assert min(a.mbps) < 15 and max(a.mbps) > 60


def test_random_walk_uses_only_random_random() -> None:
    # Reproduce the walk from the documented recipe, independently of the implementation.
    rng = random.Random(7)
    x, lo, hi = math.log(20.0), math.log(5.0), math.log(40.0)
    expected = [20.0]
    for _ in range(9):
        x += 0.2 * (2 * rng.random() - 1)
        while x < lo or x > hi:
            x = 2 * lo - x if x < lo else 2 * hi - x
        expected.append(math.exp(x))
    got = Trace.random_walk(20.0, 5.0, 40.0, 1.0, 10.0, sigma=0.2, seed=7)
    assert got.mbps == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(start=5, low=0, high=10), "low"),
        (dict(start=5, low=6, high=3), "high"),
        (dict(start=50, low=1, high=10), "start"),
        (dict(start=5, low=1, high=10, step_s=0), "step_s"),
        (dict(start=5, low=1, high=10, sigma=-1), "sigma"),
    ],
)
def test_random_walk_validation(kwargs: dict, field: str) -> None:
    full = dict(step_s=1.0, duration_s=10.0) | kwargs
    with pytest.raises(ValueError, match=field):
        Trace.random_walk(**full)
