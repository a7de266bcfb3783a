"""`robustprompt run CONFIG.yaml`: train, then evaluate clean and robust accuracy, over seeds and
over a grid of settings (methods × datasets × shots …), and summarise mean ± std. An experiment with
a ``tta:`` section instead of ``train:`` runs a test-time defence protocol (engine.tta_experiment).

Every (grid point, seed) gets a training run directory and one evaluation run directory per
target, so a killed experiment resumes where it stopped and finished runs are never redone.
A grid spread over many processes or machines (``--shard i/N``, ``--collect``, ``--launcher
slurm``) works on the same (grid point, seed) units and folders: see engine.grid and engine.launcher.
"""
from __future__ import annotations

import difflib
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import AttackSpec, DataSpec, ModelSpec, from_dict, set_dotted, to_dict
from ..errors import ConfigError
from ..paths import atomic_write_text
from ..report.console import format_table
from .evaluate import EvalConfig, check_seed, evaluate
from .grid import (LauncherConfig, check_distinct_labels, claim_root_briefly, collect_units, grid_units, mean_std,
                   missing_section, setting_name, shard_note, shard_units, slug, unit_dir, write_or_check_experiment)
from .rundir import check_out_dir, experiment_dir, read_metrics
from .runtime import process_state
from .train import TrainConfig, train, train_config_from_dict
from .tta_experiment import check_tta_experiment, expand_tta, run_tta_unit, summarize_tta, tta_row


def _paper_eval_attack() -> AttackSpec:
    return AttackSpec(attack="pgd", eps=1.0, alpha=1.0, steps=100)


@dataclass
class EvalTarget:
    """One evaluation of every trained run. Unset fields follow the training data."""

    dataset: Optional[str] = None
    root: Optional[str] = None
    split: str = "test"
    classes: Optional[str] = None       # default: the training classes (base stays base)
    subset: Optional[int] = None
    subset_seed: int = 0
    batch_size: int = 64
    workers: int = 0
    name: Optional[str] = None          # column label; default "<dataset>[/<classes>]"


@dataclass
class ExperimentEval:
    attack: AttackSpec = field(default_factory=_paper_eval_attack)
    also: list[AttackSpec] = field(default_factory=list)   # e.g. AutoAttack: robust = worst case per image
    targets: list[EvalTarget] = field(default_factory=lambda: [EvalTarget()])
    templates: str = "dataset"


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    train: dict = field(default_factory=dict)          # a TrainConfig, validated per grid point
    tta: dict = field(default_factory=dict)            # or a TTAConfig: a test-time protocol (no training)
    eval: ExperimentEval = field(default_factory=ExperimentEval)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    grid: dict = field(default_factory=dict)           # dotted key under train/eval → list of values
    out: Optional[str] = None
    device: str = "auto"
    launcher: LauncherConfig = field(default_factory=LauncherConfig)   # `run --launcher slurm`'s job resources

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        for i, seed in enumerate(self.seeds):
            check_seed(seed, f"seeds[{i}]")
        if len(set(self.seeds)) != len(self.seeds):   # one folder per seed: a repeat would share it
            raise ConfigError(f"seeds must be distinct, got {self.seeds}")


@dataclass
class Point:
    """One grid point: a label, its settings, its train config per seed and its eval targets."""

    key: str
    settings: dict[str, Any]
    train: dict[int, TrainConfig]
    evals: list[tuple[str, EvalTarget]]
    attack: AttackSpec


