"""Measurement agents the probe runs inside host namespaces (``python -m netsim.probe.agent``).

Roles (each prints one JSON line on stdout):

* ``serve ADDR PORT``: accept connections; the first byte picks ``P`` (echo 32-byte
  ping-pong messages) or ``B`` (receive a bulk transfer and report its receiver timing).
* ``rtt ADDR PORT --samples K --warmup W``: TCP ping-pong with TCP_NODELAY; prints the RTTs.
* ``send ADDR PORT --bytes N [--omit K]``: one TCP connection carrying N bytes; the
  receiver's timing (first byte, K-th byte, last byte) comes back on the same connection.
* ``gloo OP --bytes N --iters K [--concurrent C --gap S]``: time a torch.distributed op, or C
  of them in flight together (see :func:`gloo_op`).
* ``gloo-sweep --ops OP,OP --bytes N,N,... --iters K``: every op at every size in one process
  group (see :func:`gloo_sweep`; one torch start-up per host instead of one per point).

All times are CLOCK_MONOTONIC, which every namespace of one machine shares, so a sender's
start and a receiver's finish can be compared directly.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from typing import Any

__all__ = ["gloo_op", "gloo_sweep", "main", "ping_pong", "send_bulk", "serve"]

_MSG = 32
_CHUNK = 1 << 16
_IO_TIMEOUT_S = 120.0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed the connection")
        buf += part
    return bytes(buf)


def _handle(conn: socket.socket) -> None:
    conn.settimeout(_IO_TIMEOUT_S)
    with conn:
        mode = _recv_exact(conn, 1)
        if mode == b"P":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                try:
                    msg = _recv_exact(conn, _MSG)
                except ConnectionError:
                    return
                conn.sendall(msg)
        elif mode == b"B":
            total, omit = struct.unpack("!QQ", _recv_exact(conn, 16))
            got, first_t, first_n, mark_t, mark_n = 0, 0.0, 0, 0.0, 0
            buf = bytearray(_CHUNK)
            while got < total:
                k = conn.recv_into(buf, min(_CHUNK, total - got))
                if k == 0:
                    raise ConnectionError("sender closed early")
                if got == 0:
                    first_t, first_n = time.monotonic(), k
                got += k
                if mark_n == 0 and got >= omit:
                    mark_t, mark_n = time.monotonic(), got
            last_t = time.monotonic()
            conn.sendall(struct.pack("!ddQdQ", first_t, last_t, first_n, mark_t, mark_n))


def serve(addr: str, port: int, ready: threading.Event | None = None) -> None:
    """Serve forever (the probe kills the process when done)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(16)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


def _connect(addr: str, port: int, timeout: float = 20.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.create_connection((addr, port), timeout=5.0)
            s.settimeout(_IO_TIMEOUT_S)
            return s
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def ping_pong(addr: str, port: int, samples: int, warmup: int) -> list[float]:
    """RTTs in seconds of ``samples`` 32-byte round trips after ``warmup`` discarded ones."""
    with _connect(addr, port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"P")
        msg = b"\x5a" * _MSG
        out = []
        for k in range(warmup + samples):
            t = time.monotonic()
            s.sendall(msg)
            _recv_exact(s, _MSG)
            if k >= warmup:
                out.append(time.monotonic() - t)
    return out


def send_bulk(addr: str, port: int, nbytes: int, omit: int = 0) -> dict[str, float]:
    """Send ``nbytes`` on one connection; returns sender start and the receiver's timing.

    The receiver also marks when ``omit`` bytes have arrived, so the steady state can be
    timed without slow start and receive-window autotuning (like iperf's ``--omit``).
    """
    with _connect(addr, port) as s:
        s.sendall(b"B" + struct.pack("!QQ", nbytes, omit))
        block = b"\0" * _CHUNK
        view = memoryview(block)
        start = time.monotonic()
        left = nbytes
        while left:
            k = s.send(view[: min(_CHUNK, left)])
            left -= k
        first_t, last_t, first_n, mark_t, mark_n = struct.unpack("!ddQdQ", _recv_exact(s, 40))
    return {"start": start, "first": first_t, "last": last_t, "first_bytes": float(first_n),
            "mark": mark_t, "mark_bytes": float(mark_n), "bytes": float(nbytes)}


def gloo_op(op: str, nbytes: int, iters: int, lead_s: float = 0.3, concurrent: int = 1,
            gap_s: float = 0.0) -> list[float] | list[list[float]]:
    """Time ``op`` on torch.distributed (gloo, env:// rendezvous) ``iters`` times.

    Every iteration starts at one absolute CLOCK_MONOTONIC instant broadcast by rank 0 (the
    namespaces share the clock), so barrier skew does not count; the time is the last rank's
    finish minus that instant.  With ``concurrent`` k > 1 (all-reduce and all-gather only),
    each iteration launches k asynchronous ops ``gap_s`` apart and reports each op's
    completion (stamped by a future callback) from that instant: how collectives in flight
    together share the link.
    """
    if concurrent > 1:
        return _gloo_concurrent(op, nbytes, iters, lead_s, concurrent, gap_s)
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=_timeout())
    times = _time_op(op, nbytes, iters, lead_s)
    dist.barrier()
    dist.destroy_process_group()
    return times


