"""`robustprompt tta`: a test-time defence under attack, per image, with the run directory,
records, progress bar, sharding and resume of `eval`.

Records carry, per image: the undefended model's clean and adversarial predictions
(base_clean_pred, base_adv_pred) and the defence's (clean_pred, adv_pred), where the adversarial
example is the worst case over every attack run, and the defence's prediction under each attack
(adv_preds).

Threat models (a randomised defence's number must say what the attacker knows):
- nonadaptive: PGD/AutoAttack against CLIP with the initial prompt, before any adaptation (the
  papers' protocol);
- adaptive_secret: an adaptive attack through the whole defence while the defender's randomness
  stays secret — the defence evaluates every image with views drawn from `defence_seed`, which the
  attacker never uses; the attacker averages over fresh draws of its own (EOT);
- adaptive_known: the same attack on the exact views the evaluation uses (a deterministic
  deployment, or a leaked seed): an upper bound on attack strength.
`robust_acc` is the worst case per image over all the attacks run; `attacks` lists each one.

Views follow each procedure's released code unless the config sets `augmix` (see resolve_augmix):
TPT and R-TPT build AugMix views except on ImageNet and its variants, where they use random resized
crops + flips only (`augmix=len(set_id)>1` in both scripts). The resolved value and where it came
from are recorded in the run's config (method.params.augmix) and metrics (augmix, augmix_source).
"""
from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..api import classifier_from_spec, resolved_prompt
from ..config import AttackSpec, DataSpec, ModelSpec, to_dict
from ..data.registry import canonical_name
from ..errors import DatasetError
from ..models import PromptConfig
from ..models.sources import model_slug
from ..errors import ConfigError
from ..tta.procedures import build_procedure, procedure_class
from .evaluate import check_seed, check_tf32, environment, eval_identity, image_seed
from . import runlog
from .runtime import process_state, set_tf32
from .rundir import RunDir, check_out_dir, config_hash
from .sharded import aa_chunk, run_per_image
from .tasks import Task, load_task, method_of

# TPT's prompt: 4 learnable text tokens initialised from "a photo of a", one block.
TPT_PROMPT = PromptConfig(coupling="text", n_ctx=4, depth=1, text_init="a photo of a")


@dataclass
class TTAMethodSpec:
    name: str = "atpt"
    params: dict = field(default_factory=dict)


# ImageNet and its distribution-shift variants (canonical dataset names, see robustprompt.data).
IMAGENET_FAMILY = frozenset({"imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"})

# Procedures whose released code drops AugMix on the ImageNet family (views = crops + flips):
# TPT (azshue/TPT tpt_classification.py) and R-TPT (TomSheng21/R-TPT rtpt.py), augmix=len(set_id)>1.
# Not here, each for its own released code:
# - C-TPT: its distribution-shift scripts (scripts/test_tpt_ctpt_ds.sh, test_tpt_ds.sh) pass
#   --I_augmix, i.e. AugMix on the ImageNet family too — the class default (True) everywhere.
# - MTA: main.py passes augmix=(len(set_id)>1 and args.tpt), False for an --mta run, so crops +
#   flips on every dataset — MTAParams' own default (False) everywhere.
# A-TPT (SEU-VIPGroup/A-TPT atpt.py) passes augmix=len(dset)>1 too: on ImageNet its
# attention-guided views reduce to the crop bases (mix = base), which `augmix: false` gives.
CROPS_ONLY_ON_IMAGENET = frozenset({"tpt", "rtpt", "atpt"})


def is_imagenet_family(dataset: str) -> bool:
    """True for ImageNet and its variants under any accepted spelling ("imagenet-a", "ImageNet-R"…);
    False for everything else, including imagefolder:/csv: datasets and unknown names."""
    try:
        return canonical_name(dataset) in IMAGENET_FAMILY
    except DatasetError:
        return False


