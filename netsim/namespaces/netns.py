"""netsim.namespaces.netns: real hosts as network namespaces with shaped links (docs/design/netsim.md#namespaces).

``up(topo)`` returns a :class:`Net` (context manager) whose hosts run real processes
(``net.popen(rank, argv)`` with ``net.env(rank)``); ``down(tag)`` removes everything.

Safety: every object carries the ``nsm-`` prefix and is recorded in the write-ahead state
``/run/netsim/<tag>.json`` *before* it is created, so even a SIGKILLed controller leaves
something ``netsim down`` can clean.  Processes are killed by recorded PID after checking
``/proc/<pid>/cmdline`` (never by name), plus the PIDs ``ip netns pids`` reports inside
netsim namespaces.  Nothing outside those namespaces is touched.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from netsim.namespaces.commands import NS_RE, Cmd, host_ns, ns_add
from netsim.namespaces._procs import STATE_DIR, WIRE_MODULE, cmdline, kill_all, read_state, state_path, write_state
from netsim.namespaces.executor import Executor, run_argv
from netsim.model.link import Link
from netsim.namespaces.plan import Caps, FeatureError, HostPlan, Plan, UpOptions, plan_up
from netsim.model.topo import Topo
from netsim.model.trace import Trace

__all__ = ["Net", "FeatureError", "STATE_DIR", "attach", "detect", "down",
           "leftovers", "list_namespaces", "require_root", "topo_from_json", "topo_to_json", "up"]

log = logging.getLogger(__name__)

ROOT_MESSAGE = ("netsim.namespaces.netns needs root to create network namespaces; run as root, "
                "or use netsim.emulate, which needs no privileges")
_WIRE_START_TIMEOUT_S = 20.0
_ACTIVE: dict[str, Net] = {}
_GUARDS_INSTALLED = False
_PREV_HANDLERS: dict[int, Any] = {}


def require_root() -> None:
    """Raise before any command: ``PermissionError`` without root, ``FeatureError`` without tools."""
    if os.geteuid() != 0:
        raise PermissionError(ROOT_MESSAGE)
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise FeatureError(f"netsim.namespaces.netns needs `{tool}` (Debian package iproute2)")


def list_namespaces() -> list[str]:
    """Every netsim namespace on the machine (names matching ``NS_RE``)."""
    out = run_argv(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if NS_RE.match(n)]


@functools.lru_cache(maxsize=1)
def detect() -> Caps:
    """Probe htb, netem and TUN once in a scratch netsim namespace (cached per process)."""
    require_root()
    ns = host_ns(f"d{os.getpid() % 10_000_000}", 0)
    run_argv(ns_add(ns).argv)
    try:
        run_argv(["ip", "-n", ns, "link", "add", "nsm0", "type", "veth", "peer", "name", "nsm1"])
        htb = run_argv(["tc", "-n", ns, "qdisc", "add", "dev", "nsm0", "root", "handle", "1:",
                        "htb", "default", "1"], check=False).returncode == 0
        netem = run_argv(["tc", "-n", ns, "qdisc", "add", "dev", "nsm1", "root", "netem",
                          "delay", "1ms"], check=False).returncode == 0
        tun = os.path.exists("/dev/net/tun")
        if tun:
            from netsim.namespaces.wire import open_tun

            try:
                os.close(open_tun(ns))
            except OSError:
                tun = False
    finally:
        run_argv(["ip", "netns", "del", ns], check=False)
    caps = Caps(netem=netem, tun=tun, htb=htb)
    log.info("kernel capabilities: %s", caps)
    return caps


def _ns_pids(ns: str) -> list[int]:
    out = run_argv(["ip", "netns", "pids", ns], check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def leftovers(tag: str | None = None) -> list[str]:
    """What netsim objects remain (namespaces, state files, wire processes) for ``tag`` or all."""
    rx = re.compile(rf"^nsm-{re.escape(tag)}-(h\d+|sw)$") if tag else NS_RE
    left = [f"namespace {n}" for n in list_namespaces() if rx.match(n)]
    if STATE_DIR.is_dir():
        pattern = f"{tag}.*" if tag else "*"
        left += [f"state {p}" for p in STATE_DIR.glob(pattern) if p.suffix in (".json", ".tmp")]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            c = cmdline(int(d.name)) or ""
            if WIRE_MODULE in c and (tag is None or f"/{tag}.json" in c):
                left.append(f"process {d.name} {c}")
    return left


def down(tag: str | None = None, *, all_: bool = False) -> list[str]:
    """Remove a net (or every netsim object with ``all_``); idempotent; returns what remains."""
    require_root()
    if tag is None and not all_:
        raise ValueError("down needs a tag or all_=True")
    tags = [tag] if tag else sorted({p.stem for p in STATE_DIR.glob("*.json")
                                     if not p.stem.endswith(".wire")}
                                    if STATE_DIR.is_dir() else set())
    for t in tags:
        _ACTIVE.pop(t, None)
        state = read_state(t) or {}
        rx = re.compile(rf"^nsm-{re.escape(t)}-(h\d+|sw)$")
        namespaces = sorted(set(state.get("namespaces", [])) |
                            {n for n in list_namespaces() if rx.match(n)})
        pids: dict[int, str | None] = {int(p): c for p, c in state.get("pids", {}).items()}
        for ns in namespaces:
            pids.update({p: None for p in _ns_pids(ns)})
        kill_all(pids)
        wire = state.get("wire_pid")
        if wire:
            kill_all({int(wire["pid"]): wire["cmdline"]})
        for ns in namespaces:
            if NS_RE.match(ns):
                run_argv(["ip", "netns", "del", ns], check=False)
        for suffix in (".json", ".wire.json", ".tmp"):
            (STATE_DIR / f"{t}{suffix}").unlink(missing_ok=True)
    if all_:
        for ns in list_namespaces():
            kill_all({p: None for p in _ns_pids(ns)})
            run_argv(["ip", "netns", "del", ns], check=False)
    left = leftovers(None if all_ else tag)
    if left:
        log.warning("netsim down left: %s", left)
    return left


def _link_json(link: Link) -> dict[str, Any]:
    tr = link.trace
    return {"bandwidth_mbps": link.bandwidth_mbps, "latency_ms": link.latency_ms,
            "jitter_ms": link.jitter_ms, "loss": link.loss, "queue_packets": link.queue_packets,
            "reorder": link.reorder, "mtu": link.mtu,
            "trace": None if tr is None else {"times": list(tr.times_s), "mbps": list(tr.mbps),
                                              "loop": tr.loop, "period_s": tr.period_s}}


def _link_from_json(d: dict[str, Any]) -> Link:
    t = d.pop("trace")
    trace = None if t is None else Trace(t["times"], t["mbps"], loop=t["loop"],
                                         period_s=t["period_s"])
    return Link(d.pop("bandwidth_mbps"), d.pop("latency_ms"), d.pop("jitter_ms"), d.pop("loss"),
                trace, **d)


def topo_to_json(topo: Topo) -> dict[str, Any]:
    """The state file's description of ``topo`` (so another process can probe the net)."""
    return {"n": topo.n, "shared": topo.shared, "link": _link_json(topo.link),
            "hosts": {str(i): _link_json(lk) for i, lk in topo.hosts.items()},
            "pairs": {f"{i}-{j}": _link_json(lk) for (i, j), lk in topo.pairs.items()}}


