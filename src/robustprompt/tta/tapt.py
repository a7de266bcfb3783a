"""TAPT — test-time adversarial prompt tuning (Wang et al., CVPR 2025), after its released code
(xinwong/TAPT, trainers/adv_vli.py `test_time_adv_tuning`, configs/trainers/TAPTVLI/*.yaml).

Per test image, a fresh copy of the bimodal (text + vision, every prompted block) prompt is tuned
on its most confident views with TPT's marginal entropy plus an alignment of the views' per-block
token statistics to statistics precomputed on a public set (tta.token_stats, `robustprompt
tta-stats`), on clean and on adversarial images:

    L = H(mean_s softmax(z_s)) + (w / depth) · Σ_{b ∈ B} [ γ · A_b(adv) + (1 − γ) · A_b(clean) ]
    A_b(ref) = ½ · mean_{n,c} |μ_b − μ̂_b^ref| + ½ · mean_{n,c} |σ²_b − σ̂²_b^ref|

* s runs over the k = ⌊0.1·V⌋ lowest-entropy views (selected once, under the initial prompt;
  the same views feed both terms: TAPT_THRESHOLD = ALIGN_THRESHOLD = 0.1);
* μ_b, σ²_b (N×C): mean and population variance OVER THOSE k VIEWS of each token and channel of
  the input of block b (all tokens: CLS, patches and the vision prompt tokens), as μ̂, σ̂² are
  over the public set's images;
* B = blocks 0 … depth−2 (the released loop `range(ALIGN_LAYER_FROM, ALIGN_LAYER_TO − 1)` with
  0 and 9: it stops one block short of the 9 prompted ones) — `align_layers: all` takes every
  prompted block 0 … depth−1; w / depth = DISTR_LOSS_W / (TO − FROM) = 100 / 9 either way;
* γ = 0.5 (TAPT.GAMMA), ℓ1 (AT.ALIGN_TYPE "l1"; `align_norm: l2` is the code's mean squared
  error option);
* one AdamW step (lr 5e-4, torch's default weight decay 0.01), 64 views = the image + 63 random
  resized crops with flips (the released loader's augmix with an empty op list: no AugMix), and
  the prediction is the tuned model's on the test image itself. The released code runs under
  fp16 autocast; here fp32.

Every image has its own prompt copy (text P×n_ctx×d per block, vision P×n_ctx×d per block; Adam is
element-wise and each loss sees only its own copy, so images do not interact) made fresh from the
classifier's prompt for every batch. Because the vision prompt changes the image features, every
tuning step runs the image tower on the selected views of all images in one batched pass, each
image's views with its own vision prompt (PromptedCLIP.encode_image's per-image
`vision_prompts`), traced at the aligned blocks.

The initial prompt. TAPT's numbers start from an IVLP prompt adversarially trained on ImageNet
(16 shots; the released scripts' --model-dir), and its statistics were computed with that same
prompt: pass such a training run with --run, to both `robustprompt tta-stats` and `robustprompt
tta`. Without --run the prompt is TAPT_PROMPT untrained ("a photo" as the text context, vision
tokens a random N(0, 0.02²) draw). Since the statistics of the prompt tokens are the prompt
itself, the statistics file stores the prompt it was computed with and TAPT starts from that one
when the model's differs (``prompt_from_stats``, default true, with a warning naming both
hashes — a random untrained draw is never the same in two processes); false refuses instead.
Trained prompts (a model loaded from a run or prompt file) are never replaced: statistics of
another prompt are refused.

Couplings: any prompt with vision prompts; the tuned copies are the resolved per-block tensors
(for a coupled prompt the copies are tuned as independent tensors, the coupling is not kept);
without text prompts (coupling "vision", TAPT's V variant) the class text features are fixed.

Adaptive attacks: ``run(..., differentiable=True)`` keeps the graph images → views → tuned
model's features of the test image → prediction. By default (``through_update=False``) the tuned
prompts enter as constants (tuned on detached views). ``through_update=True`` (the adaptive
attack's default) differentiates through the prompt update as well: the tuning loss is computed
on the non-detached selected views and AdamW runs functionally with create_graph (the same update
as TTAProcedure.tune_copies), so the gradient also follows image → views → tuning
gradient (both towers' prompts) → tuned prompts → prediction. That path runs the image tower's
double backward on the k selected views (about 3× the cost of a plain step). The view selection
(top-k) is an index set, constant in both cases.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from ..errors import ConfigError, ModelError
from ..models import PromptConfig, PromptedClassifier
from .base import TTAParams, TTAProcedure, entropy, marginal_entropy, register
from .token_stats import TokenStats, block_inputs, check_stats_for, load_token_stats, prompt_hash

log = logging.getLogger(__name__)

# TAPT's released VLI prompt: 2 text + 2 vision tokens in 9 blocks, text from "a photo of a"
# ("<c1> <c2> of a {class}.", MaPLe's layout).
TAPT_PROMPT = PromptConfig(coupling="independent", n_ctx=2, depth=9, text_init="a photo of a",
                           text_init_mode="phrase")

ALIGN_LAYERS = ("code", "all")
ALIGN_NORMS = ("l1", "l2")


@dataclass
class TAPTParams(TTAParams):
    stats: str = ""               # the token-statistics file (robustprompt tta-stats)
    stats_sha256: Optional[str] = None   # filled in from the file (recorded); if given, checked
    align_weight: float = 100.0   # DISTR_LOSS_W, divided by the prompt depth
    adv_weight: float = 0.5       # γ (TAPT.GAMMA): weight of the adversarial statistics, 1 − γ clean
    align_layers: str = "code"    # code: blocks 0 … depth−2 (released loop); all: 0 … depth−1
    align_norm: str = "l1"        # l1 (AT.ALIGN_TYPE of the released configs) | l2 (mean squared error)
    steps: int = 1
    lr: float = 5e-4
    augmix: bool = False          # crops + flips (the released loader's empty AugMix op list)
    prompt_from_stats: bool = True   # start from the prompt the statistics were computed with

    def __post_init__(self) -> None:
        super().__post_init__()
        if not math.isfinite(self.align_weight) or self.align_weight < 0:
            raise ConfigError(f"tapt align_weight must be a finite number >= 0, got {self.align_weight}")
        if not 0 <= self.adv_weight <= 1:
            raise ConfigError(f"tapt adv_weight (γ) must be in [0, 1], got {self.adv_weight}")
        if self.align_layers not in ALIGN_LAYERS:
            raise ConfigError(f"tapt align_layers must be one of {', '.join(ALIGN_LAYERS)}, got {self.align_layers!r}")
        if self.align_norm not in ALIGN_NORMS:
            raise ConfigError(f"tapt align_norm must be one of {', '.join(ALIGN_NORMS)}, got {self.align_norm!r}")
        if not isinstance(self.stats, str):
            raise ConfigError(f"tapt stats must be a file path, got {self.stats!r}")


# ---------------------------------------------------------------------------- the loss
def view_moments(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens P×k×N×C (k views) → per-image mean and population variance over the views, P×N×C."""
    mean = tokens.mean(dim=1)
    return mean, (tokens - mean.unsqueeze(1)).pow(2).mean(dim=1)


