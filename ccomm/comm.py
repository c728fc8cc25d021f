"""Payload transport over any torch.distributed process group.

Only `payload.buffer` crosses the wire; a received buffer is wrapped with the local
`payload.meta` (or a `meta` the caller passes), which is valid because every rank encodes
a tensor of the same shape with the same codec, so the receiver's own context decodes
the sender's buffer.

- `allreduce_payload`: sums buffers in place (legal for additive codecs only; packed
  byte buffers are refused).
- `allgather_payloads`: every rank's payload, in group-rank order. When sizes may differ
  (`same_size=False`), one int64 size header per rank is gathered first, then buffers
  padded to the largest size are gathered and trimmed.
- `send_recv`: send to `dst` while receiving from `src` (a ring step), deadlock-free
  because both transfers are posted before either is waited on.

Every function has an `async_op=True` form returning a `CommHandle`; only the payload
transfer is asynchronous: a size exchange, when needed, completes before the call
returns, because the receive buffers cannot be allocated without it and launching it from
a completion callback could reorder collectives between ranks.

Every byte a rank hands to torch.distributed is recorded in `ccomm.stats` (see that
module for exactly what is counted). Failures of the backend (including a peer that died
or stopped answering within the group's timeout) surface as `CommError`, or
`CommTimeoutError` when the backend reports a timeout; the transport never waits longer
than the process group's own timeout.

Buffers and headers stay on the payload's device, so the same code runs on gloo (CPU)
and NCCL (CUDA).
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Generic, Sequence, TypeVar

import torch
import torch.distributed as dist

from .payload import Payload, PayloadMeta
from .stats import CommStats, resolve

if TYPE_CHECKING:
    from .codecs.base import Codec

__all__ = [
    "CommError",
    "CommTimeoutError",
    "CommHandle",
    "allreduce_payload",
    "allgather_payloads",
    "send_recv",
    "decode_sum",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Buffer dtypes whose elementwise sum is meaningless (bit-packed codes, bytes, flags).
_PACKED_DTYPES = (torch.uint8, torch.int8, torch.bool)
#: dtype of size headers: one element per rank, wide enough for any buffer.
_HEADER_DTYPE = torch.int64
_HEADER_BYTES = 8

# Substrings of backend error messages that mean "the group's timeout expired"
# (gloo: "Timed out waiting 3000ms ...", "Application timeout caused pair closure";
# NCCL watchdog: "Watchdog caught collective operation timeout").
_TIMEOUT_MARKERS = ("timed out", "timeout")


class CommError(RuntimeError):
    """torch.distributed failed during a transport call (peer lost, backend error)."""


class CommTimeoutError(CommError, TimeoutError):
    """The process group's timeout expired: a peer died or stopped taking part."""


def _wrap_error(exc: BaseException, what: str) -> CommError:
    msg = f"{what}: {exc}"
    if any(m in str(exc).lower() for m in _TIMEOUT_MARKERS):
        return CommTimeoutError(msg)
    return CommError(msg)


