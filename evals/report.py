"""Reports over finished eval folders: one table row per run, and accuracy against latency.

Each eval folder holds the ``summary.json`` written by ``evals.runner.run_eval``. Runs that
share a policy (a threshold sweep, say) are drawn as one line per policy, so a policy's
speed/accuracy trade-off reads at a glance next to the baselines' single points.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

#: Columns of the report table, in order.
REPORT_COLUMNS = (
    "config", "policy", "dataset", "n", "samples", "accuracy", "mean_latency_s", "total_wall_s", "speedup",
    "large_token_share", "acceptance_rate", "tokens_small", "tokens_large", "errors",
)


class ReportError(ValueError):
    """An eval folder without a readable summary."""


def build_report(dirs: Sequence[Path], out: Path | None = None) -> list[dict[str, Any]]:
    """One row per eval folder, with ``speedup`` against the first folder's total wall time.

    Put the baseline run first. With ``out`` (a Markdown file), writes the table there and
    the accuracy/latency plot beside it (same name, ``.png``).
    """
    if not dirs:
        raise ReportError("no eval folders given")
    summaries = [read_summary(Path(d)) for d in dirs]
    base_wall = summaries[0].get("total_wall_s") or 0.0
    rows = []
    for d, s in zip(dirs, summaries):
        row = {col: s.get(col) for col in REPORT_COLUMNS}
        wall = s.get("total_wall_s") or 0.0
        row["speedup"] = base_wall / wall if wall > 0 and base_wall > 0 else None
        row["dir"] = str(d)
        rows.append(row)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown_table(rows, REPORT_COLUMNS))
        plot_accuracy_latency(rows, out.with_suffix(".png"))
    return rows


def read_summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{folder} has no summary.json (is it an eval folder? run or resume the eval)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path}: {e}") from e


def plot_accuracy_latency(rows: Iterable[Mapping[str, Any]], path: Path) -> None:
    """Accuracy against mean latency: a point per run, labelled, one line per policy."""
    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    by_policy: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("accuracy") is not None and row.get("mean_latency_s") is not None:
            by_policy.setdefault(str(row.get("policy")), []).append(row)
    for policy, group in by_policy.items():
        group = sorted(group, key=lambda r: r["mean_latency_s"])
        xs = [r["mean_latency_s"] for r in group]
        ys = [r["accuracy"] for r in group]
        ax.plot(xs, ys, marker="o", linestyle="-" if len(group) > 1 else "none", label=policy)
        for r, x, y in zip(group, xs, ys):
            ax.annotate(str(r.get("config")), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("mean latency per problem (s)")
    ax.set_ylabel("accuracy (pass@1)")
    ax.grid(alpha=0.3)
    if by_policy:
        ax.legend(title="policy")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def fmt(value: Any) -> str:
    """A table cell: 4 significant digits for floats, a dash for missing values."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_report(rows: Sequence[Mapping[str, Any]], console: Console | None = None,
                 columns: Sequence[str] = REPORT_COLUMNS) -> None:
    """The report (or bench) rows as a table on the terminal."""
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")  # a narrow terminal wraps cells rather than cutting them
    for row in rows:
        table.add_row(*(fmt(row.get(c)) for c in columns))
    (console or Console()).print(table)