def gloo_sweep(ops: list[str], sizes: list[int], iters: int, lead_s: float = 0.3) -> dict[str, dict[str, list[float]]]:
    """:func:`gloo_op` for every op and size in one process group: ``{op: {str(bytes): times}}``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=_timeout())
    out = {op: {str(n): _time_op(op, n, iters, lead_s) for n in sizes} for op in ops}
    dist.barrier()
    dist.destroy_process_group()
    return out


def _timeout() -> Any:
    from datetime import timedelta

    return timedelta(seconds=_IO_TIMEOUT_S)


def _time_op(op: str, nbytes: int, iters: int, lead_s: float) -> list[float]:
    import torch
    import torch.distributed as dist

    rank, n = dist.get_rank(), dist.get_world_size()
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    outs = [torch.empty_like(x) for _ in range(n)]

    def once() -> None:
        if op == "send":
            if rank == 0:
                dist.send(x, 1)
            elif rank == 1:
                dist.recv(x, 0)
        elif op == "allreduce":
            dist.all_reduce(x)
        elif op == "allgather":
            dist.all_gather(outs, x)
        else:
            raise ValueError(f"op must be send, allreduce or allgather; got {op!r}")

    once()  # connections are set up lazily by gloo: keep them out of the timing
    times = []
    for _ in range(iters):
        dist.barrier()
        at = torch.tensor([time.monotonic() + lead_s], dtype=torch.float64)
        dist.broadcast(at, 0)
        while time.monotonic() < at.item():
            time.sleep(min(1e-3, max(0.0, at.item() - time.monotonic())))
        once()
        end = torch.tensor([time.monotonic()], dtype=torch.float64)
        dist.all_reduce(end, op=dist.ReduceOp.MAX)
        times.append(end.item() - at.item())
    return times


def _gloo_concurrent(op: str, nbytes: int, iters: int, lead_s: float, k: int, gap_s: float) -> list[list[float]]:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if op not in ("allreduce", "allgather"):
        raise ValueError(f"op must be allreduce or allgather with --concurrent; got {op!r}")
    dist.init_process_group("gloo", timeout=timedelta(seconds=_IO_TIMEOUT_S))
    n = dist.get_world_size()
    xs = [torch.ones(max(1, nbytes // 4)) for _ in range(k)]
    outs = [[torch.empty_like(x) for _ in range(n)] for x in xs]

    def launch(i: int) -> Any:
        if op == "allreduce":
            return dist.all_reduce(xs[i], async_op=True)
        return dist.all_gather(outs[i], xs[i], async_op=True)

    for w in [launch(i) for i in range(k)]:  # connections and TCP windows: untimed
        w.wait()
    times = []
    for _ in range(iters):
        dist.barrier()
        at = torch.tensor([time.monotonic() + lead_s], dtype=torch.float64)
        dist.broadcast(at, 0)
        t0 = at.item()
        done = [0.0] * k
        works = []
        for i in range(k):
            while time.monotonic() < t0 + i * gap_s:
                time.sleep(2e-4)
            w = launch(i)
            w.get_future().add_done_callback(lambda _f, i=i: done.__setitem__(i, time.monotonic() - t0))
            works.append(w)
        for w in works:
            w.wait()
        time.sleep(0.01)  # the last callback may run just after wait() returns
        d = torch.tensor(done, dtype=torch.float64)
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        times.append(d.tolist())
    dist.barrier()
    dist.destroy_process_group()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netsim.probe.agent")
    sub = ap.add_subparsers(dest="role", required=True)
    for role in ("serve", "rtt", "send"):
        p = sub.add_parser(role)
        p.add_argument("addr")
        p.add_argument("port", type=int)
        p.add_argument("--samples", type=int, default=200)
        p.add_argument("--warmup", type=int, default=20)
        p.add_argument("--bytes", type=int, default=8 << 20)
        p.add_argument("--omit", type=int, default=0)
    g = sub.add_parser("gloo")
    g.add_argument("op", choices=("send", "allreduce", "allgather"))
    g.add_argument("--bytes", type=int, default=4 << 20)
    g.add_argument("--iters", type=int, default=3)
    g.add_argument("--concurrent", type=int, default=1, help="ops launched per iteration (each timed)")
    g.add_argument("--gap", type=float, default=0.0, help="seconds between their launches")
    w = sub.add_parser("gloo-sweep")
    w.add_argument("--ops", default="allreduce,allgather", help="comma-separated: send, allreduce, allgather")
    w.add_argument("--bytes", default="4,204000", help="comma-separated sizes per rank")
    w.add_argument("--iters", type=int, default=3)
    a = ap.parse_args(argv)
    if a.role == "gloo-sweep":
        ops = a.ops.split(",")
        bad = [op for op in ops if op not in ("send", "allreduce", "allgather")]
        if bad:
            ap.error(f"--ops: {bad} not among send, allreduce, allgather")
        sweep = gloo_sweep(ops, [int(b) for b in a.bytes.split(",")], a.iters)
        print(json.dumps({"sweep": sweep}), flush=True)
    elif a.role == "gloo":
        times = gloo_op(a.op, a.bytes, a.iters, concurrent=a.concurrent, gap_s=a.gap)
        print(json.dumps({"times": times}), flush=True)
    elif a.role == "serve":
        serve(a.addr, a.port)
    elif a.role == "rtt":
        print(json.dumps({"rtt": ping_pong(a.addr, a.port, a.samples, a.warmup)}), flush=True)
    else:
        print(json.dumps(send_bulk(a.addr, a.port, a.bytes, a.omit)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
