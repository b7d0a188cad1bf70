"""Decode-time ratios and training-time estimates of the arith2 sizes: ``python -m evals.arith2.speed``.

Speed does not depend on the weights, so the three `train.SPECS` are built with
random weights and measured in one run, interleaved (``--rounds`` rounds, the
fastest of each kept) so that load from other processes hits all sizes alike:

- decode: ms per generated token at batch 1 on one thread, as `reasonspec bench`
  runs each model on one core;
- training: mean seconds per optimizer step over one group of real batches of the
  model's chain style, on 1 thread and on all, times ``max_steps``, plus the evaluations ``train`` runs (greedy
  decoding of the validation problems at batch 50, timed per decode step over a
  chain-long context), gives the estimate of a full run. With other processes on
  the cores, 2 threads wait on each other: measured under a load of ~3 on 2 cores,
  the small model took 1.6 s per step on 2 threads and 0.27 s on 1.
"""

from __future__ import annotations

import argparse
import json
import os
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
    evalstep: dict[tuple[str, int], float] = {}
    train: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            model.eval()
            torch.set_num_threads(1)
            dec[name] = min(dec.get(name, 1e9), decode_ms(model, prompt, args.decode_tokens))
            make = Batches(enc[name], SPECS[name], "speed", args.batch_size, SPECS[name].max_steps, [], torch.device("cpu"))
            for n in sorted({1, threads}):
                torch.set_num_threads(n)
                model.eval()
                evalstep[name, n] = min(evalstep.get((name, n), 1e9), decode_ms(model, context, 16, batch=50))
                model.train()
                train[name, n] = min(train.get((name, n), 1e9), train_s_per_step(model, SPECS[name], make))
            torch.set_num_threads(threads)
    report: dict = {}
    evals_per_run = {name: spec.max_steps // args.eval_every + 1 for name, spec in SPECS.items()}  # + the test evaluation
    for name, spec in SPECS.items():
        report[name] = {
            "params": sum(p.numel() for p in models[name].parameters()),
            "decode_ms_per_token": round(dec[name], 3),
            "decode_ratio_vs_small": round(dec[name] / dec["small"], 2),
            "max_steps": spec.max_steps,
        }
        for n in sorted({1, threads}):
            eval_min = evals_per_run[name] * (args.val_problems / 50) * args.eval_tokens * evalstep[name, n] / 1000 / 60
            report[name][f"{n}_threads"] = {
                "train_s_per_step": round(train[name, n], 2),
                "eval_minutes": round(eval_min, 1),
                "estimate_minutes": round(spec.max_steps * train[name, n] / 60 + eval_min, 1),
            }
    for n in sorted({1, threads}):
        total = sum(report[m][f"{n}_threads"]["estimate_minutes"] for m in SPECS)
        report[f"total_estimate_minutes_{n}_threads"] = round(total, 1)
    report["setup"] = {"batch_size": args.batch_size, "decode_threads": 1, "load_average": os.getloadavg()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
