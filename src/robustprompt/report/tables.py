"""Paper-style result tables: one column per dataset plus an average, methods as rows, a
natural-accuracy block and a robust-accuracy block, one table per threat model.

Conventions (stated again in every caption):

* a cell is the mean ± sample standard deviation (ddof=1) over seeds, 2 decimals; a cell with a
  single seed shows the mean only;
* "Average" is the mean of the row's per-dataset means (each dataset weighs the same). A row that
  lacks some of the table's datasets gets a dagger (†) and a footnote naming what is missing; such
  partial averages are not ranked. The column is left out when the table has one dataset;
* per column the best value is bold and the second best underlined, compared at the displayed
  precision, so tied cells all get the mark. Nothing is marked in a column with a single value, and
  "second best" needs at least three values (with two, underlining the last would mislead);
* rows: methods in the order of ``METHOD_TITLES`` (zero-shot first, the proposed methods late),
  unknown methods after them by name; columns in the literature's dataset order, then alphabetical;
* runs of different threat models (``RunResult.threat_key``) never share a table; tables come
  in ``threat_sort_key`` order (clean, FGSM, PGD, AutoAttack, by budget; adaptive ones last).
"""
from __future__ import annotations

import csv
import io
import logging
import re
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..errors import ConfigError
from .collect import RowKey, RunResult, dataset_rank, group_by_threat, row_key, row_labels, sort_row_keys
from .console import format_table

log = logging.getLogger("robustprompt")

BLOCKS = ("natural", "robust")
BLOCK_TITLES = {"natural": "Natural accuracy (%)", "robust": "Robust accuracy (%)"}
AVERAGE = "Average"
FORMATS = ("md", "csv", "latex")
DAGGER = "†"


@dataclass
class Cell:
    """The values of one (block, row, column) over seeds, with their summary."""

    values: list[float]
    seeds: list[Optional[int]]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation (ddof=1); None for a single value."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def n_seeds(self) -> int:
        return len(self.values)


@dataclass
class Average:
    """A row's average over the per-dataset means it has; ``missing`` lists the table's
    columns it lacks (a partial average, shown with a dagger)."""

    mean: float
    missing: list[str]

    @property
    def partial(self) -> bool:
        return bool(self.missing)


@dataclass
class ResultTable:
    """One threat model's natural and robust blocks, ready to render in any format."""

    threat_key: tuple
    threat_label: str
    columns: list[str]
    rows: list[RowKey]
    labels: dict[RowKey, str]
    cells: dict[tuple[str, RowKey, str], Cell]
    averages: dict[tuple[str, RowKey], Average]
    marks: dict[tuple[str, RowKey, str], str]     # "best" / "second"; column may be AVERAGE
    caption: str
    footnotes: list[str]

    @property
    def show_average(self) -> bool:
        return len(self.columns) > 1

    @property
    def header(self) -> list[str]:
        return ["Method", *self.columns, *([AVERAGE] if self.show_average else [])]


def build_tables(runs: Iterable[RunResult]) -> list[ResultTable]:
    """One ResultTable per threat model (clean, FGSM, PGD, AutoAttack; adaptive ones last)."""
    runs = list(runs)
    if not runs:
        raise ConfigError("no runs to tabulate")
    return [_build_one(group) for group in group_by_threat(runs).values()]


def _build_one(runs: list[RunResult]) -> ResultTable:
    columns = sorted({r.column for r in runs}, key=dataset_rank)
    rows = sort_row_keys(row_key(r) for r in runs)
    labels = row_labels(rows)
    cells: dict[tuple[str, RowKey, str], Cell] = {}
    for r in runs:
        for block, value in (("natural", r.clean_acc), ("robust", r.robust_acc)):
            c = cells.setdefault((block, row_key(r), r.column), Cell([], []))
            c.values.append(value)
            c.seeds.append(r.seed)
    for (block, rk, col), c in cells.items():
        dupes = sorted({s for s in c.seeds if c.seeds.count(s) > 1}, key=str)
        if dupes and block == "natural":  # warn once per cell, not per block
            paths = [str(r.path) for r in runs if row_key(r) == rk and r.column == col and r.seed in dupes]
            log.warning("report: %s on %s has several runs for seed(s) %s (%s); each counts as a sample",
                        labels[rk], col, ", ".join(map(str, dupes)), ", ".join(paths))
    averages: dict[tuple[str, RowKey], Average] = {}
    if len(columns) > 1:
        for block in BLOCKS:
            for rk in rows:
                have = [col for col in columns if (block, rk, col) in cells]
                if have:
                    averages[(block, rk)] = Average(statistics.fmean(cells[(block, rk, col)].mean for col in have),
                                                    [col for col in columns if col not in have])
    marks = _rank(columns, rows, cells, averages)
    footnotes = []
    for rk in rows:
        avg = averages.get(("natural", rk)) or averages.get(("robust", rk))
        if avg is not None and avg.partial:
            n_have = len(columns) - len(avg.missing)
            footnotes.append(f"{DAGGER} {labels[rk]}: average over the {n_have} of {len(columns)} dataset columns "
                             f"it has (no {', '.join(avg.missing)}).")
    return ResultTable(runs[0].threat_key, runs[0].threat_label, columns, rows, labels, cells, averages,
                       marks, _caption(runs, cells, columns), footnotes)


