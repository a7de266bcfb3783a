"""Robustness cards: for each defence, every attack that was run on it and the worst case.

A results table shows one number per defence and dataset: the worst case per image over every
attack a run ran (``robust_acc``). A card opens that number up. There is one card per defence
(table row: method or test-time method × base prompts × shots × backbone), per dataset column and
per set of attacks (runs that ran different attacks never share a card, as they never share a
table column). It lists

* clean accuracy,
* each attack: its title, which randomness of the defence the attacker had (``known``: the exact
  views the evaluation uses; ``secret``: fresh draws of its own; ``–``: the attack does not
  target the defence's randomness, e.g. the non-adaptive attack on CLIP), its accuracy,
* the worst case per image over the attacks (``robust_acc``), in bold,

each as the mean ± sample std (ddof=1) over seeds, the mean alone for a single seed. The worst
case is at most every attack's accuracy (an image survives the worst case only if it survives
each attack), and the gap shows how much running several attacks adds.

Only runs that record several attacks (``attacks`` in metrics.json, two or more) get cards: a
single-attack run has nothing to open up that its table row does not already show.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..errors import ConfigError
from .collect import RowKey, RunResult, dataset_rank, row_key, row_labels, sort_row_keys, threat_sort_key
from .console import format_table
from .tables import FORMATS, Cell, _fmt_cell, _num, latex_escape

CLEAN = "clean"
WORST = "worst_case"
NO_RANDOMNESS = "–"
HEADER = ("Attack", "Randomness", "Accuracy (%)")


@dataclass
class CardLine:
    """One line of a card: an attack (or ``clean`` / ``worst_case``) and its values over seeds."""

    key: str
    title: str
    randomness: Optional[str]
    cell: Cell


@dataclass
class Card:
    """The card of one defence on one dataset column under one set of attacks."""

    row: RowKey
    label: str
    column: str
    threat_key: tuple
    threat_label: str
    backbone: str
    lines: list[CardLine] = field(default_factory=list)
    seeds: list[Optional[int]] = field(default_factory=list)
    ns: set = field(default_factory=set)

    @property
    def n_attacks(self) -> int:
        return sum(line.key not in (CLEAN, WORST) for line in self.lines)

    @property
    def note(self) -> str:
        """What the card's numbers are: backbone, seeds and images."""
        known = sorted({s for s in self.seeds if s is not None})
        seed_list = f" ({', '.join(map(str, known))})" if known else ""
        counts = sorted({line.cell.n_seeds for line in self.lines})
        if counts == [1]:
            seeds = f"Single seed{seed_list}."
        else:
            seeds = f"Mean ± sample std (ddof=1) over {counts[-1]} seeds{seed_list}."
            if len(counts) > 1:
                seeds += " Attacks that some seeds did not run are over fewer."
        ns = sorted(n for n in self.ns if n is not None)
        images = (f" n = {ns[0]} images." if len(ns) == 1 else
                  f" n = {ns[0]}–{ns[-1]} images per run." if ns else "")
        return f"Backbone: {self.backbone}. {seeds}{images}"


def build_cards(runs: Iterable[RunResult]) -> list[Card]:
    """One Card per (defence, dataset column, set of attacks), for the runs that record two or more
    attacks; in table row order, then dataset order, then threat order. [] when no run has them."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        if len(r.attacks) > 1:
            groups.setdefault((row_key(r), r.column, r.threat_key), []).append(r)
    if not groups:
        return []
    rows = sort_row_keys(k[0] for k in groups)
    labels = row_labels(rows)
    order = sorted(groups, key=lambda k: (rows.index(k[0]), dataset_rank(k[1]), threat_sort_key(k[2])))
    return [_card(labels[k[0]], groups[k]) for k in order]


def _card(label: str, runs: list[RunResult]) -> Card:
    first = runs[0]
    card = Card(row_key(first), label, first.column, first.threat_key, first.threat_label, first.backbone,
                seeds=[r.seed for r in runs], ns={r.n for r in runs})
    lines: dict[str, CardLine] = {CLEAN: CardLine(CLEAN, "clean (no attack)", None, Cell([], []))}
    for r in runs:
        _add(lines[CLEAN], r.clean_acc, r.seed)
        for a in r.attacks:  # attacks in the order the run lists them; later runs may add ones
            line = lines.setdefault(a.key, CardLine(a.key, a.title, a.randomness, Cell([], [])))
            _add(line, a.acc, r.seed)
    n_over = len(dict(first.threat_key).get("attacks", ())) or 1  # the attacks the worst case is over
    worst = CardLine(WORST, f"worst case per image over {n_over} attack{'s' if n_over > 1 else ''}", None,
                     Cell([], []))
    for r in runs:
        _add(worst, r.robust_acc, r.seed)
    card.lines = [*lines.values(), worst]
    return card


def _add(line: CardLine, value: float, seed: Optional[int]) -> None:
    line.cell.values.append(value)
    line.cell.seeds.append(seed)


# ---------------------------------------------------------------- rendering

def robustness_cards(runs: Iterable[RunResult], fmt: str = "md") -> str:
    """The robustness cards as text: ``md`` (a heading and a small table per card), ``csv`` (long
    format: one row per card line) or ``latex`` (a booktabs table per card). Empty text (csv: the
    header alone) when no run records several attacks."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown card format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cards = build_cards(runs)
    if fmt == "csv":
        return _csv(cards)
    if not cards:
        return ""
    render = _markdown if fmt == "md" else _latex
    return "\n".join(render(c) for c in cards)


