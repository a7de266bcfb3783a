"""A protocol grid spread over many processes or machines: shards, the shared root, and collection.

The work units of an experiment are its (grid point, seed) pairs, in the grid's deterministic order
(`itertools.product` over the grid keys as the config lists them, seeds innermost). Each unit owns
its run directories (``<root>/<point>/seed-<seed>/train`` and ``eval-*``, or ``…/tta``), and each of
those is locked by the run that writes it, so units never share a file.

* ``run CONFIG --shard i/N`` runs unit j (0-based) when ``j mod N == i - 1``: round-robin, because
  the grid's order puts the expensive settings together (every ImageNet unit, every 16-shot unit of
  a method): contiguous blocks would give one shard all of them, round-robin spreads them over the
  shards. Every unit is in exactly one shard for any N; a shard with i > #units has nothing to do.
  ``--shard j/#units`` is unit j alone, which is how a missing unit is named.
* A sharded run holds the experiment root's lock only for the moment it takes to mark the folder and
  write experiment.yaml (absent: written atomically; present: it must describe the same experiment),
  so any number of shards run side by side; it writes no summary.
* ``run CONFIG --collect`` assembles summary.json/summary.md from each finished run's metrics.json
  (the same rows in the same order as an unsharded run, so a complete grid gives the same summary)
  and lists the missing units with the command that runs each.

Several GPUs per unit combine with this freely: a shard is an ordinary `robustprompt run`, so
``torchrun --nproc-per-node 4 -m robustprompt run CONFIG --shard i/N`` (or ``accelerate launch``)
runs each of its units on 4 GPUs, the engine splitting images (and training batches) across the
processes as it does for any run; grid points go across nodes, each point on one or several GPUs.
"""
from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import yaml

from ..errors import ConfigError
from ..paths import atomic_write_text
from .rundir import _first_difference, experiment_dir

# exit status of `run --collect` when some units have not finished (0: complete; 2: a user mistake)
INCOMPLETE_EXIT = 3
# experiment keys that may differ between shards of one grid (where and how a shard runs, not what)
_PER_SHARD_KEYS = ("device", "out", "launcher")
# how long a shard waits for another shard's momentary hold on the root before it gives up
ROOT_PATIENCE_S = 60.0


@dataclass(frozen=True)
class Unit:
    """One (grid point, seed) pair; `index` is its 0-based place in the grid's order."""

    index: int
    point: str
    seed: int


@dataclass
class LauncherConfig:
    """The ``launcher:`` section of an experiment: what each submitted job asks the scheduler for
    (submitit's AutoExecutor parameters; `partition`, `account`, `qos`, `constraint`,
    `array_parallelism` and `additional` are Slurm's). Set on the command line with
    ``--set launcher.KEY=VALUE``. Several GPUs per unit: tasks_per_node = gpus_per_node, and each
    job sets up torch.distributed across its tasks (submitit's TorchDistributedEnvironment)."""

    gpus_per_node: int = 1
    cpus_per_task: int = 8
    timeout_min: int = 240
    mem_gb: Optional[float] = None
    nodes: int = 1
    tasks_per_node: int = 1
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = 256          # jobs of one array running at once
    setup: list[str] = field(default_factory=list)      # shell lines run before each job (module load …)
    additional: dict = field(default_factory=dict)      # any other sbatch option, e.g. {gres: "gpu:a100:1"}
    name: Optional[str] = None            # job name; default robustprompt-<experiment name>

    def __post_init__(self) -> None:
        for key in ("gpus_per_node", "cpus_per_task", "timeout_min", "nodes", "tasks_per_node", "array_parallelism"):
            value = getattr(self, key)
            low = 0 if key == "gpus_per_node" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"launcher.{key} must be an integer ≥ {low}, got {value!r}")
        if self.mem_gb is not None and (isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, (int, float))
                                        or self.mem_gb <= 0):
            raise ConfigError(f"launcher.mem_gb must be a positive number, got {self.mem_gb!r}")


def setting_name(dotted: str) -> str:
    """Short label of a grid key: train.data.shots → shots, tta.method.name → method."""
    parts = dotted.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def slug(value: Any) -> str:
    """A grid value as one safe path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "x"


def unit_dir(root: Path, point: str, seed: int) -> Path:
    """The folder of one unit's runs."""
    return Path(root) / point / f"seed-{seed}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def grid_units(point_keys: Iterable[str], seeds: Iterable[int]) -> list[Unit]:
    """Every (point, seed) in the order an unsharded run takes them: points outer, seeds inner."""
    seeds = list(seeds)
    return [Unit(i, key, seed) for i, (key, seed) in
            enumerate((k, s) for k in point_keys for s in seeds)]


def check_distinct_labels(labels: list[str], where: str) -> None:
    """Each grid point owns the run folder named by its label: two points with one label would share it."""
    dup = next((k for k in labels if labels.count(k) > 1), None)
    if dup is not None:
        raise ConfigError(f"{where}: two grid points share the label {dup!r} (each needs its own run folder); "
                          f"give grid entries distinct names")


def parse_shard(text: str, environ: Optional[Mapping[str, str]] = None) -> tuple[int, int]:
    """'i/N' (1-based, 1 ≤ i ≤ N) → (i, N); 'slurm' → this task's place in its Slurm job array
    (see `slurm_array_shard`); anything else is a one-line ConfigError."""
    if str(text).strip().lower() == "slurm":
        return slurm_array_shard(os.environ if environ is None else environ)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"--shard takes I/N with whole numbers, e.g. 3/8 (shard 3 of 8), or 'slurm' inside a "
                          f"Slurm job array, got {str(text)[:50]!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise ConfigError(f"--shard {i}/{n}: shards are numbered 1 to N (N ≥ 1); a 0-based index such as "
                          f"SLURM_ARRAY_TASK_ID needs + 1 (or use --shard slurm)")
    return i, n


