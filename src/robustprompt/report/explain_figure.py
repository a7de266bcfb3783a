"""Rendering explanations (robustprompt.explain) as the CBA-FAPT paper's Figure 1(a), for any
image and any run: per model, the clean and the adversarial image with the signed CBA map and the
rollout overlaid, top-5 class probabilities, the textual attribution over the prompt tokens, and
the shift between clean and adversarial maps as numbers. PNG and PDF."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import ConfigError
from ..explain import ImageExplanation, PairExplanation
from .outputs import check_figure_path, figure_base, save_figure

__all__ = ["render", "check_figure_path"]

PANELS = ("clean · CBA map", "clean · rollout", "clean · top-5", "adversarial · CBA map",
          "adversarial · rollout", "adversarial · top-5", "text attribution")


def _up(m: torch.Tensor, size: int) -> np.ndarray:
    return F.interpolate(m[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _show_image(ax, img: torch.Tensor) -> None:
    arr = img.permute(1, 2, 0).clamp(0, 1).numpy()
    ax.imshow(arr, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _cba_overlay(ax, e: ImageExplanation) -> None:
    _show_image(ax, e.image)
    m = _up(e.cba, e.image.shape[-1])
    lim = float(np.abs(m).max()) or 1.0
    # signed: red supports the class, blue suppresses it
    ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55, interpolation="bilinear")


def _rollout_overlay(ax, e: ImageExplanation) -> None:
    _show_image(ax, e.image)
    ax.imshow(_up(e.rollout, e.image.shape[-1]), cmap="inferno", vmin=0, vmax=1, alpha=0.55, interpolation="bilinear")


def _top5(ax, e: ImageExplanation, classnames: Sequence[str], label) -> None:
    k = min(5, len(e.probs))
    p, idx = e.probs.topk(k)
    names = [classnames[i] for i in idx.tolist()][::-1]
    colors = ["#2a9d8f" if (label is not None and i == label) else "#8d99ae" for i in idx.tolist()][::-1]
    ax.barh(range(k), p.numpy()[::-1], color=colors)
    ax.set_yticks([])
    for i, name in enumerate(names):  # names inside the panel: long class names never clip
        ax.text(0.02, i, f"{name}  {p.numpy()[::-1][i]:.2f}", va="center", fontsize=6.5)
    ax.set_xlim(0, 1)
    ax.tick_params(axis="x", labelsize=6)


def _text_bars(ax, pair: PairExplanation) -> None:
    c, a = pair.clean.text.numpy(), pair.adv.text.numpy()
    n = max(len(c), len(a))
    xs = np.arange(n)
    ax.bar(xs[:len(c)] - 0.2, c, width=0.4, color="#457b9d", label="clean")
    ax.bar(xs[:len(a)] + 0.2, a, width=0.4, color="#e63946", label="adversarial")
    tokens = pair.clean.tokens if len(pair.clean.tokens) >= len(pair.adv.tokens) else pair.adv.tokens
    ax.set_xticks(xs)
    ax.set_xticklabels(tokens, rotation=60, ha="right", fontsize=6)
    ax.axhline(0, color="black", lw=0.5)
    ax.tick_params(axis="y", labelsize=6)
    ax.legend(fontsize=6, loc="upper left")


def render(pairs: Sequence[PairExplanation], classnames: Sequence[str], out_path: str | Path, *,
           threat_label: str) -> list[Path]:
    """One row per (image, model). Writes PNG and PDF; returns both paths."""
    if not pairs:
        raise ConfigError("nothing to explain")
    out_path = Path(out_path)
    check_figure_path(out_path)
    rows = len(pairs)
    fig = Figure(figsize=(2.3 * len(PANELS), 2.6 * rows))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, len(PANELS), width_ratios=[1, 1, 1.1, 1, 1, 1.1, 2.2], hspace=0.9, wspace=0.45)
    for r, pair in enumerate(pairs):
        axes = [fig.add_subplot(grid[r, c]) for c in range(len(PANELS))]
        _cba_overlay(axes[0], pair.clean)
        _rollout_overlay(axes[1], pair.clean)
        _top5(axes[2], pair.clean, classnames, pair.label)
        _cba_overlay(axes[3], pair.adv)
        _rollout_overlay(axes[4], pair.adv)
        _top5(axes[5], pair.adv, classnames, pair.label)
        _text_bars(axes[6], pair)
        for c, ax in enumerate(axes):
            ax.set_title(PANELS[c], fontsize=7)
        s = pair.shift
        shift = (f"CBA map shift: ℓ2 {s['cba_l2']:.3g}, rank corr. {s['cba_spearman']:.2f} · rollout shift: ℓ2 "
                 f"{s['rollout_l2']:.3g}, rank corr. {s['rollout_spearman']:.2f}")
        if "text_l2" in s:
            shift += f" · text map shift: ℓ2 {s['text_l2']:.3g}, rank corr. {s['text_spearman']:.2f}"
        truth = f"label {classnames[pair.label]} · " if pair.label is not None else ""
        head = (f"{pair.model} — {truth}clean: {classnames[pair.clean.target]} "
                f"({float(pair.clean.probs.max()):.2f}) → adversarial: {classnames[int(pair.adv.probs.argmax())]} "
                f"({float(pair.adv.probs.max()):.2f})")
        axes[0].text(0, 1.32, head + "\n" + shift, transform=axes[0].transAxes, fontsize=7.5, va="bottom")
    fig.text(0.5, 0.0, f"Clean vs adversarial ({threat_label}). CBA maps: red supports, blue suppresses the "
             f"explained class; rollout: token-gradient reinforced attention; green bar: the true class.",
             fontsize=8.5, ha="center", va="top")
    base = figure_base(out_path)
    return save_figure(fig, [base.with_suffix(".png"), base.with_suffix(".pdf")], dpi=150, bbox_inches="tight")
