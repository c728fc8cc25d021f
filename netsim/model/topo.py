"""Topologies: n hosts, per-host access rates (shared mode) or independent pairs (mesh mode).

``shared=True``: host i has one uplink and one downlink at ``hosts.get(i, link)``'s rate,
shared by all of its flows (a GPU's NIC, a WAN site). ``shared=False``: every ordered pair
(i, j) is an independent link at ``pairs.get((i, j), link)``'s rate. Latency, jitter and loss
are always per pair. Both modes agree for n = 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

from ccomm.configfile import load_mapping

from .link import Link
from .trace import Trace

__all__ = ["Topo", "Resource"]


#: ("up", i), ("down", j) in shared mode; ("pair", i, j) in mesh mode.
Resource = Union[tuple[str, int], tuple[str, int, int]]

_LINK_KEYS = ("bandwidth_mbps", "latency_ms", "jitter_ms", "loss", "trace", "queue_packets", "reorder", "mtu")


@dataclass(frozen=True)
class Topo:
    n: int
    link: Link
    hosts: Mapping[int, Link]
    pairs: Mapping[tuple[int, int], Link]
    shared: bool = True
    _cache: dict[tuple[int, int], Trace] = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        n: int,
        link: Link,
        *,
        hosts: Mapping[int, Link] | None = None,
        pairs: Mapping[tuple[int, int], Link] | None = None,
        shared: bool = True,
    ) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n={n!r} must be an integer >= 1")
        if not isinstance(link, Link):
            raise ValueError(f"link={link!r} must be a netsim.Link")
        hosts = dict(hosts or {})
        pairs = {tuple(k): v for k, v in (pairs or {}).items()}
        for i, lk in hosts.items():
            if not (isinstance(i, int) and 0 <= i < n):
                raise ValueError(f"hosts key {i!r} must be a rank in [0, {n - 1}]")
            if not isinstance(lk, Link):
                raise ValueError(f"hosts[{i}]={lk!r} must be a netsim.Link")
        for key, lk in pairs.items():
            if len(key) != 2 or not all(isinstance(x, int) and 0 <= x < n for x in key) or key[0] == key[1]:
                raise ValueError(f"pairs key {key!r} must be (i, j) with i != j, both ranks in [0, {n - 1}]")
            if not isinstance(lk, Link):
                raise ValueError(f"pairs[{key}]={lk!r} must be a netsim.Link")
        if not isinstance(shared, bool):
            raise ValueError(f"shared={shared!r} must be a bool")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "link", link)
        object.__setattr__(self, "hosts", MappingProxyType(hosts))
        object.__setattr__(self, "pairs", MappingProxyType(pairs))
        object.__setattr__(self, "shared", shared)
        object.__setattr__(self, "_cache", {})

    def __hash__(self) -> int:
        return hash((self.n, self.link, tuple(sorted(self.hosts.items())), tuple(sorted(self.pairs.items())), self.shared))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def uniform(
        cls,
        n: int,
        bandwidth_mbps: float | None = None,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        trace: Trace | None = None,
        *,
        shared: bool = True,
        **link_kw: Any,
    ) -> Topo:
        return cls(n, Link(bandwidth_mbps, latency_ms, jitter_ms, loss, trace, **link_kw), shared=shared)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Topo:
        """Read a topology file::

            n: 4
            shared: true            # false = mesh
            link: {bandwidth_mbps: 100, latency_ms: 10}
            hosts: {0: {bandwidth_mbps: 10}}        # fields not given inherit from `link`
            pairs: {"0-1": {latency_ms: 50}}
            # trace: a path (relative to this file), .csv = CSV, else Mahimahi

        """
        path = Path(path)
        doc = load_mapping(path, "topology")
        unknown = set(doc) - {"n", "link", "hosts", "pairs", "shared"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: n, link, hosts, pairs, shared")
        if "n" not in doc or "link" not in doc:
            raise ValueError(f"{path}: keys 'n' and 'link' are required")
        base_spec = _link_spec(doc["link"], {}, path, "link")
        base = _make_link(base_spec, path, "link")
        hosts = {int(i): _make_link(_link_spec(v, base_spec, path, f"hosts.{i}"), path, f"hosts.{i}")
                 for i, v in (doc.get("hosts") or {}).items()}
        pairs = {}
        for key, v in (doc.get("pairs") or {}).items():
            try:
                i, j = (int(x) for x in str(key).split("-"))
            except ValueError:
                raise ValueError(f"{path}: pairs key {key!r} must look like 'i-j'") from None
            pairs[(i, j)] = _make_link(_link_spec(v, base_spec, path, f"pairs.{key}"), path, f"pairs.{key}")
        return cls(int(doc["n"]), base, hosts=hosts, pairs=pairs, shared=bool(doc.get("shared", True)))

    # ------------------------------------------------------------------ queries
    @property
    def is_uniform(self) -> bool:
        return all(v == self.link for v in self.hosts.values()) and all(v == self.link for v in self.pairs.values())

    def host_link(self, i: int) -> Link:
        return self.hosts.get(i, self.link)

    def pair_link(self, i: int, j: int) -> Link:
        return self.pairs.get((i, j), self.link)

    def _check_pair(self, i: int, j: int) -> None:
        if not (0 <= i < self.n and 0 <= j < self.n) or i == j:
            raise ValueError(f"(src, dst)=({i}, {j}) must be distinct ranks in [0, {self.n - 1}]")

    def resources(self, i: int, j: int) -> tuple[Resource, ...]:
        """What a message i -> j occupies: {up_i, down_j} shared, {pair_ij} mesh."""
        self._check_pair(i, j)
        return (("up", i), ("down", j)) if self.shared else (("pair", i, j),)

    def resource_trace(self, r: Resource) -> Trace:
        if r[0] == "pair":
            return self.pair_link(r[1], r[2]).rate_trace  # type: ignore[misc]
        return self.host_link(r[1]).rate_trace

    def message_trace(self, i: int, j: int) -> Trace:
        """Rate a message i -> j gets: the slowest of its resources, capped by the pair's Mathis rate."""
        key = (i, j)
        hit = self._cache.get(key)
        if hit is None:
            hit = Trace.min(*(self.resource_trace(r) for r in self.resources(i, j)))
            cap = self.pair_link(i, j).mathis_mbps
            if cap is not None and cap < max(hit.mbps):
                hit = hit.clip(high=cap)
            self._cache[key] = hit
        return hit

    def serialization_time(self, i: int, j: int, nbytes: float, start_s: float = 0.0) -> float:
        if not (math.isfinite(nbytes) and nbytes >= 0):
            raise ValueError(f"nbytes={nbytes!r} must be finite and >= 0")
        return self.message_trace(i, j).time_to_send(8.0 * nbytes, start_s)

    def transfer_time(self, i: int, j: int, nbytes: float, start_s: float = 0.0) -> float:
        """Jitter-free time of one message alone on the network."""
        return self.pair_link(i, j).latency_s + self.serialization_time(i, j, nbytes, start_s)


def _link_spec(raw: Any, base: Mapping[str, Any], path: Path, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: {where} must be a mapping of link fields {list(_LINK_KEYS)}")
    unknown = set(raw) - set(_LINK_KEYS)
    if unknown:
        raise ValueError(f"{path}: {where} has unknown fields {sorted(unknown)}; allowed: {list(_LINK_KEYS)}")
    spec = dict(base)
    if "trace" in raw:
        spec.pop("bandwidth_mbps", None)
    if "bandwidth_mbps" in raw:
        spec.pop("trace", None)
    spec.update(raw)
    if isinstance(spec.get("trace"), str):
        tpath = Path(spec["trace"])
        spec["trace"] = Trace.load(tpath if tpath.is_absolute() else path.parent / tpath)
    return spec


def _make_link(spec: Mapping[str, Any], path: Path, where: str) -> Link:
    spec = dict(spec)
    if "latency_ms" not in spec:
        raise ValueError(f"{path}: {where}.latency_ms is required")
    try:
        return Link(
            spec.pop("bandwidth_mbps", None),
            spec.pop("latency_ms"),
            spec.pop("jitter_ms", 0.0),
            spec.pop("loss", 0.0),
            spec.pop("trace", None),
            **spec,
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {where}: {exc}") from None
