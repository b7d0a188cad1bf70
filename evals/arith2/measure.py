"""Held-out measurements of the second-generation arith models: ``python -m evals.arith2.measure``.

What the issue's targets need beyond `reasonspec bench` (which gives accuracy and speed), on test-split problems
at the default difficulty, greedy, through the real hf worker:

- the two SpecReason judges on the small model's own steps: the small model solves the problems; every step up
  to its first error is labelled by exact arithmetic (`chains.label_steps`) and scored by the large model, with
  the prompt judge (expected 0-9 digit after the standard judge suffix) and the likelihood judge (9 x the
  geometric-mean probability of the step's tokens); AUROC of each against the labels;
- Speculative Thinking's cues in the small model's text: how often a step opens with a reflection or
  affirmation cue (`policies.spec_thinking.classify` on its first 20 tokens), overall and after a wrong / a
  correct step;
- each model's greedy accuracy and chain length (tokens, steps).

Contexts are the problem's prompt ids followed by the reasoning so far *encoded whole*, as a model that wrote it
would have it in its log up to a step boundary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path

from evals.arith.measure import auroc
from evals.arith.problems import ArithGenerator
from evals.arith2.chains import BOXED, STEP_SEP, label_steps
from evals.arith2.train import cue_rate
from orchestrator.prompting import prompt_ids, to_messages
from policies.judge_prompt import judge_suffix_text
from workers.hf_backend import HFWorker
from workers.protocol import GenParams

MODELS = Path(__file__).parent / "models"


async def solve(worker: HFWorker, problems, max_tokens: int) -> tuple[list[list[int]], list[str]]:
    tok = worker.tokenizer
    prompts = [prompt_ids(tok, to_messages(p.text)) for p in problems]
    gens = await asyncio.gather(*(worker.generate(ids, GenParams(max_tokens=max_tokens)) for ids in prompts))
    return prompts, [g.text for g in gens]


def chain_stats(tok, problems, texts: list[str]) -> dict:
    n_tok = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    steps = [t.split(STEP_SEP) for t in texts]
    after: dict[bool, list[str]] = {True: [], False: []}
    for p, written in zip(problems, steps):
        for k, ok in enumerate(label_steps(p, written)[: len(written) - 1]):
            after[ok].append(written[k + 1])
    correct = sum(bool(m := BOXED.findall(t)) and int(m[-1]) == p.answer for p, t in zip(problems, texts))
    return {"accuracy": correct / len(problems), "mean_tokens": n_tok / len(problems),
            "mean_steps": sum(map(len, steps)) / len(problems),
            "cue_rate": cue_rate(tok, [s for w in steps for s in w]),
            "cue_after_wrong": cue_rate(tok, after[False]), "cue_after_correct": cue_rate(tok, after[True]),
            "steps_after_wrong": len(after[False]), "steps_after_correct": len(after[True])}


async def measure(n: int, models: Path, max_tokens: int) -> dict:
    problems = ArithGenerator("test", "medium", seed=0).take(n)
    workers = {name: HFWorker(str(models / name)) for name in ("small", "mid", "large") if (models / name).exists()}
    out: dict = {"problems": n}
    texts = {}
    for name, w in workers.items():  # one shared tokenizer: the same prompt ids for all three
        prompts, texts[name] = await solve(w, problems, max_tokens)
        out[name] = chain_stats(w.tokenizer, problems, texts[name])
    large, tok = workers["large"], workers["large"].tokenizer
    suffix = tok.encode(judge_suffix_text(tok), add_special_tokens=False)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    judge_calls, lik_calls, labels = [], [], []
    for p, ids, text in zip(problems, prompts, texts["small"]):
        steps = text.split(STEP_SEP)
        for k, ok in enumerate(label_steps(p, steps)):
            before = ids + tok.encode(STEP_SEP.join(steps[:k]) + (STEP_SEP if k else ""), add_special_tokens=False)
            step_ids = tok.encode(steps[k], add_special_tokens=False)
            ctx = ids + tok.encode(STEP_SEP.join(steps[: k + 1]) + STEP_SEP, add_special_tokens=False) + suffix
            judge_calls.append(large.next_token_logprobs(ctx, digits))
            lik_calls.append(large.score(before, step_ids))
            labels.append(ok)
    reads = await asyncio.gather(*judge_calls)
    liks = await asyncio.gather(*lik_calls)
    prompt_scores = []
    for r in reads:
        probs = [math.exp(r.candidates[d]) for d in digits]
        prompt_scores.append(sum(i * q for i, q in enumerate(probs)) / sum(probs))
    lik_scores = [9 * math.exp(sum(s.logprobs) / max(1, len(s.logprobs))) for s in liks]
    out["judged_steps"] = {"correct": labels.count(True), "wrong": labels.count(False)}
    out["prompt_judge_auroc"] = auroc(prompt_scores, labels)
    out["likelihood_judge_auroc"] = auroc(lik_scores, labels)
    for w in workers.values():
        await w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--models", type=Path, default=MODELS)
    ap.add_argument("--max-tokens", type=int, default=1200)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(measure(args.problems, args.models, args.max_tokens)), indent=1))


if __name__ == "__main__":
    main()
