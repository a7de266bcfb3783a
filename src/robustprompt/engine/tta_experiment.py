"""Test-time protocols for `robustprompt run`: a grid of test-time defences × datasets × settings.

An experiment file with a ``tta:`` section (a `TTAConfig`, the same keys as `robustprompt tta
--config`) instead of ``train:`` runs that defence at every grid point (grid keys start with
``tta.``) and seed; the seed is the attack seed, the defender's view seed follows it (seed + 1) unless
``tta.defence_seed`` pins it. Each (point, seed) is an ordinary `robustprompt tta` run directory
under ``<root>/<point>/seed-<seed>/tta``, so a killed protocol resumes where it stopped and a finished
run is never redone; the summary holds clean accuracy, every attack's accuracy and the worst case
per image, mean ± sample std over seeds.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import from_dict, set_dotted
from ..errors import ConfigError
from ..report.console import format_table
from ..tta.procedures import build_procedure, procedure_class
from .grid import check_distinct_labels, mean_std, setting_name, slug, unit_dir
from .tta import TTAConfig, resolve_augmix, run_tta


@dataclass
class TTAPoint:
    """One grid point of a test-time protocol: its label, settings and one TTAConfig per seed."""

    key: str
    settings: dict[str, Any]
    configs: dict[int, TTAConfig]


def _slug(value: Any) -> str:
    """A grid value's label; a whole method spec is labelled by its name."""
    return slug(value["name"] if isinstance(value, dict) and "name" in value else value)


def expand_tta(tta: dict, grid: dict, seeds: list[int], device: str, where: str = "config", *,
               build: bool = False) -> list[TTAPoint]:
    """Every grid point with its validated per-seed configs — all checked before anything runs.
    build=True also builds each point's procedure, which checks the files it reads (TAPT's
    statistics): done before a protocol runs, not when a config is only loaded or printed."""
    for k, values in grid.items():
        if not k.startswith("tta."):
            raise ConfigError(f"{where}: grid key {k!r} of a test-time experiment must start with 'tta.'")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{k} must be a non-empty list")
    if "seed" in tta:
        raise ConfigError(f"{where}: tta.seed is set by the experiment's seeds list; remove it")
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        settings = dict(zip(keys, values))
        key = ",".join(f"{setting_name(k)}={_slug(v)}" for k, v in settings.items()) or "default"
        raw = copy.deepcopy(tta)
        for k, v in settings.items():
            set_dotted(raw, k[len("tta."):], v)
        raw.setdefault("device", device)
        configs = {seed: from_dict(TTAConfig, {**raw, "seed": seed}, f"{where} [{key}]: tta") for seed in seeds}
        first = configs[seeds[0]]
        params = resolve_augmix(first.method, first.data.dataset)[0]
        if build:   # everything the procedure checks, its input files included
            build_procedure(first.method.name, params)
        else:       # the name and the values only (a statistics file may be made later)
            cls = procedure_class(first.method.name)
            from_dict(cls.Params, params, f"{where} [{key}]: tta.method.params ({cls.name})")
        points.append(TTAPoint(key, settings, configs))
    check_distinct_labels([p.key for p in points], where)
    return points


def tta_row(point: TTAPoint, seed: int, m: dict, run_dir: Path) -> dict:
    """The summary row of one finished run (its metrics `m`)."""
    return {"point": point.key, **{setting_name(k): v for k, v in point.settings.items()},
            "method": m["tta_method"], "target": m["dataset"], "seed": seed,
            "clean_acc": m["clean_acc"], "robust_acc": m["robust_acc"], "n": m["n"],
            "base_clean_acc": m["base_clean_acc"], "base_robust_acc": m["base_robust_acc"],
            "attack_accs": {a["key"]: a["acc"] for a in m["attacks"]},
            "attack_titles": {a["key"]: a["title"] for a in m["attacks"]},
            "threat": m["threat"], "wall_time_s": m["wall_time_s"], "run": str(run_dir)}


def run_tta_unit(point: TTAPoint, seed: int, root: Path, progress: bool) -> list[dict]:
    """Run (or resume) one point and seed; its summary row once finished (main process)."""
    run_dir = unit_dir(root, point.key, seed) / "tta"
    m = run_tta(point.configs[seed], run_dir, progress=progress)
    return [] if m is None else [tta_row(point, seed, m, run_dir)]


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def summarize_tta(rows: list[dict], name: str, seeds: list[int]) -> dict[str, Any]:
    """Mean ± sample std over seeds of clean, each attack and the worst case, per grid point."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["point"], []).append(r)
    keys: list[str] = []
    titles: dict[str, str] = {}
    for rs in groups.values():
        for k, t in rs[0]["attack_titles"].items():
            if k not in keys:
                keys.append(k)
                titles[k] = t
    agg, table = [], []
    for point, rs in groups.items():
        entry = {"point": point, "method": rs[0]["method"], "target": rs[0]["target"],
                 "seeds": [r["seed"] for r in rs], "n": rs[0]["n"], "threat": rs[0]["threat"],
                 "runs": [r["run"] for r in rs]}
        for field in ("clean_acc", "robust_acc", "base_clean_acc", "base_robust_acc"):
            entry[field.replace("_acc", "_mean")], entry[field.replace("_acc", "_std")] = \
                mean_std([r[field] for r in rs])
        entry["attacks"] = {k: dict(zip(("mean", "std"), mean_std([r["attack_accs"][k] for r in rs])))
                            for k in keys if all(k in r["attack_accs"] for r in rs)}
        agg.append(entry)
        table.append([point, str(rs[0]["n"]), _pm(entry["clean_mean"], entry["clean_std"])]
                     + [_pm(**entry["attacks"][k]) if k in entry["attacks"] else "–" for k in keys]
                     + [_pm(entry["robust_mean"], entry["robust_std"])])
    header = ["setting", "n", "clean"] + [titles[k] for k in keys] + ["worst case"]
    threat = agg[0]["threat"] if agg else {}
    caption = (f"Test-time defences, mean ± sample std over seeds {seeds} (attack seed; the defence's view seed "
               f"follows it). Each attack column is that attack's own accuracy; worst case: an image counts only "
               f"if the defence survives every attack run on it. Accuracies in %.")
    md = format_table(header, table, align="lr" + "r" * (len(header) - 2)) + f"\n\n{caption}\n"
    return {"name": name, "kind": "tta", "rows": rows, "aggregate": agg, "threat": threat, "markdown": md}


def check_tta_experiment(tta: dict, train: dict, where: str) -> bool:
    """True when the experiment runs a test-time defence, False for a training one; both: an error."""
    if tta and train:
        raise ConfigError(f"{where}: an experiment either trains prompts (train:) or runs a test-time defence "
                          f"(tta:), not both")
    return bool(tta)
