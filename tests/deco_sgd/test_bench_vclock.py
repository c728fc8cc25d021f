"""The virtual clock's rules (docs/design/deco_sgd.md#virtual-time) on hand-computed numbers."""
from __future__ import annotations

import pytest

from deco_sgd.bench.vclock import LinkTimeline, PatternCost, StepClock, pattern_cost
from netsim import Link, Trace


def test_pattern_cost_ring_sizes() -> None:
    # Ring all-reduce of S bytes: V = 2(n-1)/n·S, 2(n-1) hops; all-gather of S-byte blocks: (n-1)·S, n-1 hops.
    ar = pattern_cost("allreduce", 4, 1000.0)
    assert ar.nbytes == pytest.approx(1500.0) and ar.hops == 6
    ag = pattern_cost("allgather", 4, 1000.0)
    assert ag.nbytes == pytest.approx(3000.0) and ag.hops == 3
    assert pattern_cost("allreduce", 1, 1000.0).nbytes == 0.0
    with pytest.raises(ValueError, match="pattern"):
        pattern_cost("ps", 4, 1.0)


def test_docstring_example() -> None:
    tl = LinkTimeline(Link(8.0, 50.0), world=2)  # 1 MB/s, 50 ms one way
    clock = StepClock(0.1)
    done = tl.exchange(clock.launch_s, 1_000_000, "allreduce")
    assert done == pytest.approx(1.2)  # 0.1 launch + 0.1 (2 hops) + 1.0 s serialisation
    assert clock.end_step([done]) == pytest.approx(1.2)
    assert clock.blocked == pytest.approx(1.1)
    assert tl.link_free == pytest.approx(1.1)  # done - L_eff


def test_queueing_behind_previous_message() -> None:
    tl = LinkTimeline(Link(8.0, 50.0), world=2)
    d1 = tl.exchange(0.0, 1_000_000, "allreduce")  # tx 0..1.0, done 1.1
    d2 = tl.exchange(0.5, 500_000, "allreduce")  # waits for link_free = 1.0, tx 0.5 s, done 1.6
    assert (d1, d2) == (pytest.approx(1.1), pytest.approx(1.6))
    # A launch after the link is free starts at once.
    assert tl.exchange(3.0, 0, "allreduce") == pytest.approx(3.1)


def test_trace_serialisation_and_outage() -> None:
    # 8 Mbit/s for 1 s, outage for 1 s, then 16 Mbit/s: 1.5 MB from t=0 -> 1 MB by t=1, 0.5 MB at 2 MB/s.
    link = Link(None, 10.0, trace=Trace.steps([(0, 8.0), (1, 0.0), (2, 16.0)]))
    tl = LinkTimeline(link, world=2)
    done = tl.exchange(0.0, 1_500_000, "allreduce")
    assert done == pytest.approx(0.02 + 2.25)
    assert tl.probe(0.0, "allgather") == pytest.approx(0.01 + 4 * 8 / 8e6)
    assert tl.link_free == pytest.approx(2.25)  # the probe did not take the link


def test_step_rule_with_staleness() -> None:
    # τ = 1: step s applies entry s-1, so a slow exchange only holds the step after next.
    tl = LinkTimeline(Link(8.0, 50.0), world=2)
    clock = StepClock(0.1)
    done0 = tl.exchange(clock.launch_s, 200_000, "allreduce")  # 0.1 + 0.2 + 0.1 = 0.4
    assert clock.end_step([]) == pytest.approx(0.1)  # fill step: nothing applied
    done1 = tl.exchange(clock.launch_s, 200_000, "allreduce")  # queued: tx 0.3..0.5, done 0.6
    assert done1 == pytest.approx(0.6)
    assert clock.end_step([done0]) == pytest.approx(0.4)
    assert clock.end_step([done1]) == pytest.approx(0.6)


def test_validation_names_fields() -> None:
    with pytest.raises(ValueError, match="t_comp"):
        StepClock(0.0)
    with pytest.raises(ValueError, match="world"):
        LinkTimeline(Link(8.0, 1.0), world=0)
    with pytest.raises(ValueError, match="launch_s"):
        LinkTimeline(Link(8.0, 1.0), world=2).exchange(-1.0, 1, "allreduce")


