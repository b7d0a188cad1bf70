"""Reports over finished eval folders: one table row per run, and accuracy against latency.

Each eval folder holds the ``summary.json`` written by ``evals.runner.run_eval``. Runs that
share a policy (a threshold sweep, say) are drawn as one line per policy, so a policy's
speed/accuracy trade-off reads at a glance next to the baselines' single points.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from evals.plots import plot_tradeoff, tradeoff_title

#: Columns of the report table, in order.
REPORT_COLUMNS = (
    "config", "policy", "dataset", "n", "samples", "accuracy", "mean_latency_s", "total_wall_s", "speedup",
    "efficiency", "large_token_share", "acceptance_rate", "tokens_small", "tokens_large", "errors",
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


def plot_accuracy_latency(rows: Iterable[Mapping[str, Any]], path: Path, title: str | None = None) -> None:
    """Accuracy against mean latency: a point per run, labelled without overlaps, one line per policy.

    The default title names the dataset, n and this machine (a report is drawn where it was run).
    """
    rows = list(rows)
    plot_tradeoff(rows, path, title=title or tradeoff_title(rows))


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


# ---------------------------------------------------------------- compact tables (terminal and Markdown)


@dataclass(frozen=True)
class Column:
    """A table column: the row key it shows, a short header with its unit, and how a cell reads."""

    key: str
    header: str
    cell: Callable[[Any], str] = str
    numeric: bool = True


def _num(spec: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v, spec)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _speedup(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


#: The columns a researcher reads first; everything else (and full precision) is in the JSON.
COMPACT_COLUMNS: tuple[Column, ...] = (
    Column("config", "config", str, numeric=False),
    Column("accuracy", "acc", _num(".3f")),
    Column("mean_latency_s", "s/problem", _num(".3f")),
    Column("speedup", "speedup", _speedup),
    Column("large_token_share", "large %", _pct),
    Column("acceptance_rate", "accept %", _pct),
)


def compact_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column] = COMPACT_COLUMNS,
                  title: str | None = None, caption: str | None = None) -> Table:
    """A rich table that fits 80 columns: numeric cells and all headers never wrap; names fold."""
    table = Table(title=title, caption=caption)
    for c in columns:
        if c.numeric:
            table.add_column(c.header, justify="right", no_wrap=True)
        else:
            table.add_column(c.header, overflow="fold", min_width=len(c.header))
    for row in rows:
        table.add_row(*(c.cell(row.get(c.key)) for c in columns))
    return table


def print_compact(rows: Sequence[Mapping[str, Any]], console: Console | None = None,
                  columns: Sequence[Column] = COMPACT_COLUMNS, title: str | None = None,
                  caption: str | None = None) -> None:
    (console or Console()).print(compact_table(rows, columns, title, caption))


def compact_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column] = COMPACT_COLUMNS) -> str:
    """The compact table as Markdown (numbers right-aligned)."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(c.cell(row.get(c.key)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
