"""Drafts from the target's own weights, measured: ``python -m evals.bench_drafts``.

An arith world's large model alone (``--world arith2``, the default, or ``arith``: the first
pair), with its int8 copy as the draft (ML-SpecQD), with the multi-level
variant (the small model drafting for the int8 copy) and with Kangaroo (its first layers and an
adapter trained by ``python -m evals.kangaroo_adapter``), on the same test problems, one request at a time (ms/token is latency, not
throughput). Configurations are interleaved repeat by repeat, so that load drifts hit all of them
alike, and every speculative run's tokens are checked against the plain model's.

Per configuration and repeat: ms per generated token and, per draft level, accepted draft tokens
per verification and the acceptance rate. Prints one JSON line per (repeat, configuration) and a
summary with the spread (min-max over repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

from evals.arith.problems import ArithGenerator
from evals.kangaroo_adapter import WORLDS, world_models
from orchestrator.config import SpeculativeConfig
from orchestrator.prompting import prompt_ids, to_messages
from workers.hf_backend import HFWorker
from workers.hf_drafts import draft_levels
from workers.protocol import GenParams

def configs(world: str, k: int, adapter: Path) -> dict[str, SpeculativeConfig | None]:
    small = SpeculativeConfig(method="draft", model=str(world_models(world) / "small"),
                              num_speculative_tokens=max(1, k - 1))
    return {
        "large alone": None,
        "int8 draft": SpeculativeConfig(method="quantized", num_speculative_tokens=k),
        "int8 draft + small below": SpeculativeConfig(method="quantized", num_speculative_tokens=k, draft=small),
        "kangaroo": SpeculativeConfig(method="kangaroo", model=str(adapter), num_speculative_tokens=k),
    }


async def run_once(worker: HFWorker, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    params = GenParams(max_tokens=max_tokens)
    out, t = [], time.perf_counter()
    for p in prompts:
        out.append((await worker.generate(p, params)).token_ids)
    return out, time.perf_counter() - t


async def bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    large = str(world_models(args.world) / "large")
    workers = {name: HFWorker(large, speculative=spec, threads=args.threads)
               for name, spec in configs(args.world, args.k, args.adapter).items()}
    tok = workers["large alone"].tokenizer
    prompts = [prompt_ids(tok, to_messages(p.text)) for p in ArithGenerator("test", seed=args.seed).take(args.n)]
    results: dict[str, list[dict]] = {name: [] for name in workers}
    try:
        for w in workers.values():  # warm-up: first-call costs out of the measurement
            await w.generate(prompts[0], GenParams(max_tokens=8))
        want = None
        for rep in range(args.repeats):
            for name, w in workers.items():
                before = [dict(level) for level in draft_levels(w)]
                ids, seconds = await run_once(w, prompts, args.max_tokens)
                if name == "large alone":
                    want = want or ids
                tokens = sum(map(len, ids))
                levels = []
                for now, was in zip(draft_levels(w), before):  # this run's counts: the counters only grow
                    d = {k: now[k] - was[k] for k in ("drafts", "proposed", "accepted", "early_stops")}
                    levels.append({"draft": now["draft"], **d,
                                   "accepted_per_draft": round(d["accepted"] / d["drafts"], 3) if d["drafts"] else 0.0,
                                   "acceptance": round(d["accepted"] / d["proposed"], 3) if d["proposed"] else 0.0})
                rec = {"repeat": rep, "config": name, "tokens": tokens, "ms_per_token": round(1000 * seconds / tokens, 3),
                       "same_tokens_as_large": ids == want, "levels": levels}
                results[name].append(rec)
                print(json.dumps(rec), flush=True)
    finally:
        for w in workers.values():
            await w.close()
    summary = {}
    for name, recs in results.items():
        ms = [r["ms_per_token"] for r in recs]
        apd = [r["levels"][0]["accepted_per_draft"] for r in recs if r["levels"]]
        summary[name] = {"ms_per_token": ms, "accepted_per_draft_top_level": apd,
                         "all_same_tokens": all(r["same_tokens_as_large"] for r in recs)}
    print(json.dumps({"summary": summary, "world": args.world, "problems": args.n, "repeats": args.repeats,
                      "threads": args.threads,
                      "k": args.k, "max_tokens": args.max_tokens}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=WORLDS, default="arith2")
    ap.add_argument("--n", type=int, default=20, help="test problems")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per verification (the top level)")
    ap.add_argument("--max-tokens", type=int, default=600, help="the arith2 large model writes ~490 tokens a problem")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapter", type=Path, required=True,
                    help="a Kangaroo adapter for the world's large model (python -m evals.kangaroo_adapter --out DIR)")
    asyncio.run(bench(ap.parse_args()))


if __name__ == "__main__":
    main()
