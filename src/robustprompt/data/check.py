"""`robustprompt data check`: is a dataset where the loader expects it, complete and readable?

Unlike the loaders (which stop at the first problem), a check lists every problem it finds: a
missing folder or split file (with the exact path expected), images a split lists but the disk
lacks (how many, and the first few), a class count that differs from the benchmark's, and images
that cannot be decoded (a seeded sample per split, or every image with ``full=True``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from robustprompt.data.base import SPLIT_NAMES
from robustprompt.data.coop import SPLIT_JSON_LAYOUTS, build_coop
from robustprompt.data.images import PathLoader, load_rgb
from robustprompt.data.naming import read_lines
from robustprompt.data.registry import FASHION_MNIST, build_dataset, canonical_name
from robustprompt.data.splitfile import read_split_json
from robustprompt.errors import ConfigError, DatasetError

# class counts of the benchmarks as CoOp and the ImageNet-shift papers use them
EXPECTED_CLASSES = {
    "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102, "food101": 101,
    "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101, "fgvc_aircraft": 100, "imagenet": 1000,
    "imagenetv2": 1000, "imagenet_sketch": 1000, "imagenet_a": 200, "imagenet_r": 200, FASHION_MNIST: 10,
}
SAMPLE_PER_SPLIT = 16
SHOW = 5   # missing or unreadable files named per problem


@dataclass
class CheckReport:
    """What ``check_dataset`` found: ``ok`` facts and ``problems`` (empty when the dataset is usable)."""

    dataset: str
    root: Path
    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable report, one finding a line."""
        out = [f"ok: {line}" for line in self.ok] + [f"problem: {line}" for line in self.problems]
        verdict = (f"{self.dataset}: all checks passed" if not self.problems
                   else f"{self.dataset}: {len(self.problems)} problem(s) under {self.root}")
        return out + [verdict]


# one split as the check sees it: (name, image paths or None, a loader index -> image, size)
_SplitView = tuple[str, Optional[list[Path]], Callable[[int], Image.Image], int]


def check_dataset(name: str, root: str | Path, *, full: bool = False, sample: int = SAMPLE_PER_SPLIT,
                  seed: int = 0) -> CheckReport:
    """Check dataset ``name`` under data root ``root``: layout, class count, missing and
    unreadable images (``sample`` seeded images per split are decoded, every one if ``full``)."""
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise ConfigError(f"--sample must be a whole number >= 0, got {str(sample)[:40]}")
    canonical = canonical_name(name)
    root = Path(root).expanduser()
    report = CheckReport(canonical, root)
    if canonical != FASHION_MNIST and not root.is_dir():
        report.problems.append(f"data root not found: {root}")
        return report
    if canonical in SPLIT_JSON_LAYOUTS:
        views, n_classes = _split_json_views(canonical, root, report)
    elif canonical == "fgvc_aircraft":
        views, n_classes = _fgvc_views(root, report)
    else:
        if canonical == "imagenet":
            _imagenet_layout(root, report)
            if report.problems:
                return report
        views, n_classes = _built_views(canonical, root, report)
    if n_classes is not None:
        expected = EXPECTED_CLASSES.get(canonical)
        if expected is not None and n_classes != expected:
            report.problems.append(f"{n_classes} classes found; the {canonical} benchmark has {expected}")
        else:
            report.ok.append(f"{n_classes} classes")
    for view in views:
        _check_split(view, report, full, sample, seed)
    return report


def _split_json_views(name: str, root: Path, report: CheckReport) -> tuple[list[_SplitView], Optional[int]]:
    layout = SPLIT_JSON_LAYOUTS[name]
    base = root / layout.folder
    image_dir = base / layout.image_dir if layout.image_dir else base
    split_path = base / layout.split_file
    for path, what in ((base, "dataset folder"), (image_dir, "image folder")):
        if not path.is_dir():
            report.problems.append(f"{what} not found: {path} (expected {layout.describe(root)})")
    if not split_path.is_file():
        report.problems.append(f"split file not found: {split_path} (CoOp's {layout.split_file}; "
                               f"`robustprompt data prepare --dataset {name}` says where to get it)")
    if report.problems:
        return [], None
    try:
        entries, names = read_split_json(split_path)
    except DatasetError as exc:
        report.problems.append(str(exc))
        return [], None
    report.ok.append(f"split file {split_path}")
    return [_path_view(s, [image_dir / rel for rel, _ in entries[s]]) for s in SPLIT_NAMES], len(names)


