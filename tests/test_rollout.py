"""Rollouts against a direct float64 computation; TV and fusions against hand-worked cases."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from robustprompt.attribution.rollout import normalise_maps, rollout, total_variation
from robustprompt.models import PromptConfig, PromptedClassifier
from robustprompt.tta.atpt import tv_fusion
from robustprompt.tta.rtpt import reliability_weights


@pytest.fixture
def clf(tiny_backbone):
    torch.manual_seed(4)
    c = PromptedClassifier(tiny_backbone, ["a", "b", "c", "d"], PromptConfig(coupling="vision", n_ctx=2, depth=2))
    for p in c.prompt_parameters():
        p.data.normal_(0, 0.5)
    return c


def _reference(clf64, image, mode):
    """One image, float64, every operation written out; returns the unnormalised 4×4 map."""
    v = clf64.model.clip.visual
    prompts = clf64.model.prompt.vision_prompts()
    x = ((image[None].double() - clf64.mean) / clf64.std)
    z = v.conv1(x).flatten(2).transpose(1, 2)
    z = torch.cat([v.class_embedding.view(1, 1, -1), z], 1) + v.positional_embedding
    z = v.ln_pre(torch.cat([z, prompts[0][None]], 1))
    blocks = v.transformer.resblocks
    L = len(blocks)
    inputs, attns = [], []
    for b, blk in enumerate(blocks):
        if 0 < b < len(prompts):
            z = torch.cat([z[:, :-2], prompts[b][None]], 1)
        if mode == "token_grad" and b >= L - 2:
            z = z.detach().requires_grad_(True) if b == L - 2 else z
        inputs.append(z)
        h = blk.ln_1(z)
        q, k, val = (h @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias).chunk(3, -1)
        H = blk.attn.num_heads
        d = q.shape[-1] // H
        maps = [((q[0, :, hh * d:(hh + 1) * d] @ k[0, :, hh * d:(hh + 1) * d].t()) / math.sqrt(d)).softmax(-1)
                for hh in range(H)]
        attn = torch.stack(maps)                       # H×N×N, in the graph: S depends on it via o
        heads = [attn[hh] @ val[0, :, hh * d:(hh + 1) * d] for hh in range(H)]
        attns.append(attn)
        o = torch.cat(heads, -1)[None]
        z = z + blk.attn.out_proj(o)
        z = z + blk.mlp(blk.ln_2(z))
    feat = F.normalize(v.ln_post(z[:, 0]) @ v.proj, dim=-1)
    logits = clf64.model.logit_scale * feat @ clf64.text_features().t()
    S = logits[0, logits[0].argmax()]
    N = z.shape[1]
    eye = torch.eye(N, dtype=torch.float64)
    if mode == "token_grad":
        grads = torch.autograd.grad(S, [inputs[L - 2], inputs[L - 1]])
        mats = []
        for T, g, A in zip([inputs[L - 2], inputs[L - 1]], grads, [attns[L - 2], attns[L - 1]]):
            w = torch.relu((T[0] * g[0]).sum(-1))
            w = w / w.sum()
            m = eye + (A.detach() * w[None, None, :]).mean(0)
            mats.append(m / m.sum(-1, keepdim=True))
        roll = mats[1] @ ((mats[0] + mats[1]) / 2)
    else:
        grads = torch.autograd.grad(S, attns)
        roll = None
        for A, g in zip(attns, grads):
            m = eye + torch.relu(g * A.detach()).mean(0)
            m = m / m.sum(-1, keepdim=True)
            roll = m if roll is None else m @ roll
    return roll[0, 1:17].view(4, 4).detach()


@pytest.mark.parametrize("mode", ["token_grad", "gar"])
def test_rollout_matches_float64(clf, tiny_images, mode):
    """The batched implementation, run in float64, equals the per-image hand computation; in
    float32 it agrees to float32 accuracy (ReLU of near-zero token scores can flip, so loosely)."""
    clf64 = copy.deepcopy(clf).double()
    maps64 = rollout(clf64, tiny_images[:3].double(), mode=mode, normalise=False)
    maps32 = rollout(clf, tiny_images[:3], mode=mode, normalise=False)
    for i in range(3):
        ref = _reference(clf64, tiny_images[i], mode)
        torch.testing.assert_close(maps64[i], ref, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(maps32[i].double(), ref, atol=5e-4, rtol=0)


def test_rollout_is_one_batched_pass(clf, tiny_images, monkeypatch):
    calls = {"n": 0}
    original = clf.model.encode_image

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    monkeypatch.setattr(clf.model, "encode_image", counting)
    maps = rollout(clf, tiny_images.repeat(16, 1, 1, 1))
    assert calls["n"] == 1 and maps.shape == (64, 4, 4)


def test_normalise_clips_and_scales():
    m = torch.arange(100, dtype=torch.float32).view(1, 10, 10)
    m[0, 9, 9] = 1e6  # an outlier the 0.99 quantile clips
    out = normalise_maps(m)
    hi = 98 + 0.01 * (1e6 - 98)   # the 0.99 quantile of 100 values, linear interpolation: 98.01th
    assert out.min() == 0 and out[0, 9, 9] == 1
    assert out[0, 9, 8].item() == pytest.approx(98 / hi, rel=1e-3)  # float32 quantile interpolation


def test_total_variation_by_hand():
    a = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]])
    # vertical |Δ|: 1 (row 0→1) + 2 (row 1→2); horizontal: 1 + 1 (row 0) + 2 (row 2) → 7
    assert total_variation(a).item() == 7.0


def test_tv_fusion_by_hand():
    logits = torch.log(torch.tensor([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]]))     # P=1, V=3, K=2
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1, 0, 0] = 1.0                                                        # TV(view 1) = 2
    selected = torch.tensor([[0, 1]])                                             # kept views 0 and 1
    w0, w1 = 1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))           # softmax(-[0, 2])
    expected = torch.tensor([[w0 * 0.7 + w1 * 0.2, w0 * 0.3 + w1 * 0.8]])
    torch.testing.assert_close(tv_fusion(logits, selected, maps), expected)


def test_reliability_weights_by_hand():
    f = F.normalize(torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]), dim=-1)  # views 0,1 agree
    w = reliability_weights(f, top_k=1, temperature=1.0)
    # best similarity to another view: 1, 1, 0
    e = torch.tensor([math.e, math.e, 1.0])
    torch.testing.assert_close(w[0], e / e.sum())