class CommHandle(Generic[T]):
    """Handle of an asynchronous transport call.

    `wait()` blocks until the transfer is done and returns the call's result (the same
    value the synchronous form returns); calling it again returns the same object, or
    raises the same error. `is_completed()` never blocks. `get_future()` returns a
    `torch.futures.Future` completed with the result (or the `CommError`).
    """

    def __init__(self, works: Sequence[Any], finish: Callable[[], T], what: str) -> None:
        self._works = list(works)
        self._finish = finish
        self._what = what
        # Reentrant and never held while blocking on the backend: a future callback may
        # run inline in the thread that completes the work (gloo's worker) or in the
        # thread calling get_future(), and must not deadlock against wait().
        self._lock = threading.RLock()
        self._done = False
        self._result: T | None = None
        self._error: CommError | None = None
        self._future: torch.futures.Future[T] | None = None

    def wait(self) -> T:
        if not self._done:
            try:
                for w in list(self._works):
                    w.wait()
            except RuntimeError as exc:  # DistBackendError and gloo errors are RuntimeErrors
                self._fail(exc)
            else:
                self._succeed()
        return self._outcome()

    def is_completed(self) -> bool:
        if self._done:
            return True
        return all(w.is_completed() for w in list(self._works))

    def get_future(self) -> "torch.futures.Future[T]":
        """A future holding the result (the same future on every call)."""
        with self._lock:
            if self._future is not None:
                return self._future
            futs: list[torch.futures.Future[Any]] | None
            try:
                futs = [w.get_future() for w in self._works] if not self._done else []
            except RuntimeError:
                # gloo's point-to-point works have no futures: wait on a helper thread.
                futs = None
            fut: torch.futures.Future[T] = torch.futures.Future()
            self._future = fut
            if futs is not None:
                # add_done_callback + set_exception keeps the CommError type; an exception
                # raised inside `then` would reach the waiter as a plain RuntimeError.
                torch.futures.collect_all(futs).add_done_callback(lambda all_done: self._on_futures(all_done, fut))
            else:
                threading.Thread(target=self._complete, args=(fut,), name="ccomm-wait", daemon=True).start()
            return fut

    # -- internals ---------------------------------------------------------------------
    def _succeed(self) -> None:
        with self._lock:
            if self._done:
                return
            try:
                self._result = self._finish()
            except RuntimeError as exc:
                self._error = _wrap_error(exc, self._what)
                self._error.__cause__ = exc
            self._done = True
            self._works = []  # release the buffers the backend's work objects hold

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._done:
                return
            self._error = _wrap_error(exc, self._what)
            self._error.__cause__ = exc
            self._done = True
            self._works = []

    def _outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _on_futures(
        self, all_done: "torch.futures.Future[list[torch.futures.Future[Any]]]", fut: "torch.futures.Future[T]"
    ) -> None:
        try:
            for f in all_done.value():
                f.value()  # raises the backend's error, if any
        except RuntimeError as exc:
            self._fail(exc)
        else:
            self._succeed()
        if self._error is not None:
            fut.set_exception(self._error)
        else:
            fut.set_result(self._result)  # type: ignore[arg-type]

    def _complete(self, fut: "torch.futures.Future[T]") -> None:
        try:
            fut.set_result(self.wait())
        except Exception as exc:  # whatever wait() raises must reach the future's waiter
            fut.set_exception(exc)

    def __repr__(self) -> str:
        return f"CommHandle({self._what!r}, completed={self.is_completed()})"


def _finish_sync(handle: CommHandle[T], async_op: bool) -> "T | CommHandle[T]":
    return handle if async_op else handle.wait()


def _issue(what: str, fn: Callable[[], Any]) -> Any:
    """Call a torch.distributed function, turning backend failures into CommError."""
    try:
        return fn()
    except RuntimeError as exc:
        raise _wrap_error(exc, what) from exc


def _check_payload(payload: Any, fn: str) -> Payload:
    if not isinstance(payload, Payload):
        raise ValueError(f"{fn}: payload must be a ccomm.Payload, got {type(payload).__name__}")
    return payload


def _group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


# -- all-reduce --------------------------------------------------------------------------


def allreduce_payload(
    payload: Payload,
    group: dist.ProcessGroup | None = None,
    *,
    async_op: bool = False,
    key: str | None = None,
    stats: CommStats | None = None,
) -> "Payload | CommHandle[Payload]":
    """Sum `payload.buffer` over the group, in place; returns `payload` (or a handle).

    Legal only for additive codecs (`codec.additive`), whose buffers are numbers; the
    result decodes to the sum of every rank's decoded tensor. Counts `payload.nbytes`.
    """
    payload = _check_payload(payload, "allreduce_payload")
    buf = payload.buffer
    if buf.dtype in _PACKED_DTYPES:
        raise ValueError(
            f"allreduce_payload: payload buffer has dtype {buf.dtype} (packed codes), whose sum is "
            "meaningless; use allgather_payloads for non-additive codecs"
        )
    _group_rank_and_size(group)
    what = f"allreduce_payload(key={key!r}, {payload.nbytes} bytes)"
    resolve(stats).record("allreduce", key, payload_bytes=payload.nbytes)
    logger.debug("%s", what)
    work = _issue(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True))
    return _finish_sync(CommHandle([work], lambda: payload, what), async_op)


