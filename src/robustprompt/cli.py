"""`robustprompt <command>`: parses flags and YAML, builds a config, calls the engine. Nothing else."""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from typing import Any, Callable, NoReturn, Optional, Sequence

from .cli_config import (add_config_args, annotate_defaults, apply_sets, check_dataset_given, check_run_model,
                         eval_description, print_config)
from .errors import RobustPromptError
from .messages import one_line

log = logging.getLogger("robustprompt")

# OSErrors that describe the machine, not a bug: a full disk or quota, no permission, a read-only
# file system, a path through a file, a folder where a file should go, a name already taken.
# main() prints them as one line; any other exception keeps its traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                                errno.ENOTDIR, errno.EISDIR, errno.EEXIST})

# CLI flag → dotted config key, for flags shared by commands that take a model/data/attack.
MODEL_FLAGS = {
    "model": "model.name", "pretrained": "model.pretrained", "quick_gelu": "model.quick_gelu",
    "templates": "model.templates", "run": "model.run", "coupling": "model.prompt.coupling",
    "n_ctx": "model.prompt.n_ctx", "depth": "model.prompt.depth",
    "allow_backbone_mismatch": "model.allow_backbone_mismatch",
}
DATA_FLAGS = {
    "dataset": "data.dataset", "root": "data.root", "split": "data.split", "classes": "data.classes",
    "subset": "data.subset", "subset_seed": "data.subset_seed", "batch_size": "data.batch_size",
    "workers": "data.workers", "download": "data.download",
}
ATTACK_FLAGS = {
    "attack": "attack.attack", "norm": "attack.norm", "eps": "attack.eps", "alpha": "attack.alpha",
    "steps": "attack.steps", "restarts": "attack.restarts", "loss": "attack.loss",
    "no_random_start": "attack.random_start", "aa_chunk": "attack.aa_chunk",
}
RUN_FLAGS = {"seed": "seed", "device": "device"}


def add_model_args(p: argparse.ArgumentParser, *, loads_prompts: bool = True) -> None:
    """loads_prompts: the command can load learned prompts (--run); train always starts fresh ones."""
    g = p.add_argument_group("model")
    g.add_argument("--model", help="open_clip architecture (e.g. ViT-B-32; `robustprompt list models`), "
                                   "hf-hub:ORG/REPO[@REVISION] (an open_clip model on the Hugging Face Hub), "
                                   "local-dir:PATH (a folder in that layout) or 'demo' (default: demo)")
    g.add_argument("--pretrained", help="pretrained tag (e.g. openai; `robustprompt list pretrained`) or checkpoint "
                                        "file; omit for random init, and for hf-hub:/local-dir: models")
    g.add_argument("--quick-gelu", action="store_const", const=True, default=None,
                   help="use QuickGELU (automatic for OpenAI tags and TorchScript files)")
    g.add_argument("--templates", help="'dataset' (default), 'ensemble', or a template with {}")
    if not loads_prompts:
        _add_prompt_layout_args(g)
        return
    g.add_argument("--run", help="learned prompts to load: a training run directory or hf-hub:ORG/REPO[@REVISION] "
                                 "(a repo `robustprompt push` wrote); its backbone is used (--pretrained: the "
                                 "same weights, moved, hash-checked; --model: refused unless it names that backbone)")
    g.add_argument("--allow-backbone-mismatch", action="store_const", const=True, default=None,
                   help="load --run prompts onto backbone weights whose SHA-256 differs from the recorded one")
    _add_prompt_layout_args(g)


def _add_prompt_layout_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--coupling", help="prompt coupling for untrained prompts (default none)")
    g.add_argument("--n-ctx", type=int)
    g.add_argument("--depth", type=int)


def batch_size_arg(value: str) -> "int | str":
    """--batch-size N, or auto (eval: probed on CUDA, see engine.autobatch)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {value[:40]!r}") from None


def add_data_args(p: argparse.ArgumentParser, *, auto_batch: bool = False) -> None:
    """auto_batch: --batch-size also takes `auto` (eval)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="dataset name (see README), imagefolder:PATH or csv:PATH")
    g.add_argument("--root", help="data root holding the CoOp-layout dataset folders")
    g.add_argument("--split", help="split to evaluate (default test)")
    g.add_argument("--classes", choices=["all", "base", "new"])
    g.add_argument("--subset", type=int, help="evaluate a fixed random subset of N images")
    g.add_argument("--subset-seed", type=int)
    if auto_batch:
        g.add_argument("--batch-size", type=batch_size_arg, metavar="N|auto",
                       help="images per batch, or auto: on CUDA the largest attack batch that fits (a forward + "
                            "backward probed at 16, 32, 64, ... up to 4096 until out of memory, then ¾ of the "
                            "largest that ran, down to a multiple of 8); on a CPU auto means 64. Results do not "
                            "depend on it; the probe is recorded in metrics.environment.batch_size")
    else:
        g.add_argument("--batch-size", type=int)
    g.add_argument("--workers", type=int, help="data-loading worker processes (with CUDA: pinned memory, "
                                               "4 batches prefetched per worker)")
    g.add_argument("--download", action="store_const", const=True, default=None,
                   help="allow downloading datasets that support it (Fashion-MNIST)")


