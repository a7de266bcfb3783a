"""CBA-FAPT's bidirectional attribution maps (Feng et al., AAAI 2026), vision and text.

For the last block of a tower, with per-head query/key/value of the pooled token (CLS for vision,
EOT for text) and of every other token i:

    forward weights   λ_i^h = cos(q_pool^h, k_i^h)                 (cosine, not softmax)
    backward weights  w_c   = ∂S / ∂o_pool[c]                      (o: attention output before
                                                                    out_proj and the residual)
    map               A_i   = Σ_h λ_i^h Σ_{c ∈ head h} w_c v_i[c]  (signed)

S is the matching score cos(z_v(x), z_t(t_c)) of a chosen class c. The paper's Eq. 6 is one
cosine over the full (all heads concatenated) q_pool and k_i: `heads="concat"`, the default.
`heads="per_head"` computes λ per head and lets it multiply only that head's value channels.

Textual distribution (the paper's L_TAA is a KL between textual maps, which it calls "sparse and
focused"; it does not say how a signed map becomes a distribution). A plain softmax of the raw map
is at the mercy of the backbone's scale: |A_t| is ~1e-2 on CLIP-like models, so softmax(A_t) is
uniform to six digits and L_TAA ≈ 1e-7 has no gradient worth the name. Choice made here:
standardise the map over the prompt's tokens 0…EOT (subtract its mean, divide by its standard
deviation), then softmax at temperature τ = 1: the distribution then depends only on the map's
shape, not on its units, on every backbone, and keeps the signed map's ranking. `norm="none"`
restores the plain softmax of the raw values (softmax(A/τ)).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..models.prompted_clip import PromptedCLIP, TextTrace, VisionTrace
from ..models.trace import BlockTrace, block_tail

HeadMode = Literal["concat", "per_head"]
TextNorm = Literal["standardize", "none"]
TEXT_NORMS = ("standardize", "none")


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


def vision_attribution(score: torch.Tensor, trace: VisionTrace, *, heads: HeadMode = "concat",
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
                     *, heads: HeadMode = "concat", create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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


def text_logits(amap: torch.Tensor, valid: torch.Tensor, *, norm: TextNorm = "standardize",
                temperature: float = 1.0) -> torch.Tensor:
    """The logits whose softmax over the valid tokens is the textual distribution: B×L → B×L.

    norm="standardize": (A − mean) / std over each row's valid tokens, divided by τ; "none": A / τ.
    Invalid tokens get a large finite negative logit (not −inf, whose differences would turn the
    gradients of a KL into NaN), so their probability is exactly 0 in float32 and float64.
    """
    if norm not in TEXT_NORMS:
        raise ValueError(f"textual map norm must be one of {TEXT_NORMS}, got {norm!r}")
    a = amap
    if norm == "standardize":
        v = valid.to(amap.dtype)
        n = v.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (amap * v).sum(-1, keepdim=True) / n
        var = (((amap - mean) * v) ** 2).sum(-1, keepdim=True) / n
        # a constant map (std 0) becomes uniform with finite gradients instead of 0/0
        a = (amap - mean) / torch.sqrt(var + torch.finfo(amap.dtype).tiny)
    return (a / temperature).masked_fill(~valid, -1e9)


def text_distribution(amap: torch.Tensor, valid: torch.Tensor, *, norm: TextNorm = "standardize",
                      temperature: float = 1.0) -> torch.Tensor:
    """Textual map → distribution over each prompt's valid tokens (B×L, zeros elsewhere)."""
    return text_logits(amap, valid, norm=norm, temperature=temperature).softmax(-1) * valid


def normalised_entropy(dist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Entropy / log(number of valid tokens) per row, B: 1 = uniform, 0 = one token."""
    h = -(dist * dist.clamp_min(1e-30).log()).sum(-1)
    return h / valid.sum(-1).clamp_min(2).to(dist.dtype).log()
