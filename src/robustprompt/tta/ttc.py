"""TTC — test-time counterattacks (Xing, Zhao & Sebe, CVPR 2025, "CLIP is Strong Enough to Fight
Back"). Training-free: no prompt is tuned and no views are built.

Per image x (in [0,1]), with f the image tower's embedding (unnormalised by default) and
budget ε_ttc, step α and N steps:

* random start  δ₀: uniform in the ε_ttc-cube (ℓ∞; ℓ2: Gaussian direction, uniform radius), then
                x + δ₀ clamped into [0,1]. Seeded per image from `seeds`.
* sensitivity   τ = ‖f(x + δ₀) − f(x)‖₂ / ‖f(x)‖₂  (`sensitivity`): how far a small random noise
                moves the embedding. Adversarial images are "falsely stable" (small τ).
* counterattack N steps of PGD that *maximise* ‖f(x + δ) − f(x)‖₂² (the anchor f(x) is the
                embedding of the image as received): δ_{k+1} = Π(δ_k + α·sign(∇_δ)) (ℓ∞; ℓ2: the
                normalised gradient), Π = into the ε_ttc-ball, then x + δ into [0,1].
* τ gate        images with τ < τ_thres are counterattacked (`tau_gate`); the others get
                x + δ₀ (the released code's choice, ``ungated="noise"``) or x itself
                (``ungated="clean"``, the "left as they are" reading).
* weighting     the counterattacked image is x + Σ_k w_k δ_k over k = 0..N with
                w = softmax(β·k) (`step_weights`), so later steps weigh more (β = 2, N = 2:
                w ≈ 0.016, 0.117, 0.867). ``combine="embedding"`` instead averages the
                normalised embeddings f(x + δ_k) with the same weights (the reading in which β
                weighs the embeddings along the steps).
* prediction    the class probabilities softmax(scale · f̂·T) of the final image's normalised
                embedding f̂ against the classifier's own text features T (any prompt it carries:
                zero-shot CLIP or trained prompts from ``--run``).

Defaults (ε_ttc = 4/255, α = 1/255, N = 2, τ_thres = 0.2, β = 2, ℓ∞, unnormalised embeddings,
the perturbations weighted, ungated images get δ₀) follow the authors' released code
(Sxing2/CLIP-Test-time-Counterattacks, code/test_time_counterattack.py: the function
``tau_thres_weighted_counterattacks`` and the TTC.sh settings): in it τ is measured on the random
start δ₀ with the same model that is counterattacked (zero-shot CLIP), the loss is the squared
ℓ2 distance of the raw (unnormalised) image embeddings, the weights are softmax(β·k) over the
N + 1 perturbations δ₀..δ_N (δ₀ included), and an image with τ ≥ τ_thres is classified at x + δ₀,
not at x. With ``steps = 0`` every image gets x + δ₀ (the code's random-noise baseline) and the
gate is not used. ε and α are in the toolkit's attack units: /255 for ℓ∞ (``eps: 4`` = 4/255),
pixel units for ℓ2. When a classifier carries a vision prompt, f includes it (the code
counterattacks through the model it classifies with).

Batched: the P images are P independent problems; the loss is a sum of per-image terms, the gate,
the norms and the weights are per image, and the random start of image i depends only on
seeds[i] (`attacks.pgd.random_perturbation`, PGD's own random start), so an attacker who knows the seeds reproduces it.

Adaptive attacks (``run(..., differentiable=True)``) — what is differentiated:

* the whole map image → x_final → prediction, through every counterattack step: δ₀ and each δ_k
  are kept as functions of the image (their [0,1] box clamps depend on it), and so are the anchor
  f(x) and every embedding.
* ℓ∞ (default): the step direction sign(∇) is piecewise constant, its exact derivative is zero
  almost everywhere, so no second-order graph is built (create_graph would only add zeros); the
  attacker's gradient is the exact a.e. derivative of the TTC map — CLIP's gradient at the
  counterattacked image, scaled by the box clamps. ℓ2: the step g/‖g‖ is smooth, and ∇ is taken
  with create_graph=True, so the gradient also flows image → counterattack gradient → δ_k.
* the τ gate, a hard threshold, is held as a constant mask (``gate_grad="constant"``, default):
  its exact derivative is zero almost everywhere, and the attack's best-iterate bookkeeping sees
  the gate's forward value anyway. ``gate_grad="sigmoid"`` adds a straight-through (BPDA)
  surrogate: the forward value is unchanged (the hard gate), the backward pass uses
  sigmoid((τ_thres − τ)/T) (T = ``gate_temperature``), so an attacker is also pulled towards
  raising τ above the threshold, i.e. escaping the counterattack.
``through_update`` is ignored (TTC updates no prompt).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attacks.pgd import ascent_step, project, random_perturbation
from ..errors import ConfigError
from ..models import PromptedClassifier
from .base import TTAProcedure, register

NORMS = ("linf", "l2")
EMBEDDINGS = ("raw", "normalized")
COMBINES = ("perturbation", "embedding")
UNGATED = ("noise", "clean")
GATE_GRADS = ("constant", "sigmoid")


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"ttc {key} must be one of {', '.join(options)}, got {value!r}")


@dataclass
class TTCParams:
    """TTC's settings; defaults from the released code (see the module docstring)."""

    eps: float = 4.0                 # ε_ttc: /255 units for ℓ∞ (4 = 4/255), pixel units for ℓ2
    step_size: float = 1.0           # α, same units as eps
    steps: int = 2                   # N counterattack steps (0: random noise δ₀ only)
    tau_thres: float = 0.2           # counterattack images with τ below this
    beta: float = 2.0                # step weights softmax(β·k), k = 0..N
    norm: str = "linf"               # linf | l2
    embedding: str = "raw"           # raw (code: unnormalised f) | normalized (unit-norm f)
    combine: str = "perturbation"    # perturbation (code: x + Σ w_k δ_k) | embedding (Σ w_k f̂(x + δ_k))
    ungated: str = "noise"           # noise (code: τ ≥ τ_thres → x + δ₀) | clean (→ x)
    gate_grad: str = "constant"      # adaptive attacks: constant mask | sigmoid straight-through
    gate_temperature: float = 0.01   # T of the sigmoid surrogate
    augmix: bool = False             # TTC builds no views; kept for the engine's records

    def __post_init__(self) -> None:
        for key in ("eps", "step_size", "tau_thres", "beta", "gate_temperature"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                    or value in (float("inf"), float("-inf")):
                raise ConfigError(f"ttc {key} must be a finite number, got {value!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"ttc steps must be an integer >= 0, got {self.steps!r}")
        if self.eps < 0 or self.step_size <= 0 or self.tau_thres < 0 or self.gate_temperature <= 0:
            raise ConfigError(f"ttc needs eps >= 0, step_size > 0, tau_thres >= 0 and gate_temperature > 0 "
                              f"(got {self.eps}, {self.step_size}, {self.tau_thres}, {self.gate_temperature})")
        _choice(self.norm, NORMS, "norm")
        _choice(self.embedding, EMBEDDINGS, "embedding")
        _choice(self.combine, COMBINES, "combine")
        _choice(self.ungated, UNGATED, "ungated")
        _choice(self.gate_grad, GATE_GRADS, "gate_grad")
        if self.augmix:
            raise ConfigError("ttc builds no views, so augmix must be false")

    @property
    def eps_pixels(self) -> float:
        """ε_ttc on the [0,1] pixel scale."""
        return self.eps / 255 if self.norm == "linf" else float(self.eps)

    @property
    def step_pixels(self) -> float:
        return self.step_size / 255 if self.norm == "linf" else float(self.step_size)


# ----------------------------------------------------------------------------- the formulas


def sensitivity(noisy: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """τ = ‖f(x + δ₀) − f(x)‖₂ / ‖f(x)‖₂ per image.  noisy, anchor P×D → P."""
    return (noisy - anchor).norm(dim=-1) / anchor.norm(dim=-1)


def tau_gate(tau: torch.Tensor, tau_thres: float) -> torch.Tensor:
    """Which images are counterattacked: τ < τ_thres (strictly, as the released code's
    sign(τ_thres − τ) > 0 — an image exactly at the threshold is not).  tau P → bool P."""
    return tau < tau_thres


def step_weights(steps: int, beta: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights of the N + 1 counterattack iterates δ₀..δ_N: w_k = exp(β·k) / Σ_j exp(β·j)
    (softmax of β·k; β = 0 is the plain mean, β → ∞ the last step only).  → (N+1,)"""
    return (beta * torch.arange(steps + 1, dtype=dtype)).softmax(0)


class Counterattack(NamedTuple):
    deltas: list[torch.Tensor]       # N+1 perturbations δ₀..δ_N, each P×3×H×W
    embeddings: list[torch.Tensor]   # f(x + δ_k) for k = 0..N−1 (those the steps computed), each P×D


def counterattack(embed: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, delta0: torch.Tensor,
                  anchor: torch.Tensor, *, eps: float, alpha: float, steps: int, norm: str = "linf",
                  differentiable: bool = False, keep_embeddings: bool = True) -> Counterattack:
    """N PGD steps that maximise Σ_i ‖embed(x_i + δ_i) − anchor_i‖₂² from δ₀ (x P×3×H×W, anchor P×D;
    eps/alpha on the pixel scale). The sum separates per image, so each δ_i follows its own
    gradient. differentiable=True keeps every δ_k and embedding a function of x (and, for ℓ2, of
    the step's gradient via create_graph; ℓ∞'s sign has derivative zero, so none is built);
    keep_embeddings=False returns the embeddings detached and frees each step's image-tower graph
    (what an attacker that only differentiates the δ_k needs: ℓ∞, gate and weights constant)."""
    deltas, embeddings = [delta0], []
    create_graph = differentiable and norm == "l2"
    keep = differentiable and (keep_embeddings or create_graph)
    delta = delta0
    for _ in range(steps):
        # the attacker's backward differentiates this gradient (ℓ2): the fused attention kernels
        # have no double backward, the math one is plain ops
        with torch.enable_grad(), (sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext()):
            z = x + delta if differentiable else (x + delta).detach()
            if not z.requires_grad:
                z.requires_grad_(True)
            e = embed(z)
            loss = (e - anchor).square().sum()
            (g,) = torch.autograd.grad(loss, z, create_graph=create_graph, retain_graph=keep)
        delta = project(delta + ascent_step(g, alpha, norm), x, eps, norm)
        if not differentiable:
            delta = delta.detach()
        if not keep:
            e = e.detach()
        deltas.append(delta)
        embeddings.append(e)
    return Counterattack(deltas, embeddings)


# ----------------------------------------------------------------------------- the procedure


@register
class TTC(TTAProcedure):
    name = "ttc"
    title = "TTC"
    summary = "no prompt tuning: τ-gated counterattack pushing the image embedding away from its own, steps weighted"
    tunes_prompt = False
    Params = TTCParams
    # an attack started only from the non-adaptive example stalls on TTC (the counterattack undoes
    # that example's direction): a second, random restart (test_adaptive_attack_is_at_least_as_strong…)
    adaptive_restarts = 2
    # no views and (ℓ∞) no second-order graph: all EOT draws in one call fit
    adaptive_eot_chunk = None

    def embed(self, clf: PromptedClassifier, x: torch.Tensor) -> torch.Tensor:
        """f(x): the image tower's embedding P×D, unnormalised (``embedding="raw"``) or unit-norm."""
        if self.params.embedding == "normalized":
            return clf.encode_image(x)[0]
        return clf.model.encode_image(clf.normalize(x))[0]

    def run(self, clf: PromptedClassifier, images: torch.Tensor, seeds: Sequence[int], *,
            differentiable: bool = False, through_update: bool = False) -> torch.Tensor:
        """Defended class probabilities P×K for images P×3×S×S in [0,1] (see the module docstring
        for what differentiable=True differentiates; through_update is ignored)."""
        p = self.params
        if len(seeds) != images.shape[0]:
            raise ValueError(f"need one seed per image: {images.shape[0]} images, {len(seeds)} seeds")
        x = images if differentiable else images.detach()
        eps, alpha = p.eps_pixels, p.step_pixels
        with torch.no_grad():     # the text side is a constant here: the cached features, no graph
            txt = clf.text_features()
        embed = lambda z: self.embed(clf, z)  # noqa: E731
        with torch.set_grad_enabled(differentiable):
            delta0 = random_perturbation(x, eps, p.norm, list(seeds))
            if p.steps == 0:       # the code's random-noise baseline: x + δ₀ for every image
                return self._probs(clf, embed(x + delta0), txt)
            # the graphs of f(x) and of each step's embedding matter to an attacker only through ℓ2's
            # differentiated step, the embedding combination or the sigmoid gate; otherwise they
            # would hold N + 1 image-tower passes of activations for nothing
            keep = differentiable and (p.norm == "l2" or p.combine == "embedding" or p.gate_grad == "sigmoid")
            with torch.set_grad_enabled(keep):
                anchor = embed(x)
            ca = counterattack(embed, x, delta0, anchor, eps=eps, alpha=alpha, steps=p.steps, norm=p.norm,
                               differentiable=differentiable, keep_embeddings=keep)
            tau = sensitivity(ca.embeddings[0], anchor)
            gated = tau_gate(tau.detach(), p.tau_thres)
            w = step_weights(p.steps, p.beta, torch.float64).to(x.dtype).to(x.device)
            surrogate = None
            if differentiable and p.gate_grad == "sigmoid":
                s = torch.sigmoid((p.tau_thres - tau) / p.gate_temperature)
                surrogate = s - s.detach()          # exactly 0 forward, the sigmoid's slope backward
            if p.combine == "perturbation":
                return self._probs(clf, embed(self._final_image(x, ca.deltas, w, gated, surrogate)), txt)
            return self._probs_from_embeddings(clf, x, ca, anchor, embed, w, gated, surrogate, txt)

    def _final_image(self, x: torch.Tensor, deltas: list[torch.Tensor], w: torch.Tensor, gated: torch.Tensor,
                     surrogate) -> torch.Tensor:
        """x + Σ_k w_k δ_k where gated, else x + δ₀ (noise) or x (clean).  → P×3×H×W"""
        counter = torch.einsum("k,kpchw->pchw", w, torch.stack(deltas))
        other = deltas[0] if self.params.ungated == "noise" else torch.zeros_like(counter)
        out = torch.where(gated.view(-1, 1, 1, 1), x + counter, x + other)
        if surrogate is not None:
            out = out + surrogate.view(-1, 1, 1, 1) * (counter - other)
        return out

    def _probs_from_embeddings(self, clf, x, ca: Counterattack, anchor, embed, w, gated, surrogate, txt):
        """``combine="embedding"``: Σ_k w_k f̂(x + δ_k) where gated, else f̂(x + δ₀) or f̂(x)."""
        feats = [F.normalize(e, dim=-1) for e in ca.embeddings] + [F.normalize(embed(x + ca.deltas[-1]), dim=-1)]
        counter = torch.einsum("k,kpd->pd", w, torch.stack(feats))
        other = feats[0] if self.params.ungated == "noise" else F.normalize(anchor, dim=-1)
        out = torch.where(gated[:, None], counter, other)
        if surrogate is not None:
            out = out + surrogate[:, None] * (counter - other)
        return self._probs(clf, out, txt)

    @staticmethod
    def _probs(clf: PromptedClassifier, feats: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """softmax of the classifier's logits for image embeddings P×D (normalised here)."""
        return clf.logits_from(F.normalize(feats, dim=-1), txt).softmax(-1)