def resolve_augmix(method: "TTAMethodSpec", dataset: str) -> tuple[dict, str]:
    """The procedure parameters a run uses, with `augmix` resolved, and where that value came from.

    An `augmix` given in method.params always wins. Otherwise a procedure in CROPS_ONLY_ON_IMAGENET
    gets augmix = False on the ImageNet family (TPT's rule), and every other case keeps the
    procedure's own default."""
    params = dict(method.params)
    if "augmix" in params:
        return params, "config"
    if method.name in CROPS_ONLY_ON_IMAGENET and is_imagenet_family(dataset):
        params["augmix"] = False
        return params, "auto: crops + flips only on the ImageNet family (TPT's rule)"
    default = procedure_class(method.name).Params().augmix
    return params, f"auto: {method.name}'s default ({'AugMix' if default else 'crops + flips only'})"


def _tta_data() -> DataSpec:
    return DataSpec(batch_size=4)


def _tta_attack() -> AttackSpec:
    return AttackSpec(attack="pgd", eps=4.0, alpha=1.0, steps=100)


RANDOMNESS = ("secret", "known")


@dataclass
class AdaptiveSpec:
    """The adaptive attack on a defence (tta.adaptive.AdaptiveAttack): APGD-style steps with EOT
    over fresh view draws (secret randomness) and gradients through the prompt update."""

    steps: int = 100
    eot: int = 16               # view sets per step when the randomness is secret
    loss: str = "ce"            # ce | dlr
    restarts: Optional[int] = None   # None: the procedure's own (TTAProcedure.adaptive_restarts; 1, TTC 2)
    schedule: str = "apgd"      # apgd | pgd
    through_update: bool = True
    # EOT draws per batched call of the defence (memory only: not in the run identity). None: all
    # at once on a CPU; on an accelerator the procedure's own (TTAProcedure.adaptive_eot_chunk:
    # one for view-based defences, where B images × EOT-16 × 64 views with the second-order graph
    # would not fit — ViT-B/16: ~120 MB of activations per image-draw; all at once for TTC)
    chunk: Optional[int] = None

    def __post_init__(self) -> None:
        if self.chunk is not None and (isinstance(self.chunk, bool) or not isinstance(self.chunk, int)
                                       or self.chunk < 1):
            raise ConfigError(f"adaptive_attack.chunk must be a whole number ≥ 1 (EOT draws per call) or null, "
                              f"got {self.chunk!r}")
        if self.steps < 1 or self.eot < 1 or (self.restarts is not None and self.restarts < 1):
            raise ConfigError(f"adaptive_attack needs steps, eot and restarts >= 1 "
                              f"(got {self.steps}, {self.eot}, {self.restarts})")
        if self.loss not in ("ce", "dlr"):
            raise ConfigError(f"adaptive_attack.loss must be ce or dlr, got {self.loss!r}")
        if self.schedule not in ("apgd", "pgd"):
            raise ConfigError(f"adaptive_attack.schedule must be apgd or pgd, got {self.schedule!r}")

    def build(self):
        from ..tta.adaptive import AdaptiveAttack

        return AdaptiveAttack(steps=self.steps, eot=self.eot, loss=self.loss, restarts=self.restarts,
                              schedule=self.schedule, through_update=self.through_update)

    def title(self, randomness: str) -> str:
        name = f"{'APGD' if self.schedule == 'apgd' else 'PGD'}-{self.steps}"
        if self.loss != "ce":
            name += f"-{self.loss.upper()}"
        if (self.restarts or 1) > 1:
            name += f" ×{self.restarts}"
        eot = f"EOT-{self.eot} " if randomness == "secret" else ""
        return f"adaptive, randomness {randomness} ({eot}{name})"


