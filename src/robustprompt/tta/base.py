"""Test-time prompt tuning: the shared per-image procedure and the registry of its variants.

For each test image: build V views, encode them (one batched forward), select the most confident
views under the initial prompt, tune a fresh copy of the text prompt on them (AdamW), predict.
The image tower never depends on the text prompt, so view features are computed once and every
tuning step runs only the text tower. Several images are processed at once as independent
problems: each has its own prompt copy (one P×n_ctx×d tensor; Adam is element-wise, so the
per-image updates do not interact) created fresh for every batch — nothing carries over from
one image to the next.

For adaptive attacks, ``run(..., differentiable=True)`` keeps the graph from the images to the
prediction; ``through_update=True`` also differentiates through the prompt update (AdamW run
functionally with create_graph, `tune_copies`). The default path is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigError
from ..models import PromptConfig, PromptedClassifier
from ..registry import Registry
from .views import augmix_views


@dataclass
class TTAParams:
    """Defaults from TPT/R-TPT/A-TPT: 64 views, keep the 10% most confident, one AdamW step."""

    n_views: int = 64
    select_ratio: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01
    augmix: bool = True          # AugMix views (False: crops + flips only, TPT's ImageNet setting)
    crop_scale: float = 0.08     # smallest crop area fraction (RandomResizedCrop's default)

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"tta crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.n_views < 1 or not 0 < self.select_ratio <= 1 or self.steps < 0 or self.lr <= 0:
            raise ConfigError(f"tta needs n_views >= 1, 0 < select_ratio <= 1, steps >= 0, lr > 0 "
                              f"(got {self.n_views}, {self.select_ratio}, {self.steps}, {self.lr})")

    @property
    def n_selected(self) -> int:
        return max(1, int(self.n_views * self.select_ratio))


@dataclass
class ViewSet:
    """Views of P images: P×V×3×S×S, plus whatever a procedure attaches (maps)."""

    views: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """TPT: entropy of the mean prediction over views.  …×k×K → …"""
    logp = logits.log_softmax(-1)
    avg = torch.logsumexp(logp, dim=-2) - math.log(logits.shape[-2])
    return -(avg.exp() * avg).sum(-1)


def adamw_unrolled(prompts: list[torch.Tensor], loss: Callable[[list[torch.Tensor]], torch.Tensor], *,
                   steps: int, lr: float, weight_decay: float) -> list[torch.Tensor]:
    """`steps` AdamW updates of `prompts` (tensors that require grad) on the scalar loss(prompts),
    written out with the same operations in the same order as torch.optim.AdamW (its defaults
    β = (0.9, 0.999), eps = 1e-8), with gradients from autograd.grad(create_graph=True): the returned
    tensors carry the graph through every step (what the loss depends on → gradient → update).

        θ ← θ·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
        θ ← θ − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + eps).
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = [torch.zeros_like(t) for t in prompts]
    v = [torch.zeros_like(t) for t in prompts]
    for step in range(1, steps + 1):
        grads = torch.autograd.grad(loss(prompts), prompts, create_graph=True)
        bc1, bc2_sqrt = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
        new = []
        for i, (theta, g) in enumerate(zip(prompts, grads)):
            theta = theta * (1 - lr * weight_decay)
            m[i] = torch.lerp(m[i], g, 1 - beta1)
            v[i] = v[i] * beta2 + (1 - beta2) * g * g
            # √v floored at the smallest normal: where g ≡ 0 the plain sqrt's derivative (∞·0) would
            # be NaN; the forward value changes only for v below that floor
            root = v[i].clamp_min(torch.finfo(v[i].dtype).tiny).sqrt()
            new.append(theta - (lr / bc1) * m[i] / (root / bc2_sqrt + eps))
        prompts = new
    return prompts


