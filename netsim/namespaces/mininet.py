"""netsim.namespaces.mininet: the same topologies through Mininet's Python API (docs/design/netsim.md#mininet).

``up(topo)`` returns a :class:`netsim.namespaces.netns.Net`.  Mininet builds hosts ``nsmh<i>`` (network
namespaces held by ``mnexec`` shells) joined by a ``LinuxBridge`` ``nsms0`` (no controller).

* **With netem**, TCLinks carry everything: ``bw`` = line rate with ``use_htb``, plus delay,
  jitter, loss and ``max_queue_size`` (Mininet builds all four with netem, so without netem
  it would silently add no delay).
* **Without netem** (this project's machines) the Mininet links stay unshaped management
  links and the plan of :func:`netsim.namespaces.plan.plan_up` in wire mode is applied inside the
  Mininet hosts: TUN ``nsmt0`` per host (opened by :mod:`netsim.namespaces.wire` through
  ``/proc/<pid>/ns/net``), htb on the TUNs, the wire for delay and downlinks.  Commands run
  under ``nsenter --net=/proc/<pid>/ns/net`` instead of ``ip -n``.

Cleanup is ``net.stop()``, never ``mn -c`` (which wipes every Mininet object on the host).
This is the only backend that touches the root namespace (Mininet's bridge and the root ends
of its veths); :func:`down_root_links` removes leftovers named ``nsmh*``/``nsms*`` there.

Mininet comes from Debian (``apt-get install mininet``; PyPI's pre-release lacks ``mnexec``).
A venv without system site packages still finds it: :func:`load_mininet` appends Debian's
dist-packages directory to the *end* of ``sys.path`` so the venv's own packages win.
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from types import ModuleType
from typing import Any

from netsim.namespaces.commands import Cmd, host_ns
from netsim.namespaces.executor import run_argv
from netsim.namespaces._procs import STATE_DIR, WIRE_MODULE, kill_all, read_state, write_state
from netsim.namespaces.netns import FeatureError, Net, detect, require_root, topo_to_json
from netsim.namespaces.plan import HostPlan, Plan, UpOptions, plan_up
from netsim.model.topo import Topo

__all__ = ["MininetNet", "down_root_links", "load_mininet", "up"]

log = logging.getLogger(__name__)

_DEBIAN_DIST = "/usr/lib/python3/dist-packages"
_ROOT_LINK_RE = re.compile(r"^nsm[hs]\d+(-eth\d+)?$")
_HINT = ("netsim.namespaces.mininet needs Mininet >= 2.3 from the distribution (`apt-get install mininet "
         "bridge-utils`; PyPI's pre-release lacks mnexec), importable from this Python (a venv "
         "with system site packages, or Debian's dist-packages)")


def load_mininet() -> ModuleType:
    """Import Mininet lazily; ``ImportError`` naming the fix when it is missing."""
    try:
        import mininet  # noqa: F401
    except ImportError:
        if os.path.isdir(os.path.join(_DEBIAN_DIST, "mininet")) and _DEBIAN_DIST not in sys.path:
            sys.path.append(_DEBIAN_DIST)
        try:
            import mininet  # noqa: F401,F811
        except ImportError as e:
            raise ImportError(_HINT) from e
    if shutil.which("mnexec") is None:
        raise ImportError(_HINT + ": `mnexec` is not on PATH")
    import mininet.net

    return mininet


def _nsenter(pid: int) -> list[str]:
    return ["nsenter", f"--net=/proc/{pid}/ns/net"]


def _localize(cmd: Cmd, pid_of: dict[str, int]) -> list[str]:
    """Rewrite a netns-scoped command (``ip -n NS``, ``tc -n NS``, ``ip netns exec NS``)."""
    a = list(cmd.argv)
    if a[:3] == ["ip", "netns", "exec"]:
        return _nsenter(pid_of[a[3]]) + a[4:]
    if a[1] == "-n":
        return _nsenter(pid_of[a[2]]) + [a[0]] + a[3:]
    raise ValueError(f"cannot localize {cmd}")


class MininetNet(Net):
    """A :class:`Net` whose hosts are Mininet hosts; ``down()`` stops Mininet."""

    def __init__(self, mn: Any, pids: list[int], *args: Any) -> None:
        super().__init__(*args)
        self.mn, self.pids = mn, pids

    def exec_prefix(self, rank: int) -> list[str]:
        return _nsenter(self.pids[rank])

    def down(self) -> list[str]:
        if self._closed:
            return []
        self._closed = True
        kill_all({p.pid: None for p in self.procs})
        for p in self.procs:
            p.wait()
        if self._wire is not None:
            kill_all({self._wire.pid: None})
            self._wire.wait()
            for f in (self._wire.stdin, self._wire.stdout):
                if f:
                    f.close()
        self.mn.stop()
        for suffix in (".json", ".wire.json"):
            (STATE_DIR / f"{self.tag}{suffix}").unlink(missing_ok=True)
        return down_root_links()


def _our_root_links() -> list[str]:
    """Root-namespace links named like netsim's Mininet objects (``nsmh*``, ``nsms*``)."""
    out = run_argv(["ip", "-o", "link"], check=False).stdout
    names = (ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines())
    return [n for n in names if _ROOT_LINK_RE.match(n)]


def down_root_links() -> list[str]:
    """Delete root-namespace links named like netsim's Mininet objects; returns what remains."""
    for name in _our_root_links():
        run_argv(["ip", "link", "del", name], check=False)
    return [f"root link {n}" for n in _our_root_links()]


