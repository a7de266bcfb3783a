"""Recording the inside of transformer blocks during the ordinary forward pass.

A traced block runs the same computation as open_clip's `ResidualAttentionBlock`, written out
so that q, k, v, the attention output and (optionally) the attention probabilities stay in the
autograd graph of the forward that produced the logits — no second pass is needed to explain or
regularise a prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from ..errors import ModelError


@dataclass(frozen=True)
class TraceSpec:
    """What to record. blocks: "all" or block indices (negative counts from the end).
    attn: also record the softmax attention probabilities (costs an explicit N×N matrix)."""

    blocks: Union[str, Sequence[int]] = (-1,)
    attn: bool = False

    def resolve(self, n_layers: int) -> set[int]:
        if self.blocks == "all":
            return set(range(n_layers))
        out = set()
        for b in self.blocks:
            idx = b + n_layers if b < 0 else b
            if not 0 <= idx < n_layers:
                raise ModelError(f"trace block {b} is out of range for a {n_layers}-block tower")
            out.add(idx)
        return out


@dataclass
class BlockTrace:
    """One block's internals. Shapes: tokens B×N×C; heads concatenated along C (head h owns
    channels h·d … (h+1)·d − 1); attn B×H×N×N (rows = queries)."""

    x_in: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_out: torch.Tensor          # softmax(q kᵀ/√d) v per head, before out_proj and residual
    x_out: torch.Tensor
    num_heads: int
    attn: Optional[torch.Tensor] = None


@dataclass
class TowerTrace:
    """Traced blocks of one tower, keyed by (non-negative) block index."""

    blocks: dict[int, BlockTrace] = field(default_factory=dict)
    n_layers: int = 0

    def __getitem__(self, b: int) -> BlockTrace:
        idx = b + self.n_layers if b < 0 else b
        if idx not in self.blocks:
            raise KeyError(f"block {b} was not traced (traced: {sorted(self.blocks)})")
        return self.blocks[idx]

    @property
    def last(self) -> BlockTrace:
        return self[-1]


def check_traceable(block: nn.Module) -> None:
    if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention) \
            or hasattr(block, "ln_1_kv") or not block.attn._qkv_same_embed_dim:
        raise ModelError(f"tracing needs open_clip's standard ResidualAttentionBlock, got {type(block).__name__}")


def traced_block_forward(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    record_attn: bool = False,
) -> tuple[torch.Tensor, BlockTrace]:
    """x: B×N×C → (B×N×C, BlockTrace); same result as `block(x, attn_mask=attn_mask)`."""
    mha = block.attn
    B, N, C = x.shape
    H = mha.num_heads
    d = C // H
    h = block.ln_1(x)
    q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    qh, kh, vh = (t.reshape(B, N, H, d).transpose(1, 2) for t in (q, k, v))
    mask = attn_mask.to(x.dtype) if attn_mask is not None else None
    probs = None
    if record_attn:
        scores = (qh @ kh.transpose(-2, -1)) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        oh = probs @ vh
    else:
        oh = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    attn_out = oh.transpose(1, 2).reshape(B, N, C)
    y = x + block.ls_1(mha.out_proj(attn_out))
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return y, BlockTrace(x_in=x, q=q, k=k, v=v, attn_out=attn_out, x_out=y, num_heads=H, attn=probs)


def block_tail(block: ResidualAttentionBlock, x_in: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of a block given its input and attention output (any leading shape, last dim C):
    residual + out_proj, then the MLP branch. Token-wise, so it can run on a single token."""
    y = x_in + block.ls_1(block.attn.out_proj(attn_out))
    return y + block.ls_2(block.mlp(block.ln_2(y)))
