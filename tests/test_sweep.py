"""Sweeps, compact tables, readable plots and quiet progress (issue 18)."""

from __future__ import annotations

import io
import itertools
import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from evals.datasets import load_dataset
from evals.plots import plot_tradeoff
from evals.progress import LineProgress, progress_bar
from evals.report import COMPACT_COLUMNS, compact_markdown, print_compact
from evals.runner import RESULTS, run_eval
from evals.sweep import (SWEEP_COLUMNS, GridError, grid_points, pareto_flags, parse_grid, plan_sweep, run_sweep,
                         short_keys)
from orchestrator.core import Orchestrator

# ---------------------------------------------------------------- the grid


def test_grid_is_a_typed_cartesian_product():
    grid = parse_grid(["policy.threshold=3, 5.5", "policy.judge=prompt,likelihood", "policy.first_n_large=0"])
    assert grid == {"policy.threshold": [3, 5.5], "policy.judge": ["prompt", "likelihood"],
                    "policy.first_n_large": [0]}
    assert type(grid["policy.threshold"][0]) is int and type(grid["policy.threshold"][1]) is float
    points = grid_points(grid)
    assert len(points) == 4
    assert points[0] == {"policy.threshold": 3, "policy.judge": "prompt", "policy.first_n_large": 0}
    assert [p["policy.threshold"] for p in points] == [3, 3, 5.5, 5.5]  # the first key varies slowest


@pytest.mark.parametrize("specs, message", [
    (["policy.threshold"], "must look like"),
    (["policy.threshold="], "must look like"),
    (["policy.threshold=3,,5"], "empty value"),
    (["policy.threshold=3", "policy.threshold=5"], "given twice"),
    (["policy.threshold=3,3"], "repeats"),
    ([], "at least one"),
])
def test_bad_grid_options(specs, message):
    with pytest.raises(GridError, match=message):
        parse_grid(specs)


def test_a_bad_grid_key_or_value_is_named_before_anything_runs():
    with pytest.raises(GridError, match=r"(?s)policy\.threshhold=3.*threshhold: unknown key"):
        plan_sweep("arith-v1/specreason", {"policy.threshhold": [3]})
    with pytest.raises(GridError, match="policy.judge=maybe"):
        plan_sweep("arith-v1/specreason", {"policy.judge": ["maybe"]})


def test_plan_derives_baselines_from_the_swept_config():
    runs = plan_sweep("arith-v1/specreason", {"policy.threshold": [3, 7]}, ["sampling.max_tokens=300"])
    assert [(r.label, r.kind, r.folder) for r in runs] == [
        ("large-only", "baseline", "large-only"), ("small-only", "baseline", "small-only"),
        ("threshold=3", "point", "threshold=3"), ("threshold=7", "point", "threshold=7")]
    assert [r.config.policy.type for r in runs] == ["large-only", "small-only", "specreason", "specreason"]
    assert runs[2].config.policy.threshold == 3 and runs[3].config.policy.threshold == 7
    for r in runs:  # same models and sampling everywhere, --set included
        assert r.config.models == runs[-1].config.models and r.config.sampling.max_tokens == 300
    assert runs[2].config.name == "arith-v1-specreason[threshold=3]"


def test_labels_use_the_shortest_unique_key_suffix():
    assert short_keys(["policy.threshold", "models.large.speculative.method", "models.small.speculative.method"]) \
        == {"policy.threshold": "threshold", "models.large.speculative.method": "large.speculative.method",
            "models.small.speculative.method": "small.speculative.method"}


def test_pareto_front():
    rows = [{"accuracy": 0.99, "mean_latency_s": 0.3}, {"accuracy": 0.5, "mean_latency_s": 0.06},
            {"accuracy": 0.98, "mean_latency_s": 0.16}, {"accuracy": 0.9, "mean_latency_s": 0.2},
            {"accuracy": 0.98, "mean_latency_s": 0.16}, {"accuracy": None, "mean_latency_s": None}]
    assert pareto_flags(rows) == [True, True, True, False, True, False]


# ---------------------------------------------------------------- a real sweep on the arith pair