def _randomness(line: CardLine) -> str:
    return line.randomness or NO_RANDOMNESS


def _markdown(card: Card) -> str:
    rows = []
    for line in card.lines:
        text = _fmt_cell(line.cell.mean, line.cell.std)
        title = line.title.replace("|", "/")
        rows.append([f"**{title}**", NO_RANDOMNESS, f"**{text}**"] if line.key == WORST
                    else [title, _randomness(line), text])
    return "\n".join([f"#### {card.label.replace('|', '/')} · {card.column}", "",
                      f"Threat: {card.threat_label}", "",
                      format_table(list(HEADER), rows, align="llr"), "", card.note]) + "\n"


def _csv(cards: list[Card]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["defence", "column", "threat", "attack_key", "attack", "randomness", "mean", "std", "n_seeds"])
    for card in cards:
        for line in card.lines:
            c = line.cell
            w.writerow([card.label, card.column, card.threat_label, line.key, line.title, line.randomness or "",
                        _num(c.mean), "" if c.std is None else _num(c.std), c.n_seeds])
    return buf.getvalue()


def _latex(card: Card) -> str:
    lines = [r"% requires \usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
             r"\caption{" + latex_escape(f"Robustness card: {card.label} on {card.column}. "
                                         f"Threat: {card.threat_label}. {card.note}") + "}",
             r"\begin{tabular}{llr}", r"\toprule", " & ".join(latex_escape(h) for h in HEADER) + r" \\", r"\midrule"]
    for line in card.lines:
        text = _fmt_cell(line.cell.mean, line.cell.std, "$\\pm$")
        cells = [latex_escape(line.title), latex_escape(_randomness(line)), text]
        if line.key == WORST:
            lines.append(r"\midrule")
            cells = [rf"\textbf{{{cells[0]}}}", cells[1], rf"\textbf{{{text}}}"]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- parsing back

_VALUE = re.compile(r"^(?P<mean>-?\d+(?:\.\d+)?)(?:\s*±\s*(?P<std>\d+(?:\.\d+)?))?$")


def parse_cards_markdown(text: str) -> list[dict[str, Any]]:
    """Read markdown written by ``robustness_cards(..., "md")`` back into records:
    ``{defence, column, threat, attack, randomness, mean, std, worst}`` (``attack`` is the title
    shown; ``randomness`` None for '–'; ``worst`` True on the worst-case line). ValueError on a
    value it cannot read."""
    records: list[dict[str, Any]] = []
    defence = column = threat = None
    in_table = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#### "):
            defence, column = s[5:].rsplit(" · ", 1)
            threat, in_table = None, False
        elif s.startswith("Threat: "):
            threat = s[len("Threat: "):]
        elif s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if not in_table:
                in_table = True  # the header line
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                worst = cells[2].startswith("**")
                m = _VALUE.match(cells[2].strip("*"))
                if m is None:
                    raise ValueError(f"cannot read card value {cells[2]!r}")
                records.append({"defence": defence, "column": column, "threat": threat, "attack": cells[0].strip("*"),
                                "randomness": None if cells[1] == NO_RANDOMNESS else cells[1],
                                "mean": float(m["mean"]), "std": None if m["std"] is None else float(m["std"]),
                                "worst": worst})
        elif s:
            in_table = False
    return records
