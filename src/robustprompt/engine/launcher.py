"""`robustprompt run CONFIG --launcher slurm|local`: submit a protocol grid through submitit.

On Slurm, one job per (grid point, seed) unit by default, or one per shard with ``--shards N``, as
one job array. Locally (submitit's LocalExecutor: real processes, all started at once) one job per
group of ``launcher.gpus_per_node`` GPUs, each on its own GPUs (one job on a machine without GPUs),
or ``--shards N`` jobs. Each job runs exactly what ``run CONFIG --shard i/N`` runs
(engine.grid): its units' run directories, locked by their own runs, resumed where they stopped.
So a job that is preempted or times out is simply run again: submitit requeues it on Slurm's
signal (`ShardJob.checkpoint`), and finished runs inside it are reused. Job resources come from
the config's ``launcher:`` section (`LauncherConfig`; ``--set launcher.KEY=VALUE`` overrides);
the scheduler's logs and submitit's pickles go to ``<root>/launcher/``. Afterwards
``run CONFIG --collect`` assembles the summary.

Several GPUs per unit: ``launcher.tasks_per_node`` = ``launcher.gpus_per_node`` = G starts G
tasks per job; each task exports the torch.distributed environment (rank, world size, master
address) before the run starts, so the engine splits each run's images across the G GPUs exactly
as under torchrun.

submitit is an optional dependency: ``pip install 'robustprompt[slurm]'``.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import to_dict
from ..errors import ConfigError
from ..messages import one_line
from .grid import LauncherConfig, claim_root_briefly, grid_units

LAUNCHERS = ("slurm", "local")


def require_submitit() -> Any:
    """The submitit module, or a one-line ConfigError naming the extra that installs it."""
    try:
        import submitit
    except ImportError as exc:
        raise ConfigError("--launcher needs submitit, which is not installed: pip install 'robustprompt[slurm]' "
                          "(or pip install submitit)") from exc
    return submitit


@dataclass
class ShardJob:
    """What one submitted job runs: shard `shard` of `count` of the experiment `config` (a dict,
    re-validated in the job) in `root`. Picklable; `checkpoint` makes submitit requeue it unchanged
    on preemption or timeout (the runs resume from their own files)."""

    config: dict
    where: str
    root: str
    shard: int
    count: int
    distributed: bool = False

    def __call__(self) -> str:
        from ..config import from_dict
        from .experiment import ExperimentConfig, run_experiment

        if self.distributed:   # several tasks per job: one torch.distributed process each
            import submitit

            # every task keeps every GPU of the job: accelerate gives task r the GPU cuda:LOCAL_RANK
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from .runtime import process_state

        cfg = from_dict(ExperimentConfig, self.config, self.where)
        run_experiment(cfg, self.root, progress=False, where=self.where, shard=(self.shard, self.count))
        processes = process_state(cfg.device)[0].num_processes
        return f"shard {self.shard}/{self.count} done on {processes} process(es)"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def check_scheduler(kind: str) -> None:
    """submitit is installed and, for slurm, Slurm is reachable; else a one-line ConfigError."""
    require_submitit()
    if kind == "slurm" and shutil.which("srun") is None:   # submitit would raise a RuntimeError
        raise ConfigError("--launcher slurm: no Slurm here (srun is not on PATH); submit from the cluster's login "
                          "node, or use --launcher local to run the jobs on this machine")


def _executor(kind: str, folder: Path, launcher: LauncherConfig, name: str) -> Any:
    """submitit's AutoExecutor on Slurm, its LocalExecutor (real local processes) for `local`."""
    submitit = require_submitit()
    common = {"timeout_min": launcher.timeout_min, "gpus_per_node": launcher.gpus_per_node,
              "tasks_per_node": launcher.tasks_per_node, "nodes": launcher.nodes}
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(**common, setup=list(launcher.setup))
        return ex
    check_scheduler(kind)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    slurm = {"slurm_partition": launcher.partition, "slurm_account": launcher.account,
             "slurm_qos": launcher.qos, "slurm_constraint": launcher.constraint}
    ex.update_parameters(**common, cpus_per_task=launcher.cpus_per_task, name=name,
                         slurm_array_parallelism=launcher.array_parallelism,
                         **({"mem_gb": launcher.mem_gb} if launcher.mem_gb is not None else {}),
                         **{k: v for k, v in slurm.items() if v is not None},
                         **({"slurm_setup": list(launcher.setup)} if launcher.setup else {}),
                         **({"slurm_additional_parameters": dict(launcher.additional)} if launcher.additional
                            else {}))
    return ex