def slurm_array_shard(environ: Mapping[str, str]) -> tuple[int, int]:
    """(i, N) of this Slurm array task: N = SLURM_ARRAY_TASK_COUNT and i its place among the array's
    indices, whatever they start at (--array=0-63, 1-64) and whatever their step (--array=0-126:2).
    An array with gaps (--array=1,3,4) has no such place and is refused: name the shard with I/N."""
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT")
    missing = [n for n in names if not str(environ.get(n, "")).strip()]
    if missing:
        raise ConfigError(f"--shard slurm: {missing[0]} is not set — this is not a Slurm job array task "
                          "(sbatch --array=…); elsewhere name the shard: --shard I/N")
    try:
        task, low, high, count = (int(environ[n]) for n in names)
        step = int(environ.get("SLURM_ARRAY_TASK_STEP") or 1)
    except ValueError:
        raise ConfigError("--shard slurm: the SLURM_ARRAY_TASK_* variables are not whole numbers; "
                          "name the shard: --shard I/N") from None
    if step < 1 or count < 1 or high - low != (count - 1) * step or (task - low) % step or not low <= task <= high:
        raise ConfigError(f"--shard slurm: the array's indices ({low}…{high}, step {step}, {count} tasks) are not "
                          f"an evenly spaced range holding task {task}; submit --array=0-<N-1> or name the "
                          "shard: --shard I/N")
    return (task - low) // step + 1, count


def shard_units(units: list[Unit], shard: int, count: int) -> list[Unit]:
    """Shard `shard` of `count` (1-based): the units whose index ≡ shard − 1 (mod count)."""
    return [u for u in units if u.index % count == shard - 1]


def _comparable(experiment: dict) -> dict:
    """The experiment with every default filled in (a file written before a key existed still
    compares equal), less what may differ between shards."""
    from ..config import from_dict, to_dict
    from .experiment import ExperimentConfig

    try:
        experiment = to_dict(from_dict(ExperimentConfig, experiment))
    except (ConfigError, TypeError, ValueError):
        pass   # not a valid experiment now: compared as written
    return {k: v for k, v in experiment.items() if k not in _PER_SHARD_KEYS}


def write_or_check_experiment(root: Path, experiment: dict) -> None:
    """experiment.yaml: written if absent; if present it must describe the same experiment (a root
    holds one experiment, so `--collect` can trust that every run in it belongs to the config)."""
    file = root / "experiment.yaml"
    if file.exists():
        try:
            old = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError):
            old = None
        if isinstance(old, dict) and _comparable(old) == _comparable(experiment):
            return
        if isinstance(old, dict):
            diff = _first_difference(_comparable(old), _comparable(experiment))
            raise ConfigError(f"{str(root)[:200]} holds another experiment ({diff}); one folder holds one "
                              "experiment (its shards share one config) — choose another --out")
    atomic_write_text(file, yaml.safe_dump(experiment, sort_keys=False))


def claim_root_briefly(root: Path, experiment: dict, state=None, *, wait_for_lock: bool = False,
                       patience_s: float = ROOT_PATIENCE_S) -> None:
    """Mark `root` as an experiment folder and write (or check) its experiment.yaml under the root's
    lock, then let go of it. Another shard's or collection's hold lasts milliseconds: waited on for
    up to `patience_s`; a root held longer (an unsharded `run` holds it throughout) is refused with
    the holder named, unless `wait_for_lock`."""
    with experiment_dir(root, state, wait_for_lock=wait_for_lock, patience_s=patience_s,
                        on_claim=lambda: write_or_check_experiment(root, experiment)):
        pass


def missing_section(missing: list[dict], total: int) -> str:
    """The markdown appended to an incomplete summary: which units, and the command for each."""
    lines = [f"## Incomplete: {len(missing)} of {total} units have not finished", "",
             "Each line runs one missing unit (finished runs inside it are reused); rerunning the shards "
             "does the same.", ""]
    lines += [f"- {m['point']} seed {m['seed']}: `{m['command']}`" for m in missing]
    return "\n".join(lines) + "\n"


def collect_units(units: list[Unit], read_unit: Callable[[Unit], tuple[list[dict], bool]],
                  command: str) -> tuple[list[dict], list[dict]]:
    """Rows of every finished run, in grid order, and the missing units with the command for each.
    read_unit(unit) → (its finished rows, whether the whole unit finished)."""
    rows: list[dict] = []
    missing: list[dict] = []
    for unit in units:
        found, complete = read_unit(unit)
        rows.extend(found)
        if not complete:
            missing.append({"point": unit.point, "seed": unit.seed, "unit": unit.index + 1,
                            "command": f"{command} --shard {unit.index + 1}/{len(units)}"})
    return rows, missing


def shard_note(shard: tuple[int, int], ran: list[Unit], total: int) -> str:
    """One line saying what a shard did."""
    i, n = shard
    if not ran:
        return f"shard {i}/{n}: no units (the grid has {total}); nothing to do"
    return (f"shard {i}/{n}: {len(ran)} of {total} units finished; `robustprompt run CONFIG --collect` "
            "assembles the summary once every shard has")

