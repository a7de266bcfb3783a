"""Batched TPT / AugMix / A-TPT views: geometry, per-op references, gradients, randomness, batching."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from robustprompt.tta import views as V
from robustprompt.tta.views import (
    AUGMIX_OPS,
    Views,
    attention_guided_views,
    augmix,
    augmix_views,
    random_resized_crops,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_image(size: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(3, size, size, generator=gen(1000 + seed), dtype=dtype)


def coord_image(size: int) -> torch.Tensor:
    """Channel 0 = x, channel 1 = y of each pixel centre in units of S, channel 2 = 0.5."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return torch.stack([c.expand(size, size), c[:, None].expand(size, size), torch.full((size, size), 0.5)])


def recover_box(crop: torch.Tensor, size: int):
    """(left, top, w, h, mirrored) of the box a crop of coord_image came from.

    Bilinear resampling of a linear ramp is linear away from the clamped border, so fit the central
    part: value(o) = (left + (o + 0.5)·w/S)/S (x mirrored: (left + w - (o + 0.5)·w/S)/S).
    """
    mid = slice(size // 4, 3 * size // 4)
    o = torch.arange(size, dtype=torch.float64)[mid] + 0.5
    vx = crop[0, size // 2, mid].double()
    vy = crop[1, mid, size // 2].double()
    sx = ((vx - vx.mean()) * (o - o.mean())).sum() / ((o - o.mean()) ** 2).sum()
    sy = ((vy - vy.mean()) * (o - o.mean())).sum() / ((o - o.mean()) ** 2).sum()
    w, h = abs(sx.item()) * size * size, sy.item() * size * size
    mirrored = sx.item() < 0
    if mirrored:
        left = vx.mean().item() * size + o.mean().item() * w / size - w
    else:
        left = vx.mean().item() * size - o.mean().item() * w / size
    top = vy.mean().item() * size - o.mean().item() * h / size
    return left, top, w, h, mirrored, sy.item()


# ----------------------------------------------------------------------------- shapes, determinism


@pytest.mark.parametrize("device", DEVICES)
def test_shapes_range_and_row_zero(device):
    img = rand_image(24).to(device)
    out = augmix_views(img, 8, gen(0))
    assert isinstance(out, Views)
    for t in (out.views, out.bases, out.mixes):
        assert t.shape == (8, 3, 24, 24) and t.device.type == device and t.dtype == img.dtype
        assert t.min() >= 0 and t.max() <= 1
        assert torch.equal(t[0], img)
    assert out.m.shape == (8,) and out.m[0] == 1 and ((out.m >= 0) & (out.m <= 1)).all()
    m = out.m.view(-1, 1, 1, 1)
    torch.testing.assert_close(out.views, m * out.bases + (1 - m) * out.mixes)
    assert not torch.allclose(out.views[1], out.bases[1])  # AugMix actually changed something


def test_without_augmix_views_are_the_crops():
    img = rand_image(24)
    out = augmix_views(img, 6, gen(3), use_augmix=False)
    assert out.mixes is None and out.m is None
    assert torch.equal(out.views, out.bases) and torch.equal(out.views[0], img)
    assert torch.equal(out.views[1:], random_resized_crops(img, 5, gen(3)))


def test_single_view_is_the_image():
    img = rand_image(16)
    out = augmix_views(img, 1, gen(0))
    assert out.views.shape == (1, 3, 16, 16) and torch.equal(out.views[0], img) and out.m.tolist() == [1.0]


def test_determinism_and_independence_from_context():
    img = rand_image(24)
    ref = augmix_views(img, 16, gen(7))
    # unrelated work in between: global RNG, other images and generators, another device dtype
    torch.manual_seed(123)
    torch.rand(1000)
    augmix_views(rand_image(24, seed=5), 64, gen(8))
    again = augmix_views(img, 16, gen(7))
    assert torch.equal(ref.views, again.views) and torch.equal(ref.m, again.m)
    other = augmix_views(img, 16, gen(8))
    assert not torch.allclose(ref.views[1:], other.views[1:])
    # the random draws depend on the generator, not on the pixels; float64, as the crop and the
    # reference resample by different kernels (1.6e-6 apart in float32 against a 1e-5 bound)
    img64 = img.double()
    b1 = random_resized_crops(img64, 5, gen(11))
    b2 = random_resized_crops(coord_image(24).float(), 5, gen(11))
    boxes = [recover_box(b2[i], 24)[:4] for i in range(5)]
    for i, (left, top, w, h) in enumerate(boxes):
        crop = img64[:, round(top):round(top) + round(h), round(left):round(left) + round(w)]
        ref_crop = F.interpolate(crop[None], size=(24, 24), mode="bilinear", align_corners=False)[0]
        assert any(torch.allclose(b1[i], r, rtol=0, atol=1e-10) for r in (ref_crop, ref_crop.flip(-1)))


# ----------------------------------------------------------------------------- crops


def test_crop_boxes_follow_random_resized_crop_rule():
    size, n = 32, 300
    crops = random_resized_crops(coord_image(size), n, gen(1))
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    mirrored = 0
    for i in range(n):
        left, top, w, h, mir, sy = recover_box(crops[i], size)
        mirrored += mir
        assert sy > 0  # never flipped vertically
        for v in (left, top, w, h):
            assert abs(v - round(v)) < 1e-3, (left, top, w, h)  # integer boxes
        left, top, w, h = round(left), round(top), round(w), round(h)
        assert 0 <= left and left + w <= size and 0 <= top and top + h <= size
        # some area A ∈ scale·S² and ratio r ∈ ratio must round to this (w, h)
        a_lo, a_hi = (w - 0.5) * (h - 0.5), (w + 0.5) * (h + 0.5)
        r_lo, r_hi = (w - 0.5) / (h + 0.5), (w + 0.5) / (h - 0.5)
        full = (w, h) == (size, size)  # also the fallback box
        assert full or (a_lo <= scale[1] * size**2 and a_hi >= scale[0] * size**2), (w, h)
        assert full or (r_lo <= ratio[1] and r_hi >= ratio[0]), (w, h)
    assert 0.35 < mirrored / n < 0.65


def test_flip_mirrors_the_crop_and_can_be_disabled():
    size = 20
    crops = random_resized_crops(coord_image(size), 40, gen(2), flip=False)
    assert all(not recover_box(c, size)[4] for c in crops)
    img = rand_image(size)
    # a flipped crop of img is the mirror image of the unflipped crop with the same box
    flipped = random_resized_crops(img, 40, gen(2))
    plain = random_resized_crops(img, 40, gen(2), flip=False)
    geo = random_resized_crops(coord_image(size), 40, gen(2))
    for i in range(40):
        if recover_box(geo[i], size)[4]:
            torch.testing.assert_close(flipped[i], plain[i].flip(-1))
        else:
            torch.testing.assert_close(flipped[i], plain[i])


def test_crop_fallback_is_a_centre_crop_clamped_to_ratio():
    size = 16
    img = rand_image(size)
    crops = random_resized_crops(img, 6, gen(0), scale=(2.0, 3.0))  # no attempt fits: whole image
    for c in crops:
        assert torch.allclose(c, img, atol=1e-5) or torch.allclose(c, img.flip(-1), atol=1e-5)
    crops = random_resized_crops(coord_image(size), 6, gen(0), scale=(2.0, 3.0), ratio=(2.0, 3.0))
    for c in crops:
        left, top, w, h, _, _ = recover_box(c, size)
        assert (round(left), round(top), round(w), round(h)) == (0, 4, 16, 8)


def test_crops_are_differentiable():
    img = rand_image(16).requires_grad_()
    random_resized_crops(img, 4, gen(0)).sum().backward()
    assert img.grad.abs().sum() > 0 and torch.isfinite(img.grad).all()


# ----------------------------------------------------------------------------- per-op references


def levels_image(k: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    """K×3×S×S float64 on exact 8-bit levels (what decoded images hold), plus an odd channel."""
    g = gen(seed)
    x = torch.randint(0, 256, (k, 3, size, size), generator=g).double() / 255
    x[0, 2] = 0.4  # a constant channel
    return x


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).double() / 255


def test_autocontrast_matches_per_channel_stretch():
    x = torch.rand(3, 3, 7, 7, generator=gen(4), dtype=torch.float64) * 0.5 + 0.2
    x[1, 0] = 0.3
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    ref = (x - lo) / (hi - lo)
    ref[1, 0] = 0.3
    torch.testing.assert_close(V._autocontrast(x), ref)


def test_posterize_matches_bit_mask():
    x = torch.cat([torch.rand(2, 3, 6, 6, generator=gen(5), dtype=torch.float64), levels_image(1, 6)])
    bits = torch.tensor([4, 1, 4])
    got = V._posterize(x, bits)
    q = torch.floor(x * 255).to(torch.int64)
    masks = torch.tensor([0xF0, 0x80, 0xF0]).view(-1, 1, 1, 1)
    torch.testing.assert_close(got, (q & masks).double() / 255)
    # and PIL agrees on exact levels
    torch.testing.assert_close(got[2], from_pil(ImageOps.posterize(to_pil(x[2]), 4)))


def test_solarize_matches_where():
    x = torch.cat([torch.rand(2, 3, 6, 6, generator=gen(6), dtype=torch.float64), levels_image(1, 6)])
    thr = torch.tensor([128, 240, 200])
    got = V._solarize(x, thr)
    ref = torch.where(torch.floor(x * 255) >= thr.view(-1, 1, 1, 1), 1 - x, x)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got[2], from_pil(ImageOps.solarize(to_pil(x[2]), 200)))


def equalize_reference(channel: np.ndarray) -> np.ndarray:
    """PIL's equalize rule on one uint8 channel, written plainly."""
    hist = np.bincount(channel.ravel(), minlength=256)
    nonzero = hist[hist > 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
        return channel.copy()
    lut, acc = [], step // 2
    for level in range(256):
        lut.append(min(255, acc // step))
        acc += hist[level]
    return np.array(lut, dtype=np.uint8)[channel]


def test_equalize_matches_numpy_and_pil_references():
    x = levels_image(3, 12, seed=2)
    x[1] = x[1] * 0.3 + 0.2  # a low-contrast image (off the 8-bit levels: quantised inside the op)
    x[2, :, :6] = 0.0  # a tall histogram spike
    got = V._equalize(x)
    q = torch.floor(x * 255).to(torch.uint8).numpy()
    ref = np.stack([[equalize_reference(q[k, c]) for c in range(3)] for k in range(3)])
    torch.testing.assert_close(got, torch.from_numpy(ref).double() / 255)
    for k in (0, 2):
        torch.testing.assert_close(got[k], from_pil(ImageOps.equalize(to_pil(x[k]))))


def point_image(size: int, row: int, col: int) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size, dtype=torch.float64)
    x[0, :, row, col] = 1.0
    return x


def warp(x: torch.Tensor, op: str, value: float) -> torch.Tensor:
    # the value in float64: a float32 0.4 is off by 6e-9, which moved the sheared pixel by 1.5e-8
    theta = V._geometric_theta(torch.tensor([AUGMIX_OPS.index(op)]), torch.tensor([value], dtype=torch.float64),
                               x.shape[-1])
    return V._warp(x, theta)


def test_translate_moves_a_pixel_and_fills_black():
    moved = warp(point_image(9, 4, 3), "translate_x", 2.0)
    torch.testing.assert_close(moved, point_image(9, 4, 5))
    moved = warp(point_image(9, 4, 3), "translate_y", -3.0)
    torch.testing.assert_close(moved, point_image(9, 1, 3))
    ones = warp(torch.ones(1, 3, 9, 9, dtype=torch.float64), "translate_x", 2.0)
    assert (ones[..., :2] == 0).all() and torch.allclose(ones[..., 2:], torch.ones(1, dtype=torch.float64))


def test_rotate_and_shear():
    x = torch.rand(1, 3, 9, 9, generator=gen(0), dtype=torch.float64)
    torch.testing.assert_close(warp(x, "rotate", 0.0), x)
    torch.testing.assert_close(warp(x, "shear_x", 0.0), x)
    # +90°: counter-clockwise on screen about the centre pixel (4, 4), as PIL's rotate
    torch.testing.assert_close(warp(point_image(9, 4, 6), "rotate", 90.0), point_image(9, 2, 4))
    # PIL's shear about the top-left corner: source x = x + s·y, row 2 has centre y = 2.5
    torch.testing.assert_close(warp(point_image(9, 2, 5), "shear_x", 0.4), point_image(9, 2, 4))
    torch.testing.assert_close(warp(point_image(9, 5, 2), "shear_y", 0.4), point_image(9, 4, 2))


def test_geometric_ops_match_pil_away_from_the_fill():
    size = 32
    yy, xx = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(xx / 5), 0.5 + 0.4 * torch.cos(yy / 4), (xx + yy) / (2 * size)])
    img = (img * 255).round() / 255
    pil = to_pil(img)
    cases = [  # PIL call as AugMix makes it, our op and value; PIL's translate moves content by -t
        (pil.rotate(25, resample=Image.BILINEAR), "rotate", 25.0),
        (pil.transform((size, size), Image.AFFINE, (1, 0.2, 0, 0, 1, 0), resample=Image.BILINEAR), "shear_x", 0.2),
        (pil.transform((size, size), Image.AFFINE, (1, 0, 0, 0.2, 1, 0), resample=Image.BILINEAR), "shear_y", 0.2),
        (pil.transform((size, size), Image.AFFINE, (1, 0, 3, 0, 1, 0), resample=Image.BILINEAR), "translate_x", -3.0),
    ]
    for ref, op, value in cases:
        got = warp(img[None], op, value)[0]
        # interior only: at the fill edge grid_sample fades to black over a pixel, PIL cuts off. PIL's
        # 8-bit result lies within one level of the exact float64 value (measured ≤ 1.0 level, Pillow
        # 13); 1.5 levels leaves half a level, far above any float rounding, and a wrong warp is off
        # by many levels
        torch.testing.assert_close(got[:, 8:24, 8:24], from_pil(ref)[:, 8:24, 8:24], atol=1.5 / 255, rtol=0)


def test_op_parameters_follow_augmix_levels():
    names = ("posterize", "solarize", "rotate", "shear_x", "translate_y")
    code = torch.tensor([AUGMIX_OPS.index(o) for o in names])
    level = torch.full((5,), 5.0, dtype=torch.float64)
    sign = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    got = V._op_values(code, level, sign, 224)
    assert got.tolist() == pytest.approx([4 - 2, 256 - 128, -15, 0.15, -int(5 * (224 / 3) / 10)])


# ----------------------------------------------------------------------------- gradients


def test_views_are_differentiable():
    img = rand_image(24).requires_grad_()
    augmix_views(img, 8, gen(0)).views.sum().backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_quantising_ops_use_straight_through_gradients():
    x = torch.rand(2, 3, 6, 6, generator=gen(1), dtype=torch.float64).requires_grad_()
    outputs = (V._posterize(x, torch.tensor([4, 2])), V._solarize(x, torch.tensor([100, 200])), V._equalize(x))
    for y in outputs:
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(g, torch.ones_like(x))
    bases = rand_image(16).unsqueeze(0).repeat(4, 1, 1, 1).requires_grad_()
    mix, _ = augmix(bases, gen(2), ops=("posterize", "solarize", "equalize"))
    (g,) = torch.autograd.grad(mix.sum(), bases)
    torch.testing.assert_close(g, torch.ones_like(bases))  # Dirichlet weights sum to 1


# ----------------------------------------------------------------------------- AugMix statistics


def test_m_is_uniform_and_dirichlet_weights_sum_to_one():
    bases = torch.rand(3000, 3, 4, 4, generator=gen(0))
    _, m = augmix(bases, gen(1))
    assert abs(m.mean().item() - 0.5) < 0.02 and abs(m.var().item() - 1 / 12) < 0.006
    w = V._dirichlet_ones(20000, 3, gen(2))
    torch.testing.assert_close(w.sum(1), torch.ones(20000, dtype=torch.float64))
    assert (w > 0).all()
    # Dirichlet(1,1,1) marginals are Beta(1, 2): mean 1/3, variance 1/18
    assert torch.allclose(w.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01)
    assert torch.allclose(w.var(0), torch.full((3,), 1 / 18, dtype=torch.float64), atol=0.004)


def test_idempotent_op_chains_mix_back_to_the_op():
    # every chain applies ≥ 1 op; an idempotent op gives the same result at any depth, so the
    # convex mix of the chains equals the op's output exactly when the weights sum to 1
    bases = torch.rand(50, 3, 8, 8, generator=gen(3), dtype=torch.float64) * 0.6 + 0.1
    mix, _ = augmix(bases, gen(4), ops=("autocontrast",))
    torch.testing.assert_close(mix, V._autocontrast(bases))
    # at severity 1 posterize always keeps 4 bits
    mix, _ = augmix(bases, gen(5), ops=("posterize",))
    torch.testing.assert_close(mix, (torch.floor(bases * 255).to(torch.int64) & 0xF0).double() / 255)
    # a constant image is left alone by autocontrast: the mix is the image
    const = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64).view(1, 3, 1, 1).expand(10, 3, 8, 8)
    mix, _ = augmix(const, gen(6), ops=("autocontrast",))
    torch.testing.assert_close(mix, const)


def test_grid_sample_calls_do_not_grow_with_views(monkeypatch):
    calls = []
    real = F.grid_sample

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", counting)
    pixel_calls = []
    for name in ("_autocontrast", "_equalize", "_posterize", "_solarize"):
        real_op = getattr(V, name)
        monkeypatch.setattr(V, name, lambda *a, _op=real_op, _n=name: pixel_calls.append(_n) or _op(*a))
    img = rand_image(16)
    counts = {}
    for n_views in (2, 8, 64):
        for seed in range(5):
            calls.clear()
            pixel_calls.clear()
            augmix_views(img, n_views, gen(seed))
            counts[(n_views, seed)] = len(calls)
            # each pixel op runs at most once per chain step, for all (view, chain) pairs that drew it
            assert all(pixel_calls.count(n) <= 3 for n in set(pixel_calls))
    # one for the crops, at most one per chain step for all geometric ops
    assert max(counts.values()) <= 1 + 3
    assert min(counts[(64, s)] for s in range(5)) >= 2
    calls.clear()
    augmix_views(img, 64, gen(0))
    assert calls[0] == 63 and max(calls[1:]) > 1  # batched: many views per call


# ----------------------------------------------------------------------------- attention-guided views


def _constant_views(size: int, n: int = 3) -> Views:
    """Hand-made Views: every base is 0.2 everywhere, every chain mixture 0.9, m_j = 0.5."""
    bases = torch.full((n, 3, size, size), 0.2, dtype=torch.float64)
    mixes = torch.full((n, 3, size, size), 0.9, dtype=torch.float64)
    bases[0] = mixes[0] = 0.5  # row 0 is the image: never mixed
    m = torch.full((n,), 0.5, dtype=torch.float64)
    m[0] = 1.0
    return Views(views=m.view(-1, 1, 1, 1) * bases + (1 - m.view(-1, 1, 1, 1)) * mixes, bases=bases, mixes=mixes, m=m)


@pytest.mark.parametrize("mix_source, high_value, low_value", [
    # chain (released code): x = (1-λ)·0.2 + λ·0.9;  λ = 0.2 where attention is high, 0.8 elsewhere
    ("chain", 0.8 * 0.2 + 0.2 * 0.9, 0.2 * 0.2 + 0.8 * 0.9),          # 0.34, 0.76
    # augmix (paper's text): the finished AugMix view is 0.5·0.2 + 0.5·0.9 = 0.55
    ("augmix", 0.8 * 0.2 + 0.2 * 0.55, 0.2 * 0.2 + 0.8 * 0.55),       # 0.27, 0.48
])
def test_attention_guided_mixing_by_hand(mix_source, high_value, low_value):
    """A known map on constant images: the top 20% pixels get weight m_high of the augmentation,
    the others m_low of it; with the chain source the low pixels hold 0.8 of the chain mixture."""
    size = 5
    views = _constant_views(size)
    maps = torch.zeros(3, size, size, dtype=torch.float64)
    maps[:, 0, :] = 1.0                                     # row 0 of each map: the top 5 of 25 pixels
    out = attention_guided_views(views, maps, mix_source=mix_source)
    assert torch.equal(out[0], views.bases[0])
    expected = torch.full((2, 3, size, size), low_value, dtype=torch.float64)
    expected[:, :, 0, :] = high_value
    torch.testing.assert_close(out[1:], expected, rtol=0, atol=1e-15)
    if mix_source == "chain":  # low-attention pixels: weight m_low = 0.8 of the chain mixture
        assert (out[1:, :, 1:] - 0.2).div(0.9 - 0.2).sub(0.8).abs().max() < 1e-12


@pytest.mark.parametrize("mix_source", ["chain", "augmix"])
def test_attention_guided_mixing_is_exact(mix_source):
    size = 10
    img = rand_image(size, dtype=torch.float64)
    views = augmix_views(img, 4, gen(0))
    perm = torch.stack([torch.randperm(size * size, generator=gen(10 + i)) for i in range(4)])
    maps = perm.double().view(4, size, size)
    out = attention_guided_views(views, maps, mix_source=mix_source)
    assert out.shape == (4, 3, size, size) and torch.equal(out[0], img)
    m = views.m.view(-1, 1, 1, 1)
    target = views.mixes if mix_source == "chain" else m * views.bases + (1 - m) * views.mixes
    high = (perm >= 80).view(4, 1, size, size)  # top 20 of 100 map values
    expected = torch.where(high, 0.8 * views.bases + 0.2 * target, 0.2 * views.bases + 0.8 * target)
    torch.testing.assert_close(out[1:], expected[1:], rtol=0, atol=1e-12)


def test_attention_ties_break_by_index_and_count_rounds_up():
    size = 10
    views = augmix_views(rand_image(size, dtype=torch.float64), 3, gen(1))
    maps = torch.zeros(3, size, size, dtype=torch.float64)
    out = attention_guided_views(views, maps, ratio=0.155, m_high=0.0, m_low=1.0)
    flat_high = torch.arange(size * size) < 16  # ceil(15.5) lowest indices
    expected = torch.where(flat_high.view(1, 1, size, size), views.bases, views.mixes)
    torch.testing.assert_close(out[1:], expected[1:], rtol=0, atol=1e-12)


def test_attention_guided_views_are_differentiable():
    img = rand_image(8).requires_grad_(True)
    views = augmix_views(img, 4, gen(2))
    out = attention_guided_views(views, torch.rand(4, 8, 8, generator=gen(3)))
    (g,) = torch.autograd.grad(out[1:].sum(), img)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_attention_guided_views_validates():
    img = rand_image(8)
    views = augmix_views(img, 3, gen(0))
    maps = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="AugMix"):
        attention_guided_views(augmix_views(img, 3, gen(0), use_augmix=False), maps)
    with pytest.raises(ValueError, match="maps"):
        attention_guided_views(views, torch.rand(3, 8, 7))
    with pytest.raises(ValueError, match="ratio"):
        attention_guided_views(views, maps, ratio=0.0)
    with pytest.raises(ValueError, match="m_high"):
        attention_guided_views(views, maps, m_high=1.5)
    with pytest.raises(ValueError, match="mix_source"):
        attention_guided_views(views, maps, mix_source="view")