def add_attack_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attack (ℓ∞: eps and alpha in /255 units, --eps 4 means 4/255; ℓ2: in pixel units as in "
                             "torchattacks/AutoAttack, --norm l2 --eps 3.0 means ‖δ‖₂ ≤ 3.0; alpha default eps/4)")
    g.add_argument("--attack", choices=["none", "fgsm", "pgd", "autoattack"])
    g.add_argument("--norm", choices=["linf", "l2"])
    g.add_argument("--eps", type=float)
    g.add_argument("--alpha", type=float, help="step size (one rule, also for train's --train-alpha: eps/4 unless "
                                               "given)")
    g.add_argument("--steps", type=int)
    g.add_argument("--restarts", type=int)
    g.add_argument("--loss", choices=["ce", "kl", "dlr"])
    g.add_argument("--no-random-start", action="store_const", const=False, default=None)
    g.add_argument("--aa-chunk", type=int, help="AutoAttack: images per seeded run (default 64; 1 = per image); "
                                              "results are exact across batch sizes, resumes and processes")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML config; flags override its keys")
    add_config_args(g)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default: CUDA, else Apple's MPS, else CPU), cpu, cuda, cuda:1 (that GPU), mps")
    g.add_argument("--out", help="run directory (default: runs/<command>/<dataset>-<model>-<hash>, printed at the start "
                                 "and end; runs/latest-<command> points at the last finished one)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a different run in --out (only files robustprompt wrote are deleted)")
    g.add_argument("--wait", action="store_true",
                   help="if another process is running in --out, wait for it instead of refusing")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--report-to", metavar="NAME",
                   help="also write the scalars (always in the run's scalars.csv) to: tensorboard (needs "
                        "`pip install tensorboard`; events in <run>/tensorboard), or none (default: none)")


# --precision / --attack-precision / --tf32 → config keys, per command (train's attack is train_attack)
EVAL_PRECISION_FLAGS = {"precision": "precision", "attack_precision": "attack.precision", "tf32": "tf32"}
TRAIN_PRECISION_FLAGS = {"precision": "precision", "attack_precision": "train_attack.precision", "tf32": "tf32"}
TTA_PRECISION_FLAGS = {"attack_precision": "attack.precision", "tf32": "tf32"}


def add_precision_args(p: argparse.ArgumentParser, *, clean: bool = True) -> None:
    """clean: the command has forwards outside the attack that --precision may autocast."""
    g = p.add_argument_group("precision")
    if clean:
        g.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                       help="autocast of training and clean forwards (default fp32; fp16 trains with loss scaling)")
    g.add_argument("--attack-precision", choices=["fp32", "bf16"],
                   help="autocast inside PGD/FGSM (default fp32; bf16 is cheaper, may be a weaker attack, and is "
                        "recorded in the threat model)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="allow TF32 in CUDA matmuls and cuDNN convolutions (default off: fp32 means fp32); recorded")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="run the attacks' image forward through torch.compile (inductor; needs a C compiler on "
                        "CPU). Falls back to eager, with one warning, if compilation fails; recorded in "
                        "metrics.environment.compile; not part of the run's identity. Meant for GPUs and long "
                        "attacks (PGD-100; benchmarks/eval_throughput.py measures what it gains); the first batch "
                        "includes the compilation")


def warn_pixel_units(value: Optional[float], norm: Any, flag: str = "--eps") -> None:
    """A log line when an ℓ∞ budget typed at the CLI looks like pixel units (0.03 for 8/255)."""
    if value is None or norm not in (None, "linf") or not 0 < value < 0.25:
        return
    guess = max(1, round(value * 255))
    log.warning("%s %g is in /255 units (%g/255 = %.2g); did you mean %s %d (%d/255)?",
                flag, value, value, value / 255, flag, guess, guess)


