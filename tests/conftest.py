"""Hypothesis profile shared by the whole suite: deterministic and bounded.

`derandomize=True` derives every example from the test itself, so a run is reproducible
on any machine and never flakes; `database=None` keeps it that way (no replay of examples
saved by an earlier run on this machine); `max_examples` keeps the suite fast on 2 busy cores;
no deadline, because timing on a shared machine is noise, not a property of the code.
Set HYPOTHESIS_PROFILE=ccomm-thorough for a longer local search.

netsim plumbing, for every test folder (netsim's own tests and the real-time checks of
deco_sgd): the ``netns``/``mininet`` markers' skip logic and the leftover check.

``netns`` tests skip (with the reason) unless we are root, ``ip`` and ``tc`` exist and a
scratch namespace can be made; ``NETSIM_REQUIRE_NETNS=1`` (set by CI, which runs as root)
turns those skips into failures.  ``mininet`` tests likewise with ``NETSIM_REQUIRE_MININET=1``.
At session end, if any netns test ran, nothing netsim creates may remain: no ``nsm-*``
namespace, no ``nsm*`` device or qdisc in the root namespace, no wire process, no state file.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ccomm",
    derandomize=True,
    database=None,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ccomm-thorough",
    derandomize=True,
    database=None,
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ccomm"))

_RAN_NETNS = False


@functools.lru_cache(maxsize=1)
def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    ns = f"nsm-c{os.getpid() % 10_000_000}-h0"
    made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return None


@functools.lru_cache(maxsize=1)
def mininet_unavailable() -> str | None:
    why = netns_unavailable()
    if why:
        return why
    try:
        from netsim.namespaces.mininet import load_mininet

        load_mininet()
    except ImportError as e:
        return str(e)
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _RAN_NETNS
    checks = (("netns", netns_unavailable, "NETSIM_REQUIRE_NETNS"),
              ("mininet", mininet_unavailable, "NETSIM_REQUIRE_MININET"))
    for marker, probe, env in checks:
        if item.get_closest_marker(marker) is None:
            continue
        why = probe()
        if why:
            if os.environ.get(env) == "1":
                pytest.fail(f"{env}=1 but {marker} is unavailable: {why}")
            pytest.skip(f"{marker}: {why}")
        _RAN_NETNS = True


def leftovers() -> list[str]:
    """Every trace of netsim on the machine (namespaces, root devices/qdiscs, processes, state)."""
    from netsim.namespaces import netns

    left = netns.leftovers(None)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left += [f"root device {ln.split(':')[1].strip()}" for ln in links.splitlines()
             if ln.split(":")[1].strip().split("@")[0].startswith("nsm")]
    qd = subprocess.run(["tc", "qdisc"], capture_output=True, text=True).stdout
    left += [f"root qdisc {ln}" for ln in qd.splitlines() if " dev nsm" in ln]
    return left


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    yield
    if _RAN_NETNS and not netns_unavailable():
        left = leftovers()
        assert not left, f"netsim left these behind: {left}"
