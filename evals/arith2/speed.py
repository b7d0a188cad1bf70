"""Decode-time ratios and training-time estimates of the arith2 sizes: ``python -m evals.arith2.speed``.

Speed does not depend on the weights, so the three `train.SPECS` are built with
random weights and measured in one run, interleaved (``--rounds`` rounds, the
fastest of each kept) so that load from other processes hits all sizes alike:

- decode: ms per generated token at batch 1 on one thread, as `reasonspec bench`
  runs each model on one core;
- training: mean seconds per optimizer step over one group of real batches of the
  model's chain style (all threads), times ``max_steps``, plus the evaluations ``train`` runs (greedy
  decoding of the validation problems at batch 50, timed per decode step over a
  chain-long context), gives the estimate of a full run.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from evals.arith.problems import ArithGenerator
from evals.arith.train import ModelSpec, build_model
from evals.arith2.train import SPECS, STYLES, Batches, ChainEncoder, load_or_build_tokenizer, weighted_loss, DEFAULT_OUT


@torch.no_grad()
def decode_ms(model: torch.nn.Module, prompt: list[int], n: int, batch: int = 1) -> float:
    """Wall ms per decode step of ``n`` forced new tokens after ``prompt`` (repeated ``batch`` times)."""
    ids = torch.tensor([prompt] * batch)
    model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    t = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - t) / n * 1000


def train_s_per_step(model: torch.nn.Module, spec: ModelSpec, make: Batches) -> float:
    """Mean seconds per optimizer step over one group of batches (a group spans the length range), after a warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    times = []
    for step in [make.group] + list(range(make.group)):  # the first (a step of the next group) pays one-time allocation
        b = make(step)
        t = time.perf_counter()
        weighted_loss(model, b).backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / len(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-problems", type=int, default=100)
    ap.add_argument("--eval-tokens", type=int, default=600, help="decode steps of one validation batch (its longest chain)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    tok = load_or_build_tokenizer(DEFAULT_OUT)
    torch.manual_seed(0)
    models = {name: build_model(spec, tok) for name, spec in SPECS.items()}
    problems = ArithGenerator("train", "medium", seed=0).take(1)
    enc = {name: ChainEncoder(tok, STYLES[name]) for name in SPECS}
    prompt = enc["large"].prompt(problems[0])
    context = enc["large"].solution(problems[0], random.Random(0))[0][:300]
    dec: dict[str, float] = {}
    evalstep: dict[str, float] = {}
    train: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            model.eval()
            torch.set_num_threads(1)
            dec[name] = min(dec.get(name, 1e9), decode_ms(model, prompt, args.decode_tokens))
            torch.set_num_threads(threads)
            evalstep[name] = min(evalstep.get(name, 1e9), decode_ms(model, context, 16, batch=50))
            model.train()
            make = Batches(enc[name], SPECS[name], "speed", args.batch_size, SPECS[name].max_steps, [], torch.device("cpu"))
            train[name] = min(train.get(name, 1e9), train_s_per_step(model, SPECS[name], make))
    report = {}
    for name, spec in SPECS.items():
        evals = spec.max_steps // args.eval_every + 1  # + the final test evaluation
        eval_min = evals * (args.val_problems / 50) * args.eval_tokens * evalstep[name] / 1000 / 60
        train_min = spec.max_steps * train[name] / 60
        report[name] = {
            "params": sum(p.numel() for p in models[name].parameters()),
            "decode_ms_per_token": round(dec[name], 3),
            "decode_ratio_vs_small": round(dec[name] / dec["small"], 2),
            "train_s_per_step": round(train[name], 2),
            "max_steps": spec.max_steps,
            "estimate_minutes": round(train_min + eval_min, 1),
            "of_which_eval_minutes": round(eval_min, 1),
        }
    report["total_estimate_minutes"] = round(sum(r["estimate_minutes"] for r in report.values()), 1)
    report["setup"] = {"threads": threads, "batch_size": args.batch_size, "decode_threads": 1}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