@dataclass
class TTAConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=_tta_data)       # batch_size = images defended concurrently
    method: TTAMethodSpec = field(default_factory=TTAMethodSpec)
    attack: AttackSpec = field(default_factory=_tta_attack)
    # adaptive attacks to run besides the non-adaptive one: a list of "secret" / "known";
    # true = both, false = none
    adaptive: Union[bool, list[str]] = False
    adaptive_attack: AdaptiveSpec = field(default_factory=AdaptiveSpec)
    defence_seed: Optional[int] = None   # the defender's view randomness; None: seed + 1
    quantize_adv: bool = False
    seed: int = 0
    device: str = "auto"
    tf32: bool = False   # TF32 for CUDA matmuls and cuDNN convolutions

    def __post_init__(self) -> None:
        check_seed(self.seed, "seed")
        check_tf32(self.tf32)
        if self.defence_seed is not None:
            check_seed(self.defence_seed, "defence_seed")
        modes = self.randomness_modes
        bad = [m for m in modes if m not in RANDOMNESS]
        if bad or len(set(modes)) != len(modes):
            raise ConfigError(f"adaptive must be true, false or a list of {' / '.join(RANDOMNESS)} "
                              f"without repeats, got {self.adaptive!r}")

    def omitted_fields(self) -> tuple[str, ...]:
        """tf32 at its default (off) stays out of the run identity (existing runs keep theirs)."""
        return () if self.tf32 else ("tf32",)

    @property
    def randomness_modes(self) -> list[str]:
        if isinstance(self.adaptive, bool):
            return list(RANDOMNESS) if self.adaptive else []
        return list(self.adaptive)

    @property
    def view_seed(self) -> int:
        return self.seed + 1 if self.defence_seed is None else self.defence_seed


def defence_model_spec(spec: ModelSpec, procedure=None) -> ModelSpec:
    """A test-time defence tunes a prompt: without one given, the procedure's default_prompt,
    else TPT's."""
    if spec.run or spec.prompt is not None:
        return spec
    prompt = getattr(procedure, "default_prompt", None) or TPT_PROMPT
    return ModelSpec(name=spec.name, pretrained=spec.pretrained, quick_gelu=spec.quick_gelu,
                     prompt=prompt, templates=spec.templates)


NONADAPTIVE_TITLE = "non-adaptive (CLIP, initial prompt)"


def threat_record(cfg: TTAConfig, n_classes: int) -> dict[str, Any]:
    t = cfg.attack.threat().describe(n_classes)
    modes = cfg.randomness_modes
    t["adaptive"] = modes
    t["target"] = ("worst case per image over the non-adaptive attack (CLIP with the initial prompt) and "
                   "adaptive attacks through the whole defence (views, prompt update, ensemble) with the "
                   f"defender's randomness {' and '.join(modes)}" if modes else
                   "CLIP with the initial prompt, before any adaptation (non-adaptive)")
    t["quantize_adv"] = cfg.quantize_adv
    return t


def attack_keys(cfg: TTAConfig) -> list[str]:
    return ["nonadaptive"] + [f"adaptive_{m}" for m in cfg.randomness_modes]


def attacks_record(cfg: TTAConfig, recs: list[dict], n_classes: int) -> list[dict[str, Any]]:
    """One entry per attack run: its key, title, what the attacker knows, accuracy, settings."""
    out = []
    for key in attack_keys(cfg):
        acc = 100.0 * sum(r["adv_preds"][key] == r["label"] for r in recs) / len(recs)
        if key == "nonadaptive":
            out.append({"key": key, "title": NONADAPTIVE_TITLE, "randomness": None, "acc": acc,
                        "threat": cfg.attack.threat().describe(n_classes)})
        else:
            mode = key[len("adaptive_"):]
            out.append({"key": key, "title": cfg.adaptive_attack.title(mode), "randomness": mode, "acc": acc,
                        "attack": to_dict(cfg.adaptive_attack)})
    return out


