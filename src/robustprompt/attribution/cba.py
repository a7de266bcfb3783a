"""CBA-FAPT's bidirectional attribution maps (Feng et al., AAAI 2026), vision and text.

For the last block of a tower, with per-head query/key/value of the pooled token (CLS for vision,
EOT for text) and of every other token i:

    forward weights   λ_i^h = cos(q_pool^h, k_i^h)                 (cosine, not softmax)
    backward weights  w_c   = ∂S / ∂o_pool[c]                      (o: attention output before
                                                                    out_proj and the residual)
    map               A_i   = Σ_h λ_i^h Σ_{c ∈ head h} w_c v_i[c]  (signed)

S is the matching score cos(z_v(x), z_t(t_c)) of a chosen class c. Choice made here (the paper
writes one λ_i): λ is computed per head and multiplies that head's value channels, since each
value channel belongs to exactly one head; `heads="concat"` uses one cosine over all heads instead.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..models.prompted_clip import PromptedCLIP, TextTrace, VisionTrace
from ..models.trace import BlockTrace, block_tail

HeadMode = Literal["per_head", "concat"]


def _forward_weights(q_pool: torch.Tensor, k: torch.Tensor, num_heads: int, heads: HeadMode) -> torch.Tensor:
    """q_pool B×C, k B×N×C → λ B×N×C (each channel carries its head's cosine)."""
    B, N, C = k.shape
    if heads == "concat":
        lam = F.cosine_similarity(q_pool[:, None, :], k, dim=-1)            # B×N
        return lam[..., None].expand(B, N, C)
    d = C // num_heads
    qh = q_pool.view(B, 1, num_heads, d)
    kh = k.view(B, N, num_heads, d)
    lam = F.cosine_similarity(qh, kh, dim=-1)                                # B×N×H
    return lam.repeat_interleave(d, dim=-1)                                  # B×N×C


def combine(w: torch.Tensor, lam: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A_i = Σ_c w_c λ_ic v_ic.  w B×C, lam and v B×N×C → B×N."""
    return torch.einsum("bc,bnc->bn", w, lam * v)


def matching_score(image_features: torch.Tensor, text_features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """S_b = cos(z_v(x_b), z_t(t_{c_b})) from L2-normalised features B×D and K×D → B."""
    return (image_features * text_features[classes]).sum(-1)


def vision_channel_weights(score: torch.Tensor, trace: VisionTrace, create_graph: bool = False) -> torch.Tensor:
    """w = ∂S/∂o_cls of the last vision block: B×C. `score` (B,) must come from the traced forward."""
    last = trace.last
    (g,) = torch.autograd.grad(score.sum(), last.attn_out, create_graph=create_graph, retain_graph=True)
    return g[:, 0]


def vision_attribution(score: torch.Tensor, trace: VisionTrace, *, heads: HeadMode = "per_head",
                       create_graph: bool = False) -> torch.Tensor:
    """Signed CBA visual map over the patch grid: B×gh×gw.

    score: (B,) matching scores computed from the same forward that produced `trace` (which must
    trace the last block, and carry a graph: images or vision prompts requiring grad). create_graph=True keeps the map differentiable for training; the
    extra graph spans only the last block's tail, not the network.
    """
    last: BlockTrace = trace.last
    w = vision_channel_weights(score, trace, create_graph)
    lam = _forward_weights(last.q[:, 0], last.k, last.num_heads, heads)
    sl = trace.patch_slice
    amap = combine(w, lam[:, sl], last.v[:, sl])
    return amap.view(-1, *trace.grid)


def text_attribution(model: PromptedCLIP, trace: TextTrace, image_features: torch.Tensor, classes: torch.Tensor,
                     *, heads: HeadMode = "per_head", create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed CBA textual map of class `classes[b]`'s prompt as seen from image b.

    trace: last text block over the K class prompts; image_features B×D (normalised) of the image
    whose score S_b = cos(z_v(x_b), z_t(t_{c_b})) defines the backward weights. The text side does
    not see the image, so λ and v are shared per class and an image changes the map only through
    w — the cross-modal path the paper describes. Returns (map B×L, valid B×L), valid marking
    tokens 0…EOT of each prompt (the causal mask hides later ones from the EOT token).
    """
    last = trace.last
    eot = trace.eot[classes]                                                 # B
    o = last.attn_out[classes, eot]                                          # B×C, one copy per image
    if not o.requires_grad:  # a frozen text side (no prompts to train): differentiate from here
        o = o.detach().requires_grad_(True)
    x_in = last.x_in[classes, eot]
    z = F.normalize(model.text_head(block_tail(model.text_blocks[-1], x_in, o)), dim=-1)
    score = (image_features * z).sum(-1)
    (w,) = torch.autograd.grad(score.sum(), o, create_graph=create_graph, retain_graph=True)
    q_pool = last.q[classes, eot]
    lam = _forward_weights(q_pool, last.k[classes], last.num_heads, heads)
    amap = combine(w, lam, last.v[classes])                                  # B×L
    L = amap.shape[1]
    valid = torch.arange(L, device=amap.device)[None, :] <= eot[:, None]
    return amap, valid


def text_distribution(amap: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the valid tokens of a textual map (B×L → B×L, zeros elsewhere)."""
    return amap.masked_fill(~valid, float("-inf")).softmax(dim=-1)