def _fgvc_views(root: Path, report: CheckReport) -> tuple[list[_SplitView], Optional[int]]:
    base = root / "fgvc_aircraft"
    needed = [base / "images", base / "variants.txt", *(base / f"images_variant_{s}.txt" for s in SPLIT_NAMES)]
    for path in needed:
        if not path.exists():
            report.problems.append(f"not found: {path} (FGVC-Aircraft 2013b's data/ folder, as {base})")
    if report.problems:
        return [], None
    try:
        classes = [text for _, text in read_lines(base / "variants.txt", "class list")]
        views = []
        for s in SPLIT_NAMES:
            rows = read_lines(base / f"images_variant_{s}.txt", "split file")
            views.append(_path_view(s, [base / "images" / f"{t.partition(' ')[0]}.jpg" for _, t in rows]))
    except DatasetError as exc:
        report.problems.append(str(exc))
        return [], None
    return views, len(classes)


def _imagenet_layout(root: Path, report: CheckReport) -> None:
    """Class folders of ImageNet's train and val listed against classnames.txt, all at once."""
    base = root / "imagenet"
    names_file = base / "classnames.txt"
    if not names_file.is_file():
        report.problems.append(f"not found: {names_file} (lines '<wnid> <class name>' in label order)")
        return
    wnids = [text.partition(" ")[0] for _, text in read_lines(names_file, "class-name file")]
    for folder in ("train", "val"):
        split_dir = base / "images" / folder
        if not split_dir.is_dir():
            report.problems.append(f"not found: {split_dir} (one folder per wnid)")
            continue
        missing = [w for w in wnids if not (split_dir / w).is_dir()]
        if missing:
            report.problems.append(f"{len(missing)} of {len(wnids)} class folders missing in {split_dir} "
                                   f"(first: {', '.join(missing[:SHOW])})")


def _built_views(name: str, root: Path, report: CheckReport) -> tuple[list[_SplitView], Optional[int]]:
    try:
        # build_coop, not build_dataset: its errors would point back to this check
        dataset = build_dataset(name, root) if name == FASHION_MNIST else build_coop(name, root)
    except DatasetError as exc:
        report.problems.append(str(exc))
        return [], None
    views = []
    for split_name, split in dataset.splits.items():
        paths = [Path(p) for p in split.load.paths] if isinstance(split.load, PathLoader) else None
        views.append((split_name, paths, split.load, len(split)))
    return views, dataset.num_classes


def _path_view(split: str, paths: list[Path]) -> _SplitView:
    return split, paths, lambda i: load_rgb(paths[i]), len(paths)


def _check_split(view: _SplitView, report: CheckReport, full: bool, sample: int, seed: int) -> None:
    name, paths, load, n = view
    if n == 0:
        report.problems.append(f"split {name!r} lists no images")
        return
    present = list(range(n))
    if paths is not None:
        missing = [i for i in range(n) if not paths[i].is_file()]
        if missing:
            shown = ", ".join(str(paths[i]) for i in missing[:SHOW])
            report.problems.append(f"split {name!r}: {len(missing)} of {n} images missing (first: {shown})")
            gone = set(missing)
            present = [i for i in present if i not in gone]
    chosen = present if full else sorted(random.Random(seed).sample(present, min(sample, len(present))))
    bad = []
    for i in chosen:
        try:
            load(i)
        except DatasetError as exc:
            bad.append(str(exc))
    if bad:
        report.problems.append(f"split {name!r}: {len(bad)} of {len(chosen)} images checked are unreadable "
                               f"(first: {bad[0]})")
    else:
        what = "all decoded" if full else f"{len(chosen)} sampled decoded"
        report.ok.append(f"split {name!r}: {n} images, {n - (n - len(present))} on disk, {what}")
