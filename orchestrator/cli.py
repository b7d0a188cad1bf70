"""The ``reasonspec`` command line: run, eval, bench, sweep, report, serve.

The CLI is the application layer on top of everything (it may import evals);
the library layers keep their one-way dependencies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from orchestrator.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reasoning-level speculation orchestrator.")
console = Console()


@app.callback()
def _quiet_logs() -> None:
    """Reasoning-level speculation orchestrator."""
    from evals.progress import quiet_library_progress

    quiet_library_progress()  # off a terminal, library progress bars would print a line per redraw


ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="config name (arith/specreason) or YAML path")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="dotted override, e.g. models.large.backend=vllm")]
# the options eval and sweep share (None: the config's eval section decides)
DatasetOpt = Annotated[Optional[str], typer.Option(help="arith | math500 | aime24 | aime25 | jsonl")]
DatasetPathOpt = Annotated[Optional[Path], typer.Option(help="local JSONL file")]
LimitOpt = Annotated[Optional[int], typer.Option(min=1)]
ConcurrencyOpt = Annotated[Optional[int], typer.Option(min=1)]
SamplesOpt = Annotated[Optional[int], typer.Option(min=1, help="seeded samples per problem (pass@1 over k)")]


#: Exit codes: 2 for a mistake in what was asked (config, dataset, model path, an eval folder holding
#: another run), as for any usage error; 3 for an eval that ended incomplete (failed problems are in
#: errors.jsonl, the summary covers what finished, --resume retries the rest); 130 for Ctrl-C (128 + SIGINT).
EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 2, 3, 130
#: Errors go to stderr, unwrapped: a message the user can act on is one line, not a traceback.
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def _fail(kind: str, error: object) -> NoReturn:
    err_console.print(f"[red]{kind}:[/red] {escape(str(error))}")
    raise typer.Exit(EXIT_USAGE)


def _load(config: str, overrides: list[str] | None):
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _fail("config error", e)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Inside a command: a bad config, dataset, model path or eval folder ends it through ``_fail``."""
    from evals.datasets import DatasetError
    from evals.runner import EvalError

    try:
        yield
    except ConfigError as e:
        _fail("config error", e)
    except DatasetError as e:
        _fail("dataset error", e)
    except EvalError as e:
        _fail("eval error", e)


AUTHOR_STYLE = {"small": "cyan", "large": "magenta", "mid": "yellow"}


@app.command()
def run(
    problem: Annotated[str, typer.Argument(help="the problem text")],
    config: ConfigOpt = "arith/specreason",
    set: SetOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the whole result as JSON")] = False,
) -> None:
    """Solve one problem and show who wrote each step."""
    from orchestrator.core import Orchestrator

    cfg = _load(config, set)
    with _user_errors(), Orchestrator(cfg) as orch:
        result = orch.solve(problem)
    if json_out:
        print(result.model_dump_json(indent=1))
        return
    for seg in result.segments:
        style = AUTHOR_STYLE.get(seg.author, "white")
        mark = "" if seg.accepted else " [dim](rejected)[/dim]"
        score = f" score={seg.score:.1f}" if seg.score is not None else ""
        console.print(f"[{style}][{seg.author} {seg.kind}{score}][/{style}]{mark} {seg.text!r}")
    m = result.metrics
    console.print(f"[bold]answer:[/bold] {result.answer}   wall {m.wall_s:.2f}s   tokens {m.tokens}   "
                  f"accepted {m.accepted}/{m.proposed}")


