"""Issue 13 item 1 on the wire: ranks that disagree get one clear error on every rank, never a
wrong tensor and never a gloo abort (same_size=True with unequal sizes, all-reduce of 100 vs
50 elements, (64, 64) vs (32, 64), int2 vs binary), on every algorithm and on send_recv."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from ccomm.ranks import RankPool

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def pool3() -> Any:
    with RankPool(3, group_timeout_s=60.0) as p:
        yield p


def _gather(spec: str, shape: tuple[int, ...], same_size: bool, algo: str) -> Callable[[], Any]:
    from ccomm import make_codec
    from ccomm.comm import allgather_payloads

    p = make_codec(spec).encode(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    return lambda: allgather_payloads(p, same_size=same_size, algo=algo)


def _cases(rank: int) -> dict[str, Callable[[], Any]]:
    from ccomm import Payload, PayloadMeta
    from ccomm.comm import allreduce_payload, send_recv

    odd = rank == 1  # rank 1 disagrees with ranks 0 and 2
    cases: dict[str, Callable[[], Any]] = {}
    for algo in ("ring", "bruck"):
        for same_size in (True, False):
            cases[f"shape/{algo}/{same_size}"] = _gather("int2", (32, 64) if odd else (64, 64), same_size, algo)
            cases[f"codec/{algo}/{same_size}"] = _gather("binary" if odd else "int2", (64, 64), same_size, algo)
    for algo in ("ring", "doubling", "tree"):
        n = 50 if odd else 100
        cases[f"allreduce/{algo}"] = lambda algo=algo, n=n: allreduce_payload(
            Payload(torch.ones(n), PayloadMeta(torch.Size([n]), torch.float32)), algo=algo)
    n = 5 if odd else 9
    p = Payload(torch.ones(n), PayloadMeta(torch.Size([n]), torch.float32))
    cases["send_recv/sized"] = lambda: send_recv(p, (rank + 1) % 3, (rank - 1) % 3)
    cases["send_recv/known"] = lambda: send_recv(p, (rank + 1) % 3, (rank - 1) % 3, recv_nbytes=36)
    return cases


def _r_mismatch(rank: int, world: int) -> dict[str, str]:
    import torch.distributed as dist

    from ccomm.header import HeaderMismatchError

    out = {}
    for name, call in _cases(rank).items():
        try:
            call()
            out[name] = "no error"
        except HeaderMismatchError as e:
            out[name] = str(e)
        dist.barrier()  # the next case starts together on every rank
    return out


def test_every_mismatch_is_one_clear_error_naming_both_sides(pool3: RankPool) -> None:
    res = pool3.run(_r_mismatch, timeout=300)
    for name in res[0]:
        msgs = [r[name] for r in res]
        if name.startswith("send_recv"):
            # A ring step: rank 1 sees rank 0's header, rank 2 sees rank 1's; rank 0 gets
            # rank 2's, which agrees with its own.
            assert msgs[0] == "no error", (name, msgs)
            for rank in (1, 2):
                assert "ranks disagree on" in msgs[rank] and "rank 1 has" in msgs[rank], (name, msgs)
            continue
        assert len(set(msgs)) == 1, (name, msgs)  # the same message on every rank
        msg = msgs[0]
        assert "ranks disagree on" in msg and "rank 0 has" in msg and "rank 1 has" in msg, (name, msg)
        if name.startswith("shape"):
            assert "shape" in msg and "(64, 64)" in msg and "(32, 64)" in msg
        elif name.startswith("codec"):
            assert msg.split("ranks disagree on ")[1].startswith("codec") and "int2#" in msg and "binary#" in msg
        else:
            assert "(100,)" in msg and "(50,)" in msg


def _r_agree(rank: int, world: int) -> list[bool]:
    """Agreeing ranks: every checked path still delivers the right data."""
    from ccomm import make_codec
    from ccomm.comm import allgather_payloads, decode_sum

    codec = make_codec("int2")
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(rank))
    p = codec.encode(x)
    ok = []
    for algo in ("ring", "bruck"):
        for same_size in (True, False):
            for check in (True, False):
                if not check and not same_size:
                    continue
                got = allgather_payloads(p, same_size=same_size, algo=algo, check=check)
                ok.append(torch.equal(got[rank].buffer, p.buffer) and decode_sum(codec, got).shape == (64, 64))
    return ok


def test_agreeing_ranks_get_their_data(pool3: RankPool) -> None:
    for ok in pool3.run(_r_agree, timeout=300):
        assert ok and all(ok)
