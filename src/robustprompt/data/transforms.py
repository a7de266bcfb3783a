"""Image -> tensor transforms for CLIP-style models. No mean/std normalisation: the model does it."""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from robustprompt.errors import ConfigError

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


class ToRGB:
    """Convert any PIL image to 8-bit RGB (grey-scale, palette and RGBA images occur in the wild;
    16-bit, 32-bit and float images are scaled, not clipped: see data/images.py)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        from robustprompt.data.images import to_rgb8

        return to_rgb8(image)

    def __repr__(self) -> str:
        return "ToRGB()"


RESIZE_MODES = ("shortest", "squash")


def clip_transform(
    image_size: int, interpolation: str = "bicubic", train: bool = False, resize_mode: str = "shortest"
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor 3 x image_size x image_size in [0, 1].

    Eval (train=False), by ``resize_mode``:
      - ``shortest``: resize the shorter side to ``image_size`` (aspect kept), then centre-crop —
        CLIP's preprocessing and Dassl's test transform (what FAP/MaPLe evaluate with);
      - ``squash``: resize both sides straight to ``image_size`` × ``image_size`` (aspect not
        kept, nothing cropped) — Dassl's *training* transform when INPUT.TRANSFORMS is empty,
        as in FAP's released configs.
    Train (train=True): RandomResizedCrop(scale 0.08-1) and a random horizontal flip (CoOp's
    augmentation; ``resize_mode`` does not apply).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    mode = _INTERPOLATIONS.get(str(interpolation).lower())
    if mode is None:
        raise ConfigError(
            f"unknown interpolation {interpolation!r}; choose one of {', '.join(_INTERPOLATIONS)}"
        )
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(f"unknown resize_mode {resize_mode!r}; choose one of {', '.join(RESIZE_MODES)} "
                          "(shortest: shorter side + centre crop; squash: both sides to the size)")
    if train:
        steps = [
            ToRGB(),
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=mode, antialias=True),
            T.RandomHorizontalFlip(),
        ]
    elif resize_mode == "squash":
        steps = [ToRGB(), T.Resize((image_size, image_size), interpolation=mode, antialias=True)]
    else:
        steps = [
            ToRGB(),
            T.Resize(image_size, interpolation=mode, antialias=True),
            T.CenterCrop(image_size),
        ]
    return T.Compose(steps + [T.ToTensor()])
