"""CLIP with deep prompts in both towers, built on a frozen open_clip model.

The forward walks open_clip's own modules (patch embedding, blocks, norms, projections) and only
inserts prompt tokens between blocks, so with no prompts it is open_clip's `encode_image` /
`encode_text`. Blocks named in a `TraceSpec` run through `traced_block_forward`, which records
q, k, v, attention output and attention maps in the same pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

from ..errors import ModelError
from .prompts import PromptConfig, PromptLearner
from .trace import TowerTrace, TraceSpec, check_traceable, traced_block_forward


def _per_sequence(ctx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """n_ctx×d → n×n_ctx×d (shared); n×n_ctx×d passes through."""
    ctx = ctx.to(dtype)
    return ctx if ctx.dim() == 3 else ctx.expand(n, -1, -1)


@dataclass
class VisionTrace(TowerTrace):
    """Vision tower trace. Token layout per block: [CLS, patches (grid row-major), prompts]."""

    n_patches: int = 0
    n_prompts: int = 0
    grid: tuple[int, int] = (0, 0)

    @property
    def patch_slice(self) -> slice:
        return slice(1, 1 + self.n_patches)


@dataclass
class TextTrace(TowerTrace):
    """Text tower trace. eot: B index of the pooled (end-of-text) token per sequence."""

    eot: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP plus a `PromptLearner`.

    encode_image: normalised images B×3×H×W → features B×D (not L2-normalised).
    encode_text: token ids S×L (prompt placeholders at positions 1…n_ctx) → features S×D.
    """

    def __init__(self, clip: nn.Module, tokenizer: Optional[Callable[..., torch.Tensor]] = None,
                 prompt: PromptConfig = PromptConfig(), template: Optional[str] = None) -> None:
        """template: the dataset's main template, the init phrase of text_init_mode 'template'."""
        super().__init__()
        if not isinstance(clip, (CLIP, CustomTextCLIP)):
            raise ModelError(f"unsupported model class {type(clip).__name__}: expected an open_clip CLIP")
        self.clip = clip
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.prompt_cfg = prompt
        text = clip.text if isinstance(clip, CustomTextCLIP) else clip
        if isinstance(clip, CustomTextCLIP) and (not isinstance(clip.text, TextTransformer)
                                                 or clip.text.cls_emb is not None
                                                 or getattr(clip.text, "use_pad_mask", False)):
            self._text_mod = None  # only open_clip's own encode_text is available
        else:
            self._text_mod = text
        self.vision_is_vit = isinstance(clip.visual, VisionTransformer) and clip.visual.attn_pool is None
        if prompt.has_vision and not self.vision_is_vit:
            raise ModelError("vision prompts need a ViT image tower without attentional pooling, "
                             f"got {type(clip.visual).__name__}")
        if prompt.has_text and self._text_mod is None:
            raise ModelError("text prompts need open_clip's standard text transformer")
        d_text = self._text_mod.transformer.width if self._text_mod is not None else 0
        vt = clip.visual.transformer if self.vision_is_vit else None
        d_vision = vt.width if vt is not None else 0
        self.text_layers = len(self._text_mod.transformer.resblocks) if self._text_mod is not None else 0
        self.vision_layers = len(vt.resblocks) if vt is not None else 0

        self.tokenizer = tokenizer
        self.prompt = PromptLearner(prompt, d_text, d_vision, self.text_layers, self.vision_layers,
                                    embed_phrase=self._embed_phrase if tokenizer is not None else None,
                                    template=template) if prompt.coupling != "none" else None

    @torch.no_grad()
    def _embed_phrase(self, phrase: str) -> torch.Tensor:
        """Token embeddings of a phrase without start/end tokens: n_tokens × d_text."""
        ids = self.tokenizer([phrase])[0]
        eot = int(self.pool_index(ids[None])[0])
        return self._text_mod.token_embedding(ids[1:eot].to(self._text_mod.token_embedding.weight.device))

    # The backbone stays in eval mode whatever the caller does: prompts train, CLIP does not.
    def train(self, mode: bool = True) -> "PromptedCLIP":
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    @property
    def logit_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.clip, "logit_bias", None)

    @property
    def image_grid(self) -> tuple[int, int]:
        return tuple(self.clip.visual.grid_size) if self.vision_is_vit else (0, 0)

    def prompt_parameters(self) -> list[nn.Parameter]:
        return list(self.prompt.parameters()) if self.prompt is not None else []

    def text_side_parameters(self) -> list[nn.Parameter]:
        return self.prompt.text_side_parameters() if self.prompt is not None else []

    # ------------------------------------------------------------------ vision
    def encode_image(self, images: torch.Tensor, trace: Optional[TraceSpec] = None,
                     vision_prompts: Optional[list[torch.Tensor]] = None
                     ) -> tuple[torch.Tensor, Optional[VisionTrace]]:
        """vision_prompts overrides the learned vision context: per block, n_ctx×d (shared) or
        B×n_ctx×d (one context per image — e.g. a prompt tuned per test image)."""
        if not self.vision_is_vit:
            if trace is not None or vision_prompts is not None:
                raise ModelError("tracing and vision prompts need a ViT image tower")
            return self.clip.visual(images), None
        v = self.clip.visual
        if vision_prompts is not None:
            prompts = vision_prompts
        else:
            prompts = self.prompt.vision_prompts() if self.prompt is not None else None
        x = v.conv1(images)
        B = x.shape[0]
        x = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)
        n_patches = x.shape[1]
        x = torch.cat([v.class_embedding.view(1, 1, -1).expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        n_prompts = 0
        if prompts:
            n_prompts = prompts[0].shape[-2]
            x = torch.cat([x, _per_sequence(prompts[0], B, x.dtype)], dim=1)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        traced = trace.resolve(len(blocks)) if trace is not None else set()
        rec = VisionTrace(n_layers=len(blocks), n_patches=n_patches, n_prompts=n_prompts,
                          grid=tuple(v.grid_size)) if trace is not None else None
        for b, blk in enumerate(blocks):
            if prompts and 1 <= b < len(prompts):
                x = torch.cat([x[:, :-n_prompts], _per_sequence(prompts[b], B, x.dtype)], dim=1)
            if b in traced:
                check_traceable(blk)
                x, bt = traced_block_forward(blk, x, None, record_attn=trace.attn)
                rec.blocks[b] = bt
            else:
                x = blk(x)
        pooled = self._vision_pool(x, n_patches)
        return pooled, rec

    def _vision_pool(self, x: torch.Tensor, n_patches: int) -> torch.Tensor:
        v = self.clip.visual

        def pool(t: torch.Tensor) -> torch.Tensor:
            if v.pool_type == "tok":
                return t[:, 0]
            if v.pool_type == "avg":
                return t[:, 1:1 + n_patches].mean(dim=1)  # prompt tokens are not image content
            raise ModelError(f"vision pool_type {v.pool_type!r} is not supported")

        if v.final_ln_after_pool:
            pooled = v.ln_post(pool(x))
        else:
            pooled = pool(v.ln_post(x))
        return pooled @ v.proj if v.proj is not None else pooled

    # ------------------------------------------------------------------ text
    def encode_text(self, tokens: torch.Tensor, trace: Optional[TraceSpec] = None,
                    text_prompts: Optional[list[torch.Tensor]] = None) -> tuple[torch.Tensor, Optional[TextTrace]]:
        """text_prompts overrides the learned text context: per block, n_ctx×d (shared) or
        S×n_ctx×d (one context per sequence — e.g. a prompt tuned per test image)."""
        if self._text_mod is None:
            if trace is not None or text_prompts is not None:
                raise ModelError("tracing and prompt overrides need open_clip's standard text transformer")
            return self.clip.encode_text(tokens), None
        t = self._text_mod
        if text_prompts is not None:
            prompts = text_prompts
        else:
            prompts = self.prompt.text_prompts() if self.prompt is not None else None
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast_dtype)
        S = x.shape[0]
        n_ctx = 0
        if prompts:
            n_ctx = prompts[0].shape[-2]
            x = torch.cat([x[:, :1], _per_sequence(prompts[0], S, cast_dtype), x[:, 1 + n_ctx:]], dim=1)
        x = x + t.positional_embedding.to(cast_dtype)
        mask = t.attn_mask
        blocks = t.transformer.resblocks
        traced = trace.resolve(len(blocks)) if trace is not None else set()
        rec = TextTrace(n_layers=len(blocks)) if trace is not None else None
        for b, blk in enumerate(blocks):
            if prompts and 1 <= b < len(prompts):
                x = torch.cat([x[:, :1], _per_sequence(prompts[b], S, cast_dtype), x[:, 1 + n_ctx:]], dim=1)
            if b in traced:
                check_traceable(blk)
                x, bt = traced_block_forward(blk, x, mask, record_attn=trace.attn)
                rec.blocks[b] = bt
            else:
                x = blk(x, attn_mask=mask)
        eot = self.pool_index(tokens)
        if rec is not None:
            rec.eot, rec.tokens = eot, tokens
        return self.text_head(x[torch.arange(S, device=x.device), eot]), rec

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token of each sequence (S,)."""
        t = self._text_mod
        if isinstance(t, CLIP):
            pool_type, eos_id = t.text_pool_type, getattr(t, "text_eos_id", None)
        else:
            pool_type, eos_id = t.pool_type, getattr(t, "eos_id", None)
        if pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if pool_type == "eos":
            return (tokens == eos_id).int().argmax(dim=-1)
        if pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        if pool_type == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        raise ModelError(f"text pool_type {pool_type!r} is not supported")

    def text_head(self, pooled_tokens: torch.Tensor) -> torch.Tensor:
        """ln_final + projection of pooled last-block tokens (…×C → …×D). ln_final is token-wise,
        so applying it after pooling equals open_clip's order."""
        t = self._text_mod
        x = t.ln_final(pooled_tokens)
        proj = t.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    @property
    def text_blocks(self) -> nn.ModuleList:
        return self._text_mod.transformer.resblocks

    @property
    def vision_blocks(self) -> nn.ModuleList:
        return self.clip.visual.transformer.resblocks