async def test_sweep_runs_points_and_baselines_once_and_resumes(tmp_path, monkeypatch):
    calls: list[str] = []
    asolve = Orchestrator.asolve

    async def counted(self, problem, *args, **kwargs):
        calls.append(self.config.name)
        return await asolve(self, problem, *args, **kwargs)

    monkeypatch.setattr(Orchestrator, "asolve", counted)
    sweep = await run_sweep("arith-v1/specreason", {"policy.threshold": [3, 7]}, tmp_path, dataset="arith", limit=3,
                            concurrency=3, progress=False)

    names = ["large-only", "small-only", "arith-v1-specreason[threshold=3]", "arith-v1-specreason[threshold=7]"]
    assert sorted(calls) == sorted(n for n in names for _ in range(3))  # each run once, the same 3 problems
    assert [r["label"] for r in sweep["rows"]] == ["large-only", "small-only", "threshold=3", "threshold=7"]
    assert [r["config"] for r in sweep["rows"]] == names
    ids = {json.dumps(sorted(json.loads(line)["id"] for line in (tmp_path / r["folder"] / RESULTS).open()))
           for r in sweep["rows"]}
    assert len(ids) == 1
    assert sweep["rows"][0]["speedup"] == 1.0 and sweep["rows"][2]["knobs"] == {"policy.threshold": 3}
    assert sweep["rows"][2]["policy_params"]["threshold"] == 3
    assert any(r["pareto"] for r in sweep["rows"]) and sweep["pareto"]
    assert json.loads((tmp_path / "sweep.json").read_text()) == sweep
    md = (tmp_path / "sweep.md").read_text()
    assert "| point | acc | s/problem | speedup | large % | accept % |" in md and "threshold=7" in md
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    calls.clear()  # a re-run with --resume redoes nothing and rebuilds the same rows
    again = await run_sweep("arith-v1/specreason", {"policy.threshold": [3, 7]}, tmp_path, dataset="arith", limit=3,
                            concurrency=3, progress=False, resume=True)
    assert calls == []
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in sweep["rows"]]
    assert all(len((tmp_path / r["folder"] / RESULTS).read_text().splitlines()) == 3 for r in again["rows"])


def test_cli_sweep_names_a_bad_key_and_exits_2():
    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["sweep", "--config", "arith-v1/specreason", "--grid", "policy.threshhold=3,5"])
    assert result.exit_code == 2
    assert "threshhold" in result.output and "unknown key" in result.output


# ---------------------------------------------------------------- tables that fit 80 columns


ROWS = [
    {"config": name, "point": name, "accuracy": 0.98765, "mean_latency_s": 12.34567, "speedup": 11.7654,
     "large_token_share": 0.13456, "acceptance_rate": 0.87719}
    for name in ("arith-large-only", "arith-specreason-prompt", "math500-r1-distill-32b-with-1.5b-specreason",
                 "threshold=3 judge=likelihood first_n_large=2 *")
]


@pytest.mark.parametrize("columns", [COMPACT_COLUMNS, SWEEP_COLUMNS])
def test_tables_fit_80_columns_with_whole_headers(columns):
    out = io.StringIO()
    print_compact(ROWS, Console(file=out, width=80, force_terminal=False), columns=columns,
                  title="arith-specreason, sweep of threshold: arith, n=100", caption="*: Pareto front")
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if "acc" in line)
    for c in columns:
        assert c.header in header  # on one line, not split across two
    assert "12.346" in out.getvalue() and "11.77x" in out.getvalue() and "87.7" in out.getvalue()
    assert compact_markdown(ROWS[:1], columns).splitlines()[2].endswith("| 0.988 | 12.346 | 11.77x | 13.5 | 87.7 |")


# ---------------------------------------------------------------- plots that read


def test_plot_labels_do_not_overlap(tmp_path):
    names = ["large-only", "small-only", "spec-thinking", "specreason", "specreason-prompt", "consultant",
             "speculative", "threshold=3", "threshold=5"]
    xs = [0.288, 0.062, 0.066, 0.163, 0.129, 0.137, 0.139, 0.064, 0.141]
    ys = [0.99, 0.53, 0.53, 0.98, 0.53, 0.97, 0.99, 0.55, 0.975]
    rows = [{"config": n, "policy": n if n.endswith("-only") else "p" + n[:3], "accuracy": y, "mean_latency_s": x}
            for n, x, y in zip(names, xs, ys)]
    annotations = plot_tradeoff(rows, tmp_path / "p.png", title="t")
    renderer = annotations[0].figure.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in annotations]
    assert len(boxes) == len(names)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- quiet progress


def test_progress_off_a_terminal_is_one_line(monkeypatch):
    err = io.StringIO()  # isatty() is False, like a log file or a pipe
    monkeypatch.setattr("sys.stderr", err)
    bar = progress_bar(total=40, initial=10, desc="arith-specreason")
    assert isinstance(bar, LineProgress)
    for _ in range(30):
        bar.set_postfix_str("acc=0.950 tok/s=120", refresh=False)
        bar.update()
    bar.close()
    bar.close()
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arith-specreason: 40/40 solves, 10 resumed, acc=0.950")

    every = LineProgress(total=10, desc="c", every=4, file=err)
    for _ in range(10):
        every.update()
    every.close()
    assert [line.split(",")[0] for line in err.getvalue().splitlines()[1:]] == ["c: 4/10 solves", "c: 8/10 solves",
                                                                                 "c: 10/10 solves"]


async def test_an_eval_logs_one_line_off_a_terminal(arith_small, tmp_path, capsys):
    await run_eval(arith_small, load_dataset("arith", limit=3), tmp_path, concurrency=3, grade_timeout=60)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("arith-v1-small-only: 3/3 solves, acc=")


def test_grade_is_exported():
    from evals import grade

    assert grade("so \\boxed{16}", "16") is True and grade("\\boxed{15}", "16") is False
