"""The session gate: one inference call at a time, API calls first, ingest never starved.

Each ONNX Runtime call owns all the session's intra-op threads, so calls take turns. Callers with
priority (queries, the service's ``POST /encode`` and ``/search``) go before waiting normal
callers (ingest batches), so an interactive request waits for about one call in progress rather
than for a whole ingest batch. Unbounded, that order lets a steady stream of API calls starve the
ingest, so the turn rule gives a waiting normal caller every ``(burst + 1)``-th call: after
``burst`` priority calls in a row that passed a waiting normal caller, the normal one goes next.

:class:`TurnPolicy` is the rule alone (no threads, no clock); :class:`SessionGate` applies it
with a condition variable.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

# Priority calls that may pass a waiting ingest call in a row before that one goes. A query call
# is small (tens of tokens) and an ingest call is a full batch (1024-2048 padded tokens), so in
# time the ingest keeps most of the encoder even under a flood (README, Configuration).
DEFAULT_PRIORITY_BURST = 4


@dataclass(slots=True)
class TurnPolicy:
    """Who may take the next inference call. ``burst``: priority calls that may pass a waiting
    normal caller in a row (at least 1)."""

    burst: int = DEFAULT_PRIORITY_BURST
    busy: bool = False
    priority_waiting: int = 0
    normal_waiting: int = 0
    # priority calls granted while a normal caller was waiting, since the last normal call
    passed: int = 0
    # statistics: the longest such run, and the normal calls the burst rule put first
    longest_pass: int = 0
    ingest_turns_forced: int = 0

    def __post_init__(self) -> None:
        check_burst(self.burst)

    def ingest_due(self) -> bool:
        """A normal caller waits and priority callers have passed it ``burst`` times."""
        return self.normal_waiting > 0 and self.passed >= self.burst

    def may_enter(self, priority: bool) -> bool:
        """Whether a waiting caller of this kind may take the free session now."""
        if self.busy:
            return False
        if priority:
            return not self.ingest_due()
        return self.priority_waiting == 0 or self.ingest_due()

    def enter(self, priority: bool) -> None:
        """A waiting caller of this kind takes the session (``may_enter`` was true)."""
        if priority:
            self.priority_waiting -= 1
            if self.normal_waiting:
                self.passed += 1
                self.longest_pass = max(self.longest_pass, self.passed)
        else:
            if self.priority_waiting:
                self.ingest_turns_forced += 1
            self.normal_waiting -= 1
            self.passed = 0
        self.busy = True


def check_burst(burst: int) -> int:
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"priority burst must be an integer >= 1, not {burst!r}")
    return burst


class SessionGate:
    """One inference call at a time, in the order of :class:`TurnPolicy`: a priority caller
    waits at most for the call in progress plus, under a flood, one normal call per ``burst``
    priority calls; a normal caller gets at least one call in every ``burst + 1`` while it waits.
    """

    def __init__(self, burst: int = DEFAULT_PRIORITY_BURST) -> None:
        self._cond = threading.Condition()
        self._policy = TurnPolicy(burst)

    @property
    def burst(self) -> int:
        return self._policy.burst

    @burst.setter
    def burst(self, value: int) -> None:
        with self._cond:
            self._policy.burst = check_burst(value)
            self._cond.notify_all()

    def waiting(self) -> tuple[int, int]:
        """(priority, normal) callers waiting now."""
        with self._cond:
            return self._policy.priority_waiting, self._policy.normal_waiting

    def snapshot(self) -> TurnPolicy:
        """A copy of the gate's state and statistics (``longest_pass``, ``ingest_turns_forced``)."""
        with self._cond:
            return replace(self._policy)

    @contextmanager
    def hold(self, priority: bool) -> Iterator[None]:
        policy = self._policy
        with self._cond:
            if priority:
                policy.priority_waiting += 1
            else:
                policy.normal_waiting += 1
            try:
                self._cond.wait_for(lambda: policy.may_enter(priority))
            except BaseException:
                if priority:
                    policy.priority_waiting -= 1
                else:
                    policy.normal_waiting -= 1
                self._cond.notify_all()
                raise
            policy.enter(priority)
        try:
            yield
        finally:
            with self._cond:
                policy.busy = False
                self._cond.notify_all()
