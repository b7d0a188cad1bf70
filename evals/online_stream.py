"""Acceptance over a stream of problems, with and without online draft adaptation (issue 17, part 4).

    python -m evals.online_stream --config arith/speculative --limit 100 --blocks 4 --out /tmp/online.json

Each arm starts its own workers (a swap changes the draft inside its worker) and
solves the same held-out problems in order, ``concurrency`` at a time; acceptance
is reported per block of consecutive problems, so a draft that improves shows it
in the later blocks. The online arm's adapter report (updates, gate numbers,
live acceptance per draft version) is included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from evals.datasets import load_dataset
from orchestrator import Orchestrator, load_config


async def run_arm(config: str, overrides: list[str], online: bool, problems: list, concurrency: int,
                  blocks: int) -> dict[str, Any]:
    orch = Orchestrator(load_config(config, [*overrides, f"online.enabled={str(online).lower()}"]))
    t0 = time.perf_counter()
    try:
        results = await orch.asolve_batch([p.problem for p in problems], concurrency=concurrency,
                                          ids=[p.id for p in problems])
        if orch.adapter is not None:
            await orch.adapter.drain()
        report = orch.adapter.report() if orch.adapter is not None else None
        line = orch.adapter.summary_line() if orch.adapter is not None else None
    finally:
        await orch.aclose()
    size = max(1, len(results) // blocks)
    rows = []
    for b in range(0, len(results), size):
        chunk = results[b : b + size]
        proposed = sum(r.metrics.proposed for r in chunk)
        accepted = sum(r.metrics.accepted for r in chunk)
        rows.append({"problems": f"{b + 1}-{b + len(chunk)}", "acceptance": round(accepted / max(proposed, 1), 4),
                     "proposed": proposed})
    correct = sum(r.answer == p.answer for r, p in zip(results, problems))
    return {"online": online, "blocks": rows, "accuracy": round(correct / len(problems), 4),
            "wall_s": round(time.perf_counter() - t0, 2), "adapter": report, "adaptation": line}


async def compare(config: str, limit: int, blocks: int, concurrency: int, overrides: list[str]) -> dict[str, Any]:
    problems = load_dataset("arith", split="test", limit=limit)
    arms = [await run_arm(config, overrides, online, problems, concurrency, blocks) for online in (False, True)]
    return {"config": config, "problems": limit, "overrides": overrides, "arms": arms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="arith/speculative")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], help="dotted override, e.g. online.interval=4")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    result = asyncio.run(compare(a.config, a.limit, a.blocks, a.concurrency, a.set))
    for arm in result["arms"]:
        name = "online" if arm["online"] else "static"
        print(f"{name:7s} acc {arm['accuracy']:.3f}  wall {arm['wall_s']:.1f}s  acceptance by block: "
              + ", ".join(f"{r['problems']}: {r['acceptance']:.3f}" for r in arm["blocks"]))
        if arm["adaptation"]:
            print(f"        {arm['adaptation']}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
