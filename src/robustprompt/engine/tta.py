"""`robustprompt tta`: a test-time defence under attack, per image, with the run directory,
records, progress bar, sharding and resume of `eval`.

Records carry, per image: the undefended model's clean and adversarial predictions
(base_clean_pred, base_adv_pred) and the defence's (clean_pred, adv_pred).

Views follow each procedure's released code unless the config sets `augmix` (see resolve_augmix):
TPT and R-TPT build AugMix views except on ImageNet and its variants, where they use random resized
crops + flips only (`augmix=len(set_id)>1` in both scripts). The resolved value and where it came
from are recorded in the run's config (method.params.augmix) and metrics (augmix, augmix_source).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..api import classifier_from_spec, resolved_prompt
from ..config import AttackSpec, DataSpec, ModelSpec, to_dict
from ..data.registry import canonical_name
from ..errors import DatasetError
from ..models import PromptConfig
from ..tta.adaptive import eot_pgd
from ..tta.procedures import build_procedure, procedure_class
from .evaluate import environment, image_seed
from .runtime import process_state
from .rundir import RunDir, config_hash
from .sharded import run_per_image
from .tasks import load_task, method_of

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


@dataclass
class TTAConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=_tta_data)       # batch_size = images defended concurrently
    method: TTAMethodSpec = field(default_factory=TTAMethodSpec)
    attack: AttackSpec = field(default_factory=_tta_attack)
    adaptive: bool = False
    quantize_adv: bool = False
    seed: int = 0
    device: str = "auto"


def _model_spec(spec: ModelSpec) -> ModelSpec:
    """A test-time defence tunes a text prompt: without one given, TPT's."""
    if spec.run or spec.prompt is not None:
        return spec
    return ModelSpec(name=spec.name, pretrained=spec.pretrained, quick_gelu=spec.quick_gelu,
                     prompt=TPT_PROMPT, templates=spec.templates)


def threat_record(cfg: TTAConfig, n_classes: int) -> dict[str, Any]:
    t = cfg.attack.threat().describe(n_classes)
    t["adaptive"] = cfg.adaptive
    t["target"] = ("the whole defence: EOT-PGD through views and ensemble, started from the non-adaptive "
                   "example, worst case per image" if cfg.adaptive else
                   "CLIP with the initial prompt, before any adaptation (non-adaptive)")
    t["quantize_adv"] = cfg.quantize_adv
    return t


def run_tta(cfg: TTAConfig, out: Optional[str | Path] = None, *, overwrite: bool = False,
            progress: bool = True) -> Optional[dict[str, Any]]:
    state, device = process_state(cfg.device)
    params, augmix_source = resolve_augmix(cfg.method, cfg.data.dataset)
    procedure = build_procedure(cfg.method.name, params)
    model_spec = _model_spec(cfg.model)
    config = {"kind": "tta", **to_dict(cfg)}
    config["model"] = to_dict(model_spec)
    config["model"]["prompt"] = resolved_prompt(model_spec).to_dict()
    config["method"]["params"] = to_dict(procedure.params)   # augmix as resolved
    ds = cfg.data.dataset.replace(":", "_").replace("/", "_")
    default = Path("runs") / "tta" / f"{procedure.name}-{ds}-{model_spec.name}-{config_hash(config)}"
    run = RunDir(out or default, config, overwrite=overwrite)
    resumed = run.prepare(is_main=state.is_main_process)
    state.wait_for_everyone()
    if resumed and run.metrics() is not None:
        return run.metrics() if state.is_main_process else None

    task = load_task(cfg.data)
    clf = classifier_from_spec(model_spec, task.dataset, device)
    clf.eval()
    if procedure.tunes_prompt:
        procedure.initial_prompts(clf)  # fails now, with a clear message, if there is nothing to tune
    threat = cfg.attack.threat()
    t_start = time.time()

    def process(x: torch.Tensor, y: torch.Tensor, idx: list[int]) -> list[dict]:
        attack_seeds = [image_seed(cfg.seed, i) for i in idx]
        view_seeds = [image_seed(cfg.seed + 1, i) for i in idx]
        with torch.no_grad():
            base_clean = clf(x).argmax(1)
        x_adv = threat.run(clf, x, y, seeds=attack_seeds, seed=cfg.seed)   # before any adaptation
        if cfg.quantize_adv:
            x_adv = torch.round(x_adv * 255) / 255
        with torch.no_grad():
            defended_adv = procedure.run(clf, x_adv, view_seeds).argmax(1)
        if cfg.adaptive and not threat.is_clean:
            x_ada = eot_pgd(procedure, clf, x, y, threat, attack_seeds, start=x_adv)
            if cfg.quantize_adv:
                x_ada = torch.round(x_ada * 255) / 255
            with torch.no_grad():
                defended_ada = procedure.run(clf, x_ada, view_seeds).argmax(1)
            # worst case per image: keep the adaptive example unless only the transfer one succeeds
            keep_transfer = (defended_adv != y) & (defended_ada == y)
            x_adv = torch.where(keep_transfer.view(-1, 1, 1, 1), x_adv, x_ada)
            defended_adv = torch.where(keep_transfer, defended_adv, defended_ada)
        with torch.no_grad():
            base_adv = clf(x_adv).argmax(1)
            defended_clean = procedure.run(clf, x, view_seeds).argmax(1)
        return [{"base_clean_pred": int(a), "base_adv_pred": int(b), "clean_pred": int(c), "adv_pred": int(d)}
                for a, b, c, d in zip(base_clean.tolist(), base_adv.tolist(), defended_clean.tolist(),
                                      defended_adv.tolist())]

    desc = f"tta {procedure.name} {cfg.data.dataset} {threat.short()}{' adaptive' if cfg.adaptive else ''}"
    records = run_per_image(run, state, task.split, task.indices, task.transform(clf.image_size), process,
                            batch_size=cfg.data.batch_size, workers=cfg.data.workers, desc=desc, progress=progress)
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
        **method_of(model_spec),
        "prompt": clf.prompt_cfg.to_dict(),
        "seed": cfg.seed,
        "threat": threat_record(cfg, len(task.dataset.classnames)),
        "adaptive": cfg.adaptive,
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
    run.finalize(records, metrics)
    return metrics
