"""Figures for papers: few-shot accuracy curves and the robust-vs-natural trade-off.

Both draw through matplotlib's Agg canvas directly (no pyplot, so no display is touched and the
caller's backend is left alone) and write a PNG and a PDF at 150 dpi. A figure never mixes
threat models: with several in the runs, each gets its own files, named with a slug of the
threat (``fewshot_pgd100_linf_eps1_alpha1.png``). Titles carry the threat label.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Iterable, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import ConfigError
from .collect import RowKey, RunResult, dataset_rank, group_by_threat, row_key, row_labels, sort_row_keys, threat_slug

DPI = 150
MAX_PANEL_COLS = 6  # beyond this many datasets the few-shot grid wraps into more row pairs
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")


def few_shot_curves(runs: Iterable[RunResult], out_path: str | Path) -> list[Path]:
    """Accuracy against shots (log2 axis), one panel per dataset: natural accuracy in a row above
    robust accuracy (grids of more than 6 datasets wrap into several such row pairs). One line
    per method with its mean over seeds and a shaded ±1 sample std band. Only runs with a shot
    count take part; ConfigError when none has one. Returns the written files."""
    shot_runs = [r for r in runs if r.shots is not None]
    if not shot_runs:
        raise ConfigError("few-shot curves need runs with a shot count; none of the given runs has one "
                          "(zero-shot and full-data runs have shots = null)")
    groups = group_by_threat(shot_runs)
    slugs = _slugs(groups)
    written: list[Path] = []
    for key, group in groups.items():
        fig = _few_shot_figure(group)
        written += _save(fig, out_path, slugs[key] if len(groups) > 1 else None)
    return written


def tradeoff_scatter(runs: Iterable[RunResult], out_path: str | Path) -> list[Path]:
    """Robust (y) against natural (x) accuracy: a point per (method, dataset) at its mean over
    seeds, a marker and colour per method, and a larger edged marker at each method's average over
    its datasets. One figure per threat model. Returns the written files."""
    runs = list(runs)
    if not runs:
        raise ConfigError("no runs to plot")
    groups = group_by_threat(runs)
    slugs = _slugs(groups)
    written: list[Path] = []
    for key, group in groups.items():
        fig = _scatter_figure(group)
        written += _save(fig, out_path, slugs[key] if len(groups) > 1 else None)
    return written


# ---------------------------------------------------------------- figures

def _series_key(r: RunResult) -> RowKey:
    # a few-shot line spans all shot counts, so shots is not part of its identity
    return (r.method_key, r.base_method, None, r.backbone)


def _style(keys: Sequence[RowKey]) -> dict[RowKey, tuple[str, str]]:
    """A (colour, marker) per series, fixed by the row order so figures agree with tables."""
    n = len(keys)
    palette = [f"C{i}" for i in range(10)] if n <= 10 else _tab20()
    return {k: (palette[i % len(palette)], MARKERS[i % len(MARKERS)]) for i, k in enumerate(keys)}


def _tab20() -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i) for i in range(20)]


def _caption(runs: list[RunResult], what: str, point) -> str:
    """'<what> over 3 seeds · <backbone>'; seeds counted per plotted point (``point(run)``)."""
    per_point: dict = {}
    for r in runs:
        per_point[point(r)] = per_point.get(point(r), 0) + 1
    lo, hi = min(per_point.values()), max(per_point.values())
    seeds = f"{lo} seed{'s' if lo != 1 else ''}" if lo == hi else f"{lo}–{hi} seeds"
    return f"{what} over {seeds} · {'; '.join(sorted({r.backbone for r in runs}))}"


def _few_shot_figure(runs: list[RunResult]) -> Figure:
    columns = sorted({r.column for r in runs}, key=dataset_rank)
    series = sort_row_keys(_series_key(r) for r in runs)
    labels = row_labels(series)
    style = _style(series)
    shots = sorted({r.shots for r in runs if r.shots is not None})
    ncols = min(len(columns), MAX_PANEL_COLS)
    chunks = math.ceil(len(columns) / ncols)
    nrows = 2 * chunks
    legend_rows = math.ceil(len(series) / min(len(series), 4))
    head_in, legend_in = 0.55, 0.35 + 0.25 * legend_rows
    fig = Figure(figsize=(3.0 * ncols + 0.6, 2.5 * nrows + head_in + legend_in), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # accumulate (shots → values) per (series, column) once, for both rows
    data: dict[tuple[RowKey, str, int], list[RunResult]] = {}
    for r in runs:
        data.setdefault((_series_key(r), r.column, r.shots), []).append(r)
    handles = {}
    for i, col in enumerate(columns):
        chunk, c = divmod(i, ncols)
        for row, (attr, ylabel) in enumerate((("clean_acc", "Natural acc. (%)"), ("robust_acc", "Robust acc. (%)"))):
            ax = axes[2 * chunk + row][c]
            for sk in series:
                xs = [s for s in shots if (sk, col, s) in data]
                if not xs:
                    continue
                vals = [[getattr(r, attr) for r in data[(sk, col, s)]] for s in xs]
                mean = [statistics.fmean(v) for v in vals]
                std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
                color, marker = style[sk]
                (line,) = ax.plot(xs, mean, color=color, marker=marker, markersize=4, linewidth=1.4, label=labels[sk])
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=color, alpha=0.18, linewidth=0)
                handles.setdefault(sk, line)
            ax.set_xscale("log", base=2)
            ax.set_xticks(shots)
            ax.set_xticklabels([str(s) for s in shots])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{col} — {'natural' if row == 0 else 'robust'}", fontsize=9)
            if c == 0:
                ax.set_ylabel(ylabel)
            if row == 1:
                ax.set_xlabel("shots per class")
    for j in range(len(columns), chunks * ncols):  # blank panels of a wrapped last row pair
        chunk, c = divmod(j, ncols)
        axes[2 * chunk][c].set_visible(False)
        axes[2 * chunk + 1][c].set_visible(False)
    h = fig.get_figheight()
    fig.suptitle(f"Few-shot accuracy under {runs[0].threat_label}\n"
                 f"{_caption(runs, 'mean ± sample std (shaded)', lambda r: (_series_key(r), r.column, r.shots))}", fontsize=10)
    fig.legend([handles[k] for k in series if k in handles], [labels[k] for k in series if k in handles],
               loc="lower center", ncol=min(len(series), 4), frameon=False, fontsize=9)
    # tight_layout makes room for the suptitle itself, but not for a figure legend
    fig.tight_layout(rect=(0, legend_in / h, 1, 1))
    return fig


def _scatter_figure(runs: list[RunResult]) -> Figure:
    series = sort_row_keys(row_key(r) for r in runs)
    labels = row_labels(series)
    style = _style(series)
    columns = sorted({r.column for r in runs}, key=dataset_rank)
    fig = Figure(figsize=(9.0, 6.0), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    n_points = 0
    all_x: list[float] = []
    all_y: list[float] = []
    for sk in series:
        color, marker = style[sk]
        points = []
        for col in columns:
            rs = [r for r in runs if row_key(r) == sk and r.column == col]
            if rs:
                points.append((col, statistics.fmean(r.clean_acc for r in rs), statistics.fmean(r.robust_acc for r in rs)))
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        all_x += xs
        all_y += ys
        ax.scatter(xs, ys, color=color, marker=marker, s=30, alpha=0.75, label=labels[sk])
        n_points += len(points)
        ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], color=color, marker=marker, s=170,
                   edgecolors="black", linewidths=1.2, zorder=3)
        if len(columns) > 1 and len(runs) <= 400:  # name the dataset of each point while it stays legible
            for col, x, y in points:
                ax.annotate(col, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, alpha=0.7)
    # robust = natural, the ceiling of robust accuracy; the axes stay zoomed on the data
    ax.axline((0, 0), slope=1, color="0.6", linestyle="--", linewidth=0.8, zorder=0)
    for values, setter in ((all_x, ax.set_xlim), (all_y, ax.set_ylim)):
        lo, hi = min(values), max(values)
        pad = max(2.0, 0.1 * (hi - lo))
        setter(max(0.0, lo - pad), min(100.0, hi + pad))
    ax.set_xlabel("Natural accuracy (%)")
    ax.set_ylabel("Robust accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Robust vs natural accuracy under {runs[0].threat_label}\n"
                 f"{_caption(runs, 'means', lambda r: (row_key(r), r.column))}; large edged markers: average over datasets", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- files

def _slugs(groups: dict) -> dict:
    out: dict = {}
    used: set[str] = set()
    for key in groups:
        base = slug = threat_slug(key)
        i = 2
        while slug in used:  # two threat models differing only in a detail the slug leaves out
            slug, i = f"{base}-{i}", i + 1
        used.add(slug)
        out[key] = slug
    return out


def output_paths(out_path: str | Path, slug: Optional[str] = None) -> list[Path]:
    """The PNG and PDF paths for ``out_path`` (given with .png, .pdf or no suffix), the stem
    suffixed with ``_<slug>`` when given."""
    p = Path(out_path)
    if p.suffix.lower() in (".png", ".pdf"):
        p = p.with_suffix("")
    elif p.suffix:
        raise ConfigError(f"figure path {out_path}: use a .png or .pdf suffix (both files are written)")
    if slug:
        p = p.with_name(f"{p.name}_{slug}")
    return [p.with_name(p.name + ".png"), p.with_name(p.name + ".pdf")]


def _save(fig: Figure, out_path: str | Path, slug: Optional[str]) -> list[Path]:
    from .outputs import save_figure

    return save_figure(fig, output_paths(out_path, slug), dpi=DPI)