def _rank(columns: list[str], rows: list[RowKey], cells: dict, averages: dict) -> dict[tuple[str, RowKey, str], str]:
    marks: dict[tuple[str, RowKey, str], str] = {}
    for block in BLOCKS:
        for col in [*columns, AVERAGE]:
            shown: dict[RowKey, float] = {}
            for rk in rows:
                if col == AVERAGE:
                    a = averages.get((block, rk))
                    if a is not None and not a.partial:  # partial averages are not comparable
                        shown[rk] = round(a.mean, 2)
                elif (block, rk, col) in cells:
                    shown[rk] = round(cells[(block, rk, col)].mean, 2)
            if len(shown) < 2:
                continue
            best = max(shown.values())
            rest = [v for v in shown.values() if v < best]
            second = max(rest) if rest and len(shown) >= 3 else None
            for rk, v in shown.items():
                if v == best:
                    marks[(block, rk, col)] = "best"
                elif v == second:
                    marks[(block, rk, col)] = "second"
    return marks


def _caption(runs: list[RunResult], cells: dict, columns: list[str]) -> str:
    parts = [f"Accuracy (%) under {runs[0].threat_label}."]
    backbones = sorted({r.backbone for r in runs})
    parts.append(("Backbone: " if len(backbones) == 1 else "Backbones: ") + "; ".join(backbones) + ".")
    counts = sorted({c.n_seeds for c in cells.values()})
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    seed_list = f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})" if seeds else ""
    if counts == [1]:
        parts.append(f"Single seed{seed_list}: cells show the mean only.")
    elif len(counts) == 1:
        parts.append(f"Mean ± sample std (ddof=1) over {counts[0]} seeds{seed_list}.")
    else:
        parts.append(f"Mean ± sample std (ddof=1) over {counts[0]}–{counts[-1]} seeds per cell{seed_list}; "
                     "a cell from a single seed shows the mean only.")
    ns = {r.n for r in runs}
    per_col = {col: {r.n for r in runs if r.column == col} for col in columns}
    if len(ns) == 1 and None not in ns:
        parts.append(f"n = {ns.pop()} images per dataset.")
    elif all(len(v) == 1 and None not in v for v in per_col.values()):
        parts.append("Images per dataset: " + ", ".join(f"{c} {next(iter(v))}" for c, v in per_col.items()) + ".")
    else:
        parts.append("The number of images differs between runs of the same dataset.")
    if len(columns) > 1:
        parts.append("Average: mean of the per-dataset means.")
    parts.append("Best per column in bold, second best underlined.")
    return " ".join(parts)


# ---------------------------------------------------------------- rendering

