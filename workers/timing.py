"""Worker-side clocks: busy and idle time of an engine, and one call's own time in it.

Every backend reports the same accounting (``WorkerStats``: ``busy_s + idle_s ==
clock_s``; ``CallTiming`` per call), so a run's breakdown reads the same whichever
engine served it. The mechanisms live here once: the hf engine thread and the vLLM
client both mark busy spans on a ``BusyClock``; the hf engine times its own phases
on a ``PhaseClock`` and each request's share of them on a ``CallClock``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from workers.protocol import CallTiming


class BusyClock:
    """Busy time of a worker since it was created: spans with at least one ``enter`` not yet left.

    Spans nest (a vLLM client with several calls in flight enters once per call), so busy
    time is wall time with work in hand, never a sum over overlapping calls. Idle is the
    rest of the clock, so the two add up to it by construction; what a breakdown checks
    against busy time is the engine's own phase and forward-pass times inside it.
    Read from another thread (``stats``): a read may be one span stale, never negative.
    """

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._busy = 0.0
        self._since = 0.0
        self._depth = 0

    def enter(self) -> None:
        if self._depth == 0:
            self._since = time.perf_counter()
        self._depth += 1

    def leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._busy += time.perf_counter() - self._since

    def read(self) -> tuple[float, float, float]:
        """``(busy_s, idle_s, clock_s)`` now, a span in progress included."""
        now = time.perf_counter()
        busy = self._busy + (now - self._since if self._depth else 0.0)
        clock = now - self._t0
        return busy, max(0.0, clock - busy), clock


class PhaseClock:
    """Engine time per phase (``prefill``, ``decode``), the phase in progress included when read.

    Calls are answered from inside a phase, so a caller that reads the stats right after
    its answer must see the phase that answered it: time added only when a phase ends would
    lag behind the forward passes it contains.
    """

    def __init__(self, *phases: str) -> None:
        self._spent = dict.fromkeys(phases, 0.0)
        self._phase: str | None = None
        self._since = 0.0

    def start(self, phase: str) -> None:
        self.stop()
        self._phase, self._since = phase, time.perf_counter()

    def stop(self) -> None:
        if self._phase is not None:
            self._spent[self._phase] += time.perf_counter() - self._since
            self._phase = None

    def read(self) -> dict[str, float]:
        phase, since = self._phase, self._since
        spent = dict(self._spent)
        if phase is not None:
            spent[phase] += time.perf_counter() - since
        return spent


@dataclass
class CallClock:
    """One request's time inside an engine: created when it is submitted, charged per phase it takes part in."""

    t_submit: float = field(default_factory=time.perf_counter)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def timing(self) -> CallTiming:
        """The call's timing as it is answered: whatever is not its own passes was spent waiting."""
        total = time.perf_counter() - self.t_submit
        return CallTiming(queue_s=max(0.0, total - self.prefill_s - self.decode_s),
                          prefill_s=self.prefill_s, decode_s=self.decode_s)
