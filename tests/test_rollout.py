"""Rollouts against a direct float64 computation; TV and fusions against hand-worked cases."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from robustprompt.attribution.rollout import normalise_maps, rollout, total_variation
from robustprompt.models import PromptConfig, PromptedClassifier, TraceSpec
from robustprompt.tta.atpt import tv_fusion
from robustprompt.tta.rtpt import fuse, reliability_weights


@pytest.fixture
def clf(tiny_backbone):
    torch.manual_seed(4)
    c = PromptedClassifier(tiny_backbone, ["a", "b", "c", "d"], PromptConfig(coupling="vision", n_ctx=2, depth=2))
    for p in c.prompt_parameters():
        p.data.normal_(0, 0.5)
    return c


def _reference(clf64, image, mode, weights="paper"):
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
        # paper: equal average of the last two blocks; code: 0.5 and 1.0, divided by their sum
        avg = (mats[0] + mats[1]) / 2 if weights == "paper" else mats[0] / 3 + 2 * mats[1] / 3
        roll = mats[1] @ avg
    else:
        grads = torch.autograd.grad(S, attns)
        roll = None
        for A, g in zip(attns, grads):
            m = eye + torch.relu(g * A.detach()).mean(0)
            m = m / m.sum(-1, keepdim=True)
            roll = m if roll is None else m @ roll
    return roll[0, 1:17].view(4, 4).detach()


@pytest.mark.parametrize("mode, weights", [("token_grad", "paper"), ("token_grad", "code"), ("gar", "paper")])
def test_rollout_matches_float64(clf, tiny_images, mode, weights):
    """The batched implementation, run in float64, equals the per-image hand computation.

    token_grad: the last block's patch scores ⟨T, ∂S/∂T⟩ cancel ~1e6-fold (see the LayerNorm test
    below), so even float64 rounding reaches the normalised token weights as ~eps·κ
    (_weight_conditioning; κ ≈ 7e5 here). The bound is eps·κ ≈ 1.6e-10: measured errors are
    ≤ 7.4e-13 with 1 or 4 threads and AVX-512, AVX2 or scalar kernels (≥ 200× margin), where the
    former fixed 1e-12 sat 6× above them. A wrong rollout (e.g. the other block weights) moves the
    map by > 1e-4 (test_paper_and_code_rollout_weights_differ), a million times the bound."""
    clf64 = copy.deepcopy(clf).double()
    maps64 = rollout(clf64, tiny_images[:3].double(), mode=mode, rollout_weights=weights, normalise=False)
    kappa = _weight_conditioning(clf64, tiny_images[:3]) if mode == "token_grad" else torch.zeros(3)
    eps64 = torch.finfo(torch.float64).eps
    for i in range(3):
        ref = _reference(clf64, tiny_images[i], mode, weights)
        torch.testing.assert_close(maps64[i], ref, atol=max(1e-12, eps64 * float(kappa[i])), rtol=1e-9)


def test_paper_and_code_rollout_weights_differ(clf, tiny_images):
    clf64 = copy.deepcopy(clf).double()
    paper = rollout(clf64, tiny_images[:2].double(), rollout_weights="paper", normalise=False)
    code = rollout(clf64, tiny_images[:2].double(), rollout_weights="code", normalise=False)
    assert (paper - code).abs().max() > 1e-4
    with pytest.raises(ValueError, match="rollout_weights"):
        rollout(clf, tiny_images[:1], rollout_weights="equal")
    with pytest.raises(ValueError, match="last_blocks=2"):
        rollout(clf, tiny_images[:1], rollout_weights="code", last_blocks=3)


def _block_token_scores(clf64, images, block=-1):
    """⟨T, ∂S/∂T⟩ per token of a block's input (default the last; float64) and Σ|T·∂S/∂T| (its
    scale), B×N each, S the top-1 logit as the rollout scores it."""
    b = block % clf64.model.vision_layers
    with torch.enable_grad():
        out = clf64.features(images.double().requires_grad_(True), vision_trace=TraceSpec(blocks=(b,), attn=True))
        S = out.logits.gather(1, out.logits.argmax(1, keepdim=True)).sum()
        T = out.vision[b].x_in
        (g,) = torch.autograd.grad(S, T)
    return (T * g).sum(-1).detach(), (T * g).abs().sum(-1).detach(), out.vision.patch_slice


def _weight_conditioning(clf, images):
    """κ per image (B): by how much token_grad's weights W = ReLU(s)/Σ ReLU(s), s_t = Σ_c T·g, magnify
    rounding in their products — max_t Σ_c|T·g| / Σ_t ReLU(s_t), the larger over the last two
    blocks. A relative rounding u in each product moves a weight by about u·κ."""
    clf64 = copy.deepcopy(clf).double()
    kappas = []
    for block in (-2, -1):
        score, scale, _ = _block_token_scores(clf64, images, block)
        kappas.append(scale.max(-1).values / F.relu(score).sum(-1))
    return torch.stack(kappas).max(0).values


def test_last_block_patch_weights_vanish_by_layernorm_scale_invariance(clf, tiny_images):
    """Why token_grad is ill-conditioned in float32: a patch token of the last block reaches the
    score only through ln_1 (keys, values); LayerNorm without eps is scale invariant, so by Euler's
    theorem ⟨T, ∂S/∂T⟩ = 0 for it. The weights left are an eps artefact ~eps/var, far below the
    terms of the sum (the same holds in the released code, whose tokens are also block inputs)."""
    clf64 = copy.deepcopy(clf).double()
    clf64.model.clip.visual.transformer.resblocks[-1].ln_1.eps = 0.0
    score, scale, patches = _block_token_scores(clf64, tiny_images[:3])
    assert (score[:, patches].abs() / scale[:, patches]).max() < 1e-12
    clf64.model.clip.visual.transformer.resblocks[-1].ln_1.eps = 1e-5   # open_clip's eps
    score, scale, patches = _block_token_scores(clf64, tiny_images[:3])
    ratio = score[:, patches].abs() / scale[:, patches]
    assert ratio.max() < 1e-3 and ratio.max() > 1e-9


@pytest.mark.parametrize("mode", ["token_grad", "gar"])
def test_rollout_float32_agrees_when_well_conditioned(clf, tiny_images, mode):
    """float32 against the float64 hand computation on a model where the quantity is stable.

    For token_grad the last two blocks' ln_1 get eps = 1, which breaks the LayerNorm scale
    invariance above, so the token scores no longer cancel (Σ|T·g| / |Σ T·g| drops from ~1e6 to
    ~3, κ from 7e5 to ~30) and float32 rounding stays ≤ 4e-8 (1 or 4 threads; AVX-512, AVX2 or
    scalar kernels: ≥ 24× below the bound). With open_clip's eps = 1e-5 (κ ≈ 7e5) the float32 map
    is off by 2e-4 to 5e-4 depending on the CPU's kernels (≈ u32·κ·max|map|; 5.13e-4 failed a 5e-4
    bound in issue 10): a bound with a 10× margin would be half the map itself. GAR is well
    conditioned as it is."""
    clf = copy.deepcopy(clf)
    if mode == "token_grad":
        for blk in clf.model.clip.visual.transformer.resblocks[-2:]:
            blk.ln_1.eps = 1.0
        assert _weight_conditioning(clf, tiny_images[:3]).max() < 100   # the premise of a 1e-6 bound
    clf64 = copy.deepcopy(clf).double()
    maps32 = rollout(clf, tiny_images[:3], mode=mode, normalise=False)
    for i in range(3):
        ref = _reference(clf64, tiny_images[i], mode)
        assert ref.abs().max() > 1e-3                       # a map, not rounding noise
        torch.testing.assert_close(maps32[i].double(), ref, atol=1e-6, rtol=0)


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
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])                 # P=1, V=3, K=2
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1, 0, 0] = 1.0                                                        # TV(view 1) = 2 on the grid
    selected = torch.tensor([[0, 1]])                                             # kept views 0 and 1
    w0, w1 = 1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))           # softmax(-[0, 2])
    # logits (released code): softmax of the weighted logits
    z = [w0 * 2.0, w1 * 1.0]
    e = [math.exp(z[0]), math.exp(z[1])]
    expected = torch.tensor([[e[0] / sum(e), e[1] / sum(e)]])
    torch.testing.assert_close(tv_fusion(logits, selected, maps, resolution="grid"), expected)
    # probs (paper's Σ w p)
    p0 = [math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2))]
    p1 = [1 / (1 + math.e), math.e / (1 + math.e)]
    expected = torch.tensor([[w0 * p0[0] + w1 * p1[0], w0 * p0[1] + w1 * p1[1]]])
    torch.testing.assert_close(tv_fusion(logits, selected, maps, resolution="grid", space="probs"), expected)


def test_tv_fusion_at_image_resolution_uses_the_upsampled_maps():
    """A single hot cell on a 2×2 grid, upsampled bilinearly to 4×4 (align_corners=False): rows
    and columns of the upsampled map read [1, .75, .25, 0] (hot row/col) and [.75, .5625, .1875, 0]
    … so its TV is larger than on the grid and the weights sharper; checked by hand below."""
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    maps = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    maps[0, 1, 0, 0] = 1.0
    # upsampled cell values: 1 → weights (1, .75, .25, 0) along each axis from the hot corner
    a = [1.0, 0.75, 0.25, 0.0]
    up = [[a[i] * a[j] for j in range(4)] for i in range(4)]
    tv = sum(abs(up[i + 1][j] - up[i][j]) for i in range(3) for j in range(4)) + \
        sum(abs(up[i][j + 1] - up[i][j]) for i in range(4) for j in range(3))      # = 2 · (1 + .75 + .25) = 4
    assert tv == pytest.approx(4.0)
    w1 = math.exp(-tv) / (1 + math.exp(-tv))
    out = tv_fusion(logits.double(), torch.tensor([[0, 1]]), maps, resolution="image", size=4, space="probs")
    p_a, p_b = math.e / (1 + math.e), 1 / (1 + math.e)
    expected = torch.tensor([[(1 - w1) * p_a + w1 * p_b, (1 - w1) * p_b + w1 * p_a]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="size"):
        tv_fusion(logits, torch.tensor([[0, 1]]), maps.float(), resolution="image")


def test_reliability_weights_by_hand():
    f = F.normalize(torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]), dim=-1)  # views 0,1 agree
    w = reliability_weights(f, top_k=1, temperature=1.0)
    # best similarity to another view: 1, 1, 0
    e = torch.tensor([math.e, math.e, 1.0])
    torch.testing.assert_close(w[0], e / e.sum())


def test_reliability_weights_mask_the_diagonal_exactly():
    """Self-similarities of float32 unit vectors often round below 1: a `sim >= 1` test would keep
    them as a view's best neighbour. The exact mask equals a float64 loop over the other views."""
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(4, 16, 512, generator=g), dim=-1)
    diag = (f @ f.transpose(1, 2)).diagonal(dim1=1, dim2=2)
    assert (diag < 1.0).any()                          # the released code's test would miss these
    w = reliability_weights(f, top_k=5, temperature=0.01)
    f64 = f.double()
    ref = torch.zeros(4, 16, dtype=torch.float64)
    for p in range(4):
        for i in range(16):
            sims = sorted((float(f64[p, i] @ f64[p, j]) for j in range(16) if j != i), reverse=True)
            ref[p, i] = sum(sims[:5]) / 5
    torch.testing.assert_close(w.double(), (ref / 0.01).softmax(-1), atol=1e-4, rtol=0)


def test_fuse_logits_versus_probs_by_hand():
    w = torch.tensor([[0.25, 0.75]])
    z = torch.tensor([[[0.0, 4.0], [2.0, 0.0]]])
    fused = 0.25 * torch.tensor([0.0, 4.0]) + 0.75 * torch.tensor([2.0, 0.0])     # [1.5, 1.0]
    torch.testing.assert_close(fuse(w, z, "logits"), fused.softmax(-1)[None])
    p = 0.25 * torch.tensor([0.0, 4.0]).softmax(-1) + 0.75 * torch.tensor([2.0, 0.0]).softmax(-1)
    torch.testing.assert_close(fuse(w, z, "probs"), p[None])
    assert fuse(w, z, "logits").argmax() == 0 and fuse(w, z, "probs").argmax() == 0
