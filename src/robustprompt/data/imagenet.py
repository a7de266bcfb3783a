"""ImageNet and its distribution-shift variants (V2, Sketch, A, R) in the CoOp layout."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from robustprompt.data.base import Dataset, LazySplits, Split
from robustprompt.data.images import PathLoader, cached_list_images, list_subdirs
from robustprompt.data.naming import read_lines, readable
from robustprompt.errors import DatasetError

# templates[0] is the single-prompt template; the rest are CLIP's 7-template ensemble.
IMAGENET_TEMPLATES = [
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


def read_classnames(path: Path) -> list[tuple[str, str]]:
    """``classnames.txt`` lines ``<wnid> <class name>`` -> [(wnid, name)] in file order."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lineno, text in read_lines(path, "class-name file"):
        wnid, _, name = text.partition(" ")
        name = name.strip()
        if not name:
            raise DatasetError(f"{path} line {lineno}: expected '<wnid> <class name>', got {text!r}")
        if wnid in seen:
            raise DatasetError(f"{path} line {lineno}: wnid {wnid} is listed twice")
        seen.add(wnid)
        rows.append((wnid, readable(name)))
    if not rows:
        raise DatasetError(f"class-name file {path} is empty")
    return rows


def _find_classnames(root: Path, folders: list[str]) -> list[tuple[str, str]]:
    candidates = [root / f / "classnames.txt" for f in folders]
    for path in candidates:
        if path.is_file():
            return read_classnames(path)
    raise DatasetError("classnames.txt not found; looked for "
                       + ", ".join(str(p) for p in candidates)
                       + " (lines '<wnid> <class name>', in ImageNet label order)")


