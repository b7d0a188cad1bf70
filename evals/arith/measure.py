"""Held-out measurements of the arith pair: ``python -m evals.arith.measure``.

- judge quality: the small model solves held-out problems; each of its steps whose
  context is still correct is labelled by exact arithmetic and scored 0-9 by the
  large model with SpecReason's prompt judge (expected digit); AUROC of score vs label;
- reflection: how often the small model writes a "Wait" step after one of its errors;
- accuracy of both models (greedy) and the per-token decode time gap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re

from evals.arith.problems import ArithGenerator, ArithProblem
from orchestrator.config import load_config
from orchestrator.prompting import prompt_ids, to_messages
from policies.judge_prompt import judge_suffix_text
from workers.hf_backend import HFWorker
from workers.protocol import GenParams

OP_STEP = re.compile(r"^(-?\d+) ([+-]) (\d+) = (-?\d+)$")
CHECK_STEP = re.compile(r"^Let me check: (-?\d+) ([+-]) (\d+) = (-?\d+)\. Yes\.$")
ANSWER_STEP = re.compile(r"^So the answer is \\boxed\{(-?\d+)\}\.$")


def apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def label_steps(problem: ArithProblem, steps: list[str]) -> list[bool]:
    """Correctness of each step up to and including the first wrong one (later contexts are wrong)."""
    labels, value, idx = [], problem.start, 0
    for step in steps:
        ok = False
        if m := OP_STEP.match(step):
            x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
            ok = idx < len(problem.ops) and x == value and (op, y) == problem.ops[idx] and z == apply(x, op, y)
            if ok:
                value, idx = z, idx + 1
        elif m := CHECK_STEP.match(step):
            ok = int(m[4]) == apply(int(m[1]), m[2], int(m[3]))
        elif m := ANSWER_STEP.match(step):
            ok = idx == len(problem.ops) and int(m[1]) == value
        labels.append(ok)
        if not ok:
            break
    return labels


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a random correct step outscores a random wrong one (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


async def measure(n: int) -> dict:
    cfg = load_config("arith-v1/specreason")
    small = HFWorker(cfg.models["small"].resolved_path())
    large = HFWorker(cfg.models["large"].resolved_path())
    tok = large.tokenizer
    suffix = tok.encode(judge_suffix_text(tok), add_special_tokens=False)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    problems = ArithGenerator("test", "medium", seed=0).take(n)
    prompts = [prompt_ids(tok, to_messages(p.text)) for p in problems]
    gens = await asyncio.gather(*(small.generate(ids, GenParams(max_tokens=200)) for ids in prompts))
    judge_calls, lik_calls, labels, texts = [], [], [], []
    errors = reflected = 0
    for p, ids, g in zip(problems, prompts, gens):
        steps = g.text.split("\n\n")
        lab = label_steps(p, steps)
        if not all(lab):
            errors += 1
            bad = len(lab) - 1
            reflected += any(s.startswith("Wait") for s in steps[bad + 1 :])
        for k, ok in enumerate(lab):
            ctx = ids + tok.encode("\n\n".join(steps[: k + 1]) + "\n\n", add_special_tokens=False) + suffix
            judge_calls.append(large.next_token_logprobs(ctx, digits))
            before = ids + tok.encode("\n\n".join(steps[:k]) + ("\n\n" if k else ""), add_special_tokens=False)
            lik_calls.append(large.score(before, tok.encode(steps[k], add_special_tokens=False)))
            labels.append(ok)
            texts.append(steps[k])
    lps = await asyncio.gather(*judge_calls)
    liks = await asyncio.gather(*lik_calls)
    # SpecReason's likelihood judge: 9 x the geometric-mean probability of the step's tokens
    lik_scores = [9 * math.exp(sum(s.logprobs) / max(1, len(s.logprobs))) for s in liks]
    scores = []
    for lp in lps:
        probs = [math.exp(lp.candidates[d]) for d in digits]
        scores.append(sum(i * q for i, q in enumerate(probs)) / sum(probs))
    small_acc = sum(g.text.endswith(f"\\boxed{{{p.answer}}}.") for p, g in zip(problems, gens)) / n
    await small.close()
    await large.close()
    return {
        "problems": n,
        "small_greedy_accuracy": small_acc,
        "judged_steps": len(labels),
        "wrong_steps": labels.count(False),
        "prompt_judge_auroc": auroc(scores, labels),
        "likelihood_judge_auroc": auroc(lik_scores, labels),
        "likelihood_judge_at_7": {"correct_kept": sum(s >= 7 for s, y in zip(lik_scores, labels) if y) / max(1, labels.count(True)),
                                  "wrong_rejected": sum(s < 7 for s, y in zip(lik_scores, labels) if not y) / max(1, labels.count(False))},
        "mean_score_correct": sum(s for s, y in zip(scores, labels) if y) / max(1, labels.count(True)),
        "mean_score_wrong": sum(s for s, y in zip(scores, labels) if not y) / max(1, labels.count(False)),
        "small_solutions_with_errors": errors,
        "of_which_reflected": reflected,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=200)
    print(json.dumps(asyncio.run(measure(ap.parse_args().problems)), indent=1))


if __name__ == "__main__":
    main()