@app.command("eval")
def eval_cmd(
    config: ConfigOpt,
    dataset: DatasetOpt = None,
    dataset_path: DatasetPathOpt = None,
    limit: LimitOpt = None,
    concurrency: ConcurrencyOpt = None,
    samples: SamplesOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="result folder (default runs/<config name>)")] = None,
    resume: Annotated[bool, typer.Option(help="skip problems already in OUT/results.jsonl")] = False,
    overwrite: Annotated[bool, typer.Option(help="start OUT afresh if it has results")] = False,
    allow_config_change: Annotated[bool, typer.Option(help="let --resume add to a run made with another config "
                                                           "(the folder then mixes runs)")] = False,
    set: SetOpt = None,
) -> None:
    """Evaluate a config on a dataset: results.jsonl, summary.json, summary.md, a table.

    Exit code 0: every problem solved; 2: a bad config, dataset or model path, or a --resume
    with another config than OUT's run (OUT/run_config.json); 3: incomplete, some problems
    failed (OUT/errors.jsonl; --resume retries them); 130: interrupted (partial summary written).
    """
    from evals.datasets import load_dataset
    from evals.runner import print_summary, run_eval
    from orchestrator.core import Orchestrator

    cfg = _load(config, set)
    e = cfg.eval
    e.dataset = dataset or e.dataset
    e.dataset_path = str(dataset_path) if dataset_path else e.dataset_path
    e.limit = limit or e.limit
    e.concurrency = concurrency or e.concurrency
    e.samples = samples or e.samples
    out_dir = out or Path(e.out or f"runs/{cfg.name}")
    with _user_errors():
        problems = load_dataset(e.dataset, path=e.dataset_path, split=e.split, limit=e.limit, fields=e.fields or None)

    async def main() -> dict:
        orch = Orchestrator(cfg)
        try:
            return await run_eval(orch, problems, out_dir, concurrency=e.concurrency, samples=e.samples, resume=resume,
                                  overwrite=overwrite, dataset=e.dataset, allow_config_change=allow_config_change)
        finally:
            await orch.aclose()

    with _user_errors():
        try:
            summary = asyncio.run(main())
        except KeyboardInterrupt:  # the runner has written the summary of what finished
            err_console.print(f"interrupted: finished results and their summary are in {out_dir}; --resume continues")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    print_summary(summary)
    console.print(f"results in {out_dir}")
    if not summary["complete"]:
        err_console.print(f"[yellow]incomplete:[/yellow] {summary['completed']} of "
                          f"{summary['problems'] * summary['samples']} solves finished, {summary['errors']} failed "
                          f"(see {out_dir / 'errors.jsonl'}); --resume retries them")
        raise typer.Exit(EXIT_INCOMPLETE)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def bench(
    ctx: typer.Context,
    configs: Annotated[list[str], typer.Option("--configs", help="configs to compare (--configs C1 C2 ...); the first "
                                                                  "is the baseline")],
    dataset: str = "arith",
    dataset_path: Annotated[Optional[Path], typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
    out: Annotated[Path, typer.Option()] = Path("runs/bench"),
    resume: Annotated[bool, typer.Option(help="finish an interrupted bench")] = False,
    overwrite: Annotated[bool, typer.Option(help="start OUT afresh if it has results")] = False,
    rounds: Annotated[int, typer.Option(min=1, help="interleave the configs over this many slices of the problems, "
                                                    "so that a drift in machine speed reaches all of them")] = 1,
    set: SetOpt = None,
) -> None:
    """The same problems through several configs: one table, bench.json/md/png."""
    from evals.breakdown import bench_breakdown_table
    from evals.report import print_compact, read_summary
    from evals.runner import run_bench

    configs = list(configs) + list(ctx.args)  # `--configs C1 C2 C3`: typer binds C1, the rest arrive as extra args

    for c in configs:
        _load(c, set)  # fail fast on any bad config before running the first one
    with _user_errors():  # a bad dataset, or a folder holding another run
        rows = asyncio.run(run_bench(configs, dataset, limit, concurrency, out, set, dataset_path=dataset_path,
                                     resume=resume, overwrite=overwrite, rounds=rounds))
    print_compact(rows, console, caption=f"speedup: total wall time against {rows[0]['config']}; "
                                         "full precision in bench.json")
    console.print(bench_breakdown_table([read_summary(Path(r["dir"])) for r in rows]))
    console.print(f"{len(rows)} configs compared; see {out}/bench.md, bench.json, bench.png")


@app.command()
def sweep(
    config: ConfigOpt,
    grid: Annotated[list[str], typer.Option("--grid", help="key=v1,v2,... (repeat for a cartesian product), e.g. "
                                                           "policy.threshold=3,5,7,9")],
    dataset: DatasetOpt = None,
    dataset_path: DatasetPathOpt = None,
    limit: LimitOpt = None,
    concurrency: ConcurrencyOpt = None,
    samples: SamplesOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="sweep folder (default runs/sweep-<config name>)")] = None,
    baselines: Annotated[bool, typer.Option(help="run LargeOnly and SmallOnly of the same models")] = True,
    resume: Annotated[bool, typer.Option(help="finish an interrupted sweep (or add grid points)")] = False,
    overwrite: Annotated[bool, typer.Option(help="start every point afresh")] = False,
    set: SetOpt = None,
) -> None:
    """Every point of a knob grid (and the baselines, once) on the same problems: sweep.json/md/png."""
    from evals.report import print_compact
    from evals.sweep import SWEEP_COLUMNS, GridError, parse_grid, plan_sweep, run_sweep, sweep_title

    cfg = _load(config, set)
    e = cfg.eval
    try:
        knobs = parse_grid(grid)
        plan_sweep(config, knobs, set, baselines)  # fail fast on a bad grid key before the first run
    except GridError as err:
        _fail("grid error", err)
    out_dir = out or Path(f"runs/sweep-{cfg.name}")
    with _user_errors():  # a bad dataset, or a point's folder holding another run
        try:
            result = asyncio.run(run_sweep(
                config, knobs, out_dir, dataset=dataset or e.dataset, limit=limit or e.limit,
                concurrency=concurrency or e.concurrency, overrides=set,
                dataset_path=str(dataset_path) if dataset_path else e.dataset_path, split=e.split, fields=e.fields,
                samples=samples or e.samples, resume=resume, overwrite=overwrite, baselines=baselines))
        except KeyboardInterrupt:  # finished points, and what finished of the current one, are on disk
            err_console.print(f"interrupted: finished results are in {out_dir}; --resume continues")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    print_compact(result["rows"], console, columns=SWEEP_COLUMNS, title=sweep_title(result),
                  caption=f"*: Pareto front; speedup against {result['speedup_baseline']}")
    console.print(f"see {out_dir}/sweep.md, sweep.json, sweep.png")
    incomplete = [r["label"] for r in result["rows"] if r.get("complete") is False]
    if incomplete:
        err_console.print(f"[yellow]incomplete:[/yellow] {', '.join(incomplete)} have failed problems (see their "
                          "errors.jsonl); --resume retries them")
        raise typer.Exit(EXIT_INCOMPLETE)


