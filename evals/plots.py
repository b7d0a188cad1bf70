"""Accuracy-against-latency plots that read at a glance: labels that do not collide, baselines apart.

Points of a sweep or a bench often sit close together (two fast policies with the small model's
accuracy), so a fixed label offset prints their names over each other. ``place_labels`` is a
small greedy placement: each label tries positions on rings of growing radius around its point and
takes the first whose box overlaps no marker, no placed label and stays inside the axes; labels
pushed away from their point get a thin leader line. No dependency beyond matplotlib.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

#: Policies drawn as reference points (hollow, black/grey) rather than as the thing being measured.
BASELINE_STYLE: dict[str, dict[str, Any]] = {
    "large-only": {"marker": "s", "color": "black"},
    "small-only": {"marker": "D", "color": "dimgrey"},
}

#: Label directions (unit offsets) tried in order on each ring; NE first reads most naturally.
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_RINGS_PT = (5.0, 12.0, 20.0, 30.0, 42.0, 56.0)  # offset radii in points


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str
    color: str = "black"


@cache
def machine_label() -> str:
    """A short description of this machine for plot titles: CPU model and count, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    label = f"{cpus} x {cpu}" if cpu else f"{cpus} CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            label += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # no torch, or a broken CUDA setup: the CPU description is enough
        pass
    return label


