"""A run's time breakdown: the summary's ``time`` section and the tables that show it.

Three views of the same run (``orchestrator.timing`` defines the per-problem terms):

- **problems**: each problem's wall time along its critical path, summed over the run:
  ``wall = model + queue + overhead + off_path + gap``, and ``efficiency = model / wall`` (the
  critical path's model time over the wall time; latency-weighted over problems);
- **calls** per model: calls, their wall time, model time (prefill, decode) and queue
  wait, summed over problems (calls in flight together each count whole);
- **workers**: each model's engine over the run (the difference of two ``stats()``
  snapshots): busy and idle time, prefill/decode phases, time inside forward passes,
  queue wait; and the **event loop**: the wall time it spent running code (policy,
  session, runner) and its thread's CPU time.

The problem and call views come from ``results.jsonl``, so they cover every session of
a resumed run; the worker and loop views are the last session's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from workers.protocol import WorkerStats

#: Problem-view terms, summed over problems.
PROBLEM_TERMS = ("wall_s", "critical_path_s", "queue_s", "overhead_s", "off_path_s", "gap_s")
#: Per-model call terms, summed over problems.
CALL_TERMS = ("calls", "call_s", "model_s", "prefill_s", "decode_s", "queue_s", "untimed")
#: Worker counters a run's breakdown takes the difference of.
WORKER_TERMS = ("busy_s", "idle_s", "clock_s", "cpu_s", "prefill_s", "decode_s", "forward_s", "queue_s",
                "forward_passes", "requests")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def worker_time(before: Mapping[str, WorkerStats], after: Mapping[str, WorkerStats]) -> dict[str, dict[str, Any]]:
    """Per model, what its worker did between two ``stats()`` snapshots (``busy_share``: busy over its clock)."""
    out: dict[str, dict[str, Any]] = {}
    for role, end in after.items():
        start = before.get(role, WorkerStats())
        row: dict[str, Any] = {k: getattr(end, k) - getattr(start, k) for k in WORKER_TERMS}
        row["busy_share"] = _ratio(row["busy_s"], row["clock_s"])
        out[role] = row
    return out


def time_summary(records: Sequence[Mapping[str, Any]], workers: Mapping[str, Any] | None = None,
                 loop: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary's ``time`` section from result records (their ``time``), worker diffs and the loop meter."""
    timed = [r["time"] for r in records if r.get("time")]
    # records written before off_path_s was split out of gap_s (a run resumed across versions) count it in gap_s
    problems: dict[str, Any] = {k: sum(t.get(k, 0.0) for t in timed) for k in PROBLEM_TERMS}
    problems["n"] = len(timed)
    problems["efficiency"] = _ratio(problems["critical_path_s"], problems["wall_s"])
    effs = [t["efficiency"] for t in timed if t.get("efficiency") is not None]
    problems["efficiency_min"] = min(effs) if effs else None
    calls: dict[str, dict[str, float]] = {}
    for t in timed:
        for role, rt in t["roles"].items():
            acc = calls.setdefault(role, dict.fromkeys(CALL_TERMS, 0))
            for k in CALL_TERMS:
                acc[k] += rt[k]
    out: dict[str, Any] = {"problems": problems, "calls": calls, "workers": dict(workers) if workers else None,
                           "loop": None}
    if loop is not None:
        out["loop"] = {**loop, "busy_share": _ratio(loop.get("busy_s"), loop.get("wall_s")),
                       "cpu_share": _ratio(loop.get("cpu_s"), loop.get("wall_s"))}
    return out


# ---------------------------------------------------------------- tables


def _s(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _table(*headers: str, title: str, first: str, first_width: int = 6) -> Table:
    """A light table that fits 80 columns: numbers right-aligned and never wrapped, names fold."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column(first, overflow="fold", min_width=max(len(first), first_width))
    for h in headers:
        table.add_column(h, justify="right", no_wrap=True)
    return table


def breakdown_tables(time: Mapping[str, Any], title: str = "") -> list[Table]:
    """The ``time`` section of one summary as rich tables: problems, calls per model, workers and the loop."""
    p = time["problems"]
    wall = p["wall_s"] or None
    t1 = _table("seconds", "of wall", first="term",
                title=f"{title} where the wall time went (critical path, {p['n']} problems)".strip())
    for key, label in (("critical_path_s", "model (critical path)"), ("queue_s", "queue in workers"),
                       ("overhead_s", "call overhead (hand-offs)"),
                       ("off_path_s", "waiting on calls off the path"), ("gap_s", "no call in flight"),
                       ("wall_s", "wall")):
        t1.add_row(label, _s(p[key]), _pct(_ratio(p[key], wall)))
    t1.caption = f"efficiency {_s(p['efficiency'])} (lowest problem {_s(p['efficiency_min'])})"
    t2 = _table("calls", "call", "model", "prefill", "decode", "queue", "ms/call", first="model",
                title="calls per model, seconds summed over problems")
    for role, c in time["calls"].items():
        t2.add_row(role, str(c["calls"]), _s(c["call_s"]), _s(c["model_s"]), _s(c["prefill_s"]), _s(c["decode_s"]),
                   _s(c["queue_s"]), f"{1000 * c['call_s'] / c['calls']:.2f}" if c["calls"] else "-")
    tables = [t1, t2]
    workers, loop = time.get("workers"), time.get("loop")
    if workers or loop:
        t3 = _table("busy", "busy %", "cpu", "prefill", "decode", "forward", "queue", "passes",
                    first="engine", title="engines over the run, seconds (idle time in the JSON)")
        for role, w in (workers or {}).items():
            t3.add_row(role, _s(w["busy_s"]), _pct(w["busy_share"]), _s(w.get("cpu_s")),
                       _s(w["prefill_s"]), _s(w["decode_s"]), _s(w["forward_s"]), _s(w["queue_s"]),
                       str(w["forward_passes"]))
        if loop:
            t3.add_row("loop", _s(loop["busy_s"]), _pct(loop["busy_share"]), _s(loop["cpu_s"]), "", "", "", "", "")
            t3.caption = ("cpu: the thread's CPU time; busy beyond it is time with work but no core, or "
                          "waiting for the GIL")
        tables.append(t3)
    return tables


def print_breakdown(time: Mapping[str, Any] | None, console: Console | None = None, title: str = "") -> None:
    if not time:
        return
    console = console or Console()
    for table in breakdown_tables(time, title):
        console.print(table)


def bench_breakdown_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """One line per config of a bench: efficiency, the problems' wall split, and engine and loop busy shares."""
    table = _table("eff", "model", "queue", "hand", "off", "gap", "small", "large", "loop", first="config",
                   first_width=16,
                   title="where the time went: critical path, % of wall; engines and loop, % busy")
    table.caption = ("eff: the critical path's model time over wall; hand: hand-offs (call time outside the "
                     "workers); off: waits on calls off the path; gap: none of a problem's calls in flight")
    for row in rows:
        t = row.get("time") or {}
        p = t.get("problems")
        if not p:
            table.add_row(str(row.get("config")), *["-"] * 9)
            continue
        wall = p["wall_s"] or None
        workers, loop = t.get("workers") or {}, t.get("loop") or {}
        table.add_row(
            str(row.get("config")), _s(p["efficiency"]),
            *(_pct(_ratio(p.get(k), wall)) for k in ("critical_path_s", "queue_s", "overhead_s", "off_path_s",
                                                      "gap_s")),
            *(_pct((workers.get(r) or {}).get("busy_share")) for r in ("small", "large")),
            _pct(loop.get("busy_share")),
        )
    return table