@app.command()
def report(dirs: Annotated[list[Path], typer.Argument(help="eval result folders")],
           out: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Rebuild tables and plots from result folders."""
    from evals.report import build_report

    rows = build_report(dirs, out)
    console.print_json(json.dumps(rows))


@app.command()
def distill(
    student: Annotated[str, typer.Option(help="the draft's model folder (the starting point)")],
    teacher: Annotated[str, typer.Option(help="the target's model folder")],
    out: Annotated[Path, typer.Option(help="output folder: distilled model, model card, checkpoint")],
    divergence: Annotated[Optional[str], typer.Option(help="fkl | rkl | tvd | jsd (default fkl)")] = None,
    data: Annotated[Optional[str], typer.Option(help="onpolicy (the draft's samples, default) | fixed (the "
                                                     "teacher's greedy outputs)")] = None,
    reference: Annotated[Optional[str], typer.Option(help="AdaSPEC: a reference model folder (a draft-sized model "
                                                          "distilled with fkl first); enables token filtering")] = None,
    keep_fraction: Annotated[Optional[float], typer.Option(help="AdaSPEC: fraction of tokens kept (default 0.4)")] = None,
    dataset: DatasetOpt = None,
    dataset_path: DatasetPathOpt = None,
    split: Annotated[Optional[str], typer.Option(help="training split (arith: train)")] = None,
    problems: Annotated[Optional[int], typer.Option(help="training prompts (default 256)")] = None,
    heldout: Annotated[Optional[int], typer.Option(help="held-out prompts measured before and after (default 16)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="gradient steps (default 300)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="prompts per step (default 8)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate (default 3e-4)")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="warmup steps (default 10)")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="generated continuation length (default 256)")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="on-policy sampling temperature (default 1)")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="steps between checkpoints (default 50)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the checkpoint in OUT")] = False,
    overwrite: Annotated[bool, typer.Option(help="start OUT afresh")] = False,
) -> None:
    """Fine-tune a draft toward its target (DistillSpec divergences, on-policy or fixed data, AdaSPEC filtering).

    Writes a Hugging Face model folder with a model card (README.md) and distill.json; see evals/distill.py.
    """
    given = {k: v for k, v in locals().items() if k not in ("resume", "overwrite") and v is not None}  # options only
    from pydantic import ValidationError

    from evals.distill import DistillError, DistillSettings, run_distill

    given["out"] = str(out)
    if dataset_path is not None:
        given["dataset_path"] = str(dataset_path)
    try:
        settings = DistillSettings(**given)
    except ValidationError as e:
        _fail("distill error", "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
    with _user_errors():
        try:
            summary = run_distill(settings, resume=resume, overwrite=overwrite)
        except DistillError as e:
            _fail("distill error", e)
    before, after = summary["heldout_before"], summary["heldout_after"]
    console.print(f"held out: {settings.divergence} {before[settings.divergence]} -> {after[settings.divergence]}, "
                  f"greedy agreement {before['agreement']} -> {after['agreement']}; model in {out}")


@app.command()
def serve(
    config: ConfigOpt = "arith/specreason",
    host: str = "127.0.0.1",
    port: int = 8000,
    set: SetOpt = None,
    read_timeout: Annotated[Optional[float], typer.Option(
        help="seconds a client may take to send a whole request (default 10)", min=0.1)] = None,
) -> None:
    """An OpenAI-compatible endpoint (/v1/chat/completions, /v1/models, /health)."""
    from orchestrator.server import READ_TIMEOUT_S, serve as serve_app

    serve_app(_load(config, set), host=host, port=port, read_timeout=read_timeout or READ_TIMEOUT_S)


if __name__ == "__main__":
    app()
