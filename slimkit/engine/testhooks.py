"""Test support: simulated crashes at write boundaries and early stops, installed with a context manager.

Nothing here is part of a verb's signature and nothing is a module global a test mutates: a hook
lives in a context variable for the duration of a ``with`` block, and the run directory and the
epoch engine ask :func:`active` whether one is installed (None outside tests, so they do nothing).

- :func:`crash_at`: the ``n``-th write of a run directory raises :class:`SimulatedCrash`
  (optionally leaving that write half done); :class:`~slimkit.engine.rundir.RunDir` counts its writes here.
- :func:`stop_after`: the run returns early, as a crashed one would have left it, after ``n`` resume
  points: epochs for train, evolve and merge (:func:`slimkit.engine.epochs.run_phases`), finished
  tasks and baselines for den.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

__all__ = ["SimulatedCrash", "crash_at", "stop_after", "active", "TestHook"]


class SimulatedCrash(BaseException):
    """Raised by the test hook at a write boundary. A BaseException, so no ``except Exception`` swallows it."""


class TestHook:
    """Counts write boundaries (raising at boundary ``at``, 1-based) and resume points (stopping after ``stop``)."""

    __test__ = False  # not a pytest test class

    def __init__(self, at: int | None = None, torn: bool = False, stop: int | None = None) -> None:
        self.at, self.torn, self.stop = at, torn, stop
        self.count = 0
        self.names: list[str] = []  # what each boundary wrote, in order
        self.points = 0  # resume points passed

    def boundary(self, what: str) -> None:
        self.count += 1
        self.names.append(what)
        if self.at is not None and self.count == self.at:
            raise SimulatedCrash(f"simulated crash after write #{self.count} ({what})")

    def tears(self) -> bool:
        """True when the next boundary is the crash point and the write itself should be torn."""
        return self.torn and self.at is not None and self.count + 1 == self.at

    def passed_point(self) -> bool:
        """Count one resume point; True when the run should stop here."""
        self.points += 1
        return self.stop is not None and self.points >= self.stop


_HOOK: contextvars.ContextVar[TestHook | None] = contextvars.ContextVar("slimkit_test_hook", default=None)


def active() -> TestHook | None:
    """The hook a test installed around this call, or None."""
    return _HOOK.get()


@contextlib.contextmanager
def _installed(hook: TestHook) -> Iterator[TestHook]:
    token = _HOOK.set(hook)
    try:
        yield hook
    finally:
        _HOOK.reset(token)


def crash_at(n: int | None, torn: bool = False) -> contextlib.AbstractContextManager[TestHook]:
    """Within the block, the ``n``-th write boundary raises :class:`SimulatedCrash` (None: never; the
    hook then only counts, ``.count`` and ``.names`` after the block). ``torn``: the crashing write is
    left half done (half a metrics line, or an atomic write's temporary file without its rename)."""
    return _installed(TestHook(at=n, torn=torn))


def stop_after(n: int | None) -> contextlib.AbstractContextManager[TestHook]:
    """Within the block a training verb returns early after ``n`` resume points (None: never), with
    the run directory as a crash there would leave it; ``--resume`` continues it."""
    return _installed(TestHook(stop=n))
