"""Batched test-time views (TPT / R-TPT / A-TPT): random resized crops, AugMix, attention-guided mixing.

All views of one image are built with a fixed number of batched tensor calls (no loop over views),
on the image's device, in floating point, and differentiably where the op allows it. Random
parameters are drawn on the CPU from the caller's per-image ``torch.Generator`` only, so an image's
views depend on nothing else.

Coordinates: pixel ``i`` covers the continuous interval ``[i, i + 1)`` (centre ``i + 0.5``), origin at
the top-left corner, y pointing down — the convention of PIL's affine transforms, which AugMix uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ArrayLike = Union[np.ndarray, Tensor, Sequence[float]]

AUGMIX_OPS = (
    "autocontrast",
    "equalize",
    "posterize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)

_CODE = {name: i for i, name in enumerate(AUGMIX_OPS)}
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_GEOMETRIC_CODES = tuple(_CODE[name] for name in _GEOMETRIC)
_PIXEL_OPS = ("autocontrast", "equalize", "posterize", "solarize")
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes before its fallback


@dataclass
class Views:
    """Views of one image (V views, V-1 augmented). Shapes V×3×S×S in [0, 1].

    views: final views; ``views[0]`` is the input image itself.
    bases: crop+flip bases b_j; ``bases[0]`` is the input image.
    mixes: AugMix chain mixtures mix_j (None without AugMix); row 0 is the image.
    m: V mixing weights m_j ~ Beta(1, 1) (None without AugMix); ``m[0] = 1``.
    """

    views: Tensor
    bases: Tensor
    mixes: Optional[Tensor]
    m: Optional[Tensor]


# ----------------------------------------------------------------------------- validation


def _check_image(image: Tensor) -> int:
    if not isinstance(image, Tensor):
        raise ValueError(f"image must be a torch.Tensor of shape 3×S×S, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2] or image.shape[1] < 1:
        raise ValueError(f"image must have shape 3×S×S (one square RGB image), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a floating-point tensor with values in [0, 1], got {image.dtype}")
    return int(image.shape[1])


def _check_batch(x: Tensor, name: str) -> int:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape n×3×S×S, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor with values in [0, 1], got {x.dtype}")
    return int(x.shape[2])


def _check_generator(gen: torch.Generator) -> None:
    if not isinstance(gen, torch.Generator):
        raise ValueError(f"gen must be a torch.Generator, got {type(gen).__name__}")
    if gen.device.type != "cpu":
        raise ValueError(
            f"gen must be a CPU torch.Generator (parameters are drawn on the CPU), got one on {gen.device}"
        )


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from None
    if not (0.0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"{name} must satisfy 0 < low <= high < inf, got {value!r}")
    return lo, hi


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- crops


def random_resized_crops(
    image: Tensor,
    n: int,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> Tensor:
    """``n`` random resized crops (+ random horizontal flips) of one image, in one grid_sample.

    image: 3×S×S. Returns n×3×S×S. Box sampling follows torchvision's RandomResizedCrop: up to 10
    attempts with area ~ U(scale)·S² and log-uniform aspect ratio in ``ratio``, integer box sizes,
    uniform integer position; if no attempt fits, a centre crop clamped to the ratio range. The box
    is resized to S×S with bilinear interpolation (align_corners=False, samples clamped to the box
    as in F.interpolate of the cropped tensor), then mirrored with probability 0.5 when ``flip``.
    """
    size = _check_image(image)
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be a non-negative integer number of crops, got {n!r}")
    _check_generator(gen)
    s_lo, s_hi = _check_range("scale", scale)
    r_lo, r_hi = _check_range("ratio", ratio)
    if n == 0:
        return image.new_empty((0, 3, size, size))

    # parameters are tiny: do the bookkeeping in numpy (host overhead, not pixels, dominates here)
    full = float(size)
    u = torch.rand(n, 2 * _CROP_ATTEMPTS + 3, generator=gen, dtype=torch.float64).numpy()
    u_area, u_ratio = u[:, :_CROP_ATTEMPTS], u[:, _CROP_ATTEMPTS:2 * _CROP_ATTEMPTS]
    u_top, u_left, u_flip = u[:, -3], u[:, -2], u[:, -1]
    target = full * full * (s_lo + (s_hi - s_lo) * u_area)
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w_try = np.round(np.sqrt(target * aspect))  # half-to-even, as Python's round in torchvision
    h_try = np.round(np.sqrt(target / aspect))
    fits = (w_try > 0) & (w_try <= full) & (h_try > 0) & (h_try <= full)
    first = fits.argmax(axis=1)  # first fitting attempt
    any_fit = fits.any(axis=1)

    # torchvision's fallback for a square image (input ratio 1): centre crop clamped to the ratio range
    if 1.0 < r_lo:
        fb_w, fb_h = full, float(round(full / r_lo))
    elif 1.0 > r_hi:
        fb_w, fb_h = float(round(full * r_hi)), full
    else:
        fb_w, fb_h = full, full
    rows = np.arange(n)
    w = np.where(any_fit, w_try[rows, first], fb_w)
    h = np.where(any_fit, h_try[rows, first], fb_h)
    top = np.minimum(np.floor(u_top * (full - h + 1)), full - h)
    left = np.minimum(np.floor(u_left * (full - w + 1)), full - w)
    top = np.where(any_fit, top, np.floor((full - h) / 2))
    left = np.where(any_fit, left, np.floor((full - w) / 2))
    mirror = np.where(u_flip < 0.5, -1.0, 1.0) if flip else np.ones(n)

    # normalised output u ∈ [-1, 1] → input x = (2·left + w)/S - 1 + u·w/S (u mirrored by the sign)
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0] = mirror * w / full
    theta[:, 0, 2] = (2 * left + w) / full - 1
    theta[:, 1, 1] = h / full
    theta[:, 1, 2] = (2 * top + h) / full - 1
    # a resize of the cropped tensor clamps source coordinates to the crop's edge pixel centres;
    # without this the outermost half pixel would blend in neighbours from outside the box
    lo = np.stack([(2 * left + 1) / full - 1, (2 * top + 1) / full - 1], axis=1)
    hi = np.stack([(2 * (left + w) - 1) / full - 1, (2 * (top + h) - 1) / full - 1], axis=1)
    packed = _to_device(torch.from_numpy(np.concatenate([theta.ravel(), lo.ravel(), hi.ravel()])), image)
    theta_d = packed[: 6 * n].view(n, 2, 3)
    bounds = packed[6 * n:].view(2, n, 1, 1, 2)
    grid = F.affine_grid(theta_d, [n, 3, size, size], align_corners=False)
    grid = torch.clamp(grid, bounds[0], bounds[1])
    batch = image.unsqueeze(0).expand(n, -1, -1, -1)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- AugMix ops


def _to_device(t: Tensor, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Move a small CPU parameter tensor to ``like``'s device (and ``like``'s dtype unless given).

    The cast happens on the CPU and the copy is non-blocking, so the host never waits for the GPU.
    """
    t = t.to(dtype=dtype or like.dtype)
    if t.device == like.device:
        return t
    if t.device.type == "cpu" and like.device.type == "cuda":
        t = t.pin_memory()  # the caching host allocator keeps the block until the copy has run
    return t.to(device=like.device, non_blocking=True)