def alignment_loss(means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor],
                   ref_mean: torch.Tensor, ref_var: torch.Tensor, blocks: Sequence[int],
                   norm: str = "l1") -> torch.Tensor:
    """Σ_i ½·mean|μ_i − μ̂_{b_i}| + ½·mean|σ²_i − σ̂²_{b_i}| (l1; l2: squared differences), the mean
    over tokens and channels, per image. means/variances: per aligned block, P×N×C; ref_*: per
    block of the tower, L×N×C; blocks: the tower block of each entry. Returns P."""
    diff = (lambda a, b: (a - b).abs()) if norm == "l1" else (lambda a, b: (a - b).pow(2))
    total = means[0].new_zeros(means[0].shape[0]) if means else ref_mean.new_zeros(())
    for mu, var, b in zip(means, variances, blocks):
        total = total + 0.5 * diff(mu, ref_mean[b]).flatten(1).mean(1) + 0.5 * diff(var, ref_var[b]).flatten(1).mean(1)
    return total


def tapt_alignment(means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor], stats: TokenStats,
                   blocks: Sequence[int], adv_weight: float, norm: str = "l1") -> torch.Tensor:
    """γ·A(adversarial statistics) + (1 − γ)·A(clean statistics), per image (P)."""
    adv = alignment_loss(means, variances, stats.adv_mean, stats.adv_var, blocks, norm)
    clean = alignment_loss(means, variances, stats.clean_mean, stats.clean_var, blocks, norm)
    return adv_weight * adv + (1 - adv_weight) * clean


