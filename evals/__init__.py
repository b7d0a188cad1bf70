"""The evaluation layer: datasets, grading, the eval runner, sweeps, reports and the arith world.

``grade`` is the layer's public entry point for scoring a response (``from evals import grade``).
It is resolved lazily: the grading children run ``python -m evals.grading``, and importing that
module while its package initialises would make runpy warn (and execute it twice).
"""

from __future__ import annotations

from typing import Any

__all__ = ["grade"]


def __getattr__(name: str) -> Any:
    if name == "grade":
        from evals.grading import grade

        return grade
    raise AttributeError(f"module 'evals' has no attribute {name!r}")