def expand(cfg: ExperimentConfig, where: str = "config") -> list[Point]:
    """Every grid point with its validated configs — all checked before anything runs."""
    keys = list(cfg.grid)
    for k in keys:
        if not k.startswith(("train.", "eval.attack.")):
            raise ConfigError(f"{where}: grid key {k!r} must start with 'train.' or 'eval.attack.'")
        if not isinstance(cfg.grid[k], list) or not cfg.grid[k]:
            raise ConfigError(f"{where}: grid.{k} must be a non-empty list")
    points = []
    for values in itertools.product(*(cfg.grid[k] for k in keys)) if keys else [()]:
        settings = dict(zip(keys, values))
        raw = {"train": json.loads(json.dumps(cfg.train)), "eval": {"attack": to_dict(cfg.eval.attack)}}
        for k, v in settings.items():
            set_dotted(raw, k, v)
        key = ",".join(f"{setting_name(k)}={slug(v)}" for k, v in settings.items()) or "default"
        here = f"{where} [{key}]"
        attack = from_dict(AttackSpec, raw["eval"]["attack"], f"{here}: eval.attack")
        trains = {}
        for seed in cfg.seeds:
            t = dict(raw["train"])
            t["seed"] = seed
            t.setdefault("device", cfg.device)
            trains[seed] = train_config_from_dict(t, f"{here}: train")
        first = trains[cfg.seeds[0]]
        evals = []
        for target in cfg.eval.targets:
            dataset = target.dataset or first.data.dataset
            classes = target.classes or first.data.classes
            label = target.name or (dataset if classes == "all" else f"{dataset}/{classes}")
            evals.append((label, target))
        labels = [lab for lab, _ in evals]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{where}: eval targets need distinct names, got {labels}")
        points.append(Point(key, settings, trains, evals, attack))
    check_distinct_labels([p.key for p in points], where)
    return points


def _eval_config(point: Point, seed: int, target: EvalTarget, train_dir: Path, cfg: ExperimentConfig) -> EvalConfig:
    tc = point.train[seed]
    data = DataSpec(dataset=target.dataset or tc.data.dataset,
                    root=target.root if target.root is not None else tc.data.root,
                    split=target.split, classes=target.classes or tc.data.classes, subset=target.subset,
                    subset_seed=target.subset_seed, batch_size=target.batch_size, workers=target.workers,
                    download=tc.data.download)
    return EvalConfig(model=ModelSpec(run=str(train_dir), templates=cfg.eval.templates), data=data,
                      attack=point.attack, also=list(cfg.eval.also), seed=seed, device=cfg.device)


def experiment_root(cfg: ExperimentConfig, out: Optional[str | Path] = None) -> Path:
    """The experiment's folder: `out`, else the config's `out`, else runs/experiments/<name>."""
    return Path(out or cfg.out or Path("runs") / "experiments" / slug(cfg.name))


def _points(cfg: ExperimentConfig, where: str, build: bool) -> tuple[bool, list]:
    """(test-time?, every grid point) — validated before anything runs."""
    test_time = check_tta_experiment(cfg.tta, cfg.train, where)
    points = expand_tta(cfg.tta, cfg.grid, cfg.seeds, cfg.device, where, build=build) if test_time \
        else expand(cfg, where)
    return test_time, points


def _train_row(point: Point, seed: int, label: str, m: dict, run_dir: Path) -> dict:
    return {"point": point.key, **{setting_name(k): v for k, v in point.settings.items()},
            "method": m["method"], "target": label, "seed": seed,
            "clean_acc": m["clean_acc"], "robust_acc": m["robust_acc"], "n": m["n"],
            "attack_accs": {a["key"]: a["acc"] for a in m.get("attacks", [])},
            "threat": m["threat"], "run": str(run_dir)}


def _run_unit(cfg: ExperimentConfig, point, seed: int, root: Path, test_time: bool, progress: bool) -> list[dict]:
    """Train and evaluate (or run the test-time defence for) one (point, seed); its summary rows
    (main process). Finished runs are reused, so a unit interrupted anywhere resumes."""
    if test_time:
        return run_tta_unit(point, seed, root, progress)
    rows = []
    seed_dir = unit_dir(root, point.key, seed)
    train(point.train[seed], seed_dir / "train", progress=progress)
    for label, target in point.evals:
        run_dir = seed_dir / f"eval-{slug(label)}"
        m = evaluate(_eval_config(point, seed, target, seed_dir / "train", cfg), run_dir, progress=progress)
        if m is not None:
            rows.append(_train_row(point, seed, label, m, run_dir))
    return rows


def _read_unit(point, seed: int, root: Path, test_time: bool) -> tuple[list[dict], bool]:
    """The rows of one unit's finished runs (read from their metrics.json) and whether all finished."""
    seed_dir = unit_dir(root, point.key, seed)
    if test_time:
        m = read_metrics(seed_dir / "tta")
        return ([tta_row(point, seed, m, seed_dir / "tta")] if m is not None else []), m is not None
    rows = []
    for label, _ in point.evals:
        run_dir = seed_dir / f"eval-{slug(label)}"
        m = read_metrics(run_dir)
        if m is not None:
            rows.append(_train_row(point, seed, label, m, run_dir))
    return rows, len(rows) == len(point.evals)