def place_labels(ax: Axes, points: Sequence[Point], fontsize: float = 8) -> list[Annotation]:
    """Annotate each point with its label where it overlaps nothing already drawn (greedy).

    Call after the axes limits are final: positions are computed in display space.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    axes_box = ax.get_window_extent(renderer)
    centres = [ax.transData.transform((p.x, p.y)) for p in points]
    own_r, other_r = 4.0 * px_per_pt, 9.0 * px_per_pt  # a label keeps clear of other points' markers

    def square(c: Sequence[float], r: float) -> Bbox:
        return Bbox.from_extents(c[0] - r, c[1] - r, c[0] + r, c[1] + r)

    labels: list[Bbox] = []
    annotations = []
    for i, (p, (cx, cy)) in enumerate(zip(points, centres)):
        others = [c for j, c in enumerate(centres) if j != i]
        taken = [*labels, square((cx, cy), own_r), *(square(o, other_r) for o in others)]
        probe = ax.text(0, 0, p.label, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        w, h = extent.width + 2, extent.height + 2
        best: tuple[float, float, float, Bbox] | None = None  # (overlap, dx, dy, box)
        for radius in _RINGS_PT:
            for ux, uy in _DIRECTIONS:
                dx, dy = ux * radius, uy * radius
                ox, oy = cx + dx * px_per_pt, cy + dy * px_per_pt
                x0 = ox if ux > 0 else ox - w if ux < 0 else ox - w / 2
                y0 = oy if uy > 0 else oy - h if uy < 0 else oy - h / 2
                box = Bbox.from_bounds(x0, y0, w, h)
                overlap = sum(_overlap(box, t) for t in taken) + _outside(box, axes_box)
                if any(_distance(box, o) < _distance(box, (cx, cy)) for o in others):
                    overlap += 1.0  # nearer another point than its own: it would read as that point's label
                if best is None or overlap < best[0]:
                    best = (overlap, dx, dy, box)
                if overlap == 0:
                    break
            if best is not None and best[0] == 0:
                break
        assert best is not None
        _, dx, dy, box = best
        labels.append(box)
        ha = "left" if dx > 0 else "right" if dx < 0 else "center"
        va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
        leader = max(abs(dx), abs(dy)) > _RINGS_PT[0]
        annotations.append(ax.annotate(
            p.label, (p.x, p.y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
            color=p.color,
            arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if leader else None,
        ))
    return annotations


def plot_tradeoff(rows: Iterable[Mapping[str, Any]], path: Path, *, title: str, label_key: str = "config",
                  pareto: bool = False, connect: Literal["latency", "given", "none"] = "latency") -> list[Annotation]:
    """Accuracy (%) against mean latency (s/problem), a point per row, one line per policy.

    ``connect`` orders each policy's line: by latency (a bench), in the rows' order (a sweep
    along one knob, whose curve reads in knob order even where latency is not monotonic), or
    not at all (a sweep over several knobs, whose points are not one curve).

    Baseline policies (``BASELINE_STYLE``) are hollow black/grey markers outside the policy lines.
    With ``pareto``, rows whose ``pareto`` is true are ringed and joined by a dashed front.
    Returns the label annotations (tests check that they do not overlap).
    """
    fig = Figure(figsize=(8.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    usable = [r for r in rows if r.get("accuracy") is not None and r.get("mean_latency_s") is not None]
    by_policy: dict[str, list[Mapping[str, Any]]] = {}
    for row in usable:
        by_policy.setdefault(str(row.get("policy")), []).append(row)
    colors: dict[int, str] = {}  # id(row) -> its marker's colour, which its label takes (labels may sit apart)
    for policy, group in by_policy.items():
        if connect == "latency":
            group = sorted(group, key=lambda r: r["mean_latency_s"])
        xs = [r["mean_latency_s"] for r in group]
        ys = [100 * r["accuracy"] for r in group]
        if policy in BASELINE_STYLE:
            style = BASELINE_STYLE[policy]
            (line,) = ax.plot(xs, ys, linestyle="none", marker=style["marker"], markersize=8, markerfacecolor="white",
                              markeredgecolor=style["color"], markeredgewidth=1.6, label=f"{policy} (baseline)",
                              zorder=3)
            color = style["color"]
        else:
            (line,) = ax.plot(xs, ys, marker="o", linestyle="-" if len(group) > 1 and connect != "none" else "none",
                              label=policy, zorder=2)
            color = line.get_color()
        colors.update((id(r), color) for r in group)
    front = sorted((r for r in usable if r.get("pareto")), key=lambda r: r["mean_latency_s"])
    if pareto and front:
        ax.step([r["mean_latency_s"] for r in front], [100 * r["accuracy"] for r in front], where="post",
                linestyle="--", color="tab:red", alpha=0.6, lw=1, label="Pareto front", zorder=1)
        ax.plot([r["mean_latency_s"] for r in front], [100 * r["accuracy"] for r in front], linestyle="none",
                marker="o", markersize=13, markerfacecolor="none", markeredgecolor="tab:red", alpha=0.6, zorder=1)
    ax.set_xlabel("mean latency per problem (s)")
    ax.set_ylabel("accuracy (%, pass@1)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if usable:
        ax.margins(x=0.15, y=0.12)  # room for labels at the edges
        ax.autoscale_view()
        ax.set_xlim(*ax.get_xlim())  # freeze: labels are placed in display space
        ax.set_ylim(*ax.get_ylim())
        # outside the axes: a legend inside may cover points or labels wherever "best" puts it
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    points = [Point(r["mean_latency_s"], 100 * r["accuracy"], str(r.get(label_key)), colors[id(r)]) for r in usable]
    annotations = place_labels(ax, points)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return annotations


def tradeoff_title(rows: Sequence[Mapping[str, Any]], what: str = "accuracy vs latency",
                   machine: str | None = None) -> str:
    """``what: dataset, n=N`` and the machine on a second line (the machine that runs this, by default)."""
    datasets = sorted({str(r.get("dataset")) for r in rows if r.get("dataset")}) or ["?"]
    ns = sorted({int(r["n"]) for r in rows if r.get("n") is not None})
    n = "/".join(str(v) for v in ns) or "?"
    return f"{what}: {'+'.join(datasets)}, n={n}\n{machine or machine_label()}"


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _distance(box: Bbox, point: Sequence[float]) -> float:
    """Distance from ``point`` to the nearest point of ``box`` (0 inside)."""
    dx = max(box.x0 - point[0], 0.0, point[0] - box.x1)
    dy = max(box.y0 - point[1], 0.0, point[1] - box.y1)
    return (dx * dx + dy * dy) ** 0.5


def _outside(box: Bbox, frame: Bbox) -> float:
    """Area of ``box`` outside ``frame``, weighted up: a label cut by the axes is worse than a touch."""
    return 4 * (box.width * box.height - _overlap(box, frame))
