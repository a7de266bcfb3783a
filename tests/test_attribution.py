"""CBA bidirectional maps against a direct float64 computation on a tiny model."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from robustprompt.attribution.cba import (matching_score, text_attribution, text_distribution,
                                          vision_attribution, vision_channel_weights)
from robustprompt.models import PromptConfig, PromptedClassifier, TraceSpec

LAST = TraceSpec(blocks=(-1,))


@pytest.fixture
def setup(tiny_backbone):
    torch.manual_seed(5)
    clf = PromptedClassifier(tiny_backbone, ["dog", "cat", "ankle boot"],
                             PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=2))
    for p in clf.prompt_parameters():
        p.data.normal_(0, 0.3)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 2, 1])
    return clf, x, y


# ---------------------------------------------------------------- float64 reference, written out
def _ref_heads(t, H):
    B, N, C = t.shape
    return t.view(B, N, H, C // H)


def _ref_vision(clf64, x, y, create_graph=False, heads="concat"):
    """Returns (map B×g×g, w B×C, f(o_cls) score function per image, o_cls) computed by hand.
    create_graph=True keeps the map differentiable w.r.t. the prompts (for gradient checks)."""
    m = clf64.model
    v = m.clip.visual
    prompts = m.prompt.vision_prompts()
    n = prompts[0].shape[0]
    z = v.conv1(((x.double() - clf64.mean) / clf64.std)).flatten(2).transpose(1, 2)
    B = z.shape[0]
    z = torch.cat([v.class_embedding.expand(B, 1, -1), z], 1) + v.positional_embedding
    z = v.ln_pre(torch.cat([z, prompts[0].expand(B, -1, -1)], 1))
    blocks = v.transformer.resblocks
    for b, blk in enumerate(blocks[:-1]):
        if 0 < b < len(prompts):
            z = torch.cat([z[:, :-n], prompts[b].expand(B, -1, -1)], 1)
        z = blk(z)
    blk = blocks[-1]
    W, bias = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    h = blk.ln_1(z)
    q, k, val = (h @ W.t() + bias).chunk(3, -1)
    H = blk.attn.num_heads
    d = q.shape[-1] // H
    qh, kh, vh = _ref_heads(q, H), _ref_heads(k, H), _ref_heads(val, H)
    att = torch.einsum("bhd,bnhd->bhn", qh[:, 0], kh) / math.sqrt(d)
    o_cls = torch.einsum("bhn,bnhd->bhd", att.softmax(-1), vh).reshape(B, -1)
    txt = clf64.encode_text()[0] if create_graph else clf64.text_features()

    def score_of(o):  # S as a function of the CLS attention output, one image per row
        r = z[:, 0] + blk.attn.out_proj(o)
        r = r + blk.mlp(blk.ln_2(r))
        feat = F.normalize(v.ln_post(r) @ v.proj, dim=-1)
        return (feat * txt[y]).sum(-1)

    o = o_cls if create_graph else o_cls.detach().requires_grad_(True)
    (w,) = torch.autograd.grad(score_of(o).sum(), o, create_graph=create_graph)
    patches = slice(1, 1 + 16)
    if heads == "concat":  # the paper's Eq. 6: one cosine over the full q_cls and k_i
        lam = F.cosine_similarity(q[:, :1], k[:, patches], dim=-1)[..., None].expand(-1, -1, H)
    else:
        lam = F.cosine_similarity(qh[:, :1], kh[:, patches], dim=-1)        # B×P×H
    amap = torch.einsum("bph,bphd->bp", lam, vh[:, patches] * w.view(B, 1, H, d))
    return amap.view(B, 4, 4), w, score_of, o_cls


@pytest.mark.parametrize("heads", ["concat", "per_head"])
def test_vision_map_matches_float64(setup, heads):
    clf, x, y = setup
    out = clf.features(x, vision_trace=LAST)
    score = matching_score(out.image_features, out.text_features, y)
    amap = vision_attribution(score, out.vision, heads=heads)
    clf64 = copy.deepcopy(clf).double()
    ref_map, ref_w, score_of, o_cls = _ref_vision(clf64, x, y, heads=heads)
    torch.testing.assert_close(amap.double(), ref_map.detach(), atol=1e-5, rtol=1e-4)
    if heads == "concat":  # the default is the paper's Eq. 6
        torch.testing.assert_close(vision_attribution(score, out.vision), amap)
    w = vision_channel_weights(matching_score(out.image_features, out.text_features, y), out.vision)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-4)
    # the channel weights are the score's derivative: central finite differences in float64
    h = 1e-6
    with torch.no_grad():
        for c in (0, 7, 31):
            e = torch.zeros_like(o_cls)
            e[:, c] = h
            fd = (score_of(o_cls + e) - score_of(o_cls - e)) / (2 * h)
            torch.testing.assert_close(w[:, c].double(), fd, atol=1e-6, rtol=1e-4)


def test_vision_map_gradient_matches_float64(setup):
    """The map is differentiable w.r.t. the prompts (create_graph) and its gradient agrees with
    the hand-written float64 map's."""
    clf, x, y = setup
    R = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(9))
    out = clf.features(x, vision_trace=LAST)
    amap = vision_attribution(matching_score(out.image_features, out.text_features, y), out.vision,
                              create_graph=True)
    grads = torch.autograd.grad((amap * R).sum(), clf.prompt_parameters())
    clf64 = copy.deepcopy(clf).double()
    # the reference's w must carry a graph too: recompute it with create_graph
    ref_map = _ref_vision(clf64, x, y, create_graph=True)[0]
    ref_grads = torch.autograd.grad((ref_map * R.double()).sum(), clf64.prompt_parameters())
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=1e-6, rtol=2e-3)


