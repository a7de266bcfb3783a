"""User-supplied datasets: an image folder tree or a CSV file listing images and labels."""
from __future__ import annotations

import csv
from pathlib import Path

from robustprompt.data.base import SPLIT_NAMES, Dataset, Split
from robustprompt.data.images import PathLoader, list_images, list_subdirs
from robustprompt.data.naming import read_lines, readable
from robustprompt.errors import DatasetError

GENERIC_TEMPLATES = ["a photo of a {}."]


def build_image_folder(root: str | Path) -> Dataset:
    """``root/<split>/<class>/<image>`` when root/train, root/val or root/test exists, else
    ``root/<class>/<image>`` (all images form the 'test' split). Classes are the sorted union
    of the class folder names, so labels agree across splits."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    present = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    if present:
        split_dirs = {s: root / s for s in present}
        layout = f"{root.as_posix()}/<split>/<class>/<image>"
    else:
        split_dirs = {"test": root}
        layout = f"{root.as_posix()}/<class>/<image>"

    class_dirs = {s: list_subdirs(d) for s, d in split_dirs.items()}
    classes = sorted(set().union(*class_dirs.values()))
    if not classes:
        raise DatasetError(f"image folder {root}: no class folders found; expected {layout}")
    label_of = {c: i for i, c in enumerate(classes)}

    splits: dict[str, Split] = {}
    for split_name, directory in split_dirs.items():
        if not class_dirs[split_name]:
            raise DatasetError(f"image folder {root}: split folder {directory} holds no class "
                               f"folders; expected {layout}")
        ids: list[str] = []
        labels: list[int] = []
        paths: list[Path] = []
        for cname in class_dirs[split_name]:
            files = list_images(directory / cname)
            if not files:
                raise DatasetError(f"image folder {root}: class folder {directory / cname} holds no "
                                   "images (.jpg .jpeg .png .bmp .webp .tif .tiff)")
            for fname in files:
                path = directory / cname / fname
                paths.append(path)
                ids.append(path.relative_to(root).as_posix())
                labels.append(label_of[cname])
        splits[split_name] = Split(ids, labels, PathLoader(paths))
    return Dataset(root.name, [readable(c) for c in classes], splits, list(GENERIC_TEMPLATES))


def build_csv(csv_path: str | Path) -> Dataset:
    """A CSV with header ``path,label[,split]``: paths relative to the CSV's folder unless
    absolute, labels are class names, split defaults to 'test'. Classes are the sorted unique
    labels, or the lines of ``classnames.txt`` next to the CSV when present."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise DatasetError(f"CSV file not found: {csv_path}")
    folder = csv_path.parent
    rows = _read_rows(csv_path)

    names_path = folder / "classnames.txt"
    if names_path.is_file():
        classes = [text for _, text in read_lines(names_path, "class-name file")]
        if len(set(classes)) != len(classes):
            raise DatasetError(f"class-name file {names_path} lists a class twice")
        for lineno, _, label, _ in rows:
            if label not in classes:
                raise DatasetError(f"{csv_path} line {lineno}: label {label!r} is not listed in "
                                   f"{names_path}")
    else:
        classes = sorted({label for _, _, label, _ in rows})
    label_of = {c: i for i, c in enumerate(classes)}

    grouped: dict[str, tuple[list[str], list[int], list[Path]]] = {}
    for lineno, rel, label, split_name in rows:
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise DatasetError(f"{csv_path} line {lineno}: image file not found: {path}")
        ids, labels, paths = grouped.setdefault(split_name, ([], [], []))
        ids.append(rel if Path(rel).is_absolute() else Path(rel).as_posix())
        labels.append(label_of[label])
        paths.append(path)
    splits = {s: Split(ids, labels, PathLoader(paths)) 
              for s, (ids, labels, paths) in grouped.items()}
    return Dataset(csv_path.stem, [readable(c) for c in classes], splits, list(GENERIC_TEMPLATES))


def _read_rows(csv_path: Path) -> list[tuple[int, str, str, str]]:
    """Rows as ``(line_number, path, label, split)``; the header is line 1."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{csv_path} line 1: the file is empty; expected a header "
                                   "'path,label' with an optional 'split' column")
            columns = [h.strip().lower() for h in header]
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise DatasetError(f"{csv_path} line 1: header {header!r} lacks column(s) "
                                   f"{', '.join(missing)}; expected 'path,label' and optionally 'split'")
            ip, il = columns.index("path"), columns.index("label")
            isplit = columns.index("split") if "split" in columns else None
            rows = []
            for fields in reader:
                lineno = reader.line_num
                if not any(f.strip() for f in fields):
                    continue
                if len(fields) != len(columns):
                    raise DatasetError(f"{csv_path} line {lineno}: expected {len(columns)} fields "
                                       f"({','.join(columns)}), got {len(fields)}")
                rel, label = fields[ip].strip(), fields[il].strip()
                split_name = fields[isplit].strip().lower() if isplit is not None else "test"
                split_name = split_name or "test"
                if not rel:
                    raise DatasetError(f"{csv_path} line {lineno}: empty path")
                if not label:
                    raise DatasetError(f"{csv_path} line {lineno}: empty label")
                if split_name not in SPLIT_NAMES:
                    raise DatasetError(f"{csv_path} line {lineno}: split {split_name!r} is not one "
                                       f"of {', '.join(SPLIT_NAMES)}")
                rows.append((lineno, rel, label, split_name))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read CSV file {csv_path}: {exc}") from None
    if not rows:
        raise DatasetError(f"{csv_path}: no images listed after the header")
    return rows
