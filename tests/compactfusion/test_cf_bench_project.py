"""compactfusion.bench.project: the FLUX projection against closed forms and the paper's ordering."""
from __future__ import annotations

import pytest

from compactfusion.bench.project import PAPER_ETHERNET, FluxSetting, codec_nbytes, project

ALL = {"single": None, "ring": None, "patch": None, "distrifusion": None, "ring+binary": 12.0, "ring+int2": 7.0,
       "ring+lowrank": 40.0, "ring+lowrank_int4": 5.0}


def _rows(ratios=ALL, mbps=(500, 1000, 1500, 2000)):
    return {(r.method, r.basis, r.mbps_per_rank): r for r in project(ratios, mbps)}


def test_codec_bytes_match_the_spec_formulas_at_the_flux_shape() -> None:
    n, c = 1024, 3072
    assert codec_nbytes("binary", n, c) == (n + c) * 2 + n * c // 8
    assert codec_nbytes("int2", n, c) == (n + c) * 2 + n * c // 4
    assert codec_nbytes("lowrank:rank=8", n, c) == 8 * (n + c) * 2
    assert 2 * n * c / codec_nbytes("binary", n, c) == pytest.approx(15.67, abs=0.01)


def test_ring_is_compute_plus_transfer_closed_form() -> None:
    s = FluxSetting()
    rows = _rows()
    raw = 2 * s.rows * s.channels
    per_step = s.layers * (s.ranks - 1) * 2 * raw / 500e6
    expect = s.t_single_s / s.ranks + s.steps * per_step
    assert rows[("ring", "formula", 500)].time_s == pytest.approx(expect, rel=1e-9)
    assert rows[("single", "formula", 500)].time_s == s.t_single_s


def test_compressed_ring_is_faster_and_measured_ratio_is_pessimistic() -> None:
    rows = _rows()
    for b in (500, 2000):
        ring = rows[("ring", "formula", b)].time_s
        f = rows[("ring+binary", "formula", b)].time_s
        m = rows[("ring+binary", "measured", b)].time_s
        assert f < m < ring
        assert rows[("distrifusion", "formula", b)].time_s <= ring


def test_projection_tracks_the_papers_ethernet_table() -> None:
    rows = _rows()
    for method in ("ring", "ring+binary", "ring+int2"):
        for b, paper in PAPER_ETHERNET[method].items():
            ours = rows[(method, "formula", b)].time_s
            assert 0.6 < ours / paper < 1.4, (method, b, ours, paper)


def test_uncompressed_methods_have_no_measured_row() -> None:
    rows = _rows()
    assert ("ring", "measured", 500) not in rows and ("ring+int2", "measured", 500) in rows


def test_distrifusion_projection_warms_up_four_raw_synchronous_steps() -> None:
    from netsim import cost
    from netsim.model.link import Link

    s = FluxSetting()
    raw = 2 * s.rows * s.channels
    ag = s.layers * cost.allgather_time(2 * raw, Link(500 * 8.0, 0.0), n=s.ranks, algo="ring")
    step = s.t_single_s / s.ranks / s.steps
    # 4 synchronous raw steps (DistriFusion's default), then 24 overlapped ones
    expect = 4 * (step + ag) + (s.steps - 4) * max(step, ag)
    assert _rows()[("distrifusion", "formula", 500)].time_s == pytest.approx(expect, rel=1e-9)