@pytest.mark.parametrize("heads", ["concat", "per_head"])
def test_text_map_matches_float64(setup, heads):
    clf, x, y = setup
    out = clf.features(x, vision_trace=None, text_trace=LAST)
    amap, valid = text_attribution(clf.model, out.text, out.image_features, y, heads=heads)
    clf64 = copy.deepcopy(clf).double()
    # hand-written: last text block over the prompts of the labels, EOT row, per-image w
    m = clf64.model
    t = m.clip
    prompts = m.prompt.text_prompts()
    tokens = clf64.tokens
    K = tokens.shape[0]
    z = t.token_embedding(tokens)
    z = torch.cat([z[:, :1], prompts[0].expand(K, -1, -1), z[:, 3:]], 1) + t.positional_embedding
    blocks = t.transformer.resblocks
    for b, blk in enumerate(blocks[:-1]):
        if 0 < b < len(prompts):
            z = torch.cat([z[:, :1], prompts[b].expand(K, -1, -1), z[:, 3:]], 1)
        z = blk(z, attn_mask=t.attn_mask)
    blk = blocks[-1]
    h = blk.ln_1(z)
    q, k, val = (h @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias).chunk(3, -1)
    H = blk.attn.num_heads
    d = q.shape[-1] // H
    eot = tokens.argmax(-1)
    img64 = out.image_features.detach().double()
    L = tokens.shape[1]
    for b in range(len(y)):
        c, e = int(y[b]), int(eot[y[b]])
        qh, kh, vh = (_ref_heads(t_[c:c + 1], H)[0] for t_ in (q, k, val))      # L×H×d
        att = (torch.einsum("hd,jhd->hj", qh[e], kh[:e + 1]) / math.sqrt(d)).softmax(-1)
        o = torch.einsum("hj,jhd->hd", att, vh[:e + 1]).reshape(-1).detach().requires_grad_(True)
        r = z[c, e] + blk.attn.out_proj(o)
        r = r + blk.mlp(blk.ln_2(r))
        feat = F.normalize(t.ln_final(r) @ t.text_projection, dim=-1)
        (w,) = torch.autograd.grad((feat * img64[b]).sum(), o)
        if heads == "concat":
            lam = F.cosine_similarity(q[c, e][None], k[c, :e + 1], dim=-1)[:, None].expand(-1, H)
        else:
            lam = F.cosine_similarity(qh[e][None], kh[:e + 1], dim=-1)        # (e+1)×H
        ref = torch.einsum("jh,jhd->j", lam, vh[:e + 1] * w.view(1, H, d))
        torch.testing.assert_close(amap[b, :e + 1].double(), ref.detach(), atol=1e-6, rtol=1e-4)
        assert valid[b].tolist() == [j <= e for j in range(L)]
    dist = text_distribution(amap, valid)
    torch.testing.assert_close(dist.sum(-1), torch.ones(len(y)))
    assert torch.all(dist[~valid] == 0)


def test_text_map_depends_on_the_image_only_through_w(setup):
    clf, x, y = setup
    out = clf.features(x, text_trace=LAST)
    a1, _ = text_attribution(clf.model, out.text, out.image_features, y)
    out2 = clf.features(x.flip(-1), text_trace=LAST)
    a2, _ = text_attribution(clf.model, out2.text, out2.image_features, y)
    assert not torch.allclose(a1, a2)
