"""Profile a short eval run per thread: the event loop and each hf engine thread, in CPU time.

    python -m evals.profile_threads -c arith/specreason --limit 5 [--top 25] [--out DIR]

cProfile sees only the thread that enables it, and wall-clock profiles are meaningless
on a machine whose cores other processes share, so each thread is profiled on its own
CPU clock (``time.thread_time``): shares of CPU and exact call counts stay true under
load, where timings do not. The hf engine threads are profiled by wrapping
``HFWorker._engine`` (the engine thread's body) for the run; the loop thread around the
eval. Prints, per thread, the functions with the most cumulative CPU time, and writes
``<thread>.prof`` files (pstats) to ``--out``; the run's own breakdown is in its summary.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import threading
import time
from pathlib import Path

from evals.datasets import load_dataset
from evals.runner import print_summary, run_eval
from orchestrator.config import load_config
from orchestrator.core import Orchestrator
from workers.hf_backend import HFWorker

_profiles: dict[str, cProfile.Profile] = {}
_lock = threading.Lock()


def _profiled_engine(engine):
    """``HFWorker._engine`` run under a per-thread CPU-time profiler, kept by thread name."""

    def run(self: HFWorker) -> None:
        prof = cProfile.Profile(time.thread_time)
        with _lock:
            _profiles[threading.current_thread().name] = prof
        prof.enable()
        try:
            engine(self)
        finally:
            prof.disable()

    return run


async def _main(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    problems = load_dataset(args.dataset, limit=args.limit)
    orch = Orchestrator(cfg)
    await orch.start()  # model loading stays out of the profile
    loop_prof = cProfile.Profile(time.thread_time)
    _profiles["event-loop"] = loop_prof
    loop_prof.enable()
    try:
        summary = await run_eval(orch, problems, Path(args.out) / "eval", concurrency=args.concurrency,
                                 overwrite=True, progress=False)
    finally:
        loop_prof.disable()
        await orch.aclose()
    print_summary(summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="arith/specreason")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--dataset", default="arith")
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="runs/profile")
    args = ap.parse_args()
    HFWorker._engine = _profiled_engine(HFWorker._engine)
    asyncio.run(_main(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, prof in _profiles.items():
        slug = name.replace("/", "_").replace(":", "_")
        prof.dump_stats(out / f"{slug}.prof")
        stats = pstats.Stats(prof)
        print(f"\n===== {name}: {stats.total_tt:.3f} s CPU")
        stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
