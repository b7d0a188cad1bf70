"""Sweeps of a policy's knobs: every point of a grid on the same problems, beside its baselines.

A researcher picks a policy's knobs from its accuracy/latency curve (SpecReason's thresholds,
Consultant Decoding's epsilon). ``run_sweep`` runs each point of a grid of dotted overrides
(``policy.threshold=3,5,7,9``; several grids form their cartesian product) as an ordinary eval
folder under ``out_dir`` (so each point resumes like ``reasonspec eval --resume``), runs the
LargeOnly and SmallOnly baselines of the same models and sampling once, and writes

- ``sweep.json``: the grid, the machine, and per run its knobs, label, Pareto flag and full summary;
- ``sweep.md``: the compact table, the Pareto front, and the plot;
- ``sweep.png``: accuracy against latency, the Pareto front marked, each point labelled by its knobs.

Speedup is the LargeOnly baseline's total wall time over the run's (the first run's without
baselines). Grid values are YAML scalars like ``--set`` values: ``3`` is an int, ``0.5`` a float.
Baselines take the config and ``--set`` overrides but no grid value, so a grid over model or
sampling keys still compares against one pair of baselines.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from evals.datasets import load_dataset
from evals.plots import machine_label, plot_tradeoff, tradeoff_title
from evals.report import COMPACT_COLUMNS, Column, build_report, compact_markdown, read_summary
from evals.runner import eval_config
from orchestrator.config import ConfigError, RunConfig, load_config, parse_overrides

SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.png"

#: Baselines derived from the swept config, in the order they run (LargeOnly first: speedups are against it).
BASELINES: tuple[tuple[str, str], ...] = (("large-only", "large"), ("small-only", "small"))

#: The sweep table: the point's label (``*`` on the Pareto front) and the compact numbers.
SWEEP_COLUMNS: tuple[Column, ...] = (Column("point", "point", str, numeric=False), *COMPACT_COLUMNS[1:])


class GridError(ValueError):
    """A ``--grid`` option that does not parse, or a grid key the config rejects."""


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a grid point or a baseline, with its config and folder name."""

    label: str
    kind: Literal["baseline", "point"]
    config: RunConfig
    folder: str
    knobs: dict[str, Any] = field(default_factory=dict)


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["policy.threshold=3,5", "policy.judge=prompt,likelihood"]`` -> ``{key: [typed values]}``.

    Values are split on commas and parsed as YAML scalars (the way ``--set`` parses its value).
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise GridError(f"grid {spec!r} must look like key.sub=v1,v2,...")
        if key in grid:
            raise GridError(f"grid key {key!r} is given twice; list all its values in one --grid")
        items = [item.strip() for item in raw.split(",")]
        if any(not item for item in items):
            raise GridError(f"grid {spec!r} has an empty value")
        values = [yaml.safe_load(item) for item in items]
        if len({json.dumps(v) for v in values}) != len(values):
            raise GridError(f"grid {spec!r} repeats a value")
        grid[key] = values
    if not grid:
        raise GridError("a sweep needs at least one --grid key=v1,v2,...")
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that is unique among ``keys`` (labels: ``threshold=7``)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if all(other == key or not (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        out[key] = suffix
    return out


def plan_sweep(config: str, grid: Mapping[str, Sequence[Any]], overrides: list[str] | dict[str, Any] | None = None,
               baselines: bool = True) -> list[SweepRun]:
    """The runs of a sweep, every config validated before anything runs (a bad grid key is named)."""
    base_overrides = parse_overrides(overrides)
    base = load_config(config, base_overrides)
    runs: list[SweepRun] = []
    if baselines:
        for policy, role in BASELINES:
            if role in base.models:
                runs.append(SweepRun(policy, "baseline", baseline_config(base, policy), policy))
    names = short_keys(list(grid))
    for point in grid_points(grid):
        label = " ".join(f"{names[k]}={_show(v)}" for k, v in point.items())
        try:
            cfg = load_config(config, {**base_overrides, **point})
        except ConfigError as e:
            point_text = ", ".join(f"{k}={_show(v)}" for k, v in point.items())
            raise GridError(f"grid point {point_text}: {e}") from None
        cfg.name = f"{base.name}[{label}]"
        folder = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", ",".join(f"{names[k]}={_show(v)}" for k, v in point.items()))
        if folder in {r.folder for r in runs}:  # values that differ only in characters a folder name drops
            folder = f"{folder}-{len(runs)}"
        runs.append(SweepRun(label, "point", cfg, folder, dict(point)))
    return runs


def baseline_config(config: RunConfig, policy: str) -> RunConfig:
    """``config`` with its policy replaced by a baseline's: same models, sampling, prompt and eval."""
    data = config.model_dump()
    data["policy"] = {"type": policy}
    data["name"] = policy
    return RunConfig.model_validate(data)


def pareto_flags(rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Whether each row is on the accuracy/latency Pareto front (no other row is as fast and as accurate)."""
    def dominated(r: Mapping[str, Any]) -> bool:
        return any(o["mean_latency_s"] <= r["mean_latency_s"] and o["accuracy"] >= r["accuracy"]
                   and (o["mean_latency_s"] < r["mean_latency_s"] or o["accuracy"] > r["accuracy"])
                   for o in rows if _measured(o))

    return [_measured(r) and not dominated(r) for r in rows]


async def run_sweep(
    config: str,
    grid: Mapping[str, Sequence[Any]],
    out_dir: Path,
    *,
    dataset: str,
    limit: int | None,
    concurrency: int,
    overrides: list[str] | dict[str, Any] | None = None,
    dataset_path: str | Path | None = None,
    split: str | None = None,
    fields: Mapping[str, str] | None = None,
    samples: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    baselines: bool = True,
) -> dict[str, Any]:
    """Run the baselines and every grid point on the same problems; returns what ``sweep.json`` holds."""
    runs = plan_sweep(config, grid, overrides, baselines)
    problems = load_dataset(dataset, path=dataset_path, split=split, limit=limit, fields=fields or None)
    out_dir = Path(out_dir)
    for run in runs:
        await eval_config(run.config, problems, out_dir / run.folder, concurrency=concurrency, samples=samples,
                          resume=resume, overwrite=overwrite, progress=progress, dataset=dataset)
    sweep = collect_sweep(out_dir, runs, config=config, name=load_config(config, overrides).name, grid=grid)
    write_sweep(out_dir, sweep)
    return sweep


def collect_sweep(out_dir: Path, runs: Sequence[SweepRun], *, config: str, name: str,
                  grid: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The sweep's record from its finished eval folders: rows with speedup, knobs and Pareto flags."""
    dirs = [Path(out_dir) / run.folder for run in runs]
    report_rows = build_report(dirs)  # speedup against the first folder: LargeOnly when baselines run
    rows = []
    for run, d, report_row in zip(runs, dirs, report_rows):
        summary = read_summary(d)
        rows.append({"label": run.label, "kind": run.kind, "knobs": run.knobs, "folder": run.folder,
                     "speedup": report_row["speedup"], **summary})
    for row, front in zip(rows, pareto_flags(rows)):
        row["pareto"] = front
        row["point"] = row["label"] + (" *" if front else "")
    return {
        "config": config,
        "name": name,
        "dataset": rows[0]["dataset"] if rows else None,
        "n": rows[0]["n"] if rows else 0,
        "samples": rows[0]["samples"] if rows else 1,
        "grid": {k: list(v) for k, v in grid.items()},
        "machine": machine_label(),
        "speedup_baseline": runs[0].label if runs else None,
        "pareto": [r["label"] for r in rows if r["pareto"]],
        "rows": rows,
    }


def write_sweep(out_dir: Path, sweep: Mapping[str, Any]) -> None:
    """``sweep.json`` (full precision), ``sweep.md`` (the compact table) and ``sweep.png``."""
    out_dir = Path(out_dir)
    (out_dir / SWEEP_JSON).write_text(json.dumps(sweep, indent=2) + "\n")
    rows = sweep["rows"]
    title = sweep_title(sweep)
    plot_tradeoff(rows, out_dir / SWEEP_PNG, title=title, label_key="label", pareto=True,
                  connect="given" if len(sweep["grid"]) == 1 else "none")
    grid = "; ".join(f"`{k}` = {', '.join(_show(v) for v in vs)}" for k, vs in sweep["grid"].items())
    (out_dir / SWEEP_MD).write_text(
        f"# Sweep of {sweep['name']} on {sweep['dataset']} (n={sweep['n']})\n\n"
        f"Grid: {grid}. Machine: {sweep['machine']}.\n\n"
        + compact_markdown(rows, SWEEP_COLUMNS)
        + f"\n`*`: on the accuracy/latency Pareto front. `speedup`: total wall time of {sweep['speedup_baseline']} "
          "over the run's. `large %`: share of the reasoning's tokens written by the large model; `accept %`: "
          f"accepted small-model proposals. Full precision in `{SWEEP_JSON}`.\n\n"
        f"![accuracy against latency]({SWEEP_PNG})\n"
    )


def sweep_title(sweep: Mapping[str, Any]) -> str:
    keys = ", ".join(short_keys(list(sweep["grid"])).values())
    return tradeoff_title(sweep["rows"], what=f"{sweep['name']}, sweep of {keys}", machine=sweep["machine"])


def _measured(row: Mapping[str, Any]) -> bool:
    return row.get("accuracy") is not None and row.get("mean_latency_s") is not None


def _show(value: Any) -> str:
    """A grid value as it was written: ``3``, ``0.5``, ``true``, ``prompt``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)
