"""netsim.netns: real hosts as network namespaces with shaped links (spec §6).

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

from netsim.commands import NS_RE, Cmd, host_ns, ns_add
from netsim.executor import CommandError, Executor, run_argv
from netsim.plan import Caps, FeatureError, HostPlan, Plan, UpOptions, plan_up
from netsim.topo import Topo

__all__ = ["Net", "FeatureError", "STATE_DIR", "detect", "down", "list_namespaces",
           "require_root", "up", "leftovers"]

log = logging.getLogger(__name__)

STATE_DIR = Path(os.environ.get("NETSIM_STATE_DIR", "/run/netsim"))
ROOT_MESSAGE = ("netsim.netns needs root to create network namespaces; run as root, "
                "or use netsim.emulate, which needs no privileges")
_TERM_GRACE_S = 5.0
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
            raise FeatureError(f"netsim.netns needs `{tool}` (Debian package iproute2)")


def _state_path(tag: str) -> Path:
    return STATE_DIR / f"{tag}.json"


def _write_state(tag: str, state: dict[str, Any]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = _state_path(tag)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _read_state(tag: str) -> dict[str, Any] | None:
    try:
        return json.loads(_state_path(tag).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
            from netsim.wire import open_tun

            try:
                os.close(open_tun(ns))
            except OSError:
                tun = False
    finally:
        run_argv(["ip", "netns", "del", ns], check=False)
    caps = Caps(netem=netem, tun=tun, htb=htb)
    log.info("kernel capabilities: %s", caps)
    return caps


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _kill_all(pids: dict[int, str | None]) -> None:
    """TERM the PIDs whose cmdline still matches, KILL survivors after a grace period."""
    live = {p: c for p, c in pids.items() if _cmdline(p) is not None and
            (c is None or _cmdline(p) == c)}
    for pid in live:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _TERM_GRACE_S
    while live and time.monotonic() < deadline:
        for pid in list(live):
            try:  # reap our own children so they do not linger as zombies
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if _cmdline(pid) is None or _is_zombie(pid):
                live.pop(pid)
        time.sleep(0.02)
    for pid in live:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


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
            c = _cmdline(int(d.name)) or ""
            if "netsim.wire" in c and (tag is None or f"/{tag}.json" in c):
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
        state = _read_state(t) or {}
        rx = re.compile(rf"^nsm-{re.escape(t)}-(h\d+|sw)$")
        namespaces = sorted(set(state.get("namespaces", [])) |
                            {n for n in list_namespaces() if rx.match(n)})
        pids: dict[int, str | None] = {int(p): c for p, c in state.get("pids", {}).items()}
        for ns in namespaces:
            pids.update({p: None for p in _ns_pids(ns)})
        _kill_all(pids)
        wire = state.get("wire_pid")
        if wire:
            _kill_all({int(wire["pid"]): wire["cmdline"]})
        for ns in namespaces:
            if NS_RE.match(ns):
                run_argv(["ip", "netns", "del", ns], check=False)
        for suffix in (".json", ".wire.json", ".tmp"):
            (STATE_DIR / f"{t}{suffix}").unlink(missing_ok=True)
    if all_:
        for ns in list_namespaces():
            _kill_all({p: None for p in _ns_pids(ns)})
            run_argv(["ip", "netns", "del", ns], check=False)
    left = leftovers(None if all_ else tag)
    if left:
        log.warning("netsim down left: %s", left)
    return left


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

    def __repr__(self) -> str:
        return f"Net(tag={self.tag!r}, n={len(self.hosts)}, mode={self.plan.mode!r})"

    def exec_prefix(self, rank: int) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[rank].ns]

    def env(self, rank: int, port: int = 29500) -> dict[str, str]:
        """Variables that keep gloo and NCCL on the emulated device (§6.4)."""
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
        """Start ``argv`` in host ``rank``'s namespace with :meth:`env`; the PID is recorded."""
        full_env = {**os.environ, **self.env(rank, port), **(env or {})}
        proc = subprocess.Popen(self.exec_prefix(rank) + list(argv), env=full_env, **kwargs)
        self.procs.append(proc)
        # `ip netns exec` execs argv, so the recorded PID becomes argv's own process.
        self._state.setdefault("pids", {})[str(proc.pid)] = None
        _write_state(self.tag, self._state)
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
    if _read_state(tag) is not None or any(n in list_namespaces() for n in plan.namespaces):
        raise FileExistsError(f"netsim tag {tag!r} is in use; run `netsim down --tag {tag}`")
    state: dict[str, Any] = {"tag": tag, "mode": plan.mode, "namespaces": [], "pids": {},
                             "wire_pid": None, "hosts": [asdict(h) for h in plan.hosts],
                             "created": time.time(), "wire": plan.wire}
    if plan.wire is not None:
        state["wire"] = {**plan.wire, "counters": str(STATE_DIR / f"{tag}.wire.json")}
    if not persist:
        _install_guards()

    def record(cmd: Cmd) -> None:  # write-ahead: the state names a namespace before it exists
        if cmd.argv[:3] == ("ip", "netns", "add"):
            state["namespaces"].append(cmd.argv[3])
            _write_state(tag, state)

    _write_state(tag, state)
    ex = Executor(before=record)
    wire: subprocess.Popen[str] | None = None
    try:
        ex.run(plan.pre)
        t0 = time.monotonic()
        if plan.wire is not None:
            argv = [sys.executable, "-m", "netsim.wire", "--state", str(_state_path(tag))]
            if not persist:
                argv.append("--pdeathsig")
            wire = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, start_new_session=True)
            state["wire_pid"] = {"pid": wire.pid, "cmdline": " ".join(argv)}
            _write_state(tag, state)
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
    _write_state(tag, state)
    net = Net(topo, plan, t0, wire, state)
    if not persist:
        _ACTIVE[tag] = net
    log.info("netsim %s up: %s, %d hosts, t0=%.6f", tag, plan.mode, len(plan.hosts), t0)
    return net


# Re-exported for the CLI's exit codes.
CommandError = CommandError
