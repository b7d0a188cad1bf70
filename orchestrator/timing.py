"""Where a problem's time goes: its model calls on a timeline, their critical path, the event loop.

Every model call goes through the Session, which records it here (``CallRecord``:
its wall interval on the orchestrator's clock and the worker's ``CallTiming``). A
problem's wall time then splits along its **critical path**: the heaviest chain of
calls in which each starts after the previous one ended (the calls that had to run
one after another; a judge and the look-ahead draft in flight together are
alternatives, and the chain takes the one with more model time). Along that chain,

    wall = model + queue + overhead + off_path + gap

- ``model``: the chain's model time (prefill and decode passes, as its workers measured them);
- ``queue``: the chain's calls waiting inside their workers (for the engine, or for other calls' passes);
- ``overhead``: the rest of the chain's calls' wall time (thread and process hand-offs, the event
  loop getting round to the answer, serialisation);
- ``off_path``: time with none of the chain's calls in flight but others of the problem's (a judge
  that waits in its engine behind the rewrite it overlaps, when the rewrite is the heavier path);
- ``gap``: time with none of the problem's calls in flight: policy and session code between calls,
  the event loop getting round to the next one (the orchestrator's own share of the wall).

``efficiency = model / wall``: 1 when the problem was never waiting on anything but its models.

``LoopMeter`` measures the event loop itself: wall time spent running callbacks (everything but
waiting in the selector) and the loop thread's CPU time, over a whole run.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.protocol import CallTiming


@dataclass(frozen=True)
class CallRecord:
    """One model call as the session saw it: when it was sent and answered, and the worker's account of it.

    A worker that sends no timing (``timing`` None) is taken to have spent the whole call on its model:
    nothing inside it can be told apart, and the breakdown counts such calls as ``untimed``.
    """

    role: str
    start: float
    end: float
    timing: CallTiming | None = None

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def model_s(self) -> float:
        return self.wall_s if self.timing is None else self.timing.model_s

    @property
    def queue_s(self) -> float:
        return 0.0 if self.timing is None else self.timing.queue_s


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoleTime(_Strict):
    """One model's calls of a problem, summed (calls in flight together each count whole)."""

    calls: int = 0
    call_s: float = 0.0
    model_s: float = 0.0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    untimed: int = 0

    def add(self, r: CallRecord) -> None:
        self.calls += 1
        self.call_s += r.wall_s
        self.model_s += r.model_s
        self.queue_s += r.queue_s
        if r.timing is None:
            self.untimed += 1
        else:
            self.prefill_s += r.timing.prefill_s
            self.decode_s += r.timing.decode_s


class ProblemTime(_Strict):
    """A problem's wall time along its critical path (see the module docstring): model + queue + overhead +
    off_path + gap."""

    wall_s: float
    critical_path_s: float = Field(description="model time of the critical path")
    critical_calls: int
    queue_s: float
    overhead_s: float
    off_path_s: float = Field(description="waits on the problem's calls off the critical path")
    gap_s: float = Field(description="time with none of the problem's calls in flight")
    efficiency: float | None
    roles: dict[str, RoleTime]


def critical_chain(records: Sequence[CallRecord]) -> list[CallRecord]:
    """The chain of calls, each starting after the previous one ended, with the most model time.

    Weighted interval scheduling over the calls' wall intervals: O(n log n), exact.
    """
    calls = sorted(records, key=lambda r: r.end)
    ends = [r.end for r in calls]
    best = [0.0] * (len(calls) + 1)  # best[i]: heaviest chain among the first i calls (by end)
    took = [False] * len(calls)
    before = [0] * len(calls)
    for i, r in enumerate(calls):
        before[i] = bisect.bisect_right(ends, r.start, 0, i)  # calls ended by the time r started
        with_r = best[before[i]] + r.model_s
        took[i] = with_r > best[i]
        best[i + 1] = with_r if took[i] else best[i]
    chain: list[CallRecord] = []
    i = len(calls)
    while i > 0:
        if took[i - 1]:
            chain.append(calls[i - 1])
            i = before[i - 1]
        else:
            i -= 1
    return chain[::-1]


def _covered(records: Sequence[CallRecord]) -> float:
    """The length of the union of the calls' wall intervals: time with at least one of them in flight."""
    total, reach = 0.0, float("-inf")
    for r in sorted(records, key=lambda r: r.start):
        if r.end > reach:
            total += r.end - max(r.start, reach)
            reach = r.end
    return total


def problem_time(records: Sequence[CallRecord], wall_s: float) -> ProblemTime:
    """The breakdown of one problem whose calls are ``records`` and whose wall time is ``wall_s``."""
    chain = critical_chain(records)
    model = sum(r.model_s for r in chain)
    queue = sum(r.queue_s for r in chain)
    in_calls = sum(r.wall_s for r in chain)
    in_flight = _covered(records)
    roles: dict[str, RoleTime] = {}
    for r in records:
        roles.setdefault(r.role, RoleTime()).add(r)
    return ProblemTime(
        wall_s=wall_s, critical_path_s=model, critical_calls=len(chain), queue_s=queue,
        overhead_s=in_calls - model - queue, off_path_s=in_flight - in_calls, gap_s=wall_s - in_flight,
        efficiency=model / wall_s if wall_s > 0 else None, roles=roles,
    )


# ---------------------------------------------------------------- the event loop


class LoopMeter:
    """How much of a stretch of wall time the running event loop spent running code rather than waiting.

    The loop waits in its selector's ``select`` when no callback is ready; that wait is timed
    (the method is wrapped on the loop's selector object for the meter's lifetime), and busy =
    wall - wait: policy and session code, answers handed over from engine threads, the runner's
    own work. ``cpu_s`` is the loop thread's CPU time over the same stretch (below ``busy_s``
    when the thread waits for the GIL or for a core). Start and stop it on the loop's thread.
    A loop without a selector (not the default asyncio loop) reports ``busy_s`` None.
    """

    def __init__(self) -> None:
        self._selector: Any = None
        self._wait = 0.0
        self._t0 = self._cpu0 = 0.0

    def start(self) -> LoopMeter:
        selector = getattr(asyncio.get_running_loop(), "_selector", None)
        if selector is not None and callable(getattr(selector, "select", None)):
            inner = selector.select

            def select(timeout: float | None = None) -> Any:
                t = time.perf_counter()
                try:
                    return inner(timeout)
                finally:
                    self._wait += time.perf_counter() - t

            selector.select = select
            self._selector = selector
        self._t0, self._cpu0 = time.perf_counter(), time.thread_time()
        return self

    def stop(self) -> dict[str, float | None]:
        """``{"wall_s", "busy_s", "cpu_s"}`` since ``start``; the selector is restored."""
        wall, cpu = time.perf_counter() - self._t0, time.thread_time() - self._cpu0
        busy = None
        if self._selector is not None:
            del self._selector.select  # the instance attribute shadowed the class's method
            self._selector = None
            busy = max(0.0, wall - self._wait)
        return {"wall_s": wall, "busy_s": busy, "cpu_s": cpu}