# -- all-gather --------------------------------------------------------------------------


def allgather_payloads(
    payload: Payload,
    group: dist.ProcessGroup | None = None,
    *,
    same_size: bool = False,
    async_op: bool = False,
    key: str | None = None,
    stats: CommStats | None = None,
) -> "list[Payload] | CommHandle[list[Payload]]":
    """Every rank's payload in group-rank order, each wrapped with the local `payload.meta`.

    `same_size=True` promises that every rank's buffer has the same number of elements
    (true for `codec.fixed_size` codecs on equal shapes) and skips the size exchange;
    breaking the promise is a backend error. All ranks must use the same buffer dtype.
    With `same_size=False`, an int64 size header is gathered first and buffers are padded
    to the largest size; header and padding are counted in `ccomm.stats`.
    """
    payload = _check_payload(payload, "allgather_payloads")
    _, world = _group_rank_and_size(group)
    buf = payload.buffer
    what = f"allgather_payloads(key={key!r}, {payload.nbytes} bytes)"
    st = resolve(stats)
    if same_size:
        st.record("allgather", key, payload_bytes=payload.nbytes)
        logger.debug("%s", what)
        out = [torch.empty_like(buf) for _ in range(world)]
        work = _issue(what, lambda: dist.all_gather(out, buf, group=group, async_op=True))
        return _finish_sync(CommHandle([work], lambda: [payload.with_buffer(b) for b in out], what), async_op)

    # Size exchange: blocking, since the receive buffers depend on it.
    n = buf.numel()
    header = torch.tensor([n], dtype=_HEADER_DTYPE, device=buf.device)
    headers = [torch.empty_like(header) for _ in range(world)]
    # Counted when handed over, so a failed exchange still shows its header bytes.
    st.record("allgather", key, header_bytes=_HEADER_BYTES)
    _issue(what + " [size exchange]", lambda: dist.all_gather(headers, header, group=group))
    sizes = [int(h.item()) for h in headers]
    longest = max(sizes)
    pad = longest - n
    st.record("allgather", key, payload_bytes=payload.nbytes, padding_bytes=pad * buf.element_size(), calls=0)
    logger.debug("%s sizes=%s", what, sizes)
    send = buf if pad == 0 else torch.cat([buf, buf.new_zeros(pad)])
    out = [buf.new_empty(longest) for _ in range(world)]
    work = _issue(what, lambda: dist.all_gather(out, send, group=group, async_op=True))

    def finish() -> list[Payload]:
        # A leading slice of a 1-D tensor is contiguous, so no copy is needed.
        return [payload.with_buffer(b if s == longest else b[:s]) for b, s in zip(out, sizes)]

    return _finish_sync(CommHandle([work], finish, what), async_op)


# -- ring send/recv ----------------------------------------------------------------------


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _exchange(
    send_buf: torch.Tensor, recv_buf: torch.Tensor, dst: int, src: int, group: dist.ProcessGroup | None
) -> list[Any]:
    """Post the send and the receive together; both are in flight before either is waited on."""
    ops = [
        dist.P2POp(dist.isend, send_buf, dst, group=group),
        dist.P2POp(dist.irecv, recv_buf, src, group=group),
    ]
    return list(dist.batch_isend_irecv(ops))


