"""What a model looks at, clean versus attacked: CBA bidirectional maps (vision and text) and
A-TPT's token-gradient rollout for an image and its PGD adversarial version, with the shift
between them as numbers. `robustprompt explain` renders these (report/explain_figure.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .attacks.threat import ThreatModel
from .attribution.cba import matching_score, text_attribution, vision_attribution
from .attribution.rollout import rollout
from .models import PromptedClassifier, TraceSpec

LAST = TraceSpec(blocks=(-1,))


@dataclass
class ImageExplanation:
    """Maps of one image under one model. Shapes: maps gh×gw, text map L (valid tokens only)."""

    image: torch.Tensor                 # 3×S×S in [0,1]
    target: int                         # class the maps explain
    cba: torch.Tensor                   # signed CBA visual map
    rollout: torch.Tensor               # token-gradient rollout map in [0,1]
    text: torch.Tensor                  # signed textual map over the target prompt's tokens
    tokens: list[str]                   # the token strings of that prompt
    probs: torch.Tensor                 # K class probabilities


@dataclass
class PairExplanation:
    """Clean and adversarial explanations of one image under one model, and their shift."""

    model: str
    clean: ImageExplanation
    adv: ImageExplanation
    label: Optional[int]
    shift: dict[str, float] = field(default_factory=dict)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two maps (ties broken by position)."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum().item() / denom) if denom > 0 else 0.0


def _token_strings(clf: PromptedClassifier, cls: int, length: int) -> list[str]:
    ids = clf.tokens[cls][:length].tolist()
    decode = getattr(clf.tokenizer, "decoder", None)
    n_ctx = clf.text_ctx_len
    out = []
    for i, t in enumerate(ids):
        if i == 0:
            out.append("<start>")
        elif 1 <= i <= n_ctx:
            out.append(f"[ctx{i}]")
        elif i == length - 1:
            out.append("<end>")
        else:
            word = decode.get(t, str(t)) if isinstance(decode, dict) else str(t)
            out.append(word.replace("</w>", ""))
    return out


def explain_image(clf: PromptedClassifier, image: torch.Tensor, target: int) -> ImageExplanation:
    """CBA maps (vision + text) and the rollout for `image` (3×S×S), explaining class `target`."""
    x = image[None].detach().clone().requires_grad_(True)
    y = torch.tensor([target], device=x.device)
    with torch.enable_grad():
        out = clf.features(x, vision_trace=LAST, text_trace=LAST)
        cba = vision_attribution(matching_score(out.image_features, out.text_features, y), out.vision)[0]
        tmap, valid = text_attribution(clf.model, out.text, out.image_features, y)
    n_valid = int(valid[0].sum())
    roll = rollout(clf, x.detach(), target=y)[0]
    return ImageExplanation(image.detach().cpu(), target, cba.detach().cpu(), roll.detach().cpu(),
                            tmap[0, :n_valid].detach().cpu(), _token_strings(clf, target, n_valid),
                            out.logits[0].detach().softmax(-1).cpu())


def explain_pair(clf: PromptedClassifier, image: torch.Tensor, label: Optional[int], threat: ThreatModel,
                 model_name: str, *, target: str = "pred", seed: int = 0) -> PairExplanation:
    """Explain `image` and its adversarial version. Without a label the attack moves the image away
    from the clean prediction. target="pred": each map explains that image's own prediction;
    "label": both explain the true (or clean-predicted) class, as CBA-FAPT's alignment does."""
    with torch.no_grad():
        clean_pred = int(clf(image[None]).argmax(1))
    y = clean_pred if label is None else label
    x_adv = threat.run(clf, image[None], torch.tensor([y], device=image.device), seeds=[seed])[0]
    with torch.no_grad():
        adv_pred = int(clf(x_adv[None]).argmax(1))
    t_clean, t_adv = (clean_pred, adv_pred) if target == "pred" else (y, y)
    clean = explain_image(clf, image, t_clean)
    adv = explain_image(clf, x_adv, t_adv)
    shift = {
        "cba_l2": float((clean.cba - adv.cba).norm()),
        "cba_spearman": spearman(clean.cba, adv.cba),
        "rollout_l2": float((clean.rollout - adv.rollout).norm()),
        "rollout_spearman": spearman(clean.rollout, adv.rollout),
    }
    if clean.text.shape == adv.text.shape:
        shift["text_l2"] = float((clean.text - adv.text).norm())
        shift["text_spearman"] = spearman(clean.text, adv.text)
    return PairExplanation(model_name, clean, adv, label, shift)


EXAMPLE_IMAGE = "example"


def example_image_path():
    from importlib.resources import files

    return files("robustprompt") / "assets" / "example_ankle_boot.png"


def run_explain(*, image: Optional[str], dataset: str, root: Optional[str], split: str, n: int, subset_seed: int,
                model, runs: Sequence[str], threat: ThreatModel, target: str, label: Optional[str],
                out: str, device: str = "cpu", allow_backbone_mismatch: bool = False) -> list:
    """Build the classifiers, pick the images, explain every (image, model) pair, render the figure.
    Bad input (an unreadable image, an --out that cannot be written) is refused before any model
    is built."""
    from .api import classifier_from_spec, resolve_device, run_backbone_spec
    from .config import ModelSpec
    from .data import build_dataset
    from .data.images import load_rgb
    from .engine.tasks import preprocess_of, subset_indices
    from .errors import ConfigError
    from .messages import quote
    from .methods import method_class
    from .report.explain_figure import render
    from .report.outputs import check_figure_path

    check_figure_path(out)
    pil = None
    if image is not None:
        pil = load_rgb(example_image_path() if image == EXAMPLE_IMAGE else image)
    dev = resolve_device(device)
    ds = build_dataset(dataset, root)
    names = ds.classnames
    specs: list[tuple[str, ModelSpec]] = []
    if runs:
        # zero-shot CLIP on the backbone the (first) run's prompts belong to
        specs.append(("zero-shot CLIP", run_backbone_spec(runs[0])))
        for r in runs:
            from .engine.tasks import method_of

            key = method_of(ModelSpec(run=r))["method"]
            title = method_class(key).title if key != "unknown" else key
            specs.append((f"{title} prompts", ModelSpec(run=r, allow_backbone_mismatch=allow_backbone_mismatch)))
    else:
        specs.append(("zero-shot CLIP", model))
    classifiers = [(title, classifier_from_spec(spec, ds, dev)) for title, spec in specs]
    transform = preprocess_of(classifiers[0][1]).transform()   # the backbone's own preprocessing
    items: list[tuple[torch.Tensor, Optional[int]]] = []
    if pil is not None:
        lab = None
        if label is not None:
            if label not in names:
                raise ConfigError(f"--label {quote(label)} is not a class of {ds.name}; classes: "
                                  f"{', '.join(names[:20])}{' …' if len(names) > 20 else ''}")
            lab = names.index(label)
        elif image == EXAMPLE_IMAGE and "ankle boot" in names:
            lab = names.index("ankle boot")
        items.append((transform(pil), lab))
    else:
        sp = ds.split(split)
        for i in subset_indices(len(sp), n, subset_seed):
            items.append((transform(sp.load(i)), sp.labels[i]))
    pairs = []
    for img, lab in items:
        for title, clf in classifiers:
            pairs.append(explain_pair(clf, img.to(dev), lab, threat, title, target=target))
    return render(pairs, names, out, threat_label=threat.short()), pairs