def topo_from_json(d: dict[str, Any]) -> Topo:
    pairs = {}
    for key, lk in d["pairs"].items():
        i, j = key.split("-")
        pairs[(int(i), int(j))] = _link_from_json(dict(lk))
    return Topo(d["n"], _link_from_json(dict(d["link"])),
                hosts={int(i): _link_from_json(dict(lk)) for i, lk in d["hosts"].items()},
                pairs=pairs, shared=d["shared"])


def attach(tag: str) -> Net:
    """The :class:`Net` of a net brought up by another process (``netsim up``)."""
    state = read_state(tag)
    if state is None or "t0" not in state:
        raise FileNotFoundError(f"no running netsim net with tag {tag!r} in {STATE_DIR}")
    topo = topo_from_json(state["topo"])
    hosts = tuple(HostPlan(**h) for h in state["hosts"])
    plan = Plan(tag, state["mode"], hosts, tuple(state["namespaces"]), (), (), state["wire"],
                int(state.get("mtu", 1500)))
    net = Net(topo, plan, float(state["t0"]), None, state)
    net._owner = False
    return net


def _die_with_us() -> list[str]:
    """The argv prefix that gives a child our death as its parent-death signal, or [] (not the
    main thread, or no setpriv). `ip netns exec` and setpriv both exec, so the recorded PID
    stays the child's own and the signal setting survives into argv."""
    if threading.current_thread() is not threading.main_thread() or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--pdeathsig", "KILL", "--"]


