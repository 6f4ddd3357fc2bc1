"""The encoder's session gate: API calls go first, but a waiting ingest call gets a turn after at
most ``burst`` of them (pure logic and threads; no model)."""

from __future__ import annotations

import threading
import time

import pytest

from encoder.gate import DEFAULT_PRIORITY_BURST, SessionGate, TurnPolicy


def _next_turn(policy: TurnPolicy) -> str:
    """Who takes the free session: exactly one kind may, whenever anyone waits."""
    allowed = [kind for kind, prio in (("api", True), ("ingest", False)) if policy.may_enter(prio)]
    waiting = {"api": policy.priority_waiting, "ingest": policy.normal_waiting}
    allowed = [kind for kind in allowed if waiting[kind]]
    assert len(allowed) == 1, (allowed, policy)
    return allowed[0]


@pytest.mark.parametrize("burst", [1, 3, DEFAULT_PRIORITY_BURST, 10])
def test_ingest_gets_one_call_in_every_burst_plus_one_under_a_flood(burst: int) -> None:
    """A fake workload: API callers always waiting (a flood) and an ingest that asks for the
    next call as soon as its last one ends. Ingest gets exactly every (burst + 1)-th call."""
    policy = TurnPolicy(burst)
    policy.priority_waiting = 50  # the flood: refilled after every call
    policy.normal_waiting = 1
    order = []
    for _ in range(10 * (burst + 1)):
        kind = _next_turn(policy)
        policy.enter(kind == "api")
        order.append(kind)
        policy.busy = False
        if kind == "api":
            policy.priority_waiting += 1
        else:
            policy.normal_waiting += 1
    assert order == (["api"] * burst + ["ingest"]) * 10
    assert policy.longest_pass == burst
    assert policy.ingest_turns_forced == 10


def test_time_share_of_a_flood_with_small_api_calls_and_big_ingest_calls() -> None:
    """The same flood on a fake clock: API calls of 2 ms (a query), ingest calls of 40 ms (a
    2048-token batch of SPLADE-tiny on 2 cores). With the default burst, ingest keeps over 80%
    of the encoder's time; with the old rule (API calls always first) it got none."""

    def ingest_share(burst: int) -> float:
        policy = TurnPolicy(burst, priority_waiting=8, normal_waiting=1)
        spent = {"api": 0.0, "ingest": 0.0}
        while sum(spent.values()) < 10.0:
            kind = _next_turn(policy)
            policy.enter(kind == "api")
            spent[kind] += 0.002 if kind == "api" else 0.040
            policy.busy = False
            if kind == "api":
                policy.priority_waiting += 1
            else:
                policy.normal_waiting += 1
        return spent["ingest"] / sum(spent.values())

    assert ingest_share(DEFAULT_PRIORITY_BURST) > 0.8
    assert ingest_share(1) > ingest_share(DEFAULT_PRIORITY_BURST) > ingest_share(100)
    assert ingest_share(10**9) == 0.0  # what the unbounded rule did: starvation


def test_api_calls_go_first_while_under_the_burst() -> None:
    policy = TurnPolicy(2, priority_waiting=1, normal_waiting=1)
    assert policy.may_enter(True) and not policy.may_enter(False)
    policy.enter(True)
    assert not policy.may_enter(True) and not policy.may_enter(False)  # busy
    policy.busy = False
    # nobody else waits for the API: ingest goes; and API calls that pass no waiting ingest
    # call do not count against it
    assert TurnPolicy(2, normal_waiting=1).may_enter(False)
    idle = TurnPolicy(2, priority_waiting=5)
    for _ in range(5):
        assert idle.may_enter(True)
        idle.enter(True)
        idle.busy = False
    assert idle.passed == 0


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_burst_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ValueError, match="priority burst"):
        TurnPolicy(bad)  # type: ignore[arg-type]
    gate = SessionGate()
    with pytest.raises(ValueError, match="priority burst"):
        gate.burst = bad  # type: ignore[assignment]
    assert gate.burst == DEFAULT_PRIORITY_BURST


def _wait_for(check: object, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_gate_with_threads_gives_ingest_its_turn() -> None:
    """Real threads at the real gate: while one call holds the session, 8 API callers and 2
    ingest callers queue up; they are served API x3, ingest, API x3, ingest, API x2."""
    gate = SessionGate(burst=3)
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with gate.hold(False):
            holding.set()
            release.wait(30)

    def caller(kind: str) -> None:
        with gate.hold(kind == "api"):
            order.append(kind)  # under the gate: the list is in the order of the turns

    first = threading.Thread(target=holder)
    first.start()
    assert holding.wait(30)
    threads = [threading.Thread(target=caller, args=("api",)) for _ in range(8)]
    threads += [threading.Thread(target=caller, args=("ingest",)) for _ in range(2)]
    for t in threads:
        t.start()
    _wait_for(lambda: gate.waiting() == (8, 2), "10 callers at the gate")
    release.set()
    for t in [first, *threads]:
        t.join(30)
        assert not t.is_alive()
    assert order == ["api"] * 3 + ["ingest"] + ["api"] * 3 + ["ingest"] + ["api"] * 2
    assert gate.waiting() == (0, 0)
    stats = gate.snapshot()
    assert (stats.longest_pass, stats.ingest_turns_forced) == (3, 2)