def test_replay_matches_online_rules() -> None:
    from deco_sgd.bench.vclock import replay

    link = Link(8.0, 50.0)
    # Same run as test_step_rule_with_staleness, plus a dependent 2-exchange chain in step 2.
    steps = [{"x": [[[200_000, "allreduce"]]], "a": []}, {"x": [[[200_000, "allreduce"]]], "a": [0]},
             {"x": [[[100_000, "allreduce"], [100_000, "allreduce"]]], "a": [1, 2]}]
    starts = replay(steps, link, 2, 0.1)
    # step 2 launches at 0.5; link free at 0.5: first 0.5+0.1+0.1 = 0.7, second 0.7+0.1+0.1 = 0.9.
    assert starts == [pytest.approx(0.1), pytest.approx(0.4), pytest.approx(0.9)]
    with pytest.raises(ValueError, match=r"steps\[0\].a"):
        replay([{"x": [], "a": [1]}], link, 2, 0.1)


def test_replay_per_rank_compute_hand_computed() -> None:
    from deco_sgd.bench.vclock import replay

    # 8 Mbit/s = 1 MB/s, 50 ms one way, n = 2: a 1 MB all-reduce receives V = 1 MB over 2 hops.
    link = Link(8.0, 50.0)
    ar = [[[1_000_000, "allreduce"]]]
    sync = [{"x": ar, "a": [s], "t": [0.1, 0.1]} for s in range(2)]
    assert replay(sync, link, 2, 0.1) == pytest.approx([1.2, 2.4])
    # τ = 1: step 0 applies nothing; step 1 applies step 0's exchange, done at 0.1 + 1.1 = 1.2;
    # step 1's exchange queues behind it (link free at 1.1) and is done at 1.1 + 1.1 = 2.2.
    stale = [{"x": ar, "a": [], "t": [0.1, 0.1]}, {"x": ar, "a": [0], "t": [0.1, 0.1]},
             {"x": [], "a": [1], "t": [0.1, 0.1]}]
    assert replay(stale, link, 2, 0.1) == pytest.approx([0.1, 1.2, 2.2])
    # A step ends when its slowest rank does.
    assert replay([{"x": [], "a": [], "t": [0.1, 0.3]}], link, 2, 0.1) == pytest.approx([0.3])
    # τ = 2, no traffic: each rank is slow (0.5 s) on one step only, in turn. A step's exchange
    # starts when the last rank launches it (step 0 at 0.5, step 1 at 0.6), and with staleness
    # the ranks do not wait for each other: 0.5 + 3·0.1, not 2·0.5 + 2·0.1.
    zero = [[[0, "allreduce"]]]
    turns = [{"x": zero, "a": [], "t": [0.5, 0.1]}, {"x": zero, "a": [], "t": [0.1, 0.5]},
             {"x": zero, "a": [0], "t": [0.1, 0.1]}, {"x": zero, "a": [1], "t": [0.1, 0.1]}]
    assert replay(turns, link, 2, 0.1) == pytest.approx([0.5, 0.6, 0.7, 0.8])
    # The clocks may start at any trace time; the times returned are on that axis.
    assert replay(sync, link, 2, 0.1, start_s=10.0) == pytest.approx([11.2, 12.4])
    with pytest.raises(ValueError, match=r"steps\[1\].t: compute times for 1 ranks, expected 2"):
        replay([{"x": [], "a": [], "t": [0.1, 0.1]}, {"x": [], "a": [], "t": [0.1]}], link, 2, 0.1)


def test_replay_without_compute_times_is_the_single_clock_rule() -> None:
    from deco_sgd.bench.vclock import replay

    # A bench step log (no "t") and the same log with every rank at t_comp give the same times.
    link = Link(8.0, 50.0)
    steps = [{"x": [[[200_000, "allreduce"]]], "a": []}, {"x": [[[200_000, "allreduce"]]], "a": [0], "c": [4096]},
             {"x": [[[100_000, "allgather", "ring"]]], "a": [1, 2]}]
    ranked = [{**s, "t": [0.1, 0.1, 0.1]} for s in steps]
    assert replay(steps, link, 2, 0.1) == replay(ranked, link, 2, 0.1)