def add_params(raw: dict, items: Optional[Sequence[str]]) -> None:
    """--param KEY=VALUE items into raw["method"]["params"] (VALUE parsed as YAML)."""
    from .errors import ConfigError
    from .messages import quote

    for item in items or []:
        key, value = _parse_set(item)
        method = raw.setdefault("method", {})
        if not isinstance(method, dict):
            raise ConfigError(f"method: expected a mapping (name:, params:) to add --param {quote(key, 60)} to, "
                              f"got {quote(method, 60)}")
        params = method.setdefault("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"method.params: expected a mapping, got {quote(params, 60)}")
        params[key] = value


def collect_overrides(args: argparse.Namespace, *tables: dict[str, str]) -> dict:
    from .config import set_dotted

    out: dict = {}
    for table in tables:
        for flag, key in table.items():
            value = getattr(args, flag, None)
            if value is not None:
                set_dotted(out, key, value)
    return out


def build_config(cls: type, args: argparse.Namespace, *tables: dict[str, str]) -> Any:
    from .config import deep_merge, from_dict, load_yaml

    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    merged = deep_merge(base, collect_overrides(args, *tables))
    return from_dict(cls, merged, args.config or "config")


def resolved_only(raw: dict, cfg: Any, args: argparse.Namespace, command: str) -> bool:
    """Refuse what would surprise (a forgotten --dataset, --model beside --run); then, with
    --print-config, print the resolved config and return True: the command stops there."""
    check_dataset_given(raw, cfg, command)
    check_run_model(raw)
    if args.print_config:
        print_config(cfg)
        return True
    return False


def check_experiment_key(key: str) -> None:
    """`run --set KEY`: train.* keys are a TrainConfig's, tta.* a TTAConfig's, the rest the experiment file's."""
    from .config import check_dotted_key
    from .engine.experiment import ExperimentConfig
    from .engine.train import TrainConfig
    from .errors import ConfigError

    if key.startswith("train."):
        check_dotted_key(TrainConfig, key[len("train."):], "train.")
    elif key.startswith("tta."):
        from .engine.tta import TTAConfig

        check_dotted_key(TTAConfig, key[len("tta."):], "tta.")
    elif key.startswith("grid."):
        raise ConfigError(f"--set {key[:100]}: grid keys hold dots (train.method.name), so they cannot be set one "
                          "by one; pin a grid key with --set KEY=VALUE, or replace the whole grid with "
                          "--set 'grid={KEY: [V1, V2]}'")
    elif key != "grid":
        check_dotted_key(ExperimentConfig, key)


def pop_auto_batch(raw: dict) -> bool:
    """True (and data.batch_size removed, so the config keeps its default) when data.batch_size is
    `auto` — from --batch-size auto, a YAML `batch_size: auto` or --set data.batch_size=auto.
    Batch size is a runtime key: it is not part of the run's identity either way."""
    data = raw.get("data")
    if isinstance(data, dict) and data.get("batch_size") == "auto":
        del data["batch_size"]
        return True
    return False


# ------------------------------------------------------------------------------ commands
def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.evaluate import EvalConfig, evaluate
    from .engine.runlog import last_log_path, tee_to_log
    from .report.console import print_metrics

    from .config import deep_merge, from_dict, load_yaml

    raw = deep_merge(load_yaml(args.config) if args.config else {},
                     collect_overrides(args, MODEL_FLAGS, DATA_FLAGS, ATTACK_FLAGS, RUN_FLAGS, EVAL_PRECISION_FLAGS))
    warn_pixel_units(args.eps, (raw.get("attack") or {}).get("norm"))
    if args.also:  # further attacks at the same budget; robust accuracy becomes the worst case
        from .errors import ConfigError

        attack, also = raw.get("attack") or {}, raw.get("also") or []
        if not isinstance(attack, dict) or not isinstance(also, list):
            raise ConfigError("attack must be a mapping and also a list to add --also attacks to them")
        budget = {k: v for k, v in attack.items() if k in ("norm", "eps")}
        raw["also"] = [*also, *({"attack": a, **budget} for a in args.also)]
    apply_sets(raw, args.set_items, EvalConfig)
    auto_batch = pop_auto_batch(raw)
    cfg = from_dict(EvalConfig, raw, args.config or "config")
    if resolved_only(raw, cfg, args, "eval"):
        return 0
    metrics = evaluate(cfg, args.out, overwrite=args.overwrite, wait_for_lock=args.wait, progress=not args.no_progress,
                       report_to=args.report_to, compile=args.compile, auto_batch=auto_batch)
    if metrics is not None:
        with tee_to_log(last_log_path()):   # the summary lines also go to the run's log.txt
            print_metrics(metrics)
    return 0


TRAIN_DATA_FLAGS = {
    "dataset": "data.dataset", "root": "data.root", "split": "data.split", "classes": "data.classes",
    "shots": "data.shots", "batch_size": "data.batch_size", "workers": "data.workers",
    "augment": "data.augment", "download": "data.download",
}
TRAIN_FLAGS = {"method": "method.name", "epochs": "optim.epochs", "lr": "optim.lr"}
TRAIN_ATTACK_FLAGS = {"train_eps": "train_attack.eps", "train_alpha": "train_attack.alpha",
                      "train_steps": "train_attack.steps"}


def cmd_train(args: argparse.Namespace) -> int:
    from .config import deep_merge, load_yaml
    from .engine.runlog import last_log_path, tee_to_log
    from .engine.train import TrainConfig, train, train_config_from_dict
    from .report.console import print_train_summary

    base = load_yaml(args.config) if args.config else {}
    raw = deep_merge(base, collect_overrides(args, MODEL_FLAGS, TRAIN_DATA_FLAGS, TRAIN_FLAGS,
                                             TRAIN_ATTACK_FLAGS, RUN_FLAGS, TRAIN_PRECISION_FLAGS))
    warn_pixel_units(args.train_eps, (raw.get("train_attack") or {}).get("norm"), "--train-eps")
    add_params(raw, args.param)
    apply_sets(raw, args.set_items, TrainConfig)
    cfg = train_config_from_dict(raw, args.config or "config")
    if resolved_only(raw, cfg, args, "train"):
        return 0
    metrics = train(cfg, args.out, overwrite=args.overwrite, wait_for_lock=args.wait, progress=not args.no_progress,
                    report_to=args.report_to)
    if metrics is not None:
        with tee_to_log(last_log_path()):   # the summary lines also go to the run's log.txt
            print_train_summary(metrics)
    return 0


def _parse_set(item: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as YAML data (bounded like a config file: see config.parse_yaml)."""
    from .config import parse_yaml
    from .errors import ConfigError
    from .messages import quote

    if "=" not in item:
        raise ConfigError(f"expected KEY=VALUE, got {quote(item)}")
    key, value = item.split("=", 1)
    return key.strip(), parse_yaml(value, f"the value of {quote(item, 80)}")


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_yaml, set_dotted
    from .engine.experiment import find_config, load_experiment, run_experiment
    from .engine.grid import parse_shard

    args.config = str(find_config(args.config))   # a file, or a config shipped with the package
    overrides: dict = {}
    pinned: dict = {}
    for item in args.set or []:
        key, value = _parse_set(item)
        check_experiment_key(key)
        set_dotted(overrides, key, value)
        pinned[key] = value           # a key set twice: the last value, as for any other key
    if args.device:
        overrides["device"] = args.device
    if pinned:
        grid = overrides["grid"] if "grid" in pinned else load_yaml(args.config).get("grid") or {}
        if isinstance(grid, dict):    # a malformed grid: load_experiment says so
            overrides["grid"] = pin_grid(grid, pinned)
    grid_mode = _check_grid_flags(args)   # before the config loads: a bad --shard is one line
    cfg = load_experiment(args.config, overrides)
    if args.print_config:
        print_config(cfg)
        return 0
    if grid_mode != "run":
        return _run_grid(args, cfg, grid_mode)
    shard = parse_shard(args.shard) if args.shard is not None else None
    summary = run_experiment(cfg, args.out, progress=not args.no_progress, where=args.config,
                             wait_for_lock=args.wait, shard=shard)
    if summary is not None:
        print(summary["markdown"])
    return 0


def pin_grid(grid: dict, pinned: dict) -> dict:
    """The grid once `run --set` has spoken: a set grid key is pinned to its one value; a key inside
    a grid key whose values are mappings (tta.method.params.n_views under a tta.method grid) is set
    in every one of them — the grid replaces the whole mapping at each point, so the value set
    alone would be lost; inside a grid key of plain values it is refused."""
    import copy

    from .config import set_dotted
    from .errors import ConfigError

    grid = dict(grid)
    for key, value in pinned.items():
        if key in grid:
            grid[key] = [value]
            continue
        for gk in [g for g in grid if key.startswith(f"{g}.")]:
            values = grid[gk] if isinstance(grid[gk], list) else [grid[gk]]
            if not all(isinstance(v, dict) for v in values):
                raise ConfigError(f"--set {key[:100]}: the grid sets {gk[:100]} to plain values, which have no "
                                  f"{key[len(gk) + 1:][:100]}; pin {gk[:100]} itself (--set {gk[:100]}=…)")
            grid[gk] = [copy.deepcopy(v) for v in values]
            for v in grid[gk]:
                set_dotted(v, key[len(gk) + 1:], value)
    return grid


def _check_grid_flags(args: argparse.Namespace) -> str:
    """'run', 'collect' or 'launch' from run's grid flags; contradictory ones are a ConfigError."""
    from .engine.grid import parse_shard
    from .errors import ConfigError

    if args.shard is not None:
        parse_shard(args.shard)
    chosen = [f for f, on in (("--shard", args.shard is not None), ("--collect", args.collect),
                              ("--launcher", args.launcher is not None)) if on]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} do not go together: --shard runs one share here, --launcher "
                          "submits every share, --collect only reads what has finished")
    if args.shards is not None and args.launcher is None:
        raise ConfigError("--shards N goes with --launcher (N jobs); to run one share here use --shard i/N")
    return "collect" if args.collect else "launch" if args.launcher else "run"