# ---------------------------------------------------------------------------- the procedure
@register
class TAPT(TTAProcedure):
    name = "tapt"
    title = "TAPT"
    summary = ("bimodal prompts tuned per image with the views' entropy plus an alignment of their per-block "
               "token statistics to clean and adversarial statistics of a public set")
    Params = TAPTParams
    default_prompt: ClassVar[Optional[PromptConfig]] = TAPT_PROMPT

    def __init__(self, params: TAPTParams) -> None:
        super().__init__(params)
        if not params.stats:
            raise ConfigError("tapt needs its token statistics: --param stats=FILE (make FILE with "
                              "`robustprompt tta-stats --model ... --dataset ... --out FILE`)")
        self.stats = load_token_stats(params.stats)
        if params.stats_sha256 not in (None, self.stats.sha256):
            raise ConfigError(f"tapt stats {params.stats[:200]} has SHA-256 {self.stats.sha256}, "
                              f"not the stats_sha256 {params.stats_sha256} given")
        params.stats_sha256 = self.stats.sha256   # recorded with the run's method params
        self._checked: "weakref.WeakSet[PromptedClassifier]" = weakref.WeakSet()   # models already checked
        self._on: dict[tuple, TokenStats] = {}

    # ------------------------------------------------------------ set-up
    def _check(self, clf: PromptedClassifier) -> None:
        if clf in self._checked:
            return
        cfg = clf.prompt_cfg
        if clf.model.prompt is None or not cfg.has_vision:
            raise ConfigError(f"tapt tunes text and vision prompts, but this model's prompt (coupling "
                              f"{cfg.coupling!r}) has no vision prompt: use a vision-language prompt "
                              "(e.g. --coupling independent) or a --run trained with one")
        check_stats_for(self.stats, clf, self.params.stats)
        self._use_stats_prompt(clf)
        n_tokens = 1 + clf.model.clip.visual.grid_size[0] * clf.model.clip.visual.grid_size[1] + cfg.n_ctx
        if self.stats.n_tokens != n_tokens:
            raise ConfigError(f"tapt stats {self.params.stats[:200]} have {self.stats.n_tokens} tokens per block, "
                              f"this model's image tower has {n_tokens} (n_ctx {cfg.n_ctx}); recompute them "
                              "with this prompt")
        self._checked.add(clf)

    def _use_stats_prompt(self, clf: PromptedClassifier) -> None:
        """The statistics belong to the prompt they were computed with (its tokens' statistics are
        the prompt itself). A model with another untrained prompt gets that one loaded
        (prompt_from_stats, a warning naming both hashes) or is refused; trained prompts (a model
        loaded from a run or prompt file) are always refused."""
        recorded, own = self.stats.meta.get("prompt_sha256"), prompt_hash(clf)
        if recorded == own:
            return
        where = self.params.stats[:200]
        if clf.prompt_origin is not None:   # trained prompts (--run) are the point: never replaced
            raise ConfigError(f"tapt stats {where} were computed with prompt {recorded}, not with the trained "
                              f"prompts of {clf.prompt_origin[:200]} ({own}); compute them for those: "
                              "robustprompt tta-stats --run RUN")
        if not (self.params.prompt_from_stats and self.stats.prompt_state):
            raise ConfigError(f"tapt stats {where} were computed with prompt {recorded}, this model's is {own}; "
                              "compute them with this prompt, or set prompt_from_stats=true")
        try:
            clf.load_prompt_state_dict({k: v.to(clf.mean.device) for k, v in self.stats.prompt_state.items()})
        except ModelError as exc:
            raise ConfigError(f"tapt stats {where} hold a prompt of another layout: {exc}") from exc
        log.warning("tapt: starting from the prompt the statistics %s were computed with (SHA-256 %s), not the "
                    "model's (%s)", where, recorded, own)

    def initial_prompts(self, clf: PromptedClassifier) -> list[torch.Tensor]:
        """The classifier's text prompts (per block, n_ctx×d; [] without text prompts), after
        checking that it has vision prompts and that the statistics fit it."""
        self._check(clf)
        text = clf.model.prompt.text_prompts()
        return [t.detach() for t in text] if text else []

    def initial_vision_prompts(self, clf: PromptedClassifier) -> list[torch.Tensor]:
        return [t.detach() for t in clf.model.prompt.vision_prompts()]

    def aligned_blocks(self, clf: PromptedClassifier) -> list[int]:
        depth = clf.prompt_cfg.depth
        return list(range(depth - 1 if self.params.align_layers == "code" else depth))

    def _stats_on(self, like: torch.Tensor) -> TokenStats:
        key = (like.device, like.dtype)
        if key not in self._on:
            s = self.stats
            to = lambda t: t.to(device=like.device, dtype=like.dtype)   # noqa: E731
            self._on[key] = TokenStats(to(s.clean_mean), to(s.clean_var), to(s.adv_mean), to(s.adv_var),
                                       s.meta, s.sha256)
        return self._on[key]

    # ------------------------------------------------------------ one evaluation of the objective
    def _text(self, clf: PromptedClassifier, text: list[torch.Tensor], P: int) -> torch.Tensor:
        """Per-image text prompts → P×K×D (fixed class features when there are none)."""
        if text:
            return self.text_features(clf, text)
        return clf.text_features().unsqueeze(0).expand(P, -1, -1)

    def objective(self, clf: PromptedClassifier, sel_views: torch.Tensor, text: list[torch.Tensor],
                  vision: list[torch.Tensor]) -> torch.Tensor:
        """Per-image TAPT loss (P) of the selected views P×k×3×S×S under per-image prompts
        (text and vision: per block, P×n_ctx×d)."""
        P, k = sel_views.shape[:2]
        blocks = self.aligned_blocks(clf)
        feats, tokens = block_inputs(clf, sel_views.flatten(0, 1), blocks,
                                     vision_prompts=[v.repeat_interleave(k, dim=0) for v in vision])
        txt = self._text(clf, text, P)
        logits = clf.model.logit_scale.detach() * feats.view(P, k, -1) @ txt.transpose(1, 2)
        loss = marginal_entropy(logits)
        if self.params.align_weight == 0 or not blocks:
            return loss
        moments = [view_moments(t.view(P, k, *t.shape[1:])) for t in tokens]
        align = tapt_alignment([m for m, _ in moments], [v for _, v in moments], self._stats_on(feats),
                               blocks, self.params.adv_weight, self.params.align_norm)
        return loss + self.params.align_weight / clf.prompt_cfg.depth * align

    # ------------------------------------------------------------ tuning
    def tune_prompts(self, clf: PromptedClassifier, sel_views: torch.Tensor, *, through_update: bool = False
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Fresh per-image copies of the text and vision prompts, tuned on sel_views P×k×3×S×S;
        returns (text, vision), each per block P×n_ctx×d. torch.optim.AdamW on detached views, or,
        with through_update, the same AdamW run functionally with create_graph (`tune_copies`)."""
        text, vision = self.initial_prompts(clf), self.initial_vision_prompts(clf)
        n = len(text)
        views = sel_views if through_update else sel_views.detach()
        tuned = self.tune_copies(text + vision, sel_views.shape[0],
                                 lambda q: self.objective(clf, views, q[:n], q[n:]).sum(), through_update=through_update)
        return tuned[:n], tuned[n:]

    # ------------------------------------------------------------ the procedure
    def run(self, clf: PromptedClassifier, images: torch.Tensor, seeds: Sequence[int], *,
            differentiable: bool = False, through_update: bool = False) -> torch.Tensor:
        """Defended class probabilities P×K for images P×3×S×S in [0,1] (see the module docstring
        for what differentiable / through_update keep in the graph)."""
        self._check(clf)
        through = differentiable and through_update
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        views = self.make_views(clf, images if differentiable else images.detach(), gens).views
        P, V = views.shape[:2]
        scale = clf.model.logit_scale.detach()
        with torch.no_grad():   # the confident views, under the initial prompt
            feats0 = clf.encode_image(views.flatten(0, 1))[0].view(P, V, -1)
            ent = entropy(scale * feats0 @ clf.text_features().t())
            selected = ent.topk(min(self.params.n_selected, V), dim=1, largest=False).indices    # P×k
        if self.params.steps > 0:
            sel_views = views[torch.arange(P, device=views.device)[:, None], selected]        # P×k×3×S×S
            text, vision = self.tune_prompts(clf, sel_views if through else sel_views.detach(), through_update=through)
        else:
            text = [t.unsqueeze(0).expand(P, -1, -1) for t in self.initial_prompts(clf)]
            vision = [t.unsqueeze(0).expand(P, -1, -1) for t in self.initial_vision_prompts(clf)]
        with torch.set_grad_enabled(differentiable):
            feats = clf.encode_image(views[:, 0], vision_prompts=vision)[0]                     # the test image
            with torch.set_grad_enabled(through):
                txt = self._text(clf, text, P)
            logits = scale * feats.unsqueeze(1) @ txt.transpose(1, 2)
            return logits[:, 0].softmax(-1)
