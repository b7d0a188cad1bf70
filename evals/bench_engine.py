"""Engine measurements on the arith models: ``python -m evals.bench_engine``.

1. KV reuse: a 20-token step generated after a cached ~1,000-token context, against
   the same step after a short fresh prompt (the issue's target: at most 2x).
2. Batching: LargeOnly on 32 arith problems at concurrency 32 against concurrency 1
   (problems/s; target: at least 4x).
3. Per-token decode time of the small and the large model (the pair's speed gap).
4. Per-call engine overhead against context length: sequential 8-token verification
   (score) and generation calls extending one chain of 1k to 32k tokens, on a randomly
   initialised 2-layer model with a 131k vocabulary (tekken), so the model's own time is
   small; reported is each call's wall time outside the forward passes (prefix-cache
   lookup and insertion, id conversion, stacking, the engine thread's hand-offs), which
   should not grow with the context.

Ratios are taken within one run on one machine; absolute numbers depend on load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from transformers import AutoTokenizer

from evals.datasets import load_dataset
from orchestrator.config import load_config
from orchestrator.core import Orchestrator
from workers.hf_backend import HFWorker
from workers.protocol import GenParams


async def kv_reuse(path: str, context_tokens: int = 1000, step: int = 20, reps: int = 5) -> dict:
    w = HFWorker(path)
    try:
        tok = w.tokenizer
        filler = "\n\n".join(f"{i} + {i % 7} = {i + i % 7}" for i in range(10, 400))
        ctx = tok.encode(filler, add_special_tokens=False)[:context_tokens]
        short = tok.encode("12 + 5 = 17\n\n17 - 3 = 14\n\n", add_special_tokens=False)
        fixed = GenParams(max_tokens=step)
        await w.generate(ctx, GenParams(max_tokens=1))  # the context is now cached, as in a running session
        long_t, short_t = [], []
        for r in range(reps):
            new = tok.encode(f"{r} + 1 = {r + 1}\n\n", add_special_tokens=False)
            t = time.perf_counter()
            g = await w.generate(ctx + new, fixed)
            long_t.append(time.perf_counter() - t)
            assert g.cached_prompt_tokens >= len(ctx) - 1
            w.cache.clear()
            await w.generate(ctx, GenParams(max_tokens=1))
            t = time.perf_counter()
            await w.generate(short + new, fixed)
            short_t.append(time.perf_counter() - t)
        lt, st = sorted(long_t)[reps // 2], sorted(short_t)[reps // 2]
        return {"context_tokens": len(ctx), "step_tokens": step, "long_context_s": lt, "short_prompt_s": st,
                "ratio": lt / st}
    finally:
        await w.close()


async def batching(n: int = 32) -> dict:
    problems = load_dataset("arith", limit=n)
    out = {}
    for conc in (1, n):
        orch = Orchestrator(load_config("arith/large-only"))
        await orch.start()
        t = time.perf_counter()
        await orch.asolve_batch([p.problem for p in problems], concurrency=conc, ids=[p.id for p in problems])
        out[f"concurrency_{conc}_problems_per_s"] = n / (time.perf_counter() - t)
        await orch.aclose()
    out["speedup"] = out[f"concurrency_{n}_problems_per_s"] / out["concurrency_1_problems_per_s"]
    return out


async def decode_speed(tokens: int = 64) -> dict:
    out = {}
    for role in ("small", "large"):
        cfg = load_config(f"arith/{role}-only")
        w = HFWorker(cfg.models[role].resolved_path())
        ids = w.tokenizer.encode("12 + 5 - 3\n", add_special_tokens=False)
        await w.generate(ids, GenParams(max_tokens=8))
        best = float("inf")
        for _ in range(3):
            w.cache.clear()
            t = time.perf_counter()
            g = await w.generate(ids, GenParams(max_tokens=tokens))
            best = min(best, (time.perf_counter() - t) / len(g.token_ids))
        out[f"{role}_ms_per_token"] = best * 1000
        await w.close()
    out["large_over_small"] = out["large_ms_per_token"] / out["small_ms_per_token"]
    return out


async def call_overhead(contexts: tuple[int, ...] = (1024, 8192, 32768), calls: int = 30, step: int = 8) -> dict:
    import random

    from evals.bench_scale import random_model_folder, tekken_folder
    from workers.protocol import token_ids

    folder = random_model_folder(AutoTokenizer.from_pretrained(tekken_folder()))
    rng = random.Random(0)
    out = {}
    for n in contexts:
        w = HFWorker(str(folder), kv_cache_tokens=4 * max(contexts))
        try:
            vocab = len(w.tokenizer)
            chain = token_ids(rng.randrange(1000, vocab) for _ in range(n + 2 * calls * step))
            await w.generate(chain[:n], GenParams(max_tokens=1))  # the context is cached, as in a running session
            for kind in ("score", "generate"):
                spent = []
                for i in range(calls):
                    at = n + i * step
                    forward = w._stats.forward_s
                    t = time.perf_counter()
                    if kind == "score":
                        await w.score(chain[:at], chain[at : at + step].tolist())
                    else:
                        await w.generate(chain[:at], GenParams(max_tokens=step, temperature=1.0, seed=i))
                    spent.append(time.perf_counter() - t - (w._stats.forward_s - forward))
                out[f"{kind}_{n}_outside_model_ms"] = statistics.median(spent) * 1000
            out[f"cache_entries_{n}"] = len(w.cache)
        finally:
            await w.close()
    return out


async def main(which: list[str]) -> None:
    results = {}
    if "decode" in which:
        results["decode"] = await decode_speed()
    if "kv" in which:
        results["kv_reuse"] = await kv_reuse(load_config("arith/large-only").models["large"].resolved_path())
    if "batching" in which:
        results["batching"] = await batching()
    if "overhead" in which:
        results["call_overhead"] = await call_overhead()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=["decode", "kv", "batching", "overhead"],
                    choices=["decode", "kv", "batching", "overhead"])
    asyncio.run(main(ap.parse_args().only))
