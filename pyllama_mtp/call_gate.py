"""One Llama, many threads: who drives the sequence now, and when it may be closed.

A Llama's context holds one sequence, so calls on it take turns: ``generate`` holds the
turn for the call, a stream from its first chunk until it ends or is closed (the sequence
must not change under it between chunks). Threads that want a turn wait for it, in no
particular order. The thread that holds an open stream gets ``ConcurrentUseError`` if it
starts another call: waiting for itself would never end.

Native work (a decode step, tokenizing, reading counters) runs inside ``native()``.
``close()`` marks the gate closed, wakes every waiter (they raise ``ClosedError``) and
returns once no native work is in flight; an open stream raises ``ClosedError`` at its next
step. So closing from another thread never frees a context that a step is using.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

from .errors import ClosedError, ConcurrentUseError


class CallGate:
    def __init__(self, what: str = "Llama"):
        self.what = what
        self._cond = threading.Condition()
        self._holder: int | None = None    # thread ident that holds the turn
        self._active = 0                   # native sections in flight
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _closed_error(self) -> ClosedError:
        return ClosedError(f"this {self.what} was closed; create a new one")

    @contextmanager
    def turn(self):
        """Hold the sequence for one call (a generate, or a stream's whole life)."""
        me = threading.get_ident()
        with self._cond:
            if self._holder == me:
                raise ConcurrentUseError(
                    f"this thread has an open stream on this {self.what}: finish it or close() it "
                    f"before starting another call (other threads wait for their turn)")
            while self._holder is not None and not self._closed:
                self._cond.wait()
            if self._closed:
                raise self._closed_error()
            self._holder = me
        try:
            yield
        finally:
            with self._cond:     # possibly from another thread: a stream closed by the GC
                self._holder = None
                self._cond.notify_all()

    @contextmanager
    def native(self):
        """Native work that close() must not cut short."""
        with self._cond:
            if self._closed:
                raise self._closed_error()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new work, wake the waiters, and wait for native work in flight."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._active:
                self._cond.wait()
