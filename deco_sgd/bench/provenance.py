"""Which code trained a run: a digest of the sources a training run executes.

The run cache is keyed by a run's config fingerprint (`runner.fingerprint`), which sees the
configuration, not the code. So a cached DeCo-SGD run could outlive the controller that made
it, and its decisions would be reported as today's. Every record therefore carries the
digest of the code that trained it (`code_digest`), and the runner:

1. trains again every controller-dependent run (DeCo-SGD and static-a-priori, whose point is
   DeCo-SGD's first decision) whose record was made by other code, or by code before records
   carried a digest: a controller change must never be judged on old runs;
2. reuses every other run by its fingerprint (a static top-k run of a full-size scenario takes
   tens of minutes), and the report says how many of the runs it used come from other code
   (`summarize`), so a reader can tell.

The digest covers the Python sources of `ccomm`, `netsim` and `deco_sgd` except the modules
that only read or present results (`EXCLUDED`): what they do cannot change a trajectory.
"""
from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "EXCLUDED", "code_digest", "describe", "source_files", "summarize"]

#: Packages whose code a training run executes.
PACKAGES = ("ccomm", "netsim", "deco_sgd")
#: Modules (relative to the repository root) that never run during training.
EXCLUDED = frozenset({
    "deco_sgd/__main__.py", "deco_sgd/cli.py", "deco_sgd/bench/report.py", "deco_sgd/bench/provenance.py",
    "deco_sgd/bench/realtime.py", "deco_sgd/bench/realtime_cli.py", "deco_sgd/bench/realtime_netns.py",
})

_ROOT = Path(__file__).resolve().parents[2]


def source_files(root: Path = _ROOT) -> list[Path]:
    """The files the digest covers, in a fixed order."""
    out = []
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            if p.relative_to(root).as_posix() not in EXCLUDED:
                out.append(p)
    return out


@functools.lru_cache(maxsize=4)
def code_digest(root: Path = _ROOT) -> str:
    """sha256 (16 hex digits) over each covered file's path and bytes.

    Cached per process: the sources do not change under a running benchmark."""
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def summarize(records: Iterable[Mapping[str, Any]], current: str) -> dict[str, Any]:
    """What the report says about provenance: the current digest, and per digest the runs
    (name, seed) that came from other code ("unknown": records made before digests)."""
    other: dict[str, list[str]] = {}
    total = 0
    for r in records:
        total += 1
        code = r.get("code") or "unknown"
        if code != current:
            other.setdefault(code, []).append(f"{r.get('name')}:s{r.get('seed')}")
    return {"code": current, "runs": total, "other_code": {k: sorted(v) for k, v in other.items()}}


def describe(summary: Mapping[str, Any]) -> Sequence[str]:
    """Report lines for `summarize`'s result."""
    other = summary["other_code"]
    n_other = sum(len(v) for v in other.values())
    line = (f"Code: digest {summary['code']} (`deco_sgd.bench.provenance`); "
            f"{summary['runs'] - n_other} of {summary['runs']} runs were trained by it")
    if not n_other:
        return [line + "."]
    counts = Counter({k: len(v) for k, v in other.items()})
    parts = [f"{k} ({n} runs: {', '.join(other[k])})" for k, n in counts.most_common()]
    return [line + "; reused runs from other code, by digest: " + "; ".join(parts) + "."]
