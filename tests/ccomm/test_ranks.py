"""`ccomm.ranks`: argument checks, the context factory, kwargs, results that outlive ranks,
and ranks that do not outlive their parent.

(Rank errors, hangs and dead peers are covered by the harness tests in test_comm.py.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from _timing import on_time
from ccomm.ranks import RankError, RankPool, run_ranks


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"n": 0}, "n"), ({"n": True}, "n"), ({"n": 2, "threads": 0}, "threads"),
     ({"n": 2, "group_timeout_s": 0}, "group_timeout_s"), ({"n": 2, "start_timeout_s": -1.0}, "start_timeout_s")],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: must be"):
        RankPool(**kwargs)


def test_run_ranks_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="^timeout: must be"):
        run_ranks(_r_sum, 2, timeout=0)


def _r_sum(rank: int, n: int, scale: float = 1.0) -> torch.Tensor:
    import torch.distributed as dist

    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    return t * scale  # a tensor result, returned by pickle


def _ctx(rank: int, n: int) -> dict[str, Any]:
    return {"rank": rank, "n": n, "hits": 0}


def _r_with_ctx(ctx: dict[str, Any], bump: int) -> tuple[int, int, int]:
    ctx["hits"] += bump  # the context persists between jobs on a rank
    return ctx["rank"], ctx["n"], ctx["hits"]


def _r_raise(rank: int, n: int) -> None:
    if rank == 1:
        raise KeyError("only rank 1")


@pytest.mark.multiprocess
def test_run_ranks_one_shot_returns_tensors_after_exit() -> None:
    out = run_ranks(_r_sum, 2, timeout=120.0, scale=2.0)
    # 1 + 2 summed over both ranks, times the keyword argument; valid after the ranks exited.
    for t in out:
        torch.testing.assert_close(t, torch.full((3,), 6.0))


@pytest.mark.multiprocess
def test_context_factory_persists_and_errors_close_the_pool() -> None:
    with RankPool(2, group_timeout_s=30.0, context=_ctx) as pool:
        assert pool.run(_r_with_ctx, 1, timeout=60.0) == [(0, 2, 1), (1, 2, 1)]
        assert pool.run(_r_with_ctx, 5, timeout=60.0) == [(0, 2, 6), (1, 2, 6)]
    assert pool.broken and not any(pool.alive())

    pool = RankPool(2, group_timeout_s=30.0)
    with pytest.raises(RankError, match=r"(?s)1 rank\(s\) failed:.*--- rank 1 ---.*KeyError: 'only rank 1'"):
        pool.run(_r_raise, timeout=60.0)
    assert pool.broken and not any(pool.alive())


#: The default group's operation timeout in the test below, and the slack for the error to arrive.
GROUP_TIMEOUT_S, GROUP_SLACK_S = 2.0, 5.0


def _r_silent_rank_1(rank: int, n: int) -> float | None:
    """Rank 0 all-reduces alone: the default group's timeout must end it."""
    import torch.distributed as dist

    if rank == 1:
        time.sleep(GROUP_TIMEOUT_S + GROUP_SLACK_S)  # alive, but never joins the all-reduce
        return None
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError:
        return time.monotonic() - t0
    return None


@pytest.mark.multiprocess
@pytest.mark.timing
def test_group_timeout_applies_after_a_patient_start() -> None:
    # The ranks join within start_timeout_s (ranks may start seconds apart on a busy host);
    # group_timeout_s then bounds every operation of the default group.
    r0, _ = on_time(lambda: run_ranks(_r_silent_rank_1, 2, timeout=120.0, group_timeout_s=GROUP_TIMEOUT_S),
                    lag_limit_s=GROUP_SLACK_S / 5)
    assert r0 is not None, "the lone all-reduce did not time out"
    assert GROUP_TIMEOUT_S * 0.9 <= r0 <= GROUP_TIMEOUT_S + GROUP_SLACK_S, r0


# -- ranks die with their parent -----------------------------------------------------------------

#: A parent that starts a pool (from its main thread, or from another thread when argv[2] is
#: "thread": then only the portable sentinel watch applies, no PDEATHSIG), writes the ranks'
#: pids, and keeps them busy until it is killed.
_PARENT = '''
import sys, threading, time
from ccomm.ranks import RankPool

def spin(rank, n, seconds):
    end, x = time.monotonic() + seconds, 0
    while time.monotonic() < end:  # busy, like a training loop
        x += 1
    return x

def main(pids_file, where):
    pools = []
    start = lambda: pools.append(RankPool(2, group_timeout_s=60.0))
    if where == "thread":
        t = threading.Thread(target=start)
        t.start()
        t.join()
    else:
        start()
    with open(pids_file, "w") as f:
        f.write(" ".join(map(str, pools[0].pids())))
    print("ready", flush=True)
    pools[0].run(spin, 600.0, timeout=900.0)

if __name__ == "__main__":
    main(*sys.argv[1:])
'''
#: Every rank must be gone this long after its parent was killed.
ORPHAN_DEADLINE_S = 10.0


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", ["main", "thread"])
def test_ranks_die_when_the_parent_is_killed(tmp_path: Path, where: str) -> None:
    script, pids_file = tmp_path / "parent.py", tmp_path / "pids"
    script.write_text(_PARENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "parent.log"  # its stderr (the resource tracker reports the queues it cleans)
    with open(log, "w") as err:
        parent = subprocess.Popen([sys.executable, str(script), str(pids_file), where], stdout=subprocess.PIPE,
                                  stderr=err, text=True, env=env)
    pids: list[int] = []
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready", log.read_text()
        pids = [int(x) for x in pids_file.read_text().split()]
        assert len(pids) == 2 and all(_running(p) for p in pids)
        time.sleep(0.5)  # the ranks are inside the job now
        parent.kill()  # SIGKILL: no cleanup code of the parent runs
        parent.wait(timeout=30)
        deadline = time.monotonic() + ORPHAN_DEADLINE_S
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in pids if _running(p)]
        assert not survivors, f"ranks {survivors} outlived their killed parent by {ORPHAN_DEADLINE_S} s"
    finally:
        parent.kill()
        for p in pids:  # never leave a busy orphan behind, even when the test fails
            if _running(p):
                os.kill(p, signal.SIGKILL)
