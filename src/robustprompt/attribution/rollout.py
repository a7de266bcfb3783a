"""Attention rollouts of the image tower: A-TPT's token-gradient reinforced rollout and the
original gradient attention rollout (GAR), for a whole batch of images in one forward + backward.

Token-gradient rollout (Hai et al., ICML 2026), for block b with input tokens T^(b) (B×N×C) and
attention A^(b) (B×H×N×N), S the logit of the top-1 class:
    W^(b) = ℓ1-normalise( ReLU( ⟨T^(b), ∂S/∂T^(b)⟩ over channels ) )          one weight per token
    Â^(b) = rownorm( I + mean_h( A^(b) · diag(W^(b)) ) )                      columns = source tokens
    Â     = Â^(L) · (Â^(L−1) + Â^(L)) / 2                                     last two blocks only
The equal average is the paper's (rollout_weights="paper", the default). The released code
(SEU-VIPGroup/A-TPT, get_gradrollout_last2avg_attn_up) weights the two blocks 0.5 and 1.0 before
dividing by their sum, i.e. Â = Â^(L) · (Â^(L−1)/3 + 2·Â^(L)/3) (rollout_weights="code"); the
rows stay stochastic either way.
GAR: Â^(b) = rownorm( I + mean_h( ReLU(∂S/∂A^(b) ⊙ A^(b)) ) ), rolled out over every block.
The map is the CLS row over the patch tokens, clipped at its 0.99 quantile and min-max normalised.
Choice made here: T^(b) is the block's *input* — the tokens its attention mixes.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..models import PromptedClassifier, TraceSpec

RolloutMode = Literal["token_grad", "gar"]
RolloutWeights = Literal["paper", "code"]
ROLLOUT_WEIGHTS = ("paper", "code")


def _rownorm(a: torch.Tensor) -> torch.Tensor:
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _identity_plus(mixing: torch.Tensor) -> torch.Tensor:
    n = mixing.shape[-1]
    return _rownorm(torch.eye(n, dtype=mixing.dtype, device=mixing.device) + mixing)


def normalise_maps(maps: torch.Tensor, quantile: float = 0.99) -> torch.Tensor:
    """Per map (B×…): clip at the `quantile`, then min-max to [0, 1]."""
    flat = maps.flatten(1)
    hi = torch.quantile(flat, quantile, dim=1, keepdim=True)
    flat = torch.minimum(flat, hi)
    lo = flat.min(dim=1, keepdim=True).values
    flat = (flat - lo) / (flat.max(dim=1, keepdim=True).values - lo).clamp_min(1e-12)
    return flat.view_as(maps)


def rollout(clf: PromptedClassifier, images: torch.Tensor, *, mode: RolloutMode = "token_grad",
            last_blocks: int = 2, stabilize: bool = True, rollout_weights: RolloutWeights = "paper",
            target: Optional[torch.Tensor] = None, text_features: Optional[torch.Tensor] = None,
            normalise: bool = True) -> torch.Tensor:
    """Rollout maps over the patch grid, B×gh×gw, for images B×3×S×S in [0,1].

    One batched forward (tracing the needed blocks) and one backward give the maps of every image.
    target: class per image (default: the top-1 prediction). text_features: class text features to
    score against (default: the classifier's current ones, held fixed). rollout_weights (token_grad
    with stabilize): how the last blocks are averaged — "paper" equally, "code" 1/3 and 2/3 as the
    released code (needs last_blocks = 2).
    """
    if rollout_weights not in ROLLOUT_WEIGHTS:
        raise ValueError(f"rollout_weights must be one of {ROLLOUT_WEIGHTS}, got {rollout_weights!r}")
    if rollout_weights == "code" and mode == "token_grad" and stabilize and last_blocks != 2:
        raise ValueError(f"rollout_weights='code' (1/3, 2/3) is defined for last_blocks=2, got {last_blocks}")
    n_layers = clf.model.vision_layers
    if mode == "token_grad":
        blocks = tuple(range(n_layers - last_blocks, n_layers))
    elif mode == "gar":
        blocks = tuple(range(n_layers))
    else:
        raise ValueError(f"unknown rollout mode {mode!r}")
    with torch.enable_grad(), clf.static_text(text_features):
        # the input requires grad so the frozen tower builds a graph down to the traced blocks
        out = clf.features(images.detach().requires_grad_(True), vision_trace=TraceSpec(blocks=blocks, attn=True))
        cls = out.logits.argmax(1) if target is None else target
        score = out.logits.gather(1, cls[:, None]).sum()
        traces = [out.vision[b] for b in blocks]
        wrt = [t.x_in for t in traces] if mode == "token_grad" else [t.attn for t in traces]
        grads = torch.autograd.grad(score, wrt)
    with torch.no_grad():
        mats = []
        for t, g in zip(traces, grads):
            if mode == "token_grad":
                w = F.relu((t.x_in * g).sum(-1))                       # B×N
                w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
                mats.append(_identity_plus((t.attn * w[:, None, None, :]).mean(1)))
            else:
                mats.append(_identity_plus(F.relu(g * t.attn).mean(1)))
        if mode == "token_grad" and stabilize and len(mats) > 1:
            roll = mats[-1] @ _block_average(mats, rollout_weights)   # averaging damps single-block noise
        else:
            roll = _chain(mats)
        sl = out.vision.patch_slice
        maps = roll[:, 0, sl].reshape(-1, *out.vision.grid)
        return normalise_maps(maps) if normalise else maps


def _block_average(mats: list[torch.Tensor], weights: RolloutWeights) -> torch.Tensor:
    """Weighted mean of row-stochastic block matrices: equal weights (paper) or, for two blocks,
    the released code's 0.5 : 1.0 (→ 1/3, 2/3), which keeps the rows stochastic."""
    if weights == "paper":
        return sum(mats) / len(mats)
    prev, last = mats
    return (0.5 * prev + 1.0 * last) / 1.5


def _chain(mats: list[torch.Tensor]) -> torch.Tensor:
    """Â^(L) ⋯ Â^(1): later blocks act on the result of earlier ones."""
    roll = mats[0]
    for m in mats[1:]:
        roll = m @ roll
    return roll


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """B×gh×gw → B×size×size (bilinear)."""
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per map: Σ|A[u+1,v] − A[u,v]| + Σ|A[u,v+1] − A[u,v]|.  B×h×w → B."""
    return (maps[:, 1:, :] - maps[:, :-1, :]).abs().flatten(1).sum(1) + \
        (maps[:, :, 1:] - maps[:, :, :-1]).abs().flatten(1).sum(1)
