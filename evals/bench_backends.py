"""Raw speed of the worker backends on arith problems: start-up, one request, a batch.

    python -m evals.bench_backends --model evals/arith/models/small --backends hf vllm
    python -m evals.bench_backends --backends vllm --speculative ngram

Measures what the policies lean on, through the Worker protocol only: engine
start-up, greedy decoding of one problem (tokens/s), a batch of concurrent problems
(aggregate tokens/s), and one prefill-only score of a full solution. Prints one JSON
line per backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from evals.arith.problems import ArithGenerator
from workers.protocol import GenParams, Worker

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def start(backend: str, model: str, speculative: dict[str, Any] | None, device: str) -> Worker:
    if backend == "hf":
        from workers.hf_backend import HFWorker

        return HFWorker(model, device=device)
    from workers.vllm_backend import VLLMWorker

    return VLLMWorker.create(model, speculative=speculative, device=device)


async def measure(worker: Worker, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    params = GenParams(max_tokens=max_tokens)
    await worker.generate(prompts[0], GenParams(max_tokens=4))  # warm-up: first-request set-up costs
    t = time.perf_counter()
    one = await worker.generate(prompts[0], params)
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    outs = await asyncio.gather(*(worker.generate(p, params) for p in prompts))
    batch_s = time.perf_counter() - t
    t = time.perf_counter()
    await worker.score(prompts[-1], outs[-1].token_ids)
    score_s = time.perf_counter() - t
    stats = await worker.stats()
    return {
        "single_tokens_per_s": round(len(one.token_ids) / single_s, 1),
        "batch_size": len(prompts),
        "batch_tokens_per_s": round(sum(len(o.token_ids) for o in outs) / batch_s, 1),
        "score_ms": round(score_s * 1000, 1),
        "score_tokens": len(outs[-1].token_ids),
        "spec_acceptance": round(stats.spec_accepted_tokens / stats.spec_proposed_tokens, 3)
        if stats.spec_proposed_tokens else None,
    }


async def bench(args: argparse.Namespace) -> None:
    tok = AutoTokenizer.from_pretrained(args.model)
    problems = ArithGenerator(split="test", seed=args.seed).take(args.batch)
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": f"{p.text}\n{INSTRUCTION}"}],
                                     add_generation_prompt=True, return_dict=False))
        for p in problems
    ]
    speculative = None
    if args.speculative == "ngram":
        speculative = {"method": "ngram", "num_speculative_tokens": args.k,
                       "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    elif args.speculative:
        speculative = {"method": "draft", "model": args.speculative, "num_speculative_tokens": args.k}
    for backend in args.backends:
        t = time.perf_counter()
        worker = start(backend, args.model, speculative if backend == "vllm" else None, args.device)
        start_s = time.perf_counter() - t
        try:
            result = await measure(worker, prompts, args.max_tokens)
        finally:
            await worker.close()
        print(json.dumps({"backend": backend, "model": args.model, "speculative": args.speculative,
                          "start_s": round(start_s, 1), **result}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "evals/arith/models/small"))
    ap.add_argument("--backends", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    ap.add_argument("--speculative", default=None, help="vllm only: 'ngram' or a draft model folder")
    ap.add_argument("--k", type=int, default=4, help="speculative tokens per step")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    asyncio.run(bench(ap.parse_args()))


if __name__ == "__main__":  # vLLM spawns processes: start engines only from the main module
    main()