def _require_dir(path: Path, name: str, expected: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{name}: directory not found: {path}; expected {expected}")


def _folder_split(class_dirs: list[tuple[Path, int]], base: Path, name: str) -> Split:
    """Every image of each ``(directory, label)`` pair; ids are paths relative to ``base``."""
    ids: list[str] = []
    labels: list[int] = []
    paths: list[Path] = []
    for directory, label in class_dirs:
        for fname in cached_list_images(directory):
            path = directory / fname
            paths.append(path)
            ids.append(path.relative_to(base).as_posix())
            labels.append(label)
    if not paths:
        folders = sorted({d.parent for d, _ in class_dirs}) or [base]
        raise DatasetError(f"{name}: no images found under {folders[0]}")
    return Split(ids, labels, PathLoader(paths))


def build_imagenet(root: Path) -> Dataset:
    """ImageNet-1k: train from images/train/<wnid>/, test from images/val/<wnid>/. Each split is
    listed on first use (an eval-only run never lists the training images), listings cached."""
    base = root / "imagenet"
    expected = (f"{base.as_posix()}/images/train/<wnid>/*, {base.as_posix()}/images/val/<wnid>/* "
                f"and {base.as_posix()}/classnames.txt")
    _require_dir(base, "imagenet", expected)
    classes = _find_classnames(root, ["imagenet"])
    builders = {key: partial(_imagenet_split, base, folder, classes, expected)
                for key, folder in (("train", "train"), ("test", "val"))}
    return Dataset("imagenet", [n for _, n in classes], LazySplits(builders), list(IMAGENET_TEMPLATES))


def _imagenet_split(base: Path, folder: str, classes: list[tuple[str, str]], expected: str) -> Split:
    try:
        return _list_imagenet_split(base, folder, classes, expected)
    except DatasetError as exc:   # listed after build_dataset returned: name the check here
        raise DatasetError(f"{exc}; run `robustprompt data check --dataset imagenet --root "
                           f"{str(base.parent)[:200]}` for everything that is missing") from None


def _list_imagenet_split(base: Path, folder: str, classes: list[tuple[str, str]], expected: str) -> Split:
    split_dir = base / "images" / folder
    _require_dir(split_dir, "imagenet", expected)
    dirs = []
    for label, (wnid, _) in enumerate(classes):
        d = split_dir / wnid
        if not d.is_dir():
            raise DatasetError(f"imagenet: class folder not found: {d}; expected {expected}")
        dirs.append((d, label))
    return _folder_split(dirs, base, "imagenet")


def build_imagenetv2(root: Path) -> Dataset:
    """ImageNet-V2 matched-frequency: folders named by label index 0..999. Test only."""
    base = root / "imagenetv2"
    image_root = base / "imagenetv2-matched-frequency-format-val"
    _require_dir(image_root, "imagenetv2", f"{image_root.as_posix()}/<label index>/*")
    classes = _find_classnames(root, ["imagenetv2", "imagenet"])
    dirs = []
    for folder in list_subdirs(image_root):
        if not folder.isdigit() or int(folder) >= len(classes):
            raise DatasetError(f"imagenetv2: folder {image_root / folder} is not a label index "
                               f"in 0..{len(classes) - 1}")
        dirs.append((image_root / folder, int(folder)))
    dirs.sort(key=lambda pair: pair[1])
    split = _folder_split(dirs, base, "imagenetv2")
    return Dataset("imagenetv2", [n for _, n in classes], {"test": split}, list(IMAGENET_TEMPLATES))


def _wnid_folders(image_root: Path, wnid_to_label: dict[str, int], name: str,
                  classnames_hint: str) -> list[tuple[str, Path]]:
    folders = list_subdirs(image_root)
    unknown = [f for f in folders if f not in wnid_to_label]
    if unknown:
        raise DatasetError(f"{name}: folder {image_root / unknown[0]} is not a wnid listed in "
                           f"{classnames_hint}")
    return [(f, image_root / f) for f in folders]


def build_imagenet_sketch(root: Path) -> Dataset:
    """ImageNet-Sketch: images/<wnid>/*, all 1000 ImageNet labels. Test only."""
    base = root / "imagenet-sketch"
    image_root = base / "images"
    _require_dir(image_root, "imagenet_sketch", f"{image_root.as_posix()}/<wnid>/*")
    classes = _find_classnames(root, ["imagenet-sketch", "imagenet"])
    wnid_to_label = {wnid: i for i, (wnid, _) in enumerate(classes)}
    folders = _wnid_folders(image_root, wnid_to_label, "imagenet_sketch", "classnames.txt")
    split = _folder_split([(d, wnid_to_label[w]) for w, d in folders], base, "imagenet_sketch")
    return Dataset("imagenet_sketch", [n for _, n in classes], {"test": split},
                   list(IMAGENET_TEMPLATES))


def _build_class_subset(root: Path, name: str, folder: str, subfolder: str) -> Dataset:
    """ImageNet-A / -R: only the wnid folders present are classes, re-labelled 0..N-1."""
    base = root / folder
    image_root = base / subfolder
    _require_dir(image_root, name, f"{image_root.as_posix()}/<wnid>/*")
    classes = _find_classnames(root, [folder, "imagenet"])
    names = dict(classes)
    folders = _wnid_folders(image_root, {w: i for i, (w, _) in enumerate(classes)}, name,
                            "classnames.txt")
    if not folders:
        raise DatasetError(f"{name}: no class folders found in {image_root}")
    split = _folder_split([(d, label) for label, (_, d) in enumerate(folders)], base, name)
    return Dataset(name, [names[w] for w, _ in folders], {"test": split}, list(IMAGENET_TEMPLATES))


def build_imagenet_a(root: Path) -> Dataset:
    """ImageNet-A (200 classes). Test only."""
    return _build_class_subset(root, "imagenet_a", "imagenet-adversarial", "imagenet-a")


def build_imagenet_r(root: Path) -> Dataset:
    """ImageNet-R (200 classes). Test only."""
    return _build_class_subset(root, "imagenet_r", "imagenet-rendition", "imagenet-r")
