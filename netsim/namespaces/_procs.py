"""Private helpers of the namespace backends (:mod:`.netns`, :mod:`.mininet`): state files and
process cleanup. Both backends write the same state file and stop the same processes, so the
helpers live here and neither backend imports the other's internals.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

__all__ = ["STATE_DIR", "WIRE_MODULE", "cmdline", "kill_all", "read_state", "state_path", "write_state"]

#: Where a net's state file (``TAG.json``) and the wire's counters (``TAG.wire.json``) live.
STATE_DIR = Path(os.environ.get("NETSIM_STATE_DIR", "/run/netsim"))
#: The wire daemon's module (``python -m WIRE_MODULE``); also how leftover wires are recognised.
WIRE_MODULE = "netsim.namespaces.wire"
_TERM_GRACE_S = 5.0


def state_path(tag: str) -> Path:
    return STATE_DIR / f"{tag}.json"


def write_state(tag: str, state: dict[str, Any]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = state_path(tag)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def read_state(tag: str) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(tag).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def kill_all(pids: dict[int, str | None]) -> None:
    """TERM the PIDs whose cmdline still matches, KILL survivors after a grace period."""
    # A recorded command line must still match (its tail: `ip netns exec NS argv` execs
    # argv), so a PID the kernel has since reused for another program is never signalled.
    live = {p: c for p, c in pids.items() if cmdline(p) is not None and
            (c is None or (cmdline(p) or "").endswith(c))}
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
            if cmdline(pid) is None or _is_zombie(pid):
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
