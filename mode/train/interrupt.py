"""Stopping a run at a safe point: SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) ask the training
loop to stop after the step it is in. The loop polls ``requested()`` between steps and at task
boundaries, saves a checkpoint there (exact to resume: each step's draws are seeded by its (seed, task,
step)) and raises ``Interrupted``; ``mode-train`` then prints the command that resumes and exits
128 + the signal (130 for SIGINT, 143 for SIGTERM).

    with interrupt.stop_at_safe_points():
        ...
        if (signum := interrupt.requested()) is not None:
            save_checkpoint(...)
            raise interrupt.Interrupted(signum)

In one process a second signal stops at once (raised where the process is; the last checkpoint
stays, as every checkpoint is written atomically). Under torchrun a stop must be one step for all
processes (a process leaving alone would leave the others waiting in a collective), so every
process polls at the same points and ``requested()`` is a signal any of them got; further
signals are ignored there (torchrun, which forwards a terminal's Ctrl-C to its workers as well, ends
processes that do not exit in time itself).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from . import distributed

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal (after saving a checkpoint where it polled)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """The shell's status of a process ended by the signal: 128 + its number."""
        return 128 + self.signum


class _Requests:
    installed = False
    signum: int | None = None


_requests = _Requests()


@contextlib.contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Within it, SIGINT and SIGTERM are requests that ``requested()`` reports (the previous handlers
    come back on exit). Signal handlers belong to the main thread: elsewhere it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if _requests.signum is not None and not distributed.is_distributed():
            raise Interrupted(signum)  # the second signal: now
        if _requests.signum is None:
            _requests.signum = signum

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    _requests.installed, _requests.signum = True, None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requests.installed, _requests.signum = False, None


def requested() -> int | None:
    """The signal that asked the run to stop, the same on every process (under torchrun: the largest
    signal number any process got; every process must call it at the same points); None: go on, and
    always outside ``stop_at_safe_points``."""
    if not _requests.installed:
        return None
    return distributed.agreed_max(_requests.signum or 0) or None