class Net:
    """A running emulated network: ``hosts``, ``env(rank)``, ``popen(rank, argv)``, ``down()``."""

    def __init__(self, topo: Topo, plan: Plan, t0: float, wire: subprocess.Popen[str] | None,
                 state: dict[str, Any]) -> None:
        self.topo, self.plan, self.t0, self._wire, self._state = topo, plan, t0, wire, state
        self.tag = plan.tag
        self.hosts: tuple[HostPlan, ...] = plan.hosts
        self.dev = plan.hosts[0].dev
        self.procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        self._owner = True  # False for attach(): leaving the context does not tear it down

    def __repr__(self) -> str:
        return f"Net(tag={self.tag!r}, n={len(self.hosts)}, mode={self.plan.mode!r})"

    def exec_prefix(self, rank: int) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[rank].ns]

    def env(self, rank: int, port: int = 29500) -> dict[str, str]:
        """Variables that keep gloo and NCCL on the emulated device
        (docs/design/netsim.md#forcing-torch-onto-the-link)."""
        if not 0 <= rank < len(self.hosts):
            raise ValueError(f"rank must be in [0, {len(self.hosts) - 1}], got {rank}")
        return {
            "GLOO_SOCKET_IFNAME": self.dev, "NCCL_SOCKET_IFNAME": self.dev,
            "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1",
            "NCCL_NET": "Socket", "MASTER_ADDR": self.hosts[0].addr, "MASTER_PORT": str(port),
            "RANK": str(rank), "WORLD_SIZE": str(len(self.hosts)), "NETSIM_T0": repr(self.t0),
            "NETSIM_TAG": self.tag,
        }

    def popen(self, rank: int, argv: Sequence[str], *, env: dict[str, str] | None = None,
              port: int = 29500, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in host ``rank``'s namespace with :meth:`env`; the PID is recorded.

        Called from the main thread, the child also dies with this process (SIGKILL, via
        ``setpriv --pdeathsig``, when util-linux has it), even when this process is killed
        and cannot run its cleanup: a process left in a namespace keeps using the host.
        Not from another thread: the kernel sends the signal when the *thread* that started
        the child exits."""
        full_env = {**os.environ, **self.env(rank, port), **(env or {})}
        proc = subprocess.Popen(self.exec_prefix(rank) + _die_with_us() + list(argv), env=full_env, **kwargs)
        self.procs.append(proc)
        # `ip netns exec` execs argv, so the recorded PID becomes argv's own process.
        self._state.setdefault("pids", {})[str(proc.pid)] = " ".join(argv)
        write_state(self.tag, self._state)
        return proc

    def wire_counters(self) -> dict[str, Any] | None:
        try:
            return json.loads((STATE_DIR / f"{self.tag}.wire.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def down(self) -> list[str]:
        if self._closed:
            return []
        self._closed = True
        left = down(self.tag)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if self._wire is not None:
            self._wire.wait()
            for f in (self._wire.stdin, self._wire.stdout):
                if f:
                    f.close()
        return left

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owner:
            self.down()


def _cleanup_all() -> None:
    for net in list(_ACTIVE.values()):
        try:
            net.down()
        except Exception:  # noqa: BLE001 - best effort at exit; the state file remains
            log.exception("cleanup of %s failed", net.tag)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _cleanup_all()
    prev = _PREV_HANDLERS.get(signum)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_guards() -> None:
    global _GUARDS_INSTALLED
    if _GUARDS_INSTALLED:
        return
    atexit.register(_cleanup_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            _PREV_HANDLERS[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)
    _GUARDS_INSTALLED = True


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"the delay wire did not answer within {timeout} s "
                           f"(exit code {proc.poll()})")
    return line.strip()


def up(topo: Topo, *, tag: str = "net", delay: str = "auto", seed: int = 0,
       mtu: int | None = None, subnet: int | None = None, persist: bool = False) -> Net:
    """Bring ``topo`` up; with ``persist=False`` it dies with this process (guards, PDEATHSIG)."""
    opts = UpOptions(tag=tag, delay=delay, subnet=subnet, seed=seed, mtu=mtu)
    require_root()
    caps = detect()
    plan = plan_up(topo, caps, opts)
    if read_state(tag) is not None or any(n in list_namespaces() for n in plan.namespaces):
        raise FileExistsError(f"netsim tag {tag!r} is in use; run `netsim down --tag {tag}`")
    state: dict[str, Any] = {"tag": tag, "mode": plan.mode, "namespaces": [], "pids": {},
                             "wire_pid": None, "hosts": [asdict(h) for h in plan.hosts],
                             "created": time.time(), "wire": plan.wire, "mtu": plan.mtu,
                             "topo": topo_to_json(topo)}
    if plan.wire is not None:
        state["wire"] = {**plan.wire, "counters": str(STATE_DIR / f"{tag}.wire.json")}
    if not persist:
        _install_guards()

    def record(cmd: Cmd) -> None:  # write-ahead: the state names a namespace before it exists
        if cmd.argv[:3] == ("ip", "netns", "add"):
            state["namespaces"].append(cmd.argv[3])
            write_state(tag, state)

    write_state(tag, state)
    ex = Executor(before=record)
    wire: subprocess.Popen[str] | None = None
    try:
        ex.run(plan.pre)
        t0 = time.monotonic()
        if plan.wire is not None:
            argv = [sys.executable, "-m", WIRE_MODULE, "--state", str(state_path(tag))]
            if not persist:
                argv.append("--pdeathsig")
            wire = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, start_new_session=True)
            state["wire_pid"] = {"pid": wire.pid, "cmdline": " ".join(argv)}
            write_state(tag, state)
            _readline(wire, _WIRE_START_TIMEOUT_S)  # "TUNS <bias>": the devices exist now
        ex.run(plan.post)
        if wire is not None:
            assert wire.stdin is not None
            wire.stdin.write("go\n")
            wire.stdin.flush()
            t0 = float(_readline(wire, _WIRE_START_TIMEOUT_S).split()[1])
    except BaseException:
        down(tag)
        raise
    state["t0"] = t0
    write_state(tag, state)
    net = Net(topo, plan, t0, wire, state)
    if not persist:
        _ACTIVE[tag] = net
    log.info("netsim %s up: %s, %d hosts, t0=%.6f", tag, plan.mode, len(plan.hosts), t0)
    return net