def _quantise(x: Tensor) -> Tensor:
    """Float image in [0, 1] → integer levels 0..255 (int64), as ``mul(255).byte()`` does."""
    return torch.floor(x.detach() * 255).clamp_(0, 255).to(torch.int64)


def _straight_through(x: Tensor, y: Tensor) -> Tensor:
    """Forward value ``y``, gradient of the identity w.r.t. ``x``."""
    return x + (y - x).detach()


def _clip_rounding(x: Tensor) -> Tensor:
    """Clamp to [0, 1] with the identity gradient: only float rounding of convex mixes goes outside,
    and a plain clamp would zero the gradient of every pixel that rounds to 1 + ulp."""
    return x + (x.clamp(0, 1) - x).detach()


def _autocontrast(x: Tensor) -> Tensor:
    """Per-image, per-channel min/max stretch to [0, 1]; constant channels unchanged. x: K×3×S×S."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    spread = hi > lo
    # a safe denominator keeps the unused branch of where() finite so its zero gradient stays zero
    denom = torch.where(spread, hi - lo, torch.ones_like(hi))
    return torch.where(spread, (x - lo) / denom, x)


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` (K,) of the 8-bit level of each pixel (straight-through). x: K×3×S×S."""
    q = _quantise(x)
    step = _to_device(torch.pow(2, 8 - bits.to(torch.int64)), x, torch.int64).view(-1, 1, 1, 1)
    out = (torch.div(q, step, rounding_mode="floor") * step).to(x.dtype) / 255
    return _straight_through(x, out)


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert (1 - x) pixels whose 8-bit level is ≥ ``threshold`` (K,) (straight-through). x: K×3×S×S."""
    q = _quantise(x)
    invert = q >= _to_device(threshold.to(torch.int64), x, torch.int64).view(-1, 1, 1, 1)
    return _straight_through(x, torch.where(invert, 1 - x, x))


def _equalize(x: Tensor) -> Tensor:
    """Per-image, per-channel histogram equalisation on 256 levels, PIL's rule (straight-through).

    x: K×3×S×S. Histograms of all K·3 channels come from one scatter-add.
    """
    k, c, hgt, wid = x.shape
    q = _quantise(x).view(k * c, hgt * wid)
    hist = torch.zeros(k * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, q, torch.ones_like(q))
    levels = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, levels, torch.zeros_like(levels)).amax(dim=1, keepdim=True)
    step = torch.div(hist.sum(dim=1, keepdim=True) - hist.gather(1, last), 255, rounding_mode="floor")
    safe = torch.where(step > 0, step, torch.ones_like(step))
    below = torch.cumsum(hist, dim=1) - hist  # pixels strictly below each level
    lut = torch.div(below + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = lut.clamp_(max=255)
    lut = torch.where(step > 0, lut, levels.expand_as(lut))  # PIL leaves near-constant channels alone
    out = lut.gather(1, q).view(k, c, hgt, wid).to(x.dtype) / 255
    return _straight_through(x, out)


def _geometric_theta(code: ArrayLike, value: ArrayLike, size: int) -> np.ndarray:
    """affine_grid matrices (K×2×3, float64 numpy) for geometric AugMix ops on S×S images.

    code: (K,) indices into AUGMIX_OPS (geometric ones); value: (K,) signed parameter — degrees for
    rotate (counter-clockwise on screen, about the centre, as PIL), factor for shear_x / shear_y
    (PIL's: source x = x + s·y about the top-left corner), pixels for translate_x / translate_y
    (content moves by +value). Each maps an output pixel position p to the source A·p + b.
    """
    code = np.asarray(code, dtype=np.int64)
    value = np.asarray(value, dtype=np.float64)
    half = size / 2.0
    rad = np.deg2rad(value)
    cos, sin = np.cos(rad), np.sin(rad)
    is_rot = code == _CODE["rotate"]
    a00 = np.where(is_rot, cos, 1.0)
    a11 = np.where(is_rot, cos, 1.0)
    a01 = np.where(is_rot, -sin, np.where(code == _CODE["shear_x"], value, 0.0))
    a10 = np.where(is_rot, sin, np.where(code == _CODE["shear_y"], value, 0.0))
    b0 = np.where(code == _CODE["translate_x"], -value, 0.0)
    b1 = np.where(code == _CODE["translate_y"], -value, 0.0)
    # rotation about the centre c: b = c - A·c
    b0 = np.where(is_rot, half - (a00 + a01) * half, b0)
    b1 = np.where(is_rot, half - (a10 + a11) * half, b1)
    # pixel p = (u + 1)·S/2 for normalised u, so u_in = A·u_out + A·1 + b/(S/2) - 1
    row0 = np.stack([a00, a01, a00 + a01 + b0 / half - 1], axis=-1)
    row1 = np.stack([a10, a11, a10 + a11 + b1 / half - 1], axis=-1)
    return np.stack([row0, row1], axis=-2)


def _warp(x: Tensor, theta: Union[Tensor, np.ndarray]) -> Tensor:
    """Bilinear warp of x (K×3×S×S) by affine_grid matrices theta (K×2×3), black outside."""
    theta = _to_device(torch.as_tensor(theta), x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _op_values(code: ArrayLike, level: ArrayLike, sign: ArrayLike, size: int) -> np.ndarray:
    """AugMix's parameter of each op at each level (float64 numpy, same shape as code).

    int_parameter(L, max) = int(L·max/10), float_parameter(L, max) = L·max/10; geometric ops get a
    random sign. posterize → bits kept, solarize → threshold level, others → degrees/factor/pixels.
    """
    code = np.asarray(code, dtype=np.int64)
    level = np.asarray(level, dtype=np.float64)
    sign = np.asarray(sign, dtype=np.float64)

    def int_param(maxval: float) -> np.ndarray:
        return np.floor(level * maxval / 10)

    value = np.zeros_like(level)
    value = np.where(code == _CODE["posterize"], 4 - int_param(4), value)
    value = np.where(code == _CODE["solarize"], 256 - int_param(256), value)
    value = np.where(code == _CODE["rotate"], sign * int_param(30), value)
    shear = (code == _CODE["shear_x"]) | (code == _CODE["shear_y"])
    value = np.where(shear, sign * level * 0.3 / 10, value)
    translate = (code == _CODE["translate_x"]) | (code == _CODE["translate_y"])
    value = np.where(translate, sign * int_param(size / 3), value)
    return value


def _dirichlet_ones(n: int, k: int, gen: torch.Generator) -> Tensor:
    """n draws of Dirichlet(1, …, 1) over k components (n×k, float64): normalised Exp(1) variables."""
    e = -torch.log1p(-torch.rand(n, k, generator=gen, dtype=torch.float64))
    e = e.clamp_min(1e-300)  # u = 0 gives e = 0; keep every draw normalisable
    return e / e.sum(dim=1, keepdim=True)


def augmix(
    bases: Tensor,
    gen: torch.Generator,
    severity: int = 1,
    width: int = 3,
    depth: tuple[int, int] = (1, 3),
    ops: Sequence[str] = AUGMIX_OPS,
) -> tuple[Tensor, Tensor]:
    """AugMix chain mixtures of a batch of bases.

    bases: n×3×S×S in [0, 1]. Returns ``(mix, m)``: mix n×3×S×S = Σ_i w_i·chain_i(b) with
    w ~ Dirichlet(1, …, 1) over ``width`` chains, and m (n,) ~ Beta(1, 1), on the bases' device and
    dtype. Each chain applies d ~ U{depth[0]..depth[1]} ops drawn uniformly from ``ops``, each at a
    level ~ U(0.1, severity). mix is NOT yet mixed with the base (that is m·b + (1-m)·mix).
    """
    size = _check_batch(bases, "bases")
    _check_generator(gen)
    if not _is_int(severity) or not 1 <= severity <= 10:
        raise ValueError(f"severity must be an integer in 1..10 (AugMix's level scale), got {severity!r}")
    if not _is_int(width) or width < 1:
        raise ValueError(f"width must be a positive integer number of chains, got {width!r}")
    if (
        not isinstance(depth, (tuple, list))
        or len(depth) != 2
        or not all(_is_int(d) for d in depth)
        or not 1 <= depth[0] <= depth[1]
    ):
        raise ValueError(f"depth must be a pair of integers (low, high) with 1 <= low <= high, got {depth!r}")
    ops = tuple(ops)
    unknown = [o for o in ops if o not in _CODE]
    if not ops or unknown:
        raise ValueError(f"ops must be a non-empty subset of {AUGMIX_OPS}, got {ops!r}")

    n = int(bases.shape[0])
    pairs = n * width  # pair p = view p // width, chain p % width
    d_max = depth[1]
    # all draws have fixed shapes, so the generator's stream never depends on what was drawn
    chain_depth = torch.randint(depth[0], depth[1] + 1, (pairs,), generator=gen).numpy()
    choice = torch.randint(0, len(ops), (pairs, d_max), generator=gen).numpy()
    u = torch.rand(pairs, 2 * d_max, generator=gen, dtype=torch.float64).numpy()
    weights = _dirichlet_ones(n, width, gen)
    m = torch.rand(n, generator=gen, dtype=torch.float64)
    code = np.array([_CODE[o] for o in ops], dtype=np.int64)[choice]
    level = 0.1 + (severity - 0.1) * u[:, :d_max]
    sign = np.where(u[:, d_max:] < 0.5, -1.0, 1.0)
    value = _op_values(code, level, sign, size)
    is_geometric = np.isin(code, _GEOMETRIC_CODES)

    # Plan every step on the host, then send all row indices and op parameters in two copies.
    ints: list[np.ndarray] = []
    floats: list[np.ndarray] = [weights.numpy().ravel(), m.numpy()]
    sizes = {"int": 0, "float": n * width + n}

    def push(chunks: list[np.ndarray], kind: str, arr: np.ndarray) -> tuple[int, int]:
        chunks.append(arr.ravel())
        start = sizes[kind]
        sizes[kind] += arr.size
        return start, sizes[kind]

    plan: list[list[tuple[str, tuple[int, int], tuple[int, int]]]] = []
    for step in range(d_max):
        active = chain_depth > step
        entries = []
        for name in ("geometric",) + _PIXEL_OPS:
            mask = is_geometric[:, step] if name == "geometric" else code[:, step] == _CODE[name]
            rows = np.flatnonzero(active & mask)
            if rows.size == 0:
                continue
            span = push(ints, "int", rows)
            param = (0, 0)
            if name == "geometric":
                param = push(floats, "float", _geometric_theta(code[rows, step], value[rows, step], size))
            elif name in ("posterize", "solarize"):  # bits kept / threshold level
                param = push(ints, "int", value[rows, step].astype(np.int64))
            entries.append((name, span, param))
        plan.append(entries)
    float_d = _to_device(torch.from_numpy(np.concatenate(floats)), bases)
    int_d = _to_device(torch.from_numpy(np.concatenate(ints or [np.zeros(0, np.int64)])), bases, torch.int64)

    x = bases.repeat_interleave(width, dim=0)
    for entries in plan:
        if not entries:
            break
        results = []  # (rows, new values); row sets are disjoint and all read this step's x
        for name, (r0, r1), (p0, p1) in entries:
            idx = int_d[r0:r1]
            sub = x[idx]
            if name == "geometric":
                out = _warp(sub, float_d[p0:p1].view(-1, 2, 3))
            elif name == "autocontrast":
                out = _autocontrast(sub)
            elif name == "equalize":
                out = _equalize(sub)
            elif name == "posterize":
                out = _posterize(sub, int_d[p0:p1])
            else:
                out = _solarize(sub, int_d[p0:p1])
            results.append((idx, out))
        # one copy of the batch per step, then in-place row writes (autograd-safe on the fresh clone)
        x = x.clone()
        for idx, out in results:
            x[idx] = out

    w = float_d[: n * width].view(n, width, 1, 1, 1)
    mix = _clip_rounding((w * x.view(n, width, 3, size, size)).sum(dim=1))
    return mix, float_d[n * width: n * width + n]


# ----------------------------------------------------------------------------- views


def augmix_views(
    image: Tensor,
    n_views: int,
    gen: torch.Generator,
    *,
    use_augmix: bool = True,
    severity: int = 1,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> Views:
    """TPT's views of one image: the image itself, then n_views - 1 augmented views.

    image: 3×S×S in [0, 1]. Row 0 of every field is the image (m[0] = 1). Rows 1..: b_j = random
    resized crop + flip, (mix_j, m_j) = augmix(b_j), view_j = m_j·b_j + (1 - m_j)·mix_j. With
    ``use_augmix=False`` the views are the bases (TPT's choice for ImageNet-family sets) and
    mixes = m = None. crop_scale: the crops' area range (TPT: torchvision's default 0.08–1). All
    fields are V×3×S×S (m: V) on the image's device and dtype.
    """
    size = _check_image(image)
    if not _is_int(n_views) or n_views < 1:
        raise ValueError(f"n_views must be a positive integer (the image counts as view 0), got {n_views!r}")
    _check_generator(gen)
    first = image.unsqueeze(0)
    crops = random_resized_crops(image, n_views - 1, gen, scale=crop_scale)
    bases = torch.cat([first, crops], dim=0)
    if not use_augmix:
        return Views(views=bases, bases=bases, mixes=None, m=None)
    if n_views > 1:
        mix, m = augmix(crops, gen, severity=severity)
    else:
        mix, m = image.new_empty((0, 3, size, size)), image.new_empty((0,))
    m_col = m.view(-1, 1, 1, 1)
    augmented = _clip_rounding(m_col * crops + (1 - m_col) * mix)
    return Views(
        views=torch.cat([first, augmented], dim=0),
        bases=bases,
        mixes=torch.cat([first, mix], dim=0),
        m=torch.cat([m.new_ones(1), m], dim=0),
    )


MixSource = Literal["chain", "augmix"]
MIX_SOURCES = ("chain", "augmix")


def attention_guided_views(
    views: Views,
    maps: Tensor,
    *,
    ratio: float = 0.2,
    m_high: float = 0.2,
    m_low: float = 0.8,
    mix_source: MixSource = "chain",
) -> Tensor:
    """A-TPT's spatially varying mix of each clean base b_j with its augmentation.

    maps: V×S×S attention maps of the bases (higher = more important). Per view the top
    ceil(ratio·S·S) pixels (ties broken by lower flat index) get λ = m_high, the rest λ = m_low
    (λ = the weight of the augmentation, so m_high < m_low keeps the salient part closer to the
    base), and the view is x_j = (1 - λ)⊙b_j + λ⊙a_j with, by ``mix_source``:

    - ``"chain"`` (default, the released code): a_j = mix_j, AugMix's chain mixture *before* its
      own Beta blend with the base. The code writes it as m_map⊙b + (1 - m_map)⊙mix with the base
      weight m_map = 0.8 / 0.2 (high / low attention), i.e. λ = 1 - m_map = 0.2 / 0.8 here.
    - ``"augmix"``: a_j = m_j·b_j + (1 - m_j)·mix_j, the finished AugMix view — the paper's text
      ("aggressive views x̃_i via AugMix", x_i = (1-λ)⊙b_i + λ⊙x̃_i) read literally. The
      finished view already holds m_j ~ Beta(1,1) of the base, so the effective weight of mix_j
      is λ·(1 - m_j): 0.4 instead of 0.8 on average in low-attention pixels.

    Returns V×3×S×S on the bases' device and dtype; row 0 is the image itself. Differentiable
    in the views; the maps only select pixels (no gradient).
    """
    if not isinstance(views, Views):
        raise ValueError(f"views must be a Views, got {type(views).__name__}")
    if views.mixes is None or views.m is None:
        raise ValueError(
            "attention_guided_views needs AugMix views (views.mixes and views.m); build them with use_augmix=True"
        )
    if mix_source not in MIX_SOURCES:
        raise ValueError(f"mix_source must be one of {MIX_SOURCES}, got {mix_source!r}")
    n, _, size, _ = views.bases.shape
    if not isinstance(maps, Tensor) or tuple(maps.shape) != (n, size, size):
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must have shape V×S×S = {(n, size, size)} (one map per view), got {shape}")
    ratio, m_high, m_low = float(ratio), float(m_high), float(m_low)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1] (fraction of pixels marked high-attention), got {ratio}")
    for name, value in (("m_high", m_high), ("m_low", m_low)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] (weight of the augmentation), got {value}")

    bases = views.bases
    lam = _attention_lambda(maps, ratio, m_high, m_low, like=bases)
    if mix_source == "chain":
        target = views.mixes
    else:
        m = views.m.to(bases.dtype).view(n, 1, 1, 1)
        target = m * bases + (1 - m) * views.mixes
    out = _clip_rounding((1 - lam) * bases + lam * target)
    return torch.cat([bases[:1], out[1:]], dim=0)


def _attention_lambda(maps: Tensor, ratio: float, m_high: float, m_low: float, like: Tensor) -> Tensor:
    """V×1×S×S augmentation weights (``like``'s dtype and device): m_high on each map's top
    ceil(ratio·S²) pixels, m_low elsewhere."""
    n, size, _ = maps.shape
    count = math.ceil(ratio * size * size - 1e-9)  # 0.07·100² is 700.0000000000001 in floats
    order = torch.sort(maps.detach().reshape(n, -1), dim=1, descending=True, stable=True).indices
    high = torch.zeros(n, size * size, dtype=torch.bool, device=maps.device)
    high.scatter_(1, order[:, :count], True)
    lam = torch.full((n, size * size), m_low, dtype=like.dtype, device=like.device)
    return lam.masked_fill(high.to(like.device), m_high).view(n, 1, size, size)