def send_recv(
    payload: Payload,
    dst: int,
    src: int,
    group: dist.ProcessGroup | None = None,
    *,
    recv_nbytes: int | None = None,
    recv_dtype: torch.dtype | None = None,
    meta: PayloadMeta | None = None,
    async_op: bool = False,
    key: str | None = None,
    stats: CommStats | None = None,
) -> "Payload | CommHandle[Payload]":
    """Send `payload` to group rank `dst` and receive a payload from group rank `src`.

    A ring step: every rank calls it with `dst = rank + 1`, `src = rank - 1` (mod size)
    and no rank blocks the others. The received buffer has dtype `recv_dtype` (default:
    the sent buffer's) and `recv_nbytes` bytes; with `recv_nbytes=None` each rank first
    sends its size as an int64 header (blocking, counted in `ccomm.stats`). The result is
    wrapped with `meta` (default: the local `payload.meta`).
    With `dst == src ==` this rank (a ring of one), the payload is copied locally and
    nothing is sent.
    """
    payload = _check_payload(payload, "send_recv")
    rank, world = _group_rank_and_size(group)
    for name, r in (("dst", dst), ("src", src)):
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world:
            raise ValueError(f"send_recv: {name}={r!r} must be a group rank in [0, {world - 1}]")
    if (dst == rank) != (src == rank):
        raise ValueError(
            f"send_recv: dst={dst}, src={src} on rank {rank}: a rank can only exchange with itself "
            "when both dst and src are itself"
        )
    buf = payload.buffer
    rdtype = buf.dtype if recv_dtype is None else recv_dtype
    esize = torch.empty((), dtype=rdtype).element_size()
    if recv_nbytes is not None:
        if isinstance(recv_nbytes, bool) or not isinstance(recv_nbytes, int) or recv_nbytes < 0:
            raise ValueError(f"send_recv: recv_nbytes={recv_nbytes!r} must be an integer >= 0 or None")
        if recv_nbytes % esize:
            raise ValueError(f"send_recv: recv_nbytes={recv_nbytes} is not a multiple of {rdtype}'s {esize} bytes")
    out_meta = payload.meta if meta is None else meta
    what = f"send_recv(key={key!r}, dst={dst}, src={src}, {payload.nbytes} bytes)"
    st = resolve(stats)

    if dst == rank:
        if recv_nbytes is not None and recv_nbytes != payload.nbytes:
            raise ValueError(f"send_recv: recv_nbytes={recv_nbytes} but this rank sends itself {payload.nbytes} bytes")
        # Ring of one: nothing goes through torch.distributed, so nothing is counted as sent.
        st.record("send_recv", key)
        local = buf.clone() if recv_dtype is None else buf.view(torch.uint8).clone().view(rdtype)
        done: CommHandle[Payload] = CommHandle([], lambda: Payload(local, out_meta), what)
        return _finish_sync(done, async_op)

    gdst, gsrc = _global_rank(group, dst), _global_rank(group, src)
    calls = 1
    if recv_nbytes is None:
        header = torch.tensor([payload.nbytes], dtype=_HEADER_DTYPE, device=buf.device)
        peer_header = torch.empty_like(header)
        st.record("send_recv", key, header_bytes=_HEADER_BYTES)
        calls = 0  # this call is already counted
        works = _issue(what + " [size exchange]", lambda: _exchange(header, peer_header, gdst, gsrc, group))
        CommHandle(works, lambda: None, what + " [size exchange]").wait()
        recv_nbytes = int(peer_header.item())
        if recv_nbytes % esize:
            raise CommError(
                f"{what}: rank {src} announced {recv_nbytes} bytes, not a multiple of {rdtype}'s {esize} bytes"
            )
    st.record("send_recv", key, payload_bytes=payload.nbytes, calls=calls)
    logger.debug("%s recv_nbytes=%d", what, recv_nbytes)
    recv = torch.empty(recv_nbytes // esize, dtype=rdtype, device=buf.device)
    works = _issue(what, lambda: _exchange(buf, recv, gdst, gsrc, group))
    return _finish_sync(CommHandle(works, lambda: Payload(recv, out_meta), what), async_op)


# -- decoding ----------------------------------------------------------------------------


def decode_sum(codec: "Codec", payloads: Sequence[Payload]) -> torch.Tensor:
    """Decode `payloads` and sum them in the given (rank) order.

    The fixed order makes the result bit-identical on every rank. Half-precision results
    are accumulated in fp32 and cast back once, so the sum does not lose precision with
    the number of ranks.
    """
    if len(payloads) == 0:
        raise ValueError("decode_sum: payloads must hold at least one payload")
    first = codec.decode(payloads[0])
    acc_dtype = torch.promote_types(first.dtype, torch.float32)
    acc = first.to(acc_dtype, copy=True)
    for p in payloads[1:]:
        acc += codec.decode(p).to(acc_dtype)
    return acc.to(first.dtype)