def test_allgather_is_charged_as_auto_runs_it() -> None:
    # 8 workers, 75 ms, 100 Mbit/s: algo="auto" runs recursive doubling for a 64 KiB block,
    # 3 latencies instead of the ring's 7; V = 7 blocks either way.
    link = Link(100.0, 75.0)
    tl = LinkTimeline(link, world=8)
    assert tl.algo("allgather", 65536) == "doubling" and tl.algo("allreduce", 65536) == "ring"
    assert pattern_cost("allgather", 8, 65536.0, "doubling") == PatternCost(7 * 65536.0, 3)
    assert pattern_cost("allgather", 8, 65536.0, "ring") == PatternCost(7 * 65536.0, 7)
    assert tl.exchange(0.0, 65536, "allgather") == pytest.approx(3 * 0.075 + 7 * 65536 / 12.5e6)
    # Bandwidth-bound (0.1 ms, 64 MiB): the ring is kept.
    assert LinkTimeline(Link(1000.0, 0.1), world=8).algo("allgather", 64 << 20) == "ring"


def test_retime_charges_a_cached_static_run_the_algorithm_of_this_link() -> None:
    from deco_sgd.bench.config import config_from_dict
    from deco_sgd.bench.runner import retime
    from deco_sgd.bench.vclock import replay

    # 8 workers, 25 ms, 20 Mbit/s: algo="auto" runs the ring for a 1.5 MB block. A static run
    # trained on a high-latency link recorded recursive doubling; here it is charged the ring.
    cfg = config_from_dict({"scenario": "x", "workers": 8, "network": {"rtt_ms": 50, "bandwidth_mbps": 20},
                            "train": {"compute_time_s": 0.075}})
    link = cfg.network.link()
    block = 1_500_000
    assert LinkTimeline(link, 8).algo("allgather", block) == "ring"
    log = [{"x": [[[block, "allgather", "doubling"]]], "a": [0]}]
    rec = {"kind": "static", "steps_log": log, "curve": [{"step": 0, "t_s": 0.0}, {"step": 1, "t_s": 9.9}]}
    ring = replay([{"x": [[[block, "allgather", "ring"]]], "a": [0]}], link, 8, 0.075)[0]
    doubling = replay(log, link, 8, 0.075)[0]
    assert ring != pytest.approx(doubling)
    assert retime(rec, cfg)["curve"][1]["t_s"] == pytest.approx(ring)
    # DeCo-SGD measured its own link and chose: its recorded algorithm is charged.
    assert retime({**rec, "kind": "deco"}, cfg)["curve"][1]["t_s"] == pytest.approx(doubling)
    # With collective_algo pinned (not "auto") nothing is re-chosen: the record is charged as is.
    pinned = config_from_dict({"scenario": "x", "workers": 8, "network": {"rtt_ms": 50, "bandwidth_mbps": 20},
                               "train": {"compute_time_s": 0.075}, "deco": {"collective_algo": "ring"}})
    assert retime(rec, pinned)["curve"][1]["t_s"] == pytest.approx(doubling)


def test_gloo_transport_charges_the_rendezvous_and_frees_the_link_alike() -> None:
    # gloo's transport (netsim.model.gloo) on 4 ranks, 1 MB/s, 50 ms: a 12 kB all-reduce's small
    # segments wait for a notice on every ring step. Completion is the replayed duration from
    # the start; the link is free after the V bytes serialise, as with the ideal transport.
    from deco_sgd.bench.vclock import replay
    from netsim import cost

    link = Link(8.0, 50.0)
    ideal, tl = LinkTimeline(link, 4), LinkTimeline(link, 4, transport="gloo")
    g = cost.allreduce_time(12_000, link, 4, transport="gloo")
    assert tl.exchange(0.0, 12_000, "allreduce") == pytest.approx(g)
    assert ideal.exchange(0.0, 12_000, "allreduce") == pytest.approx(6 * 0.05 + 0.018)
    assert tl.link_free == ideal.link_free == pytest.approx(0.018)  # V = 1.5 · 12 kB at 1 MB/s
    # The next exchange queues behind the first's bytes, not behind its rendezvous.
    assert tl.exchange(0.01, 4, "allreduce") == pytest.approx(0.018 + cost.allreduce_time(4, link, 4, transport="gloo"))
    assert tl.probe(0.0, "allreduce") == pytest.approx(cost.allreduce_time(4, link, 4, transport="gloo"))
    steps = [{"x": [[[12_000, "allreduce"]]], "a": [0]}]
    assert replay(steps, link, 4, 0.1, transport="gloo") == pytest.approx([0.1 + g])
    assert replay(steps, link, 4, 0.1) == pytest.approx([0.1 + 0.318])
    with pytest.raises(ValueError, match="transport"):
        LinkTimeline(link, 4, transport="nccl")
