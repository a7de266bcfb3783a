"""The CoOp benchmark datasets under one data root: split-json sets, FGVC-Aircraft, and the
name table that also routes the ImageNet family (see imagenet.py)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from robustprompt.data import imagenet
from robustprompt.data.base import SPLIT_NAMES, Dataset, Split
from robustprompt.data.images import PathLoader
from robustprompt.data.naming import read_lines, readable
from robustprompt.data.splitfile import read_split_json
from robustprompt.errors import DatasetError


@dataclass(frozen=True)
class SplitJsonLayout:
    """Where one split-json dataset lives under the data root."""

    name: str
    folder: str       # dataset directory under the data root
    image_dir: str    # image directory relative to ``folder``; "" means ``folder`` itself
    split_file: str   # split json relative to ``folder``
    template: str

    def describe(self, root: Path) -> str:
        images = (root / self.folder / self.image_dir).as_posix().rstrip("/")
        split_file = (root / self.folder / self.split_file).as_posix()
        return f"images under {images}/ and the split file {split_file} (the CoOp layout)"


SPLIT_JSON_LAYOUTS: dict[str, SplitJsonLayout] = {
    layout.name: layout
    for layout in [
        SplitJsonLayout("caltech101", "caltech-101", "101_ObjectCategories",
                        "split_zhou_Caltech101.json", "a photo of a {}."),
        SplitJsonLayout("oxford_pets", "oxford_pets", "images",
                        "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
        SplitJsonLayout("stanford_cars", "stanford_cars", "",
                        "split_zhou_StanfordCars.json", "a photo of a {}."),
        SplitJsonLayout("oxford_flowers", "oxford_flowers", "jpg",
                        "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower."),
        SplitJsonLayout("food101", "food-101", "images",
                        "split_zhou_Food101.json", "a photo of {}, a type of food."),
        SplitJsonLayout("sun397", "sun397", "SUN397",
                        "split_zhou_SUN397.json", "a photo of a {}."),
        SplitJsonLayout("dtd", "dtd", "images",
                        "split_zhou_DescribableTextures.json", "{} texture."),
        SplitJsonLayout("eurosat", "eurosat", "2750",
                        "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
        SplitJsonLayout("ucf101", "ucf101", "UCF-101-midframes",
                        "split_zhou_UCF101.json", "a photo of a person doing {}."),
    ]
}


def build_split_json(layout: SplitJsonLayout, root: Path) -> Dataset:
    """A dataset described by a CoOp split json. Only the first image of each split is checked
    on disk; the others are checked when loaded."""
    base = root / layout.folder
    image_dir = base / layout.image_dir if layout.image_dir else base
    split_path = base / layout.split_file
    if not base.is_dir():
        raise DatasetError(f"{layout.name}: dataset folder not found: {base}; "
                           f"expected {layout.describe(root)}")
    if not split_path.is_file():
        raise DatasetError(f"{layout.name}: split file not found: {split_path}; "
                           f"expected {layout.describe(root)}")
    if not image_dir.is_dir():
        raise DatasetError(f"{layout.name}: image directory not found: {image_dir}; "
                           f"expected {layout.describe(root)}")
    entries, names = read_split_json(split_path)

    splits: dict[str, Split] = {}
    for split_name in SPLIT_NAMES:
        items = entries[split_name]
        paths = [image_dir / rel for rel, _ in items]
        if paths and not paths[0].is_file():
            raise DatasetError(
                f"{layout.name}: image {paths[0]} (first entry of {split_name!r} in {split_path}) "
                f"not found; expected {layout.describe(root)}"
            )
        prefix = Path(layout.image_dir) if layout.image_dir else Path()
        splits[split_name] = Split(
            ids=[(prefix / rel).as_posix() for rel, _ in items],
            labels=[label for _, label in items],
            load=PathLoader(paths),
        )
    return Dataset(layout.name, [readable(n) for n in names], splits, [layout.template])


FGVC_TEMPLATE = "a photo of a {}, a type of aircraft."


def build_fgvc_aircraft(root: Path) -> Dataset:
    """FGVC-Aircraft (variant level): ``variants.txt`` and ``images_variant_{split}.txt``."""
    base = root / "fgvc_aircraft"
    image_dir = base / "images"
    expected = (f"{base.as_posix()}/images/<id>.jpg, {base.as_posix()}/variants.txt and "
                f"{base.as_posix()}/images_variant_{{train,val,test}}.txt")
    if not image_dir.is_dir():
        raise DatasetError(f"fgvc_aircraft: image directory not found: {image_dir}; expected {expected}")
    variants_path = base / "variants.txt"
    if not variants_path.is_file():
        raise DatasetError(f"fgvc_aircraft: class list not found: {variants_path}; expected {expected}")
    classes = [text for _, text in read_lines(variants_path, "class list")]
    if not classes:
        raise DatasetError(f"fgvc_aircraft: class list {variants_path} is empty")
    index: dict[str, int] = {}
    for label, cname in enumerate(classes):
        if cname in index:
            raise DatasetError(f"fgvc_aircraft: class {cname!r} appears twice in {variants_path}")
        index[cname] = label

    splits: dict[str, Split] = {}
    for split_name in SPLIT_NAMES:
        path = base / f"images_variant_{split_name}.txt"
        if not path.is_file():
            raise DatasetError(f"fgvc_aircraft: split file not found: {path}; expected {expected}")
        ids: list[str] = []
        labels: list[int] = []
        for lineno, text in read_lines(path, "split file"):
            image_id, _, cname = text.partition(" ")
            cname = cname.strip()
            if not cname:
                raise DatasetError(f"fgvc_aircraft: {path} line {lineno}: expected "
                                   f"'<image id> <class name>', got {text!r}")
            if cname not in index:
                raise DatasetError(f"fgvc_aircraft: {path} line {lineno}: class {cname!r} "
                                   f"is not listed in {variants_path}")
            ids.append(f"images/{image_id}.jpg")
            labels.append(index[cname])
        paths = [base / i for i in ids]
        if paths and not paths[0].is_file():
            raise DatasetError(f"fgvc_aircraft: image {paths[0]} (first entry of {path}) not found; "
                               f"expected {expected}")
        splits[split_name] = Split(ids, labels, PathLoader(paths))
    return Dataset("fgvc_aircraft", [readable(c) for c in classes], splits, [FGVC_TEMPLATE])


COOP_BUILDERS: dict[str, Callable[[Path], Dataset]] = {
    **{name: partial(build_split_json, layout) for name, layout in SPLIT_JSON_LAYOUTS.items()},
    "fgvc_aircraft": build_fgvc_aircraft,
    "imagenet": imagenet.build_imagenet,
    "imagenetv2": imagenet.build_imagenetv2,
    "imagenet_sketch": imagenet.build_imagenet_sketch,
    "imagenet_a": imagenet.build_imagenet_a,
    "imagenet_r": imagenet.build_imagenet_r,
}


def build_coop(name: str, root: str | Path) -> Dataset:
    """Build the CoOp dataset ``name`` (a canonical name, see COOP_BUILDERS) from ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root not found: {root} (it must be a directory holding "
                           f"the {name} dataset folder)")
    return COOP_BUILDERS[name](root)