def _require_no_other_net() -> None:
    """Refuse to build while another netsim Mininet net (or its leftovers) is in the root
    namespace: the host and switch names are fixed (``nsmh<i>``, ``nsms0``: a tag would not fit
    Linux's 15-character interface names), so a second net would collide with the first, and
    the cleanup of a failed ``up`` (:func:`down_root_links`) would delete the first net's links."""
    links = _our_root_links()
    if not links:
        return
    tags = sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []
    owners = [t for t in tags if str((read_state(t) or {}).get("mode", "")).startswith("mininet")]
    # Only wire mode writes a state file: without one the links are a veth-mode net's or a
    # killed net's leftovers, which this process cannot tell apart.
    who = (f"tag {', '.join(owners)}: `netsim down --tag {owners[0]}`" if owners else
           "no state file names its tag: a veth-mode net's `net.down()`, or `netsim down --all` for leftovers")
    raise RuntimeError(f"netsim.namespaces.mininet: another netsim Mininet network is up (root links "
                       f"{', '.join(links[:4])}{' ...' if len(links) > 4 else ''}); one runs at a time, "
                       f"bring it down first ({who})")


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"the delay wire did not start (exit code {proc.poll()})")
    return line.strip()


def up(topo: Topo, *, tag: str = "mn", delay: str = "auto", mtu: int | None = None,
       seed: int = 0) -> MininetNet:
    """Build ``topo`` in Mininet (see the module docstring); tear down with ``net.down()``."""
    require_root()
    load_mininet()
    _require_no_other_net()
    from mininet.link import TCLink
    from mininet.net import Mininet
    from mininet.nodelib import LinuxBridge

    caps = detect()
    plan = plan_up(topo, caps, UpOptions(tag=tag, delay=delay, mtu=mtu, seed=seed))
    netem = plan.mode == "veth" and caps.netem
    if plan.mode == "veth" and not netem and topo.link.latency_ms > 0:
        raise FeatureError("netsim.namespaces.mininet without netem needs the wire layout")
    k = int(plan.hosts[0].addr.split(".")[2])
    mn = Mininet(topo=None, switch=LinuxBridge, link=TCLink, controller=None, build=False,
                 ipBase=f"10.213.{k}.0/24" if plan.mode == "veth" else f"10.214.{k}.0/24",
                 waitConnected=False)
    try:
        sw = mn.addSwitch("nsms0", cls=LinuxBridge)
        hosts = [mn.addHost(f"nsmh{i}") for i in range(topo.n)]
        for i, h in enumerate(hosts):
            params: dict[str, Any] = {}
            if plan.mode == "veth":
                hl = topo.host_link(i)
                params = {"bw": hl.rate_trace.rate_mbps(0) * hl.wire_factor(True),
                          "use_htb": True}
                if netem:
                    pl = topo.link
                    params.update(delay=f"{pl.latency_ms}ms", jitter=f"{pl.jitter_ms}ms"
                                  if pl.jitter_ms else None, loss=pl.loss * 100 or None,
                                  max_queue_size=pl.queue_limit)
            mn.addLink(h, sw, **params)
        mn.build()
        mn.start()
        pids = [h.pid for h in hosts]
        pid_of = {host_ns(tag, i): pids[i] for i in range(topo.n)}
        for c in plan.pre:  # sysctls and lo; Mininet made the hosts and links itself
            if "sysctl" in c.argv:
                run_argv(_localize(c, pid_of))
        wire = None
        t0 = time.monotonic()
        if plan.mode == "wire":
            assert plan.wire is not None
            state_hosts = [{**asdict(h), "nspath": f"/proc/{pids[h.index]}/ns/net"}
                           for h in plan.hosts]
            changes = [{**c, "argv": _nsenter(pid_of[c["ns"]]) + ["tc", "-batch", "-"]}
                       for c in plan.wire["changes"]]
            state = {"tag": tag, "mode": "mininet-wire", "namespaces": [], "pids": {},
                     "hosts": state_hosts, "mtu": plan.mtu, "topo": topo_to_json(topo),
                     "wire": {**plan.wire, "changes": changes,
                              "counters": str(STATE_DIR / f"{tag}.wire.json")}}
            write_state(tag, state)
            argv = [sys.executable, "-m", WIRE_MODULE, "--state", str(STATE_DIR / f"{tag}.json"),
                    "--pdeathsig"]
            wire = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, start_new_session=True)
            state["wire_pid"] = {"pid": wire.pid, "cmdline": " ".join(argv)}
            write_state(tag, state)
            _readline(wire, 20.0)
            for c in plan.post:
                run_argv(_localize(c, pid_of))
            assert wire.stdin is not None
            wire.stdin.write("go\n")
            wire.stdin.flush()
            t0 = float(_readline(wire, 20.0).split()[1])
        else:
            state = {"tag": tag, "mode": "mininet", "hosts": [asdict(h) for h in plan.hosts]}
            for h in hosts:
                run_argv(_nsenter(h.pid) + ["ip", "link", "set", "dev", h.defaultIntf().name,
                                            "gso_max_segs", "1"])
    except BaseException:
        mn.stop()
        (STATE_DIR / f"{tag}.json").unlink(missing_ok=True)
        down_root_links()
        raise
    dev = "nsmt0" if plan.mode == "wire" else hosts[0].defaultIntf().name
    host_plans = tuple(HostPlan(h.index, h.ns, h.addr if plan.mode == "wire"
                                else hosts[h.index].IP(), dev) for h in plan.hosts)
    mplan = Plan(tag, f"mininet-{plan.mode}", host_plans, (), (), (), plan.wire, plan.mtu)
    net = MininetNet(mn, pids, topo, mplan, t0, wire, state)
    net.dev = dev
    log.info("mininet %s up: %s, %d hosts", tag, mplan.mode, topo.n)
    return net

