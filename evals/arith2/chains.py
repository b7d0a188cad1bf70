"""R1-shaped reasoning chains for arith problems, and exact step labels.

Real reasoning models spend most of their tokens *around* each operation:
restating what is known, hesitating ("Wait, let me double-check ..."),
verifying ("Let me verify: ..."), trying an alternative ("Alternatively, ..."),
recapping at the end. Those habits start right after a blank line, which is what
Speculative Thinking keys on (>80% of "wait" follow "\\n\\n"). A chain here is a
list of steps joined by ``\\n\\n``; one operation of the problem spreads over
several steps, so a solution is long (the large style averages ~18 steps and
~415 tokens at the default difficulty, ~17 and ~370 in its greedy mode) and
over 80% of its tokens are reflective.

Three styles share one grammar:

- ``LARGE`` re-checks almost every operation, whatever its difficulty;
- ``CAREFUL`` (what the mid and large models learn) announces every operation
  ("Hold on, 54 + 56 needs 2 carries, so let me go column by column.") and
  works it out column by column, ones first, before it states the result, then
  verifies it by the inverse operation. Nothing is computed in one shot: narrow
  models (width 96) trained on ``LARGE`` chains got one-shot sums wrong in the
  tens digit (0.50 held-out accuracy), and a style that states a one-shot result
  before double-checking it taught them to copy the stated digits into the
  columns (a column holds one digit fact only if nothing above it gives the answer);
- ``SMALL`` hesitates and re-checks mostly where a small model errs: at
  operations with column carries/borrows or a large operand (``hardness``), and
  at the operation after a corrected error. Errors are injected more often at
  hard operations too, so in the small model's data a cue after ``\\n\\n``
  predicts a mistake just before it, as with real small reasoners.

An injected wrong computation is a step with ``trainable=False`` (the model
learns to correct errors, not to make them), followed by a correction that
opens with the style's hesitation ("Wait, let me double-check" / "Wait, let me
redo"); every later step uses the corrected value (restated as such), so a
correction in context is carried forward whoever wrote it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from evals.arith.problems import ArithProblem
from evals.arith.solutions import STEP_SEP, Step, corrupt

__all__ = [
    "CAREFUL", "LARGE", "REFLECTIVE", "SMALL", "STEP_SEP", "ChainStep", "ChainStyle", "ModalRandom", "chain", "chain_text",
    "handoff_chain", "hardness",
    "label_steps",
]

#: step kinds that restate, hesitate, verify, try alternatives or recap (the rest compute or answer)
REFLECTIVE = frozenset(
    {"intro", "restate", "hold_on", "verify", "alternative", "double_check", "correction", "recap", "backwards"}
)
COLUMNS = ("ones", "tens", "hundreds", "thousands", "ten-thousands")
EQUATION = re.compile(r"(\d+) ([+-]) (\d+) = (-?\d+)")
NUMBER = re.compile(r"\d+")
NOT_NUMBER = re.compile(r"not -?\d+")
HAVE = re.compile(r"we have (\d+)")
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")
#: checks and alternatives restate an operation already done; an inverse one could look like the next operation
NON_ADVANCING = ("Let me", "Alternatively")

Probs = tuple[float, float, float]  # indexed by hardness 0, 1, 2


@dataclass(frozen=True)
class ChainStep(Step):
    """A step with what the statistics and the tests need: its kind and the hardness of its operation."""

    kind: str = ""
    hard: int = 0
    op: int = -1  # index of the operation the step works on; -1 before the first, len(ops) for the closing steps


@dataclass(frozen=True)
class ChainStyle:
    """How often each habit appears, per hardness of the operation (0 easy, 1, 2 hardest)."""

    name: str
    verify: Probs
    hold_on: Probs  # hesitation *before* computing, then column-by-column work
    double_check: Probs  # "Wait, let me double-check" after a (correct) computation
    alternative: Probs
    error: Probs  # a wrong computation (not trained on) followed by a correction
    recheck_after_error: float  # verification at the operation after a corrected one
    recap: float
    backwards: float
    hesitation: str  # how a re-check after a computation starts


# A habit above probability 1/2 is what a well-trained model writes under greedy decoding (see `ModalRandom`):
# the large one verifies every operation and tries an alternative at hard ones; the small one hesitates at the
# hardest (before computing, or after: "Wait, let me redo", a reflection cue that Speculative Thinking answers
# with a 20-token takeover; "check"/"verify" would trigger its 125-token verification takeover instead).
LARGE = ChainStyle(
    "large", verify=(0.9, 0.95, 1.0), hold_on=(0.0, 0.1, 0.2), double_check=(0.05, 0.1, 0.2),
    alternative=(0.2, 0.3, 0.6), error=(0.03, 0.06, 0.1), recheck_after_error=1.0, recap=1.0, backwards=0.6,
    hesitation="Wait, let me double-check",
)
CAREFUL = ChainStyle(
    "careful", verify=(0.9, 0.95, 1.0), hold_on=(1.0, 1.0, 1.0), double_check=(0.0, 0.0, 0.0),
    alternative=(0.1, 0.2, 0.3), error=(0.0, 0.0, 0.0), recheck_after_error=1.0, recap=1.0, backwards=0.3,
    hesitation="Wait, let me double-check",
)
SMALL = ChainStyle(
    "small", verify=(0.03, 0.15, 0.3), hold_on=(0.0, 0.2, 0.35), double_check=(0.02, 0.3, 0.8),
    alternative=(0.02, 0.05, 0.1), error=(0.03, 0.15, 0.3), recheck_after_error=0.9, recap=0.3, backwards=0.1,
    hesitation="Wait, let me redo",
)
def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def carries(a: int, op: str, b: int) -> int:
    """Column carries (addition) or borrows (subtraction, a >= b) of ``a op b``."""
    n = c = 0
    while a or b:
        da, db = a % 10, b % 10
        c = int(da + db + c >= 10) if op == "+" else int(da - db - c < 0)
        n += c
        a, b = a // 10, b // 10
    return n


def hardness(a: int, op: str, b: int) -> int:
    """0-2: carries/borrows plus a large operand, the places where a weak model slips."""
    return min(2, carries(a, op, b) + (b >= 40))


def digit_work(a: int, op: str, b: int) -> str:
    """Column-by-column arithmetic, ones first, as a careful solver writes it out."""
    parts: list[str] = []
    carry, i = 0, 0
    if op == "+":
        while a or b or carry:
            if not (a or b):
                parts.append(f"{COLUMNS[i]}: the carried 1")
                break
            da, db = a % 10, b % 10
            s = da + db + carry
            parts.append(f"{COLUMNS[i]}: {da} + {db}{' + 1' if carry else ''} is {s}{', carry 1' if s >= 10 else ''}")
            carry, a, b, i = int(s >= 10), a // 10, b // 10, i + 1
    else:
        while b or carry:
            da, db = a % 10, b % 10
            d = da - db - carry
            expr = f"{da} - {db}{' - 1' if carry else ''}"
            if d < 0:
                parts.append(f"{COLUMNS[i]}: {expr} needs a borrow, so {da + 10} - {db}{' - 1' if carry else ''} is {d + 10}")
            else:
                parts.append(f"{COLUMNS[i]}: {expr} is {d}")
            carry, a, b, i = int(d < 0), a // 10, b // 10, i + 1
        if a:
            parts.append(f"then {a} stays in front")
    text = "; ".join(parts)
    return text[0].upper() + text[1:]


def verb(op: str) -> str:
    return "add" if op == "+" else "subtract"


def restate(cur: int, op: str, b: int, first: bool, corrected: bool) -> str:
    if first:
        return f"We start with {cur}. First we {verb(op)} {b}."
    if corrected:
        return f"With the corrected value, we have {cur}. Next we {verb(op)} {b}."
    return f"So far we have {cur}. Next we {verb(op)} {b}."


def hold_on(a: int, op: str, b: int) -> str:
    n = carries(a, op, b)
    if n:
        what = ("a carry" if n == 1 else f"{n} carries") if op == "+" else ("a borrow" if n == 1 else f"{n} borrows")
        return f"Hold on, {a} {op} {b} needs {what}, so let me go column by column."
    if b >= 40:
        return f"Hold on, {b} is a large number, so let me go column by column."
    return f"Let me work out {a} {op} {b} column by column."


def careful(a: int, op: str, b: int) -> str:
    return f"{digit_work(a, op, b)}. So {a} {op} {b} = {apply(a, op, b)}."


def verify(a: int, op: str, b: int) -> str:
    inv = "-" if op == "+" else "+"
    return f"Let me verify: {apply(a, op, b)} {inv} {b} = {a}. Yes."


def double_check(a: int, op: str, b: int, wrong: int | None = None, opening: str = LARGE.hesitation) -> str:
    tail = f", not {wrong}." if wrong is not None else ". Good, the same."
    return f"{opening} {a} {op} {b}. {digit_work(a, op, b)}. So {a} {op} {b} = {apply(a, op, b)}{tail}"


def alternative(a: int, op: str, b: int) -> str:
    res = apply(a, op, b)
    tens, ones = b - b % 10, b % 10
    if tens and ones:
        mid = apply(a, op, tens)
        return f"Alternatively, {a} {op} {tens} = {mid}, and {mid} {op} {ones} = {res}. Same result."
    if op == "+":
        return f"Alternatively, {b} + {a} = {res}, the same in the other order."
    return f"Alternatively, counting up from {res}: {res} + {b} = {a}, so the difference is {res}."


def recap(problem: ArithProblem) -> str:
    vals = [problem.start] + problem.values()
    eqs = ", ".join(f"{vals[i]} {op} {b} = {vals[i + 1]}" for i, (op, b) in enumerate(problem.ops))
    return f"Let me recap: {eqs}."


def backwards(problem: ArithProblem) -> str:
    vals = [problem.start] + problem.values()
    eqs = ", ".join(
        f"{vals[i + 1]} {'-' if op == '+' else '+'} {b} = {vals[i]}" for i, (op, b) in reversed(list(enumerate(problem.ops)))
    )
    return f"Let me check by working backwards: {eqs}. Yes, we get back to {problem.start}."


def answer(value: int) -> str:
    return f"So the final answer is \\boxed{{{value}}}."


def intro(problem: ArithProblem) -> str:
    return f"Okay, so I need to evaluate {problem.text} from left to right."


class ModalRandom(random.Random):
    """Takes every habit more likely than not and no other, as a well-trained model decoding greedily would."""

    def random(self) -> float:
        return 0.5


def chain(problem: ArithProblem, rng: random.Random, style: ChainStyle = LARGE) -> list[ChainStep]:
    """The steps of one solution in ``style``; seeded by ``rng`` alone."""
    steps = [ChainStep(intro(problem), True, kind="intro")]
    cur, corrected = problem.start, False
    for i, (op, b) in enumerate(problem.ops):
        h = hardness(cur, op, b)
        res = apply(cur, op, b)
        at = {"hard": h, "op": i}
        steps.append(ChainStep(restate(cur, op, b, i == 0, corrected), True, kind="restate", **at))
        after_error, corrected = corrected, False
        if rng.random() < style.hold_on[h]:
            steps.append(ChainStep(hold_on(cur, op, b), True, kind="hold_on", **at))
            steps.append(ChainStep(careful(cur, op, b), True, kind="careful", **at))
        elif rng.random() < style.error[h] and (wrong := corrupt(rng, cur, op, b, problem)).rsplit(" ", 1)[1] != str(res):
            steps.append(ChainStep(wrong + ".", False, trainable=False, kind="wrong", **at))
            fix = double_check(cur, op, b, int(wrong.rsplit(" ", 1)[1]), style.hesitation)
            steps.append(ChainStep(fix, True, kind="correction", **at))
            corrected = True
        else:  # (a slip that lands on the right value is no error)
            steps.append(ChainStep(f"{cur} {op} {b} = {res}.", True, kind="op", **at))
            if rng.random() < style.double_check[h]:
                steps.append(ChainStep(double_check(cur, op, b, opening=style.hesitation), True, kind="double_check", **at))
        if rng.random() < max(style.verify[h], style.recheck_after_error if (after_error or corrected) else 0.0):
            steps.append(ChainStep(verify(cur, op, b), True, kind="verify", **at))
        if rng.random() < style.alternative[h]:
            steps.append(ChainStep(alternative(cur, op, b), True, kind="alternative", **at))
        cur = res
    end = len(problem.ops)
    if rng.random() < style.recap:
        steps.append(ChainStep(recap(problem), True, kind="recap", op=end))
    if rng.random() < style.backwards:
        steps.append(ChainStep(backwards(problem), True, kind="backwards", op=end))
    steps.append(ChainStep(answer(cur), True, kind="answer", op=end))
    return steps


#: where a continuation resumes within the operation the prefix's last step works on: after these kinds, the
#: operation's own steps of these kinds are still to come (any other kind: the next operation starts)
RESUME = {"restate": ("hold_on", "careful", "verify", "alternative"), "hold_on": ("careful", "verify", "alternative"),
          "op": ("verify", "alternative"), "careful": ("verify", "alternative"),
          "double_check": ("verify", "alternative"), "correction": ("verify", "alternative"),
          "wrong": ("verify", "alternative")}


def handoff_chain(problem: ArithProblem, rng: random.Random, prefix: ChainStyle = SMALL,
                  style: ChainStyle = CAREFUL) -> list[ChainStep]:
    """A solution begun in ``prefix`` style, cut at a random step boundary and continued in ``style``.

    This is the text a large model meets in the mixing policies (a SpecReason rewrite, a Speculative Thinking
    takeover, a consultant's correction): another writer's steps, then its own. The prefix is not trained on
    (a model learns to continue such text, not to write it); the continuation picks up exactly where the prefix
    stopped: the rest of the operation it was in, and a correction in ``style``'s words when the prefix
    ended with a wrong step (the next step then restates the corrected value). Cuts fall before the
    closing steps; the operation values agree because ``style`` here injects no errors of its own.
    """
    head = chain(problem, rng, prefix)
    tail = chain(problem, rng, style)
    last_op = max(k for k, s in enumerate(head) if s.op < len(problem.ops))
    cut = rng.randint(1, last_op + 1)
    prev = head[cut - 1]
    resume = RESUME.get(prev.kind, ())
    rest = [s for s in tail if s.op > prev.op or (s.op == prev.op and s.kind in resume)]
    if prev.kind == "wrong":
        values = [problem.start] + problem.values()
        wrong = int(prev.text.rstrip(".").rsplit(" ", 1)[1])
        fix = double_check(values[prev.op], *problem.ops[prev.op], wrong, style.hesitation)
        rest.insert(0, ChainStep(fix, True, kind="correction", hard=prev.hard, op=prev.op))
        k = next((k for k, s in enumerate(rest) if s.kind == "restate"), None)
        if k is not None:
            s = rest[k]
            rest[k] = replace(s, text=restate(values[s.op], *problem.ops[s.op], first=False, corrected=True))
    return [replace(s, trainable=False) for s in head[:cut]] + rest


def chain_text(steps: list[ChainStep]) -> str:
    return STEP_SEP.join(s.text for s in steps)


def _reference_numbers(problem: ArithProblem) -> set[int]:
    """Every number a correct step of any kind may contain for this problem."""
    texts = [intro(problem), recap(problem), backwards(problem), answer(problem.answer)]
    cur = problem.start
    for op, b in problem.ops:
        texts += [restate(cur, op, b, True, False), hold_on(cur, op, b), careful(cur, op, b), verify(cur, op, b),
                  double_check(cur, op, b), alternative(cur, op, b)]
        cur = apply(cur, op, b)
    return {int(n) for t in texts for n in NUMBER.findall(t)}


def label_steps(problem: ArithProblem, steps: list[str]) -> list[bool]:
    """Correctness of each step, up to and including the first wrong one (later contexts are wrong).

    A step is correct when each equation in it is true arithmetic, it names only
    numbers that correct steps of this problem contain (a corrected value's
    ``not N`` excepted), a restated running value is the current one, and a
    boxed answer is the answer. Equations ``value op operand = next value``
    advance the running value, except in checks and alternatives.
    """
    allowed = _reference_numbers(problem)
    values = [problem.start] + problem.values()
    done, labels = 0, []
    for text in steps:
        eqs = [(int(a), op, int(b), int(c)) for a, op, b, c in EQUATION.findall(text)]
        nums = {int(n) for n in NUMBER.findall(NOT_NUMBER.sub("", text))}
        ok = all(apply(a, op, b) == c for a, op, b, c in eqs) and nums <= allowed
        ok = ok and all(int(v) == values[done] for v in HAVE.findall(text))
        ok = ok and all(int(v) == problem.answer for v in BOXED.findall(text))
        for a, op, b, c in eqs if not text.startswith(NON_ADVANCING) else []:
            if done < len(problem.ops) and (a, op, b, c) == (values[done], *problem.ops[done], values[done + 1]):
                done += 1
        labels.append(ok)
        if not ok:
            break
    return labels