def test_input_validation():
    with pytest.raises(ValueError, match="3×S×S"):
        augmix_views(torch.rand(3, 8, 9), 4, gen(0))
    with pytest.raises(ValueError, match="3×S×S"):
        augmix_views(torch.rand(1, 8, 8), 4, gen(0))
    with pytest.raises(ValueError, match="floating"):
        augmix_views(torch.zeros(3, 8, 8, dtype=torch.uint8), 4, gen(0))
    with pytest.raises(ValueError, match="n_views"):
        augmix_views(torch.rand(3, 8, 8), 0, gen(0))
    with pytest.raises(ValueError, match="severity"):
        augmix(torch.rand(2, 3, 8, 8), gen(0), severity=0)
    with pytest.raises(ValueError, match="ops"):
        augmix(torch.rand(2, 3, 8, 8), gen(0), ops=("blur",))
    with pytest.raises(ValueError, match="scale"):
        random_resized_crops(torch.rand(3, 8, 8), 2, gen(0), scale=(0.5, 0.1))


# ----------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    img = rand_image(32)
    cpu = augmix_views(img, 16, gen(3))
    gpu = augmix_views(img.cuda(), 16, gen(3))
    assert gpu.views.is_cuda and torch.equal(gpu.m.cpu(), cpu.m)
    torch.testing.assert_close(gpu.bases.cpu(), cpu.bases, atol=1e-5, rtol=0)
    # quantising ops can flip a level where CPU and GPU round differently: compare almost everywhere
    close = (gpu.views.cpu() - cpu.views).abs() < 1e-4
    assert close.float().mean() > 0.999
    img_g = img.cuda().requires_grad_()
    augmix_views(img_g, 16, gen(3)).views.sum().backward()
    assert torch.isfinite(img_g.grad).all() and img_g.grad.abs().sum() > 0