def run_tta(cfg: TTAConfig, out: Optional[str | Path] = None, *, overwrite: bool = False,
            progress: bool = True, wait_for_lock: bool = False,
            report_to: Sequence[str] | str | None = None, compile: bool = False) -> Optional[dict[str, Any]]:
    """Run (or resume) a test-time defence under attack; returns the metrics on the main process.
    The run directory is locked as in `evaluate` (`wait_for_lock`: wait for another process);
    log.txt, scalars.csv and report_to as in `evaluate`. compile: the non-adaptive attack calls
    the classifier through `torch.compile` (engine.compiled, as `evaluate`'s); the defences and
    the adaptive attacks, which run traced and per-view forwards, stay eager."""
    if out is not None:
        check_out_dir(out)   # before any work
    report_to = runlog.require_reporters(report_to)   # before any work: a missing tensorboard
    state, device = process_state(cfg.device)
    set_tf32(cfg.tf32)
    params, augmix_source = resolve_augmix(cfg.method, cfg.data.dataset)
    procedure = build_procedure(cfg.method.name, params)
    if cfg.adaptive_attack.restarts is None:   # resolved and recorded, as augmix is
        cfg = dataclasses.replace(cfg, adaptive_attack=dataclasses.replace(
            cfg.adaptive_attack, restarts=procedure.adaptive_restarts))
    model_spec = defence_model_spec(cfg.model, procedure)
    config = {"kind": "tta", **to_dict(cfg)}
    config["model"] = to_dict(model_spec)
    config["model"]["prompt"] = resolved_prompt(model_spec).to_dict()
    config["method"]["params"] = to_dict(procedure.params)   # augmix as resolved
    task = load_task(cfg.data)
    eval_identity(config, model_spec, task)
    ds = cfg.data.dataset.replace(":", "_").replace("/", "_")
    default = Path("runs") / "tta" / f"{procedure.name}-{ds}-{model_slug(model_spec.name)}-{config_hash(config)}"
    run = RunDir(out or default, config, overwrite=overwrite)
    with run.open(state, wait_for_lock=wait_for_lock) as resumed, \
            runlog.run_logging(run.path, "tta", main_process=state.is_main_process, report_to=report_to):
        if resumed and run.metrics() is not None:
            return run.metrics() if state.is_main_process else None
        return _run_tta(cfg, run, state, device, task, procedure, model_spec, augmix_source, progress, compile)