def local_gpu_groups(gpus_per_node: int, jobs: Optional[int], device_count: int) -> list[tuple[int, ...]]:
    """The GPUs of each job `--launcher local` starts at once, one tuple per job. Local jobs all start
    immediately, so they must not share GPUs: by default one job per group of `gpus_per_node` GPUs
    here (one job without GPUs: a CPU job uses every core); `jobs` (--shards N) asks for N, refused
    when there are not that many groups."""
    if gpus_per_node == 0 or device_count == 0:
        return [()] * (jobs or 1)
    groups = device_count // gpus_per_node
    if groups == 0:
        raise ConfigError(f"--launcher local: a job asks for {gpus_per_node} GPUs (launcher.gpus_per_node), this "
                          f"machine has {device_count}")
    if jobs is not None and jobs > groups:
        raise ConfigError(f"--launcher local --shards {jobs}: local jobs run at once and this machine has GPUs for "
                          f"{groups} ({device_count} ÷ launcher.gpus_per_node {gpus_per_node}); use --shards {groups} "
                          "or fewer")
    return [tuple(range(g * gpus_per_node, (g + 1) * gpus_per_node)) for g in range(jobs or groups)]


def submit_grid(cfg, kind: str, out: Optional[str | Path] = None, *, shards: Optional[int] = None,
                where: str = "config", wait_for_lock: bool = False,
                device_count: Optional[int] = None) -> list[Any]:
    """Submit every unit of experiment `cfg` (an ExperimentConfig) and return submitit's jobs
    (`job.result()` waits for one). Slurm: one job per unit, or `shards` jobs, as one job array.
    Local: the jobs start at once on this machine, so as many as it has GPU groups (or `shards`;
    see `local_gpu_groups`), each on its own GPUs. The root is marked and its experiment.yaml
    written before any job starts, so the jobs agree on the experiment."""
    from .experiment import _points, experiment_root

    if kind not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {str(kind)[:50]!r}")
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
        raise ConfigError(f"--shards must be a whole number ≥ 1, got {shards!r}")
    launcher = cfg.launcher
    if kind == "local" and launcher.nodes != 1:
        raise ConfigError(f"--launcher local runs on this one machine: launcher.nodes must be 1, got {launcher.nodes}")
    check_scheduler(kind)   # before touching the folder
    _, points = _points(cfg, where, build=True)
    units = grid_units([p.key for p in points], cfg.seeds)
    gpu_groups: list[tuple[int, ...]] = []
    if kind == "local":
        if device_count is None:
            import torch

            device_count = torch.cuda.device_count()
        gpu_groups = local_gpu_groups(launcher.gpus_per_node, shards, device_count)
        count = len(gpu_groups)
    else:
        count = shards or len(units)
    root = experiment_root(cfg, out).resolve()   # the jobs may start in another working directory
    claim_root_briefly(root, to_dict(cfg), wait_for_lock=wait_for_lock)   # marked before submitit writes in it
    distributed = launcher.tasks_per_node * launcher.nodes > 1
    raw = to_dict(cfg)
    jobs_in = [ShardJob(raw, where, str(root), i, count, distributed) for i in range(1, min(count, len(units)) + 1)]
    try:
        executor = _executor(kind, root / "launcher" / "%j", launcher, launcher.name or f"robustprompt-{cfg.name}")
        if kind == "local":   # one submission per job: each its own GPUs
            jobs = []
            for job, gpus in zip(jobs_in, gpu_groups):
                executor.update_parameters(visible_gpus=gpus)
                jobs.append(executor.submit(job))
            return jobs
        return executor.submit_array(jobs_in)   # one submission: a Slurm job array
    except (ValueError, RuntimeError, OSError) as exc:   # sbatch refusing the jobs (a partition, an account …)
        raise ConfigError(f"--launcher {kind}: the jobs could not be submitted: {one_line(str(exc))[:400]}") from exc
