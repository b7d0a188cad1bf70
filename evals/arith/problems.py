"""Seeded generator of multi-step arithmetic problems: the `arith` world's task.

A problem is a chain of additions and subtractions evaluated left to right, one
operation per reasoning step. Every problem is assigned to exactly one split by a
hash of its text, so the held-out test split can never overlap training data, no
matter which seeds or sizes are used to draw either of them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "val", "test"]

#: difficulty name -> (min_ops, max_ops, max_operand, max_value)
DIFFICULTIES: dict[str, tuple[int, int, int, int]] = {
    "easy": (2, 3, 20, 99),
    "medium": (3, 5, 60, 299),
    "hard": (4, 7, 99, 999),
}


@dataclass(frozen=True)
class ArithProblem:
    """One problem: a start value and a list of (operator, operand) pairs."""

    start: int
    ops: tuple[tuple[str, int], ...]
    id: str = ""

    @property
    def text(self) -> str:
        parts = [str(self.start)] + [f"{op} {v}" for op, v in self.ops]
        return " ".join(parts)

    def values(self) -> list[int]:
        """Running values after each operation (the correct step results)."""
        out, cur = [], self.start
        for op, v in self.ops:
            cur = cur + v if op == "+" else cur - v
            out.append(cur)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]


def split_of(text: str) -> Split:
    """Deterministic split assignment from the problem text (10% test, 5% val)."""
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100
    if h < 10:
        return "test"
    if h < 15:
        return "val"
    return "train"


def random_problem(rng: random.Random, difficulty: str = "medium") -> ArithProblem:
    """Draw one problem; running values stay within [0, max_value]."""
    lo, hi, max_operand, max_value = DIFFICULTIES[difficulty]
    n_ops = rng.randint(lo, hi)
    cur = rng.randint(10, min(99, max_value))
    start, ops = cur, []
    for _ in range(n_ops):
        v = rng.randint(2, max_operand)
        op = rng.choice("+-")
        if op == "+" and cur + v > max_value:
            op = "-"
        if op == "-" and cur - v < 0:
            op = "+"
        cur = cur + v if op == "+" else cur - v
        ops.append((op, v))
    return ArithProblem(start=start, ops=tuple(ops))


@dataclass
class ArithGenerator:
    """Seeded stream of problems restricted to one split, with stable ids."""

    split: Split = "test"
    difficulty: str = "medium"
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"unknown arith difficulty {self.difficulty!r}; choose from {sorted(DIFFICULTIES)}")
        self._rng = random.Random(f"arith/{self.split}/{self.difficulty}/{self.seed}")

    def take(self, n: int) -> list[ArithProblem]:
        out: list[ArithProblem] = []
        seen: set[str] = set()
        while len(out) < n:
            p = random_problem(self._rng, self.difficulty)
            if split_of(p.text) != self.split or p.text in seen:
                continue
            seen.add(p.text)
            out.append(ArithProblem(p.start, p.ops, id=f"arith-{self.difficulty}-{self.split}-{self.seed}-{len(out):05d}"))
        return out


def parse_problem(text: str) -> ArithProblem:
    """Inverse of `ArithProblem.text` (used to grade and to judge arith steps)."""
    toks = text.split()
    start = int(toks[0])
    ops = tuple((toks[i], int(toks[i + 1])) for i in range(1, len(toks), 2))
    return ArithProblem(start=start, ops=ops)
