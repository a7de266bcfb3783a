"""Image -> tensor transforms for CLIP-style models. No mean/std normalisation: the model does it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

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


RESIZE_MODES = ("shortest", "longest", "squash")   # open_clip's PreprocessCfg.resize_mode values
DATA_RESIZE_MODES = ("auto", *RESIZE_MODES)          # data.resize_mode: auto = the backbone's own


class ResizeLongestAndPad:
    """open_clip's ``longest`` resize mode: scale the image so that its LONGER side is ``size``
    (aspect kept), then centre it on a ``size`` × ``size`` canvas padded with ``fill``.

    The scale follows open_clip's ResizeKeepRatio(longest=1): ratio = max(h/size, w/size), new
    sides round(h/ratio), round(w/ratio); the pad puts the odd pixel on the right/bottom, as its
    center_crop_or_pad does (then a centre crop, a no-op unless rounding overshoots)."""

    def __init__(self, size: int, interpolation: InterpolationMode, fill: int | tuple[int, ...] = 0) -> None:
        self.size, self.interpolation, self.fill = size, interpolation, fill

    def __call__(self, image: Image.Image) -> Image.Image:
        import torchvision.transforms.functional as F

        w, h = image.size
        ratio = max(h / self.size, w / self.size)
        new_h, new_w = round(h / ratio), round(w / ratio)
        image = F.resize(image, [new_h, new_w], self.interpolation, antialias=True)
        pad_w, pad_h = max(self.size - new_w, 0), max(self.size - new_h, 0)
        if pad_w or pad_h:
            image = F.pad(image, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=self.fill)
        return F.center_crop(image, [self.size, self.size])

    def __repr__(self) -> str:
        return f"ResizeLongestAndPad(size={self.size}, interpolation={self.interpolation.value}, fill={self.fill})"


def clip_transform(
    image_size: int, interpolation: str = "bicubic", train: bool = False, resize_mode: str = "shortest",
    fill_color: int | tuple[int, ...] = 0,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor 3 x image_size x image_size in [0, 1].

    Eval (train=False), by ``resize_mode`` (open_clip's preprocess modes):
      - ``shortest``: resize the shorter side to ``image_size`` (aspect kept), then centre-crop —
        CLIP's preprocessing and Dassl's test transform (what FAP/MaPLe evaluate with);
      - ``squash``: resize both sides straight to ``image_size`` × ``image_size`` (aspect not
        kept, nothing cropped) — Dassl's *training* transform when INPUT.TRANSFORMS is empty,
        as in FAP's released configs, and SigLIP's preprocessing;
      - ``longest``: resize the longer side to ``image_size`` (aspect kept), then pad to a square
        with ``fill_color`` (0-255) — nothing cropped.
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
                          "(shortest: shorter side + centre crop; squash: both sides to the size; "
                          "longest: longer side + pad)")
    if train:
        steps = [
            ToRGB(),
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=mode, antialias=True),
            T.RandomHorizontalFlip(),
        ]
    elif resize_mode == "squash":
        steps = [ToRGB(), T.Resize((image_size, image_size), interpolation=mode, antialias=True)]
    elif resize_mode == "longest":
        steps = [ToRGB(), ResizeLongestAndPad(image_size, mode, check_fill_color(fill_color))]
    else:
        steps = [
            ToRGB(),
            T.Resize(image_size, interpolation=mode, antialias=True),
            T.CenterCrop(image_size),
        ]
    return T.Compose(steps + [T.ToTensor()])


def check_fill_color(fill: object) -> int | tuple[int, ...]:
    """A pad colour: one integer 0-255 (grey level) or three (RGB)."""
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255  # noqa: E731
    if ok(fill):
        return fill  # type: ignore[return-value]
    if isinstance(fill, (list, tuple)) and len(fill) == 3 and all(ok(v) for v in fill):
        return tuple(fill)  # type: ignore[arg-type]
    raise ConfigError(f"fill_color must be an integer 0-255 or three of them, got {fill!r:.60}")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input: a backbone's open_clip preprocess config without
    mean/std (the classifier normalises). ``interpolation`` is one of bicubic, bilinear, nearest,
    lanczos; ``resize_mode`` one of RESIZE_MODES; ``fill_color`` the pad of ``longest``."""

    image_size: int
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int | tuple[int, ...] = 0

    def forced(self, resize_mode: Optional[str] = "auto", interpolation: Optional[str] = None) -> "Preprocess":
        """This preprocessing with a data config's choices laid over it: resize_mode "auto" (or
        None) keeps the backbone's own; interpolation None keeps the backbone's."""
        if resize_mode not in (None, *DATA_RESIZE_MODES):
            raise ConfigError(f"data.resize_mode must be one of {', '.join(DATA_RESIZE_MODES)}, "
                              f"got {resize_mode!r:.60}")
        changes: dict[str, Any] = {}
        if resize_mode not in (None, "auto"):
            changes["resize_mode"] = resize_mode
        if interpolation is not None:
            changes["interpolation"] = interpolation
        return replace(self, **changes) if changes else self

    def transform(self, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image → 3×S×S tensor in [0, 1] (see clip_transform)."""
        return clip_transform(self.image_size, self.interpolation, train=train, resize_mode=self.resize_mode,
                              fill_color=self.fill_color)

    def to_dict(self) -> dict[str, Any]:
        fill = list(self.fill_color) if isinstance(self.fill_color, tuple) else self.fill_color
        return {"image_size": self.image_size, "interpolation": self.interpolation,
                "resize_mode": self.resize_mode, "fill_color": fill}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocess":
        fill = data.get("fill_color", 0)
        return cls(int(data["image_size"]), str(data.get("interpolation", "bicubic")),
                   str(data.get("resize_mode", "shortest")), tuple(fill) if isinstance(fill, list) else fill)