def _rerun_command(args: argparse.Namespace, root: Any) -> str:
    """The command line that runs this experiment again (config, --set pins, --out), shell-quoted."""
    import shlex

    words = ["robustprompt", "run", args.config]
    for item in args.set or []:
        words += ["--set", item]
    return shlex.join(words + ["--out", str(root)])


def _run_grid(args: argparse.Namespace, cfg: Any, mode: str) -> int:
    """`run --collect` (exit 3 while units are missing) and `run --launcher slurm|local`."""
    from .engine.experiment import collect_experiment, experiment_root
    from .engine.grid import INCOMPLETE_EXIT
    from .engine.launcher import submit_grid

    root = experiment_root(cfg, args.out)
    if mode == "launch":
        jobs = submit_grid(cfg, args.launcher, args.out, shards=args.shards, where=args.config,
                           wait_for_lock=args.wait)
        ids = ", ".join(str(j.job_id) for j in jobs[:3]) + (" …" if len(jobs) > 3 else "")
        print(f"submitted {len(jobs)} job(s) ({ids}) to {args.launcher}; logs in {root / 'launcher'}; "
              f"when they have finished: {_rerun_command(args, root)} --collect", file=sys.stderr, flush=True)
        if args.launcher != "local":
            return 0
        failed = 0
        for job in jobs:   # local jobs are this machine's processes: wait, then collect
            try:
                job.results()   # one per task (several with tasks_per_node > 1)
            except Exception as exc:   # a job's error: its own log holds the traceback
                failed += 1
                print(f"job {job.job_id} failed ({one_line(str(exc))[:300]}); log: {job.paths.stderr}",
                      file=sys.stderr)
    summary = collect_experiment(cfg, args.out, where=args.config, command=_rerun_command(args, root),
                                 wait_for_lock=args.wait)
    print(summary["markdown"])
    missing = summary.get("missing") or []
    if missing:
        print(f"robustprompt run: incomplete: {len(missing)} unit(s) have not finished (listed above, each with the "
              f"command that runs it); exit status {INCOMPLETE_EXIT}", file=sys.stderr)
        return INCOMPLETE_EXIT
    return 0


def cmd_tta(args: argparse.Namespace) -> int:
    from .config import deep_merge, from_dict, load_yaml
    from .engine.runlog import last_log_path, tee_to_log
    from .engine.tta import TTAConfig, run_tta
    from .report.console import print_metrics

    base = load_yaml(args.config) if args.config else {}
    raw = deep_merge(base, collect_overrides(args, MODEL_FLAGS, DATA_FLAGS, ATTACK_FLAGS, RUN_FLAGS,
                                             {**TTA_FLAGS, "adaptive": "adaptive"}, TTA_PRECISION_FLAGS))
    warn_pixel_units(args.eps, (raw.get("attack") or {}).get("norm"))
    if raw.get("adaptive") == []:  # a bare --adaptive: both threat models
        raw["adaptive"] = True
    add_params(raw, args.param)
    apply_sets(raw, args.set_items, TTAConfig)
    cfg = from_dict(TTAConfig, raw, args.config or "config")
    if resolved_only(raw, cfg, args, "tta"):
        return 0
    metrics = run_tta(cfg, args.out, overwrite=args.overwrite, wait_for_lock=args.wait, progress=not args.no_progress,
                      report_to=args.report_to, compile=args.compile)
    if metrics is not None:
        with tee_to_log(last_log_path()):   # the summary lines also go to the run's log.txt
            print_metrics(metrics)
    return 0


