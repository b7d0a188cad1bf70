"""Reasoning traces and judge examples for the arith world.

Solutions look like an R1-style chain of thought: one operation per step, steps
separated by blank lines, a final ``\\boxed{}``. Some traces contain a wrong step
followed by a correction that starts with a reflection word, and some contain a
verification step; the wrong step is marked as not trainable so a model learns
to *correct* errors, not to make them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from evals.arith.problems import ArithProblem

STEP_SEP = "\n\n"


@dataclass(frozen=True)
class Step:
    text: str
    correct: bool
    trainable: bool = True


def op_step(prev: int, op: str, v: int, result: int) -> str:
    return f"{prev} {op} {v} = {result}"


def answer_step(value: int) -> str:
    return f"So the answer is \\boxed{{{value}}}."


def corrupt(rng: random.Random, prev: int, op: str, v: int, problem: ArithProblem) -> str:
    """A plausible wrong step, of the kinds a weak model makes."""
    true = prev + v if op == "+" else prev - v
    kind = rng.random()
    if kind < 0.5:  # arithmetic slip: off by one / ten / a digit
        delta = rng.choice([1, -1, 10, -10, 2, -2, 100, -100, rng.randint(3, 9)])
        return op_step(prev, op, v, max(0, true + delta) if true + delta != true else true + 1)
    if kind < 0.7:  # wrong operand, consistent arithmetic
        other = rng.choice([w for _, w in problem.ops if w != v] or [v + 1])
        return op_step(prev, op, other, prev + other if op == "+" else prev - other)
    if kind < 0.85:  # mis-copied previous value
        bad_prev = max(0, prev + rng.choice([1, -1, 10, -10, 3, -3]))
        if bad_prev == prev:
            bad_prev = prev + 1
        return op_step(bad_prev, op, v, bad_prev + v if op == "+" else bad_prev - v)
    flipped = "-" if op == "+" else "+"  # wrong sign
    return op_step(prev, flipped, v, prev + v if flipped == "+" else prev - v)


def solution_steps(problem: ArithProblem, rng: random.Random, p_error: float = 0.0, p_verify: float = 0.0) -> list[Step]:
    """The trace for a problem, with optional corrected errors and verifications."""
    steps: list[Step] = []
    prev = problem.start
    for (op, v), result in zip(problem.ops, problem.values()):
        if rng.random() < p_error:
            wrong = corrupt(rng, prev, op, v, problem)
            steps.append(Step(wrong, correct=False, trainable=False))
            steps.append(Step(f"Wait, that is wrong. {op_step(prev, op, v, result)}", correct=True))
        else:
            steps.append(Step(op_step(prev, op, v, result), correct=True))
        if rng.random() < p_verify:
            back = "-" if op == "+" else "+"
            steps.append(Step(f"Let me check: {result} {back} {v} = {prev}. Yes.", correct=True))
        prev = result
    steps.append(Step(answer_step(prev), correct=True))
    return steps


def candidate_for_judge(problem: ArithProblem, rng: random.Random) -> tuple[list[str], str, bool]:
    """(context steps, candidate step, is_correct) for judge training.

    Half of the candidates are the true next step, half a corrupted one; the final
    boxed step is also judged, with a wrong value when corrupted.
    """
    steps = [s for s in solution_steps(problem, rng, p_error=0.1, p_verify=0.05)]
    # positions where the next step is a plain correct step (not a wrong injected one)
    k = rng.randrange(len(steps))
    while not steps[k].correct:
        k = rng.randrange(len(steps))
    context = [s.text for s in steps[:k]]
    good = steps[k].text
    if rng.random() < 0.5:
        return context, good, True
    # corrupt the candidate
    if good.startswith("So the answer"):
        bad = answer_step(problem.answer + rng.choice([1, -1, 10, -10, 2, -2, 5]))
        return context, bad, False
    n_done = sum(1 for s in steps[:k] if s.correct and not s.text.startswith("Let me check"))
    op_idx = min(n_done, len(problem.ops) - 1)
    vals = [problem.start] + problem.values()
    prev = vals[op_idx]
    op, v = problem.ops[op_idx]
    bad = corrupt(rng, prev, op, v, problem)
    if good.startswith("Wait"):
        bad = "Wait, that is wrong. " + bad
    elif good.startswith("Let me check"):
        return context, good, True
    return context, bad, False
