"""Answer grading: math-verify, gold first, with a per-grade timeout that works anywhere.

math-verify enforces its own timeouts with ``signal.alarm``, which only works in the main
thread of the main interpreter; the eval runner grades from worker threads of an event
loop, possibly inside a Ray actor. So math-verify runs with its timeouts disabled in
persistent child processes (``python -m evals.grading``: started with ``subprocess``, so
nothing depends on the parent's ``__main__``, threads or fork-safety), and the parent
enforces the timeout: a child that does not answer in time is killed and replaced on the
next grade. The child also extracts the answer from the response, so the timeout covers
everything a grade does with model output, however long or odd it is. A child imports
sympy once (about a second); after that a grade is a JSON line each way plus math-verify's
own work, a few milliseconds.

Both answers are parsed the same way: wrapped in ``\\boxed{}`` (when not boxed already)
and extracted as LaTeX with the box first. Plain gold answers such as ``\\frac{1}{2}``,
``(3, \\frac{\\pi}{2})``, ``10\\%`` or ``016`` need the wrapper: math-verify's unanchored
extraction misses or misreads 108 of the 500 MATH500 answers. The response is graded by
its final boxed answer (``orchestrator.answer.final_answer``); no box, no credit.

Known leniencies of math-verify (by design, not fixed here): numbers are compared after
rounding to 6 decimal places, a base subscript is dropped (``52_8`` == ``52_9``) and units
are stripped (``15 \\mbox{ cm}^2`` == ``15 \\mbox{ cm}^3``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Seconds a new child may take to import math-verify and sympy (a busy machine is slow).
STARTUP_TIMEOUT_S = 120.0


class _ChildError(Exception):
    """math-verify raised inside a child; the child itself is fine."""


class _Child:
    """One grading process, one request at a time (callers hold it exclusively)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evals.grading"],
            cwd=Path(__file__).resolve().parent.parent,  # the folder holding the `evals` package
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        try:
            self._reply(STARTUP_TIMEOUT_S)  # {"ready": true} once math-verify is imported
        except BaseException:
            self.kill()
            raise

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no answer in {timeout:.1f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"grading process exited with code {self.proc.wait()}")
        return json.loads(line)

    def verify(self, gold: str, response: str, timeout: float) -> bool:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"gold": gold, "response": response}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(timeout)
        if "error" in reply:
            raise _ChildError(reply["error"])
        return bool(reply["ok"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Grader:
    """A thread-safe pool of up to ``processes`` grading children, started on demand.

    Concurrent ``grade`` calls run in parallel, one per child; a child that times out,
    dies or garbles its reply is killed, and the next call that needs one starts a fresh one.
    """

    def __init__(self, processes: int = min(4, os.cpu_count() or 1)) -> None:
        self.processes = processes
        self._slots = threading.BoundedSemaphore(processes)
        self._idle: list[_Child] = []
        self._lock = threading.Lock()

    def grade(self, response: str, gold: str, timeout: float = 5.0) -> bool:
        """Whether the final boxed answer of ``response`` equals ``gold``; False on timeout or error."""
        with self._slots:
            with self._lock:
                child = self._idle.pop() if self._idle else None
            try:
                child = child or _Child()
                ok = child.verify(gold, response, timeout)
            except _ChildError as e:
                log.warning("grading failed (gold %r, response ending %r): %s", gold, response[-80:], e)
                ok = False
            except BaseException as e:  # timeout, crash, garbled reply or interrupt: replace the child
                if child is not None:
                    child.kill()
                if not isinstance(e, Exception):
                    raise
                log.warning("grading failed (gold %r, response ending %r): %s; restarting the grader", gold,
                            response[-80:], e)
                return False
            with self._lock:
                self._idle.append(child)
            return ok

    def warm_up(self) -> None:
        """Start a child now unless one is idle, so a first grade need not wait for sympy's import."""
        with self._slots:
            with self._lock:
                if self._idle:
                    return
            try:
                child = _Child()
            except Exception as e:  # the next grade will try again and say why
                log.warning("could not start a grading process: %s", e)
                return
            with self._lock:
                self._idle.append(child)

    def grade_many(self, pairs: Iterable[tuple[str, str]], timeout: float = 5.0) -> list[bool]:
        """Grade (response, gold) pairs on all children at once; results in input order."""
        with ThreadPoolExecutor(self.processes) as ex:
            return list(ex.map(lambda pair: self.grade(pair[0], pair[1], timeout), pairs))

    def close(self) -> None:
        """Stop the idle children (children in use are stopped by their EOF when this process exits)."""
        with self._lock:
            children, self._idle = self._idle, []
        for child in children:
            child.kill()


_default: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The process-wide grader behind ``grade``; its children stop at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
            atexit.register(_default.close)
        return _default


def grade(response: str, gold: str, timeout: float = 5.0) -> bool:
    """Whether ``response``'s final boxed answer equals ``gold`` (math-verify, gold first).

    Safe from any thread; ``timeout`` bounds the parse and comparison of this one answer.
    Returns False, and logs why, on timeout or error.
    """
    return default_grader().grade(response, gold, timeout)


# ---------------------------------------------------------------- the child side


def _boxed(answer: str) -> str:
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


def answers_equal(gold: str, pred: str) -> bool:
    """math-verify on two bare answers, in this process, without timeouts (what a child runs)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse(_boxed(gold), config, parsing_timeout=None)
    if not gold_parsed:
        raise ValueError(f"gold answer {gold!r} does not parse")
    pred_parsed = parse(_boxed(pred), config, parsing_timeout=None)
    return verify(gold_parsed, pred_parsed, timeout_seconds=None)


def grade_response(gold: str, response: str) -> bool:
    """Whether the final boxed answer of ``response`` equals ``gold``, in this process (what a child runs)."""
    from orchestrator.answer import final_answer  # not at module level: the parent need not import it

    pred = final_answer(response)
    return pred is not None and answers_equal(gold, pred)


def _serve() -> None:
    """Child main loop: one JSON request per stdin line, one JSON reply per stdout line.

    Ctrl-C reaches the children with the parent (one process group): they ignore it and
    leave the interrupt to the parent, which stops them, instead of each printing a
    KeyboardInterrupt traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by sympy & co goes to stderr, never into the replies
    logging.disable(logging.WARNING)  # math-verify warns that its timeouts are off: the parent enforces them
    answers_equal("1", "1")  # import and warm up before saying ready
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply: dict[str, Any] = {"ok": grade_response(request["gold"], request["response"])}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    _serve()