def cmd_tta_stats(args: argparse.Namespace) -> int:
    """TAPT's statistics pre-pass: per-block token moments on clean and adversarial images → one file."""
    from .config import deep_merge, from_dict, load_yaml
    from .tta.token_stats import TokenStatsConfig, run_token_stats

    raw = deep_merge(load_yaml(args.config) if args.config else {},
                     collect_overrides(args, MODEL_FLAGS, DATA_FLAGS, ATTACK_FLAGS, RUN_FLAGS))
    warn_pixel_units(args.eps, (raw.get("attack") or {}).get("norm"))
    apply_sets(raw, args.set_items, TokenStatsConfig)
    cfg = from_dict(TokenStatsConfig, raw, args.config or "config")
    if resolved_only(raw, cfg, args, "tta-stats"):
        return 0
    meta = run_token_stats(cfg, args.out, progress=not args.no_progress)
    print(f"token statistics of {meta['n']} images ({meta['dataset']}, clean and {meta['threat'].get('attack')}) "
          f"for {meta['backbone_hash']} -> {meta['file']} (sha256 {meta['sha256']})")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .config import AttackSpec, ModelSpec
    from .explain import run_explain

    from .config import check_seed
    from .errors import ConfigError

    if (args.image is None) == (args.n is None):
        raise ConfigError("give either --image PATH (or 'example') or --n N images of --dataset")
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    check_seed(args.subset_seed, "--subset-seed")
    attack = AttackSpec(attack="pgd", eps=args.eps, alpha=args.alpha, steps=args.steps)
    model = ModelSpec(name=args.model, pretrained=args.pretrained, quick_gelu=args.quick_gelu)
    if args.print_config:
        print_config({"image": args.image, "n": args.n, "dataset": args.dataset, "root": args.root,
                      "split": args.split, "subset_seed": args.subset_seed, "label": args.label, "model": model,
                      "runs": args.run or [], "attack": attack, "target": args.target, "out": args.out,
                      "device": args.device})
        return 0
    written, pairs = run_explain(image=args.image, dataset=args.dataset, root=args.root, split=args.split, n=args.n or 1,
                                 subset_seed=args.subset_seed, model=model, runs=args.run or [],
                                 threat=attack.threat(), target=args.target, label=args.label, out=args.out,
                                 device=args.device, allow_backbone_mismatch=args.allow_backbone_mismatch)
    for p in pairs:
        s = p.shift
        print(f"{p.model}: CBA map shift ℓ2 {s['cba_l2']:.4g} (rank corr. {s['cba_spearman']:.2f}), "
              f"rollout shift ℓ2 {s['rollout_l2']:.4g} (rank corr. {s['rollout_spearman']:.2f})")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """`data check` (exit 2 when anything is missing or unreadable) and `data prepare`."""
    from .errors import DatasetError

    if args.action == "check":
        from .data.check import check_dataset

        report = check_dataset(args.dataset, args.root, full=args.full, sample=args.sample)
        print("\n".join(report.lines()))
        if report.problems:
            raise DatasetError(f"{report.dataset} under {report.root} is not usable: "
                               f"{len(report.problems)} problem(s), listed above")
        return 0
    from .data.prepare import prepare

    print("\n".join(prepare(args.dataset, args.root, dry_run=args.dry_run)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .paths import atomic_write_text
    from .report.cards import robustness_cards
    from .report.collect import collect_runs
    from .report.outputs import check_output_folder
    from .report.tables import results_table

    if args.out:
        check_output_folder(args.out)  # before any work: a file, a path through a file, no permission
    elif args.plot:
        from .errors import ConfigError

        raise ConfigError("--plot needs --out DIR for the figure files")
    runs = collect_runs(args.runs)
    cards = robustness_cards(runs, fmt=args.format)  # per defence: each attack and the worst case
    if args.attack:  # one attack's accuracy instead of the worst case over all attacks run
        from .report.collect import select_attack

        runs = select_attack(runs, args.attack)
    text = results_table(runs, fmt=args.format)
    print(text)
    if cards.strip() and args.format != "csv":
        print(cards)
    if args.out:
        out = Path(args.out)
        ext = {"md": "md", "csv": "csv", "latex": "tex"}[args.format]
        atomic_write_text(out / f"results.{ext}", text if text.endswith("\n") else text + "\n")
        if cards.strip():
            atomic_write_text(out / f"cards.{ext}", cards if cards.endswith("\n") else cards + "\n")
        if args.plot:
            from .report.plots import few_shot_curves, tradeoff_scatter

            written = tradeoff_scatter(runs, out / "tradeoff.png")
            if any(r.shots is not None for r in runs):
                written += few_shot_curves(runs, out / "few_shot.png")
            print("wrote " + ", ".join(str(w) for w in written))
    return 0


def cmd_pretrain_demo(args: argparse.Namespace) -> int:
    import json

    from .demo.backbone import ensure_demo_backbone

    directory = ensure_demo_backbone(data_root=args.root, download=args.download, force=args.force,
                                     progress=not args.no_progress)
    meta = json.loads((directory / "config.json").read_text())
    print(f"demo backbone: {directory}")
    print(f"zero-shot accuracy on Fashion-MNIST test: {meta['zero_shot_test_acc']:.2f}%  "
          f"(trained in {meta['train_time_s']:.0f} s)")
    return 0


LIST_KINDS = ("models", "pretrained", "methods", "tta", "datasets", "attacks")   # = catalog.LISTS


def cmd_list(args: argparse.Namespace) -> int:
    from .catalog import format_lines

    for line in format_lines(args.kind, model=getattr(args, "model", None)):
        print(line)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """`robustprompt methods`: the same as `robustprompt list methods`."""
    from .catalog import format_lines

    for line in format_lines("methods"):
        print(line)
    return 0


def cmd_import_prompts(args: argparse.Namespace) -> int:
    from .models.dassl_import import import_prompts, read_classnames_file

    templates = [args.template] if args.template else None
    if args.dataset:
        from .data.registry import build_dataset

        ds = build_dataset(args.dataset, args.root, download=bool(args.download))
        classnames, templates, dataset = ds.classnames, templates or [ds.templates[0]], ds.name
    else:
        classnames, dataset = read_classnames_file(args.classnames_file), None
    written, imp = import_prompts(args.checkpoint, args.out, model=args.model, pretrained=args.pretrained,
                                  quick_gelu=args.quick_gelu, classnames=classnames, templates=templates,
                                  dataset=dataset, layout=args.layout, ctx_init=args.ctx_init,
                                  verify=not args.no_verify, overwrite=args.overwrite)
    p = imp.prompt
    epoch = f", epoch {imp.epoch}" if imp.epoch is not None else ""
    print(f"imported {imp.layout} prompts{epoch}: coupling {p.coupling}, n_ctx {p.n_ctx}, depth {p.depth}, "
          f"text {p.text_init_mode}" + (f" {p.text_init!r}" if p.text_init else ""))
    print("checks: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in imp.checks.items()))
    print(f"wrote {written}")
    if written.name == "prompts.safetensors":
        print(f"evaluate with: robustprompt eval --run {written.parent} --dataset ... --attack pgd")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push

    url = push(args.run_dir, args.repo, private=args.private, revision=args.revision, token=args.token,
               license=args.license, commit_message=args.message)
    print(f"pushed {args.run_dir} to {args.repo}: {url}")
    print(f"load with: robustprompt eval --run hf-hub:{args.repo} …  or  "
          f"rp.load_classifier(prompts=\"hf-hub:{args.repo}\")")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .hub import pull

    path = pull(args.repo, args.revision, args.out, token=args.token)
    print(f"pulled {args.repo} to {path}")
    print(f"evaluate with: robustprompt eval --run {path} --dataset … --attack pgd")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    run_demo(out=args.out, subset=args.subset, progress=not args.no_progress, device=args.device)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage mistakes as one line (the usage itself is a --help away), quoting
    at most a bounded part of what the user typed."""

    def error(self, message: str) -> NoReturn:
        import re

        message = re.sub(r"'([^']{80})[^']+'", r"'\1…'", message)  # a long value the user typed
        self.exit(2, f"{self.prog}: error: {one_line(message, 600)} (see {self.prog} --help)\n")


def build_parser(defaults_in_help: bool = True) -> argparse.ArgumentParser:
    """defaults_in_help: read each flag's default from the config dataclasses into its help (this
    imports torch; main() asks for it only when --help is on the command line)."""
    from . import __version__

    parser = OneLineParser(prog="robustprompt", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"robustprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # -v also after the command; SUPPRESS keeps a subcommand without it from resetting the flag
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbose], **kw)

    defaults: dict[str, argparse.ArgumentParser] = {}   # commands whose --help shows the config defaults

    p = command("eval", help="clean and robust accuracy of a (prompted) classifier on a dataset")
    add_model_args(p)
    add_data_args(p, auto_batch=True)
    add_attack_args(p)
    p.add_argument("--also", nargs="+", choices=["pgd", "fgsm", "autoattack"],
                   help="further attacks at the same norm and ε; robust accuracy is then the worst case per "
                        "image, and each attack's own accuracy is reported (e.g. --attack pgd --also autoattack)")
    add_precision_args(p)
    add_compile_arg(p)
    add_run_args(p)
    p.set_defaults(func=cmd_eval)
    defaults["eval"] = p

    p = command("train", help="few-shot prompt tuning with one method on one dataset")
    add_model_args(p, loads_prompts=False)
    g = p.add_argument_group("method and optimisation")
    g.add_argument("--method", help="training method (see `robustprompt methods`)")
    g.add_argument("--param", action="append", metavar="KEY=VALUE", help="a method hyperparameter, repeatable")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g = p.add_argument_group("data")
    g.add_argument("--dataset")
    g.add_argument("--root")
    g.add_argument("--split")
    g.add_argument("--classes", choices=["all", "base", "new"])
    g.add_argument("--shots", type=int, help="images per class (few-shot draw, seeded)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--workers", type=int)
    g.add_argument("--augment", choices=["coop", "flip", "none"])
    g.add_argument("--download", action="store_const", const=True, default=None)
    g = p.add_argument_group("training attack (/255 units)")
    g.add_argument("--train-eps", type=float, help="ℓ∞ budget of the training attack")
    g.add_argument("--train-alpha", type=float,
                   help="its step size; one rule, as eval's --alpha: eps/4 unless given (a --train-eps without "
                        "--train-alpha gets eps/4; the built-in threat is FAP's PGD-2, ε = α = 1/255)")
    g.add_argument("--train-steps", type=int)
    add_precision_args(p)
    add_run_args(p)
    p.set_defaults(func=cmd_train)
    defaults["train"] = p

    p = command("run", help="train + evaluate over seeds (and a grid), summarise mean ± std")
    p.add_argument("config", help="experiment YAML file, or the name of one shipped with robustprompt, e.g. "
                                  "cba_fapt/few_shot (a file that exists wins)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a dotted key, e.g. train.data.root=/data (pins grid keys); repeatable")
    p.add_argument("--out", help="experiment folder (default runs/experiments/<name>)")
    p.add_argument("--device")
    add_config_args(p, dotted_set=False)
    p.add_argument("--wait", action="store_true",
                   help="if another process is running in --out, wait for it instead of refusing")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group(
        "a grid over many processes or machines",
        "The units are the (grid point, seed) pairs in the grid's order; each keeps its own run folders, "
        "so shards never write the same file and any of them can be rerun (finished runs are reused). "
        "Each shard may itself use several GPUs: torchrun --nproc-per-node G -m robustprompt run CONFIG "
        "--shard i/N.")
    g.add_argument("--shard", metavar="I/N|slurm",
                   help="run only share I of N (1 ≤ I ≤ N; unit j goes to share j mod N + 1, round-robin, so the "
                        "expensive settings spread out); shards share --out and hold its lock only briefly; no "
                        "summary is written (use --collect). In a Slurm job array: --shard slurm (its place in "
                        "the array, whatever the indices start at); Kubernetes indexed job: "
                        "--shard $((JOB_COMPLETION_INDEX + 1))/N")
    g.add_argument("--collect", action="store_true",
                   help="run nothing: write summary.json/summary.md from the runs that have finished and list the "
                        "missing units with the command for each; exit status 0 when complete, 3 when not")
    g.add_argument("--launcher", choices=["slurm", "local"],
                   help="submit the grid through submitit (pip install 'robustprompt[slurm]'): one job per unit, "
                        "or --shards N jobs, as one job array; resources from the config's launcher: section "
                        "(--set launcher.gpus_per_node=1, cpus_per_task, timeout_min, partition, mem_gb, "
                        "array_parallelism, ...); logs in OUT/launcher/. A preempted job is requeued and resumes. "
                        "local runs the jobs as processes here (one per GPU group, each on its own GPUs), waits, then collects")
    g.add_argument("--shards", type=int, metavar="N", help="with --launcher: N jobs of --shard i/N each "
                                                          "(default: slurm one job per unit; local one per GPU "
                                                          "group here, one without GPUs)")
    p.set_defaults(func=cmd_run)

    p = command("tta", help="a test-time defence (TPT, C-TPT, MTA, R-TPT, A-TPT, TTC, TAPT) under attack")
    add_model_args(p)
    add_data_args(p)
    add_attack_args(p)
    g = p.add_argument_group("test-time defence")
    g.add_argument("--method", help="tpt, ctpt, mta, rtpt, atpt, ttc or tapt (default atpt; tapt needs --param "
                                     "stats=FILE from `robustprompt tta-stats`)")
    g.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a procedure setting, e.g. n_views=64, fusion=rtpt; repeatable")
    g.add_argument("--adaptive", nargs="*", choices=["secret", "known"], default=None,
                   help="also attack the whole defence (views, prompt update, ensemble): with the defender's "
                        "randomness secret (EOT over fresh draws), known (the evaluation's own views), or, "
                        "bare, both; the result is the worst case per image over all attacks")
    g.add_argument("--adaptive-steps", type=int, help="iterations of the adaptive attack (default 100)")
    g.add_argument("--eot", type=int, help="view draws per step when the randomness is secret (default 16)")
    g.add_argument("--adaptive-loss", choices=["ce", "dlr"], help="adaptive attack loss (default ce)")
    g.add_argument("--adaptive-restarts", type=int, help="random restarts of the adaptive attack (default: the procedure's, 1; TTC 2)")
    g.add_argument("--defence-seed", type=int, help="the defender's view randomness (default: --seed + 1)")
    g.add_argument("--quantize-adv", action="store_const", const=True, default=None,
                   help="round adversarial images to 8 bits before the defence (off by default)")
    add_precision_args(p, clean=False)
    add_compile_arg(p)
    add_run_args(p)
    p.set_defaults(func=cmd_tta)
    defaults["tta"] = p

    p = command("tta-stats", help="TAPT's statistics: per-block image-token mean/variance on clean and "
                                  "adversarial images of a dataset, for `tta --method tapt --param stats=FILE`")
    add_model_args(p)
    add_data_args(p)
    add_attack_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML config (model, data, attack, seed, device); flags override its keys")
    add_config_args(g)
    g.add_argument("--seed", type=int, help="attack seed (per image, as eval)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    g.add_argument("--out", required=True, help="the statistics file to write (safetensors, written atomically)")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_tta_stats)

    p = command("explain", help="attribution maps, clean vs adversarial, as a figure (PNG + PDF)")
    p.add_argument("--image", help="an image file, or 'example' for the packaged Fashion-MNIST image")
    p.add_argument("--n", type=int, help="explain N images of --dataset instead (a grid)")
    p.add_argument("--dataset", default="fashion_mnist", help="where class names (and images) come from")
    p.add_argument("--root")
    p.add_argument("--split", default="test")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--label", help="true class name of --image (default: attack the clean prediction)")
    p.add_argument("--model", default="demo")
    p.add_argument("--pretrained")
    p.add_argument("--quick-gelu", action="store_const", const=True, default=None)
    p.add_argument("--run", action="append", help="training run (or hf-hub:ORG/REPO) whose prompts to explain "
                                                  "too; repeatable")
    p.add_argument("--allow-backbone-mismatch", action="store_true",
                   help="load --run prompts onto backbone weights whose SHA-256 differs from the recorded one")
    p.add_argument("--eps", type=float, default=4.0, help="/255 units")
    p.add_argument("--alpha", type=float)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--target", choices=["label", "pred"], default="label",
                   help="explain the true class (or, without a label, the clean prediction) on both images "
                        "(default, comparable maps), or each image's own prediction")
    p.add_argument("--out", default="explain.png", help="figure file (default: explain.png; a .pdf beside it)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA, else MPS, else CPU, as every command), "
                                                    "cpu, cuda, cuda:1 …")
    add_config_args(p, dotted_set=False)
    p.set_defaults(func=cmd_explain)

    p = command("data", help="check a dataset's files (data check) or fetch what can be fetched (data prepare)")
    data_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=OneLineParser)
    for action, text in (("check", "verify a CoOp-layout dataset: folders, split file, class count, missing and "
                                   "unreadable images; says exactly what is missing (exit 2 if anything is)"),
                         ("prepare", "download the public archives (torchvision's sources) into the CoOp layout "
                                     "and print the manual steps for the rest")):
        q = data_sub.add_parser(action, help=text, description=text)
        q.add_argument("--dataset", required=True, help="dataset name (`robustprompt list datasets`)")
        q.add_argument("--root", required=True, help="data root holding the CoOp-layout dataset folders")
        if action == "check":
            q.add_argument("--full", action="store_true", help="decode every image (default: a seeded sample)")
            q.add_argument("--sample", type=int, default=16, help="images decoded per split without --full "
                                                                  "(default: 16)")
        else:
            q.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")
    p.set_defaults(func=cmd_data)

    p = command("report", help="tables (md, csv, latex) and plots from run directories")
    p.add_argument("runs", nargs="+", help="run directories or folders holding them")
    p.add_argument("--format", choices=["md", "csv", "latex"], default="md")
    p.add_argument("--plot", action="store_true", help="also write the few-shot curves and the trade-off scatter")
    p.add_argument("--attack", help="tabulate one attack's accuracy (nonadaptive, adaptive_secret, adaptive_known, "
                                    "pgd, autoattack, …) instead of the worst case over all attacks a run ran")
    p.add_argument("--out", help="folder for results.<ext>, cards.<ext> (robustness cards of runs with several "
                                 "attacks) and the figures")
    p.set_defaults(func=cmd_report)

    p = command("methods", help="list the training-time methods (= list methods)")
    p.set_defaults(func=cmd_methods)

    p = command("list", help="list the names that exist: " + ", ".join(LIST_KINDS),
                description="Backbones also load as hf-hub:ORG/REPO and local-dir:PATH; datasets also as "
                            "imagefolder:PATH and csv:PATH.")
    p.add_argument("kind", choices=LIST_KINDS)
    p.add_argument("--model", help="with pretrained: only this architecture's tags")
    p.set_defaults(func=cmd_list)

    p = command("import-prompts", help="convert a CoOp / MaPLe / FAP checkpoint (Dassl model.pth.tar-N) into "
                                       "prompts that --run and load_classifier(run=...) accept")
    p.add_argument("checkpoint", help="the Dassl checkpoint (model.pth.tar-N, model-best.pth.tar)")
    p.add_argument("--layout", choices=["coop", "maple", "fap"], help="the trainer that wrote it (default: detect)")
    p.add_argument("--model", required=True, help="the open_clip architecture the prompts were trained on")
    p.add_argument("--pretrained", help="its weights: a tag (e.g. openai) or a checkpoint file (e.g. TeCoA, FARE)")
    p.add_argument("--quick-gelu", action="store_const", const=True, default=None)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--dataset", help="the dataset it was trained on (its class names and template)")
    g.add_argument("--classnames-file", help="the class names it was trained on, one a line, in label order")
    p.add_argument("--root", help="data root for --dataset")
    p.add_argument("--download", action="store_true", help="allow downloading --dataset if it supports it")
    p.add_argument("--template", help="the dataset template, '{}' for the class (FAP's init phrase; default: "
                                      "the dataset's, or 'a photo of a {}.')")
    p.add_argument("--ctx-init", help="the trainer's CTX_INIT (default: CoOp none, MaPLe 'a photo of a', FAP the "
                                      "template); '' for none")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing the checkpoint's class-prompt embeddings and frozen CLIP weights with "
                        "--model/--pretrained and the class names")
    p.add_argument("--out", required=True, help="folder to write (or a .safetensors prompt file)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier import in --out")
    p.set_defaults(func=cmd_import_prompts)

    p = command("push", help="upload a training run's prompts, config, metrics and a model card to the Hugging "
                             "Face Hub")
    p.add_argument("run_dir", help="a finished training run directory")
    p.add_argument("repo", help="the model repo, ORG/REPO (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its setting)")
    p.add_argument("--revision", "--branch", dest="revision", help="branch to commit to (created if missing; "
                                                                   "default main)")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`'s)")
    p.add_argument("--license", help="license id for the model card (e.g. mit, apache-2.0)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_push)

    p = command("pull", help="download a prompt repo from the Hugging Face Hub (what --run hf-hub:ORG/REPO does)")
    p.add_argument("repo", help="ORG/REPO or hf-hub:ORG/REPO[@REVISION]")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--out", help="folder to copy the files to (default: leave them in the Hugging Face cache)")
    p.add_argument("--token", help="Hugging Face token, for a private or gated repo")
    p.set_defaults(func=cmd_pull)

    p = command("pretrain-demo", help="build (or verify) the embedded demo backbone")
    p.add_argument("--root", help="where Fashion-MNIST lies, if not in /usr/share/datasets/fashion-mnist")
    p.add_argument("--download", action="store_true", help="download Fashion-MNIST if it is not found")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached copy exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pretrain_demo)

    p = command("demo", help="the main job on the embedded default: robustness table on the demo backbone")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's run directories")
    p.add_argument("--subset", type=int, default=1000, help="test images per evaluation")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    if defaults_in_help:
        _show_defaults(defaults)
    return parser


# tta's own flags (cmd_tta adds "adaptive", whose bare form needs a translation first)
TTA_FLAGS = {"method": "method.name", "adaptive_steps": "adaptive_attack.steps", "eot": "adaptive_attack.eot",
             "adaptive_loss": "adaptive_attack.loss", "adaptive_restarts": "adaptive_attack.restarts",
             "defence_seed": "defence_seed", "quantize_adv": "quantize_adv"}


def _show_defaults(parsers: dict[str, argparse.ArgumentParser]) -> None:
    """Each flag's help states its default, read from the command's config dataclass."""
    from .engine.evaluate import EvalConfig
    from .engine.train import TrainConfig
    from .engine.tta import TTAConfig

    shared = (MODEL_FLAGS, ATTACK_FLAGS, RUN_FLAGS)
    annotate_defaults(parsers["eval"], EvalConfig, *shared, DATA_FLAGS)
    parsers["eval"].description = eval_description(EvalConfig)
    annotate_defaults(parsers["tta"], TTAConfig, *shared, DATA_FLAGS, TTA_FLAGS)
    annotate_defaults(parsers["train"], TrainConfig, MODEL_FLAGS, RUN_FLAGS, TRAIN_DATA_FLAGS, TRAIN_FLAGS,
                      TRAIN_ATTACK_FLAGS)


class _StderrHandler(logging.StreamHandler):
    """Log records to whatever sys.stderr is when they are emitted (not when main() started)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _StdoutHandler(_StderrHandler):
    """Log records to whatever sys.stdout is when they are emitted."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    for h in [h for h in log.handlers if isinstance(h, _StderrHandler)]:  # main() run again in-process
        log.removeHandler(h)
    log.addHandler(_StderrHandler())
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    # "run directory: PATH" at the start and end of a run, on stdout: an error stays the one line on stderr
    rundir_log = logging.getLogger("robustprompt.rundir")
    for h in [h for h in rundir_log.handlers if isinstance(h, _StdoutHandler)]:
        rundir_log.removeHandler(h)
    rundir_log.addHandler(_StdoutHandler())
    rundir_log.setLevel(logging.INFO)
    rundir_log.propagate = False


def environment_error_line(exc: OSError) -> str:
    """'cannot write PATH: No space left on device' for an OSError of ENVIRONMENT_ERRNOS."""
    where = exc.filename if exc.filename is not None else "a file"
    return one_line(f"cannot write {str(where)[:200]}: {exc.strerror or exc}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(defaults_in_help=any(w in ("-h", "--help") for w in words))
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RobustPromptError as exc:
        print(f"robustprompt {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise  # not the machine's fault: an internal bug keeps its traceback
        print(f"robustprompt {args.command}: error: {environment_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nrobustprompt {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