def _run_tta(cfg: TTAConfig, run: RunDir, state, device, task: Task, procedure, model_spec: ModelSpec,
             augmix_source: str, progress: bool, compile: bool = False) -> Optional[dict[str, Any]]:
    from .compiled import attack_model, compile_record

    clf = classifier_from_spec(model_spec, task.dataset, device)
    clf.eval()
    attacker = attack_model(clf, compile)
    if procedure.tunes_prompt:
        procedure.initial_prompts(clf)  # fails now, with a clear message, if there is nothing to tune
    threat = cfg.attack.threat()
    t_start = time.time()

    adaptive = cfg.adaptive_attack.build() if cfg.randomness_modes else None
    eot_chunk = cfg.adaptive_attack.chunk or (None if device.type == "cpu" else procedure.adaptive_eot_chunk)

    def quantised(x_adv: torch.Tensor) -> torch.Tensor:
        return torch.round(x_adv * 255) / 255 if cfg.quantize_adv else x_adv

    part = cfg.data.batch_size

    def parts(n: int) -> list[slice]:
        """A batch is one AutoAttack chunk (64 images) when the attack is AutoAttack; the defence
        and the adaptive attacks still take data.batch_size images at a time (memory)."""
        return [slice(i, min(i + part, n)) for i in range(0, n, part)]

    def defend(x: torch.Tensor, view_seeds: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([procedure.run(clf, x[s], view_seeds[s]).argmax(1) for s in parts(len(x))])

    def process(x: torch.Tensor, y: torch.Tensor, idx: list[int]) -> list[dict]:
        attack_seeds = [image_seed(cfg.seed, i) for i in idx]
        # the defender's randomness: recorded, and used by the attacker only when it is "known"
        view_seeds = [image_seed(cfg.view_seed, i) for i in idx]
        with torch.no_grad():
            base_clean = clf(x).argmax(1)
        defended_clean = defend(x, view_seeds)
        x_non = quantised(threat.run(attacker, x, y, seeds=attack_seeds, seed=cfg.seed))   # before any adaptation
        examples, preds = {"nonadaptive": x_non}, {"nonadaptive": defend(x_non, view_seeds)}
        for mode in cfg.randomness_modes:
            if threat.is_clean:
                x_a = x_non
            else:
                from ..tta.adaptive import adaptive_attack

                adaptive_seeds = [image_seed(cfg.seed + 2, i) for i in idx]
                x_a = quantised(torch.cat([adaptive_attack(
                    procedure, clf, x[s], y[s], eps=threat.eps, norm=threat.norm, spec=adaptive,
                    attack_seeds=adaptive_seeds[s], view_seeds=view_seeds[s] if mode == "known" else None,
                    start=x_non[s], chunk=eot_chunk) for s in parts(len(x))]))
            examples[f"adaptive_{mode}"], preds[f"adaptive_{mode}"] = x_a, defend(x_a, view_seeds)
        # worst case per image: the first attack (in order) that fools the defence, else the last one
        keys = list(examples)
        x_adv, defended_adv = examples[keys[-1]].clone(), preds[keys[-1]].clone()
        for key in reversed(keys[:-1]):
            fooled = preds[key] != y
            x_adv[fooled], defended_adv[fooled] = examples[key][fooled], preds[key][fooled]
        with torch.no_grad():
            base_adv = clf(x_adv).argmax(1)
        return [{"base_clean_pred": int(base_clean[b]), "base_adv_pred": int(base_adv[b]),
                 "clean_pred": int(defended_clean[b]), "adv_pred": int(defended_adv[b]),
                 "adv_preds": {k: int(preds[k][b]) for k in keys}} for b in range(len(y))]

    modes = cfg.randomness_modes
    desc = f"tta {procedure.name} {cfg.data.dataset} {threat.short()}{' adaptive ' + '+'.join(modes) if modes else ''}"
    records = run_per_image(run, state, task.split, task.indices, task.transform(clf), process,
                            batch_size=cfg.data.batch_size, workers=cfg.data.workers, desc=desc, progress=progress,
                            chunk=aa_chunk([cfg.attack.threat()]))
    if records is None:
        return None
    recs = list(records.values())
    n = len(recs)
    acc = lambda key: 100.0 * sum(r[key] == r["label"] for r in recs) / n  # noqa: E731
    metrics = {
        "kind": "tta",
        "tta_method": procedure.name,
        "tta_params": to_dict(procedure.params),
        "augmix": procedure.params.augmix,
        "augmix_source": augmix_source,
        "dataset": cfg.data.dataset,
        "split": cfg.data.split,
        "classes": cfg.data.classes,
        "n_classes": len(task.dataset.classnames),
        "backbone": clf.backbone_info,
        "preprocess": task.preprocess(clf).to_dict(),
        **method_of(model_spec),
        "prompt": clf.prompt_cfg.to_dict(),
        "seed": cfg.seed,
        "threat": threat_record(cfg, len(task.dataset.classnames)),
        "adaptive": cfg.randomness_modes,
        "defence_seed": cfg.view_seed,
        "attacks": attacks_record(cfg, recs, len(task.dataset.classnames)),
        "worst_case": {"acc": acc("adv_pred"), "over": attack_keys(cfg)},
        "quantize_adv": cfg.quantize_adv,
        "clean_acc": acc("clean_pred"),
        "robust_acc": acc("adv_pred"),
        "base_clean_acc": acc("base_clean_pred"),
        "base_robust_acc": acc("base_adv_pred"),
        "n": n,
        "subset": cfg.data.subset,
        "wall_time_s": round(sum(r.get("sec", 0.0) for r in recs), 3),
        "wall_time_this_session_s": round(time.time() - t_start, 3),
        "environment": environment(),
    }
    if compile:   # recorded only when asked, so runs without it keep the record they always had
        metrics["environment"]["compile"] = compile_record(attacker)
    if cfg.randomness_modes:
        metrics["environment"]["eot_chunk"] = eot_chunk or cfg.adaptive_attack.eot
    run.finalize(records, metrics)
    return metrics