def results_table(runs: Iterable[RunResult], fmt: str = "md") -> str:
    """The results as text: ``md`` (markdown), ``csv`` (long format, one row per block, method
    and column) or ``latex`` (booktabs). One table per threat model; see the module docstring
    for the conventions."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tables = build_tables(runs)
    if fmt == "csv":
        return _csv(tables)
    render = _markdown if fmt == "md" else _latex
    return "\n".join(render(t) for t in tables)


def _fmt_cell(mean: float, std: Optional[float], pm: str = "±") -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} {pm} {std:.2f}"


def _row_texts(t: ResultTable, block: str, rk: RowKey, *, pm: str, dagger: str, bold, underline) -> list[str]:
    out = []
    for col in t.columns:
        c = t.cells.get((block, rk, col))
        text = "—" if c is None else _fmt_cell(c.mean, c.std, pm)
        out.append(_mark(text, t.marks.get((block, rk, col)), bold, underline))
    if t.show_average:
        a = t.averages.get((block, rk))
        text = "—" if a is None else f"{a.mean:.2f}" + (dagger if a.partial else "")
        out.append(_mark(text, t.marks.get((block, rk, AVERAGE)), bold, underline))
    return out


def _mark(text: str, mark: Optional[str], bold, underline) -> str:
    return bold(text) if mark == "best" else underline(text) if mark == "second" else text


def _markdown(t: ResultTable) -> str:
    lines = [f"### {t.threat_label}", ""]
    for block in BLOCKS:
        rows = [[_md_escape(t.labels[rk]), *_row_texts(t, block, rk, pm="±", dagger=DAGGER,
                                                       bold=lambda s: f"**{s}**", underline=lambda s: f"<u>{s}</u>")]
                for rk in t.rows if any((block, rk, c) in t.cells for c in t.columns)]
        lines += [f"**{BLOCK_TITLES[block]}**", "", format_table([_md_escape(h) for h in t.header], rows), ""]
    lines.append(t.caption)
    if t.footnotes:
        lines += [""] + [f"{f}  " for f in t.footnotes]  # trailing spaces: markdown line breaks
    return "\n".join(lines) + "\n"


def _md_escape(s: str) -> str:
    return s.replace("|", "/")  # a pipe would split the cell


def _csv(tables: list[ResultTable]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["threat", "block", "method", "column", "mean", "std", "n_seeds", "partial"])
    for t in tables:
        for block in BLOCKS:
            for rk in t.rows:
                for col in t.columns:
                    c = t.cells.get((block, rk, col))
                    if c is not None:
                        w.writerow([t.threat_label, block, t.labels[rk], col, _num(c.mean),
                                    "" if c.std is None else _num(c.std), c.n_seeds, 0])
                a = t.averages.get((block, rk))
                if a is not None:
                    w.writerow([t.threat_label, block, t.labels[rk], AVERAGE, _num(a.mean), "", "", int(a.partial)])
    return buf.getvalue()


def _num(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".")


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"ℓ∞": r"$\ell_\infty$", "ℓ2": r"$\ell_2$", "ℓ1": r"$\ell_1$", "ε": r"$\epsilon$",
                  "α": r"$\alpha$", "×": r"$\times$", "±": r"$\pm$", "†": r"$^\dagger$", "–": "--", "—": "---"}


def latex_escape(text: str) -> str:
    """Text safe for LaTeX, with the unicode of threat labels turned into math."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    for k, v in _LATEX_UNICODE.items():
        out = out.replace(k, v)
    return out


def _latex(t: ResultTable) -> str:
    ncol = len(t.header)
    lines = [r"% requires \usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
             r"\caption{" + latex_escape(t.caption) + "}",
             r"\begin{tabular}{l" + "c" * (ncol - 1) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in t.header) + r" \\"]
    for block in BLOCKS:
        lines += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{latex_escape(BLOCK_TITLES[block])}}}}} \\",
                  r"\midrule"]
        for rk in t.rows:
            if not any((block, rk, c) in t.cells for c in t.columns):
                continue
            texts = _row_texts(t, block, rk, pm="$\\pm$", dagger="$^\\dagger$",
                               bold=lambda s: rf"\textbf{{{s}}}", underline=lambda s: rf"\underline{{{s}}}")
            lines.append(" & ".join([latex_escape(t.labels[rk]), *[s.replace("—", "--") for s in texts]]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.footnotes:
        lines.append(r"\par\smallskip{\footnotesize " + r" \\ ".join(latex_escape(f) for f in t.footnotes) + "}")
    lines += [r"\end{table}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- parsing back

_CELL = re.compile(r"^(?P<mean>-?\d+(?:\.\d+)?)(?:\s*±\s*(?P<std>\d+(?:\.\d+)?))?(?P<dagger>†)?$")


def parse_markdown_table(text: str) -> list[dict[str, Any]]:
    """Read markdown written by ``results_table(..., "md")`` back into long-format records:
    ``{threat, block, method, column, mean, std, bold, underline, partial}`` (std None for a
    single seed or an average; empty cells are left out). ValueError on a cell it cannot read."""
    records: list[dict[str, Any]] = []
    threat: Optional[str] = None
    block: Optional[str] = None
    header: Optional[list[str]] = None
    titles = {v: k for k, v in BLOCK_TITLES.items()}
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("### "):
            threat, block, header = s[4:].strip(), None, None
        elif s.startswith("**") and s.strip("*") in titles:
            block, header = titles[s.strip("*")], None
        elif s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                for col, raw in zip(header[1:], cells[1:]):
                    rec = _parse_cell(raw)
                    if rec is not None:
                        records.append({"threat": threat, "block": block, "method": cells[0], "column": col, **rec})
        elif not s:
            continue
        else:
            header = None  # caption or footnote: any table has ended
    return records


def _parse_cell(raw: str) -> Optional[dict[str, Any]]:
    bold = raw.startswith("**") and raw.endswith("**")
    underline = raw.startswith("<u>") and raw.endswith("</u>")
    inner = raw[2:-2] if bold else raw[3:-4] if underline else raw
    if inner == "—":
        return None
    m = _CELL.match(inner.strip())
    if m is None:
        raise ValueError(f"cannot read table cell {raw!r}")
    return {"mean": float(m["mean"]), "std": None if m["std"] is None else float(m["std"]),
            "bold": bold, "underline": underline, "partial": m["dagger"] is not None}