def _summary(rows: list[dict], cfg: ExperimentConfig, test_time: bool, points: list) -> dict[str, Any]:
    if test_time:
        return summarize_tta(rows, cfg.name, cfg.seeds)
    return summarize(rows, cfg, {p.key: p.attack for p in points})


def _write_summary(root: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(root / "summary.md", summary["markdown"])


def run_experiment(cfg: ExperimentConfig, out: Optional[str | Path] = None, *, progress: bool = True,
                   where: str = "config", wait_for_lock: bool = False,
                   shard: Optional[tuple[int, int]] = None) -> Optional[dict[str, Any]]:
    """Every (grid point, seed): train, then evaluate each target; returns the summary (main
    process). The root folder follows the run-directory rules (marker; a non-empty folder without
    one is refused) and is locked for the whole experiment; each run inside it is a run directory.

    shard=(i, N): only the units of shard i of N (round-robin over the grid's order, see
    engine.grid); the root is locked only while it is marked and experiment.yaml written, so shards
    run side by side on one root (each unit's run folders are locked by its own runs); no summary
    is written and None is returned — `collect_experiment` assembles it. Each shard may itself run
    on several GPUs (torchrun / accelerate launch): the engine splits every run's images across
    the processes."""
    test_time, points = _points(cfg, where, build=True)
    root = experiment_root(cfg, out)
    check_out_dir(root)   # before any work
    state, _ = process_state(cfg.device)
    by_key = {p.key: p for p in points}
    units = grid_units(by_key, cfg.seeds)
    if shard is not None:
        mine = shard_units(units, *shard)
        if mine:
            claim_root_briefly(root, to_dict(cfg), state, wait_for_lock=wait_for_lock)
        for unit in mine:
            _run_unit(cfg, by_key[unit.point], unit.seed, root, test_time, progress)
        if state.is_main_process:
            print(shard_note(shard, mine, len(units)), file=sys.stderr, flush=True)
        return None
    # experiment.yaml written or checked under the lock, on the main process; a refusal reaches
    # every process (a torchrun rank would otherwise wait at its first broadcast)
    with experiment_dir(root, state, wait_for_lock=wait_for_lock,
                        on_claim=lambda: write_or_check_experiment(root, to_dict(cfg))):
        rows = []
        for unit in units:
            rows += _run_unit(cfg, by_key[unit.point], unit.seed, root, test_time, progress)
        if not state.is_main_process:   # the other processes' evaluations return nothing to summarise
            return None
        summary = _summary(rows, cfg, test_time, points)
        _write_summary(root, summary)
        return summary


def collect_experiment(cfg: ExperimentConfig, out: Optional[str | Path] = None, *, where: str = "config",
                       command: Optional[str] = None, wait_for_lock: bool = False) -> dict[str, Any]:
    """Assemble summary.json / summary.md from whatever units have finished (each run's
    metrics.json), training or test-time, without running anything. A complete grid gives exactly
    the summary an unsharded `run_experiment` writes; otherwise the summary covers the finished
    runs and carries ``missing``: [{point, seed, unit, command}] (also listed under an
    "Incomplete" heading in summary.md). `command`: how to rerun this experiment (default
    ``robustprompt run <where> --out <root>``); each missing unit's command appends --shard u/U."""
    test_time, points = _points(cfg, where, build=False)
    root = experiment_root(cfg, out)
    if not (root / "experiment.yaml").is_file():
        raise ConfigError(f"{str(root)[:200]} holds no experiment yet (no experiment.yaml); run it first "
                          "(`robustprompt run CONFIG`, or with --shard i/N)")
    by_key = {p.key: p for p in points}
    units = grid_units(by_key, cfg.seeds)
    claim_root_briefly(root, to_dict(cfg), wait_for_lock=wait_for_lock)   # the same experiment, else refused
    rows, missing = collect_units(units, lambda u: _read_unit(by_key[u.point], u.seed, root, test_time),
                                  command or f"robustprompt run {where} --out {root}")
    summary = _summary(rows, cfg, test_time, points)
    if missing:
        summary["missing"] = missing
        summary["markdown"] += "\n" + missing_section(missing, len(units))
    _write_summary(root, summary)
    return summary


def summarize(rows: list[dict], cfg: ExperimentConfig,
              attacks: Optional[dict[str, AttackSpec]] = None) -> dict[str, Any]:
    """Mean ± std over seeds per (grid point, target). `attacks`: each point's attack (the grid may
    vary eval.attack.*; default: cfg.eval.attack for every point) — one attack is named in the
    caption, several get a column."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["point"], r["target"]), []).append(r)
    agg = []
    for (point, target), rs in groups.items():
        c, cs = mean_std([r["clean_acc"] for r in rs])
        a, as_ = mean_std([r["robust_acc"] for r in rs])
        per_attack = {k: mean_std([r["attack_accs"][k] for r in rs]) for k in rs[0].get("attack_accs", {})}
        agg.append({"point": point, "method": rs[0]["method"], "target": target, "seeds": [r["seed"] for r in rs],
                    "clean_mean": c, "clean_std": cs, "robust_mean": a, "robust_std": as_,
                    "attacks": {k: {"mean": mu, "std": sd} for k, (mu, sd) in per_attack.items()},
                    "n": rs[0]["n"], "threat": rs[0]["threat"], "runs": [r["run"] for r in rs]})
    def named(point: str) -> str:
        first = (attacks or {}).get(point, cfg.eval.attack)
        return " and ".join(a.threat().short() for a in [first, *cfg.eval.also])

    names = [named(g["point"]) for g in agg]
    one = len(set(names)) <= 1
    table_rows = [[g["point"], g["target"], *([] if one else [name]), f"{g['clean_mean']:.2f} ± {g['clean_std']:.2f}",
                   f"{g['robust_mean']:.2f} ± {g['robust_std']:.2f}"] for g, name in zip(agg, names)]
    threat = agg[0]["threat"] if agg else {}
    worst = ", worst case per image" if cfg.eval.also else ""
    under = f"under {names[0] if names else named('')}" if one else "under each row's attack"
    caption = f"Mean ± sample std over seeds {cfg.seeds}. Robust accuracy {under}{worst} (float32)."
    header = ["setting", "evaluated on", *([] if one else ["attack"]), "clean", "robust"]
    md = format_table(header, table_rows) + f"\n\n{caption}\n"
    return {"name": cfg.name, "rows": rows, "aggregate": agg, "threat": threat, "markdown": md}


# The paper protocols ship inside the package, so an installed robustprompt finds them by name.
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def packaged_configs() -> list[str]:
    """Names of the experiment YAMLs shipped with the package, e.g. ['apd/few_shot', …]."""
    if not PACKAGED_CONFIGS.is_dir():
        return []
    return sorted(p.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix()
                  for p in PACKAGED_CONFIGS.rglob("*.yaml"))


def find_config(name: str | Path) -> Path:
    """The experiment YAML that `name` means: a path that exists wins; otherwise a config shipped
    with the package, named with or without `configs/` in front and `.yaml` behind
    (`cba_fapt/few_shot`, `configs/cba_fapt/few_shot.yaml`). Neither: a one-line ConfigError that
    lists the packaged names and the nearest one."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    key = path.as_posix().removeprefix("./").removeprefix("configs/").removesuffix(".yaml").removesuffix(".yml")
    known = packaged_configs()
    if key in known:
        return PACKAGED_CONFIGS / f"{key}.yaml"
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else ""
    shipped = ", ".join(known) if known else "none (this installation lacks robustprompt/configs)"
    raise ConfigError(f"config file {str(name)[:200]} does not exist, and no config shipped with robustprompt "
                      f"is named {key[:100]}{hint} (shipped: {shipped})")


def load_experiment(path: str | Path, overrides: Optional[dict] = None) -> ExperimentConfig:
    """Load experiment config `path` (a file, or a packaged name: see `find_config`), with
    `overrides` (a nested dict) merged over it, and validate every grid point."""
    from ..config import deep_merge, load_yaml

    path = find_config(path)
    raw = load_yaml(path)
    if overrides:
        raw = deep_merge(raw, overrides)
    cfg = from_dict(ExperimentConfig, raw, str(path))
    validate_experiment(cfg, str(path))  # every grid point now, not hours later
    return cfg


def validate_experiment(cfg: ExperimentConfig, where: str = "config") -> None:
    """Build every grid point's configs (training or test-time), raising ConfigError on the first bad one."""
    _points(cfg, where, build=False)
