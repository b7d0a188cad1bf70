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
5. Hand-off cost of a worker in a process of its own (``process: true``): sequential
   8-token score calls on the large arith model, in this process and in a child process,
   each call's wall time minus the worker's own account of it (queue, prefill, decode):
   what the thread and process hops add per call.
6. Churn: LargeOnly on 48 arith problems at concurrency 16, so rows keep joining the
   decode batch as others leave (problems/s, tokens/s): what changing the batch costs.

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
from workers.hf_backend import HFWorker, load_tokenizer
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


async def _large_only(n: int, concurrency: int) -> tuple[float, list]:
    """Wall time and results of LargeOnly on the first ``n`` arith problems at ``concurrency``."""
    problems = load_dataset("arith", limit=n)
    orch = Orchestrator(load_config("arith/large-only"))
    await orch.start()
    try:
        t = time.perf_counter()
        results = await orch.asolve_batch([p.problem for p in problems], concurrency=concurrency,
                                          ids=[p.id for p in problems])
        return time.perf_counter() - t, results
    finally:
        await orch.aclose()


async def batching(n: int = 32) -> dict:
    out = {}
    for conc in (1, n):
        wall, _ = await _large_only(n, conc)
        out[f"concurrency_{conc}_problems_per_s"] = n / wall
    out["speedup"] = out[f"concurrency_{n}_problems_per_s"] / out["concurrency_1_problems_per_s"]
    return out


async def churn(n: int = 48, concurrency: int = 16) -> dict:
    wall, results = await _large_only(n, concurrency)
    tokens = sum(r.metrics.tokens.get("large", 0) for r in results)
    return {"problems": n, "concurrency": concurrency, "problems_per_s": n / wall, "tokens_per_s": tokens / wall}


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


async def handoff(calls: int = 200, step: int = 8) -> dict:
    from functools import partial

    from orchestrator.pool import create_local_worker
    from orchestrator.prompting import prompt_ids, to_messages
    from workers.process_worker import ProcessWorker

    cfg = load_config("arith/large-only").models["large"]
    out = {}
    for where in ("in_process", "child_process"):
        w = create_local_worker(cfg) if where == "in_process" else ProcessWorker(partial(create_local_worker, cfg),
                                                                                 name="large")
        try:
            ids = list(prompt_ids(load_tokenizer(cfg.resolved_path()), to_messages("53 + 51 - 6 + 20 - 99")))
            chain = ids + (await w.generate(ids, GenParams(max_tokens=calls * step // 2))).token_ids
            chain += chain[len(ids):] * 2  # long enough for every call (the ids' values do not matter here)
            extra, model = [], []
            for i in range(calls):
                at = len(ids) + (i % (calls // 2)) * step
                t = time.perf_counter()
                s = await w.score(chain[:at], chain[at : at + step])
                wall = time.perf_counter() - t
                extra.append(wall - s.timing.model_s - s.timing.queue_s)
                model.append(s.timing.model_s)
            out[f"{where}_handoff_ms"] = statistics.median(extra) * 1000
            out[f"{where}_model_ms"] = statistics.median(model) * 1000
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
    if "handoff" in which:
        results["handoff"] = await handoff()
    if "churn" in which:
        results["churn"] = await churn()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=["decode", "kv", "batching", "overhead", "handoff", "churn"],
                    choices=["decode", "kv", "batching", "overhead", "handoff", "churn"])
    asyncio.run(main(ap.parse_args().only))
