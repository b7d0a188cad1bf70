"""Progress for eval runs: a bar on a terminal, a few plain lines in a log.

tqdm redraws its bar with carriage returns; where stderr is a file or a pipe (a Ray job's log,
CI, ``nohup``), every redraw becomes a line, so a bench of six configs logs hundreds of them.
``progress_bar`` therefore returns a tqdm bar only when stderr is a terminal and otherwise a
``LineProgress`` that writes one line per config when it closes (and, with ``every``, one line
each ``every`` finished problems, for long runs whose log should show they are alive).
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Protocol


class Progress(Protocol):
    """What the eval runner calls on its progress display (a subset of tqdm's API)."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...

    def close(self) -> Any: ...


class LineProgress:
    """tqdm's update/postfix/close, printed as whole lines: ``desc: n/total solves, postfix, 12.3s``."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "solve", every: int = 0,
                 disable: bool = False, file: IO[str] | None = None) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.initial, self.every, self.disable = initial, every, disable
        self.postfix = ""
        self._file = file
        self._t0 = time.perf_counter()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.every > 0 and self.n < self.total and (self.n - self.initial) % self.every == 0:
            self._line()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._line()

    def _line(self) -> None:
        if self.disable:
            return
        parts = [f"{self.n}/{self.total} {self.unit}s"]
        if self.initial:
            parts.append(f"{self.initial} resumed")
        if self.postfix:
            parts.append(self.postfix)
        parts.append(f"{time.perf_counter() - self._t0:.1f}s")
        file = self._file or sys.stderr  # looked up late: tests and loggers swap sys.stderr
        print(f"{self.desc}: " + ", ".join(parts), file=file, flush=True)


def progress_bar(total: int, initial: int = 0, desc: str = "", unit: str = "solve", disable: bool = False,
                 every: int = 0) -> Progress:
    """A tqdm bar if stderr is a terminal, else a ``LineProgress`` (see the module docstring)."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
    return LineProgress(total, initial=initial, desc=desc, unit=unit, every=every, disable=disable)


def quiet_library_progress() -> None:
    """Silence the libraries' own bars (transformers' "Loading weights", hub downloads) off a terminal.

    Through ``HF_HUB_DISABLE_PROGRESS_BARS``, read when transformers is imported, so that child
    processes (Ray actors, vLLM engines) inherit it; an already imported transformers is told directly.
    """
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging_module = sys.modules.get("transformers.utils.logging")
    if logging_module is not None:
        logging_module.disable_progress_bar()