class TTAProcedure:
    """One test-time defence. Subclasses set `name` and override the hooks they change."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    tunes_prompt: ClassVar[bool] = True
    # restarts of the adaptive attack when the user sets none: the first starts from the
    # non-adaptive example, the others from random points of the ε-ball
    adaptive_restarts: ClassVar[int] = 1
    # EOT draws per batched call of the defence on an accelerator when the user sets none (None:
    # all at once): one, since B images × 16 draws × 64 views with the second-order graph of the
    # prompt update would not fit; a CPU always takes all at once (engine.tta)
    adaptive_eot_chunk: ClassVar[Optional[int]] = 1
    Params: ClassVar[type] = TTAParams
    # the prompt a run starts from when the user gives none (None: TPT's, engine.tta.TPT_PROMPT)
    default_prompt: ClassVar[Optional[PromptConfig]] = None

    def __init__(self, params: Any) -> None:
        self.params = params

    # ---------------------------------------------------------------- hooks
    def make_views(self, clf: PromptedClassifier, images: torch.Tensor, gens: Sequence[torch.Generator]) -> ViewSet:
        p = self.params
        return ViewSet(torch.stack([augmix_views(img, p.n_views, g, use_augmix=p.augmix,
                                                 crop_scale=(p.crop_scale, 1.0)).views
                                    for img, g in zip(images, gens)]))

    def tta_loss(self, sel_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Per-image loss, P. sel_logits P×k×K of the selected views; text_features P×K×D."""
        return marginal_entropy(sel_logits)

    def predict(self, logits: torch.Tensor, feats: torch.Tensor, selected: torch.Tensor,
                viewset: ViewSet, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Class probabilities P×K from the final logits P×V×K (view 0 = the test image)."""
        return logits[:, 0].softmax(-1)

    # ---------------------------------------------------------------- the procedure
    def initial_prompts(self, clf: PromptedClassifier) -> list[torch.Tensor]:
        if clf.model.prompt is None or not clf.prompt_cfg.has_text:
            raise ConfigError(f"{self.name} tunes the text prompt, but this classifier has none "
                              "(use a text or vision-language prompt, or the mta procedure)")
        return [t.detach() for t in clf.model.prompt.text_prompts()]

    def text_features(self, clf: PromptedClassifier, prompts: list[torch.Tensor]) -> torch.Tensor:
        """Per-image prompts (each P×n_ctx×d) → normalised class text features P×K×D."""
        P = prompts[0].shape[0]
        K = clf.tokens.shape[0]
        tokens = clf.tokens.repeat(P, 1)
        per_seq = [t.repeat_interleave(K, dim=0) for t in prompts]
        feats, _ = clf.model.encode_text(tokens, text_prompts=per_seq)
        return F.normalize(feats, dim=-1).view(P, K, -1)

    def tune_copies(self, init: list[torch.Tensor], P: int, loss: Callable[[list[torch.Tensor]], torch.Tensor], *,
                    through_update: bool = False) -> list[torch.Tensor]:
        """Fresh per-image copies P×… of each initial prompt tensor, tuned by params.steps AdamW
        steps (lr, weight decay from params) on loss(copies) — summed over images, so each copy
        sees only its own image's loss. Default: torch.optim.AdamW, detached results.
        through_update=True: the same steps unrolled by `adamw_unrolled` with create_graph, so the
        forward values agree to rounding and the result's graph reaches whatever the loss depends on
        (the views or their features) through every step."""
        p = self.params
        if through_update:
            # the attacker's backward differentiates the tuning gradient: the fused attention
            # kernels (flash, memory-efficient) have no double backward, the math one is plain ops
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                copies = [t.unsqueeze(0).repeat(P, 1, 1).requires_grad_(True) for t in init]
                return adamw_unrolled(copies, loss, steps=p.steps, lr=p.lr, weight_decay=p.weight_decay)
        copies = [torch.nn.Parameter(t.detach().unsqueeze(0).repeat(P, 1, 1)) for t in init]
        opt = torch.optim.AdamW(copies, lr=p.lr, weight_decay=p.weight_decay)
        with torch.enable_grad():
            for _ in range(p.steps):
                value = loss(copies)
                opt.zero_grad()
                value.backward()
                opt.step()
        return [c.detach() for c in copies]

    def tune(self, clf: PromptedClassifier, feats: torch.Tensor, selected: torch.Tensor, *,
             through_update: bool = False) -> torch.Tensor:
        """Tune fresh per-image copies of the initial prompt on the selected views' features;
        returns the final text features P×K×D.

        feats P×V×D, selected P×k (indices of the views the loss sees). By default the features are
        taken as constants and torch.optim.AdamW updates the prompt (no graph is returned).
        through_update=True runs the same AdamW steps functionally with create_graph, on the
        features as given, so the returned text features carry the graph
        features → tuning gradient → updated prompt (`tune_copies`).
        """
        scale = clf.model.logit_scale.detach()
        sel_feats = torch.gather(feats, 1, selected[..., None].expand(-1, -1, feats.shape[-1]))

        def loss(prompts: list[torch.Tensor]) -> torch.Tensor:
            txt = self.text_features(clf, prompts)
            return self.tta_loss(scale * sel_feats @ txt.transpose(1, 2), txt).sum()

        prompts = self.tune_copies(self.initial_prompts(clf), feats.shape[0], loss, through_update=through_update)
        if through_update:
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                return self.text_features(clf, prompts)
        with torch.no_grad():
            return self.text_features(clf, prompts)

    def run(self, clf: PromptedClassifier, images: torch.Tensor, seeds: Sequence[int], *,
            differentiable: bool = False, through_update: bool = False) -> torch.Tensor:
        """Defended class probabilities P×K for images P×3×S×S in [0,1].

        differentiable=True keeps the graph from `images` through the views, their features and
        the ensemble (for adaptive attacks). The prompt update is then computed on detached
        features (the tuned prompt enters as a constant) unless through_update=True, which
        differentiates through the update too (create_graph; `tune_copies`). The
        confident-view selection is an index set (top-k), always a constant.
        """
        through = differentiable and through_update
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        viewset = self.make_views(clf, images if differentiable else images.detach(), gens)
        P, V = viewset.views.shape[:2]
        with torch.set_grad_enabled(differentiable):
            feats = clf.encode_image(viewset.views.flatten(0, 1))[0].view(P, V, -1)
        scale = clf.model.logit_scale.detach()
        with torch.no_grad():
            txt0 = clf.text_features().detach()
            ent = entropy(scale * feats.detach() @ txt0.t())                  # P×V
            selected = ent.topk(min(self.params.n_selected, V), dim=1, largest=False).indices
        if self.tunes_prompt and self.params.steps > 0:
            txt = self.tune(clf, feats if through else feats.detach(), selected, through_update=through)
        else:
            txt = txt0.unsqueeze(0).expand(P, -1, -1)
        with torch.set_grad_enabled(differentiable):
            logits = scale * feats @ txt.transpose(1, 2)
            return self.predict(logits, feats, selected, viewset, txt, scale)


PROCEDURES: Registry[type[TTAProcedure]] = Registry("test-time procedure")
register = PROCEDURES.register
list_procedures = PROCEDURES.names
procedure_class = PROCEDURES.get


def build_procedure(name: str, params: Optional[dict] = None) -> TTAProcedure:
    from ..config import from_dict

    cls = procedure_class(name)
    return cls(from_dict(cls.Params, params or {}, f"method.params ({cls.name})"))
