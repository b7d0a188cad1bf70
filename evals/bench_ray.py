"""What Ray costs and what replicas buy, on the arith small model: ``python -m evals.bench_ray``.

1. Round trip per call, in-process worker vs the same worker in a Ray actor:
   an almost empty call (``stats()``) and a short greedy generation (``--tokens``).
   The difference is the price of the actor boundary (serialisation, two gRPC hops).
2. Throughput (problems/s) of the ``arith/small-only`` config on ``--problems`` test
   problems at ``--concurrency`` (median of ``--repeats`` batches of fresh problems):
   in-process, and on a local Ray instance with 1 and 2 replicas.

Numbers depend on the machine and on whatever else runs on it; the table says how
many CPUs it had.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from evals.arith.problems import ArithGenerator
from orchestrator.config import RunConfig, load_config
from orchestrator.core import Orchestrator
from orchestrator.pool import create_local_worker
from orchestrator.prompting import prompt_ids, to_messages
from orchestrator.ray_pool import start_ray_workers
from workers.protocol import GenParams, Worker

CONFIG = "arith/small-only"


async def _ms_per_call(call: Callable[[], Awaitable[Any]], n: int) -> dict[str, float]:
    await call()  # warm: first-call costs (thread start, prefix cache) are not the steady state
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times)}


async def round_trips(worker: Worker, prompt: list[int], tokens: int, n: int) -> dict[str, dict[str, float]]:
    params = GenParams(max_tokens=tokens)
    return {
        "stats": await _ms_per_call(worker.stats, n),
        f"generate_{tokens}": await _ms_per_call(lambda: worker.generate(prompt, params), n),
    }


async def throughput(config: RunConfig, batches: list[list[str]], concurrency: int) -> dict[str, Any]:
    """Problems/s of each batch (fresh problems each, so no batch rides on another's cache); median reported."""
    orch = Orchestrator(config)
    try:
        await orch.start()
        await orch.asolve("1 + 1")  # warm
        rates = []
        for batch in batches:
            t0 = time.perf_counter()
            await orch.asolve_batch(batch, concurrency=concurrency)
            rates.append(len(batch) / (time.perf_counter() - t0))
    finally:
        await orch.aclose()
    return {"problems_per_s": statistics.median(rates), "runs": rates}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    base = load_config(CONFIG)
    tokenizer = AutoTokenizer.from_pretrained(base.models["small"].resolved_path())
    pool = [p.text for p in ArithGenerator(split="test", seed=0).take(args.problems * args.repeats)]
    batches = [pool[i * args.problems:(i + 1) * args.problems] for i in range(args.repeats)]
    prompt = prompt_ids(tokenizer, to_messages(pool[0]))
    ray_cfg = load_config(CONFIG, {"ray.address": "local"})

    local = create_local_worker(base.models["small"])
    remote = (await start_ray_workers(ray_cfg, ("small",)))["small"]
    try:
        calls = {
            "in_process": await round_trips(local, prompt, args.tokens, args.calls),
            "ray_actor": await round_trips(remote, prompt, args.tokens, args.calls),
        }
    finally:
        await local.close()
        await remote.close()

    runs = {"in_process": await throughput(base, batches, args.concurrency)}
    for replicas in (1, 2):
        cfg = load_config(CONFIG, {"ray.address": "local", "models.small.replicas": replicas})
        runs[f"ray_replicas_{replicas}"] = await throughput(cfg, batches, args.concurrency)
    return {
        "cpus": os.cpu_count(), "problems": args.problems, "repeats": args.repeats, "concurrency": args.concurrency,
        "round_trip": calls, "throughput": runs,
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"\nround trip per call, median (mean) ms, {report['cpus']} CPUs")
    for where, calls in report["round_trip"].items():
        cells = "  ".join(f"{name}: {c['median_ms']:.2f} ({c['mean_ms']:.2f})" for name, c in calls.items())
        print(f"  {where:<11} {cells}")
    print(f"\n{CONFIG}: {report['problems']} problems at concurrency {report['concurrency']}, "
          f"median of {report['repeats']} batches")
    for name, r in report["throughput"].items():
        runs = ", ".join(f"{x:.1f}" for x in r["runs"])
        print(f"  {name:<16} {r['problems_per_s']:6.1f} problems/s  (batches: {runs})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches of --problems fresh problems each")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per timed generate call")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per kind")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    report = asyncio.run(main(args))
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
