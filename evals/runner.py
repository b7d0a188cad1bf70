"""The eval runner: problems through an Orchestrator, graded, one JSONL line per result.

An eval folder holds:

- ``results.jsonl``: one line per finished (problem id, sample), written and flushed as it
  finishes, so a crash or Ctrl-C loses nothing finished;
- ``errors.jsonl``: one line per failed solve; failures stay out of ``results.jsonl`` so a
  resumed run does them again;
- ``summary.json`` and ``summary.md``: computed from ``results.jsonl``, so the summary of a
  resumed run covers every session of it.

Each result line records its session (``run``) and the seconds since that session began
(``elapsed_s``), which is how the total wall time of a run resumed after a crash is known.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import statistics
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from evals.breakdown import print_breakdown, time_summary, worker_time
from evals.datasets import Problem, load_dataset
from evals.grading import default_grader, grade
from evals.progress import progress_bar
from evals.report import build_report, fmt, markdown_table
from orchestrator.config import RunConfig, load_config
from orchestrator.core import Orchestrator
from orchestrator.session import Result
from orchestrator.timing import LoopMeter
from workers.protocol import WorkerStats

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
RUN_CONFIG = "run_config.json"
ONLINE_JSON = "online.json"  # online draft adaptation's report (orchestrator.online)
#: What a resume may change without mixing runs: how many problems and samples (a longer run
#: extends a shorter one), how many are in flight, where the folder is, and where workers run.
#: Everything else in ``run_config.json`` (models, policy, sampling, prompt, dataset) must match.
RESUMABLE_CHANGES = frozenset({"config.eval.limit", "config.eval.samples", "config.eval.concurrency",
                               "config.eval.out", "config.ray"})

Key = tuple[str, int]  # (problem id, sample index)

log = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """An eval that cannot start or continue: existing results, a corrupt results file."""


class RunChangedError(EvalError):
    """A resume whose config or problems differ from the run in the folder (it would mix two runs)."""


async def run_eval(
    orch: Orchestrator,
    problems: Sequence[Problem],
    out_dir: Path,
    *,
    concurrency: int,
    samples: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    dataset: str | None = None,
    grade_timeout: float = 5.0,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Solve and grade every (problem, sample) and return the summary (also written to ``out_dir``).

    At most ``concurrency`` solves are in flight; sample ``i`` is solved with ``seed=i``.
    ``resume`` skips the pairs already in ``out_dir/results.jsonl``; without it an existing
    results file is an error unless ``overwrite`` starts the folder afresh. ``dataset`` labels
    the summary (default: the problems' ``meta["dataset"]``).

    The run's resolved config is recorded in ``out_dir/run_config.json``; a resume whose
    config differs (beyond ``RESUMABLE_CHANGES``) or whose finished problems now read
    differently raises ``RunChangedError`` unless ``allow_config_change``.

    A failed solve goes to ``errors.jsonl`` and the run goes on; workers that cannot report
    their counters at the end leave those summary fields None. The summary says whether the
    run is ``complete``; when the run is cancelled (Ctrl-C), the summary of what finished is
    written before the cancellation goes on.
    """
    if concurrency < 1 or samples < 1:
        raise ValueError("concurrency and samples must be at least 1")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise EvalError("problem ids are not unique; results are keyed by them")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path, errors_path = out_dir / RESULTS, out_dir / ERRORS
    if resume:
        previous = load_records(results_path)
        load_records(errors_path, unique=False)  # repair a cut last line before appending
    elif results_path.exists() and results_path.stat().st_size > 0 and not overwrite:
        raise EvalError(f"{results_path} already has results: resume the run, or overwrite it")
    else:
        previous = []
        for path in (results_path, errors_path, out_dir / SUMMARY_JSON, out_dir / SUMMARY_MD):
            path.unlink(missing_ok=True)
    label = dataset or _dataset_label(problems)
    identity = {"config": orch.config.model_dump(mode="json"), "dataset": label}
    if resume and not allow_config_change:
        _refuse_changed_run(out_dir, identity, previous, problems)
    (out_dir / RUN_CONFIG).write_text(json.dumps(identity, indent=1) + "\n")

    wanted = {(p.id, s) for p in problems for s in range(samples)}
    done = {_key(r) for r in previous}
    todo = [(p, s) for s in range(samples) for p in problems if (p.id, s) not in done]
    run_index = max((r.get("run", 0) for r in previous), default=0) + 1

    await orch.start()
    stats_before = await _worker_stats(orch)
    spec_before = _spec_counters(stats_before)
    tally = _Tally([r for r in previous if _key(r) in wanted])
    bar = progress_bar(total=len(wanted), initial=tally.records, desc=orch.config.name, unit="solve",
                       disable=not progress)  # a bar on a terminal, one line per config in a log
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def solve(problem: Problem, sample: int, results: IO[str], errors: IO[str]) -> None:
        async with sem:
            try:
                result = await orch.asolve(problem.problem, id=problem.id, seed=sample)
            except Exception as e:  # this problem failed, the run goes on; a resume retries it
                _append(errors, {"id": problem.id, "sample": sample, "run": run_index,
                                 "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                                 "finished_at": time.time()})
                tally.errors += 1
                bar.set_postfix_str(tally.postfix(time.perf_counter() - t0), refresh=False)
                return
        correct = await asyncio.to_thread(grade, result.text, problem.answer, grade_timeout)
        record = result_record(problem, sample, result, correct, run=run_index, elapsed_s=time.perf_counter() - t0)
        _append(results, record)
        tally.add(record)
        bar.set_postfix_str(tally.postfix(time.perf_counter() - t0), refresh=False)
        bar.update()

    def finish(stats_after: dict[str, WorkerStats] | None, loop: dict[str, Any] | None) -> dict[str, Any]:
        """Write the summary of what is in the folder now (with this session's counters, when known)."""
        spec_after = _spec_counters(stats_after)
        spec = None
        if spec_before is not None and spec_after is not None:
            spec = {k: spec_after[k] - spec_before[k] for k in spec_after}
            if resume:  # worker counters are per process: add those of the earlier sessions
                earlier = _read_json(out_dir / SUMMARY_JSON)
                spec = {k: v + (earlier.get(k) or 0) for k, v in spec.items()}
        records = [r for r in load_records(results_path) if _key(r) in wanted]
        failed = ({_key(r) for r in load_records(errors_path, unique=False)} & wanted) - {_key(r) for r in records}
        summary = summarize(
            records,
            config=orch.config.name,
            policy=orch.policy_name,
            policy_params=orch.config.policy.model_dump(),
            models={role: m.path for role, m in orch.config.models.items()},
            dataset=label,
            problems=len(problems),
            samples=samples,
            errors=len(failed),
            spec=spec,
            workers=worker_time(stats_before, stats_after) if stats_before and stats_after else None,
            loop=loop,
        )
        if orch.adapter is not None:  # online draft adaptation: one line here, its whole report in online.json
            report = orch.adapter.report()
            (out_dir / ONLINE_JSON).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            summary["online"] = orch.adapter.summary_line()
        write_summary(out_dir, summary)
        return summary

    meter = LoopMeter().start()
    try:
        with results_path.open("a", encoding="utf-8") as results, errors_path.open("a", encoding="utf-8") as errors:
            async with asyncio.TaskGroup() as tg:
                if todo:  # start a grading process while the first problems are being solved
                    tg.create_task(asyncio.to_thread(default_grader().warm_up))
                for problem, sample in todo:
                    tg.create_task(solve(problem, sample, results, errors))
    except asyncio.CancelledError:  # Ctrl-C (asyncio.run cancels its task): summarize what finished, then stop
        finish(None, meter.stop())
        raise
    finally:
        bar.close()
    loop = meter.stop()
    return finish(await _worker_stats(orch), loop)


def result_record(problem: Problem, sample: int, result: Result, correct: bool, *, run: int,
                  elapsed_s: float) -> dict[str, Any]:
    """The results.jsonl line of one solved (problem, sample)."""
    return {
        "id": problem.id,
        "sample": sample,
        "correct": correct,
        "answer": result.answer,
        "gold": problem.answer,
        "policy": result.policy,
        **result.summary_row(),
        "run": run,
        "elapsed_s": round(elapsed_s, 4),
        "finished_at": time.time(),
        "problem": problem.problem,
        "segments": [seg.model_dump() for seg in result.segments],
    }


def summarize(records: Sequence[Mapping[str, Any]], *, config: str, policy: str, dataset: str, problems: int,
              samples: int, errors: int, spec: Mapping[str, int] | None, policy_params: Mapping[str, Any] | None = None,
              models: Mapping[str, str] | None = None, workers: Mapping[str, Any] | None = None,
              loop: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a run from its result records (see ``result_record``).

    Accuracy is pass@1 averaged over samples. ``large_token_share`` counts accepted tokens
    (what ended up in the reasoning); written tokens are reported beside it. Total wall time
    adds up each session's time to its last result. ``spec`` None: the workers' token-level
    speculation counters are unknown. ``complete``: every (problem, sample) has a result.
    ``time``: the run's time breakdown (``evals.breakdown``) from the records, the workers'
    counters over this session (``workers``, from ``worker_time``) and the event loop
    (``loop``, from ``LoopMeter``); ``efficiency`` is its critical path's model time over wall time.
    """
    def total(key: str) -> int:
        return sum(r.get(key) or 0 for r in records)

    by_sample: dict[int, list[bool]] = {}
    for r in records:
        by_sample.setdefault(r["sample"], []).append(bool(r["correct"]))
    session_wall: dict[int, float] = {}
    for r in records:
        session_wall[r.get("run", 1)] = max(session_wall.get(r.get("run", 1), 0.0), r.get("elapsed_s") or 0.0)
    wall = sum(session_wall.values())
    accepted_small, accepted_large = total("accepted_tokens_small"), total("accepted_tokens_large")
    proposed = total("proposed")
    written = total("tokens_small") + total("tokens_large")
    time_section = time_summary(records, workers, loop)
    return {
        "config": config,
        "policy": policy,
        "policy_params": dict(policy_params or {}),
        "models": dict(models or {}),
        "dataset": dataset,
        "n": len({r["id"] for r in records}),
        "problems": problems,
        "samples": samples,
        "completed": len(records),
        "accuracy": statistics.fmean(statistics.fmean(v) for v in by_sample.values()) if by_sample else None,
        "mean_latency_s": statistics.fmean(r["latency_s"] for r in records) if records else None,
        "total_wall_s": round(wall, 3),
        "throughput_problems_per_s": len(records) / wall if wall > 0 else None,
        "tokens_per_s": written / wall if wall > 0 else None,
        "tokens_small": total("tokens_small"),
        "tokens_large": total("tokens_large"),
        "accepted_tokens_small": accepted_small,
        "accepted_tokens_large": accepted_large,
        "large_token_share": (accepted_large / (accepted_small + accepted_large)
                              if accepted_small + accepted_large else None),
        "forward_passes_large": total("forward_passes_large"),
        "prompt_tokens": total("prompt_tokens"),
        "cached_prompt_tokens": total("cached_prompt_tokens"),
        "proposed": proposed,
        "accepted": total("accepted"),
        "acceptance_rate": total("accepted") / proposed if proposed else None,
        "handoffs": total("handoffs"),
        "spec_proposed_tokens": spec.get("spec_proposed_tokens", 0) if spec is not None else None,
        "spec_accepted_tokens": spec.get("spec_accepted_tokens", 0) if spec is not None else None,
        "errors": errors,
        "complete": len(records) == problems * samples,
        "runs": len(session_wall),
        "efficiency": time_section["problems"]["efficiency"],
        "time": time_section,
    }


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / SUMMARY_MD).write_text(
        f"# {summary['config']} on {summary['dataset']}\n\n"
        + markdown_table([{"metric": k, "value": v} for k, v in summary.items() if k != "time"], ("metric", "value"))
    )


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    """The summary as a two-column table on the terminal, then its time breakdown."""
    console = console or Console()
    table = Table("metric", "value", title=f"{summary.get('config')} on {summary.get('dataset')}")
    for key, value in summary.items():
        if key != "time":
            table.add_row(key, fmt(value))
    console.print(table)
    print_breakdown(summary.get("time"), console)


def load_records(path: Path, unique: bool = True) -> list[dict[str, Any]]:
    """The records of a JSONL file written by the runner, repairing what a crash leaves.

    A truncated last line is dropped and, when ``unique``, a repeated (id, sample) keeps its
    first line; the file is then rewritten cleanly (atomically) so that appending to it is
    safe. Damage anywhere else is an error rather than silent data loss.
    """
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    repaired = bool(text) and not text.endswith("\n")
    records: list[dict[str, Any]] = []
    seen: set[Key] = set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            repaired = True
            continue
        try:
            record = json.loads(line)
            key = _key(record)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            if lineno == len(lines):  # the line being written when the process died
                repaired = True
                continue
            raise EvalError(f"{path}, line {lineno}: not a result record ({e}); fix or remove the line") from None
        if unique and key in seen:
            repaired = True
            continue
        seen.add(key)
        records.append(record)
    if repaired:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
    return records


async def run_bench(
    config_names: Sequence[str],
    dataset: str,
    limit: int | None,
    concurrency: int,
    out_dir: Path,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    dataset_path: str | Path | None = None,
    fields: Mapping[str, str] | None = None,
    samples: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """The same problems through each config in turn; one eval folder each, then one table and plot.

    One Orchestrator at a time (started, run, closed) keeps memory to one run's models.
    Writes ``out_dir/<config-slug>/`` eval folders and ``bench.json``, ``bench.md`` and
    ``bench.png`` in ``out_dir``; ``speedup`` is against the first config.

    ``rounds`` > 1 interleaves the configs: the problems are cut into that many consecutive
    slices and every config runs slice 1, then every config slice 2, and so on (each slice a
    resumed session of the config's folder; wall times add up per session). On a shared machine
    whose speed drifts over minutes, a drift then reaches every config alike instead of whichever
    ran during it. The time breakdown of a config covers its last slice.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    problems = load_dataset(dataset, path=dataset_path, limit=limit, fields=fields)
    out_dir = Path(out_dir)
    dirs: list[Path] = []
    for name in config_names:
        dirs.append(out_dir / _slug(name, taken={d.name for d in dirs}))
    rounds = min(rounds, len(problems)) or 1
    for r in range(rounds):
        upto = problems[: round(len(problems) * (r + 1) / rounds)]
        for name, run_dir in zip(config_names, dirs):
            await eval_config(load_config(name, overrides), upto, run_dir, concurrency=concurrency, samples=samples,
                              resume=resume or r > 0, overwrite=overwrite and r == 0, progress=progress,
                              dataset=dataset)
    rows = build_report(dirs, out_dir / "bench.md")
    (out_dir / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


async def eval_config(config: RunConfig, problems: Sequence[Problem], out_dir: Path, **kwargs: Any) -> dict[str, Any]:
    """``run_eval`` of one config on fresh workers, closed afterwards (bench and sweep run configs this way).

    Fresh workers per config keep memory to one run's models and keep one run's KV caches from
    serving the next run's identical prompts, which would flatter the latency of later runs.
    """
    orch = Orchestrator(config)
    try:
        return await run_eval(orch, problems, out_dir, **kwargs)
    finally:
        await orch.aclose()


# ---------------------------------------------------------------- helpers


class _Tally:
    """Running numbers for the progress bar."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = len(records)
        self.correct = sum(bool(r["correct"]) for r in records)
        self.tokens = 0  # written in this session
        self.errors = 0

    def add(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        self.correct += bool(record["correct"])
        self.tokens += record["tokens_small"] + record["tokens_large"]

    def postfix(self, elapsed: float) -> str:
        acc = f"{self.correct / self.records:.3f}" if self.records else "-"
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        return f"acc={acc} tok/s={tps:.0f}" + (f" errors={self.errors}" if self.errors else "")


def _key(record: Mapping[str, Any]) -> Key:
    return str(record["id"]), int(record["sample"])


def _append(fh: IO[str], record: Mapping[str, Any]) -> None:
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    fh.flush()


async def _worker_stats(orch: Orchestrator) -> dict[str, WorkerStats] | None:
    """The orchestrator's workers' counters by role.

    None when a worker cannot say (its Ray actor out of restarts, say): the counters are
    a detail of the summary, which must still be written from the results that finished.
    """
    try:
        return await orch.stats()
    except Exception as e:
        log.warning("worker counters unavailable, the summary leaves them out: %s: %s", type(e).__name__, e)
        return None


def _spec_counters(by_role: Mapping[str, WorkerStats] | None) -> dict[str, int] | None:
    """Token-level speculation counters summed over roles (None when the workers could not say)."""
    if by_role is None:
        return None
    stats = by_role.values()
    return {
        "spec_proposed_tokens": sum(s.spec_proposed_tokens for s in stats),
        "spec_accepted_tokens": sum(s.spec_accepted_tokens for s in stats),
    }


def _refuse_changed_run(out_dir: Path, identity: Mapping[str, Any], previous: Sequence[Mapping[str, Any]],
                        problems: Sequence[Problem]) -> None:
    """Raise ``RunChangedError`` naming what differs between the folder's run and this one."""
    recorded = _read_json(out_dir / RUN_CONFIG)  # a folder from before run_config.json: nothing to compare
    changes = _changes(recorded, identity) if recorded else []
    now = {p.id: (p.problem, p.answer) for p in problems}
    reworded = sorted({i for r in previous
                       if (i := str(r["id"])) in now and now[i] != (r.get("problem"), r.get("gold"))})
    if reworded:
        changes.append(f"problems: {len(reworded)} finished problem(s) now read differently (id {reworded[0]!r})")
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise RunChangedError(f"{out_dir} holds another run ({shown}): resume it with the same config, allow the "
                              f"change (--allow-config-change), or start afresh (--overwrite)")


def _changes(old: Any, new: Any, key: str = "") -> list[str]:
    """``key: old -> new`` for each leaf that differs, outside ``RESUMABLE_CHANGES``."""
    if key in RESUMABLE_CHANGES:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in dict.fromkeys([*old, *new]):
            sub = f"{key}.{k}" if key else str(k)
            if k in old and k in new:
                out += _changes(old[k], new[k], sub)
            elif sub not in RESUMABLE_CHANGES:
                out.append(f"{_shown(sub)}: {_short(old.get(k, '(unset)'))} -> {_short(new.get(k, '(unset)'))}")
        return out
    return [] if old == new else [f"{_shown(key)}: {_short(old)} -> {_short(new)}"]


def _shown(key: str) -> str:
    """A ``run_config.json`` key as the config spells it (``config.policy.threshold`` -> ``policy.threshold``)."""
    return key.removeprefix("config.")


def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _dataset_label(problems: Sequence[Problem]) -> str:
    names = sorted({str(p.meta.get("dataset")) for p in problems if p.meta.get("dataset")})
    return "+".join(names) or "custom"


def _slug(name: str, taken: set[str]) -> str:
    """A folder name for a config name or path, unique among ``taken``."""
    stem = str(Path(name).with_suffix("")) if name.endswith((".yaml", ".yml")) else name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "config"
    unique, i = slug, 2
    while unique in taken:
        unique, i = f"{slug}-{i}", i + 1
    return unique
