"""Runs planned commands without a shell and unwinds them on failure
(docs/design/netsim.md#builders-and-executor)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterable

from netsim.namespaces.commands import Cmd, check_scoped

__all__ = ["CommandError", "Executor", "run_argv"]

log = logging.getLogger(__name__)
_TIMEOUT_S = 30.0


class CommandError(RuntimeError):
    """A planned command exited nonzero; carries the argv and its stderr."""

    def __init__(self, argv: tuple[str, ...] | list[str], code: int, stderr: str) -> None:
        super().__init__(f"`{' '.join(argv)}` exited {code}: {stderr.strip()}")
        self.argv, self.code, self.stderr = tuple(argv), code, stderr


def run_argv(argv: tuple[str, ...] | list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one argv (never through a shell) with a timeout so a wedged tool cannot hang us."""
    log.debug("run: %s", " ".join(argv))
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc


class Executor:
    """Runs :class:`Cmd` lists; ``before`` is called first (the write-ahead state hook)."""

    def __init__(self, before: Callable[[Cmd], None] | None = None) -> None:
        self.before = before
        self.done: list[Cmd] = []

    def run(self, cmds: Iterable[Cmd]) -> None:
        """Run ``cmds`` in order; on the first failure undo what ran (reverse order) and raise."""
        for cmd in cmds:
            check_scoped(cmd)
            if self.before is not None:
                self.before(cmd)
            try:
                run_argv(cmd.argv)
            except (CommandError, subprocess.TimeoutExpired):
                self.unwind()
                raise
            self.done.append(cmd)

    def unwind(self) -> list[str]:
        """Undo every command run so far, newest first; returns the undos that failed."""
        failed = []
        while self.done:
            cmd = self.done.pop()
            if cmd.undo is None:
                continue
            try:
                run_argv(cmd.undo)
            except (CommandError, subprocess.TimeoutExpired) as e:
                # A parent's undo (the namespace's deletion) may already have removed it.
                log.debug("undo failed: %s", e)
                failed.append(" ".join(cmd.undo))
        return failed
