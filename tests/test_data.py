"""Tests for robustprompt.data on tiny datasets written into tmp_path."""
from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustprompt.data import (
    Dataset,
    ImageDataset,
    Split,
    base_new_split,
    build_dataset,
    clip_transform,
    few_shot_indices,
    list_datasets,
    subsample,
)
from robustprompt.data import fashion_mnist as fm
from robustprompt.errors import DatasetError, RobustPromptError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTPROMPT_CACHE", str(tmp_path / "cache"))


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (8, 8),
                mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(path)
    return path


def make_split(labels: list[int]) -> Split:
    """An in-memory split: image i is a flat grey square of value i."""
    return Split(
        ids=[f"img/{i:03d}" for i in range(len(labels))],
        labels=list(labels),
        load=lambda i: Image.new("RGB", (8, 8), (i, i, i)),
    )


# --- fixtures on disk -------------------------------------------------------------------------

PETS_CLASSES = ["abyssinian", "american_bulldog", "beagle"]


def make_pets(root: Path, per_split: dict[str, int] | None = None) -> Path:
    """oxford_pets in the CoOp layout with 3 classes; returns the split-file path."""
    per_split = per_split or {"train": 4, "val": 1, "test": 2}
    base = root / "oxford_pets"
    split = {}
    for name, count in per_split.items():
        entries = []
        for label, cname in enumerate(PETS_CLASSES):
            for k in range(count):
                rel = f"{cname}_{name}_{k}.jpg"
                write_image(base / "images" / rel, value=20 * label + k)
                entries.append([rel, label, cname])
        split[name] = entries
    path = base / "split_zhou_OxfordPets.json"
    path.write_text(json.dumps(split))
    return path


def make_aircraft(root: Path) -> None:
    base = root / "fgvc_aircraft"
    classes = ["707-320", "A300B4", "Cessna 172"]
    (base).mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(classes) + "\n")
    n = 0
    for split in ("train", "val", "test"):
        lines = []
        for cname in classes:
            image_id = f"{1000000 + n}"
            n += 1
            write_image(base / "images" / f"{image_id}.jpg")
            lines.append(f"{image_id} {cname}")
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


IMAGENET_CLASSES = [("n01440764", "tench"), ("n01443537", "goldfish"),
                    ("n01484850", "great white shark"), ("n01491361", "tiger_shark")]


def make_imagenet(root: Path) -> None:
    base = root / "imagenet"
    base.mkdir(parents=True)
    (base / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in IMAGENET_CLASSES))
    for folder, count in (("train", 3), ("val", 2)):
        for wnid, _ in IMAGENET_CLASSES:
            for k in range(count):
                write_image(base / "images" / folder / wnid / f"{wnid}_{k}.JPEG")


# --- core types & transforms ------------------------------------------------------------------

def test_split_subset_keeps_ids_labels_and_loader_in_step():
    split = make_split([0, 1, 0, 1, 2])
    sub = split.subset([4, 1])
    assert sub.ids == ["img/004", "img/001"]
    assert sub.labels == [2, 1]
    assert sub.load(0).getpixel((0, 0)) == (4, 4, 4)
    assert len(sub) == 2
    with pytest.raises(IndexError):
        split.subset([5])


def test_dataset_split_lookup_lists_available():
    ds = Dataset("x", ["a"], {"test": make_split([0])}, ["a photo of a {}."])
    assert len(ds.split("test")) == 1
    with pytest.raises(DatasetError, match="available: test"):
        ds.split("train")


@pytest.mark.parametrize("train", [False, True])
def test_clip_transform_shape_and_range(train):
    tf = clip_transform(16, train=train)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8))
    out = tf(image)  # grey-scale input must come out with 3 channels
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_clip_transform_rejects_bad_interpolation():
    with pytest.raises(RobustPromptError, match="interpolation"):
        clip_transform(16, interpolation="cubic-ish")


def test_image_dataset_items(tmp_path):
    make_pets(tmp_path)
    ds = build_dataset("oxford_pets", tmp_path)
    torch_ds = ImageDataset(ds.split("test"), clip_transform(12))
    image, label, index = torch_ds[3]
    assert image.shape == (3, 12, 12) and 0 <= image.min() and image.max() <= 1
    assert (label, index) == (ds.split("test").labels[3], 3)
    # splits travel to DataLoader workers by pickling
    clone = pickle.loads(pickle.dumps(ds.split("test")))
    assert clone.load(0).size == (8, 8)


# --- CoOp split-json datasets -----------------------------------------------------------------

def test_coop_split_json_dataset(tmp_path):
    make_pets(tmp_path)
    ds = build_dataset("oxford-pets", tmp_path)
    assert ds.name == "oxford_pets"
    assert ds.classnames == ["abyssinian", "american bulldog", "beagle"]
    assert ds.templates == ["a photo of a {}, a type of pet."]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 12, "val": 3, "test": 6}
    test = ds.split("test")
    assert test.ids[0] == "images/abyssinian_test_0.jpg"
    assert test.labels == [0, 0, 1, 1, 2, 2]
    image = test.load(2)
    assert image.mode == "RGB" and image.size == (8, 8)


def test_coop_missing_split_file(tmp_path):
    make_pets(tmp_path).unlink()
    with pytest.raises(DatasetError, match="split_zhou_OxfordPets.json"):
        build_dataset("oxford_pets", tmp_path)


def test_coop_malformed_json(tmp_path):
    make_pets(tmp_path).write_text("{not json")
    with pytest.raises(DatasetError, match="split_zhou_OxfordPets.json"):
        build_dataset("oxford_pets", tmp_path)


@pytest.mark.parametrize("content, message", [
    ({"train": [], "val": []}, "missing key"),
    ({"train": [["a.jpg", "0", "cat"]], "val": [], "test": []}, "integer"),
    ({"train": [["a.jpg", 0]], "val": [], "test": []}, "relative_path, label, classname"),
    ({"train": [["a.jpg", 1, "cat"]], "val": [], "test": []}, "0..0"),
])
def test_coop_invalid_split_content(tmp_path, content, message):
    path = make_pets(tmp_path)
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=message) as err:
        build_dataset("oxford_pets", tmp_path)
    assert str(path) in str(err.value)


def test_coop_label_with_two_classnames(tmp_path):
    path = make_pets(tmp_path)
    split = json.loads(path.read_text())
    split["test"][0][2] = "sphynx"
    path.write_text(json.dumps(split))
    with pytest.raises(DatasetError, match="two class names") as err:
        build_dataset("oxford_pets", tmp_path)
    assert str(path) in str(err.value)


def test_coop_missing_image_dir(tmp_path):
    make_pets(tmp_path)
    (tmp_path / "oxford_pets" / "images").rename(tmp_path / "oxford_pets" / "imgs")
    with pytest.raises(DatasetError, match="image directory not found") as err:
        build_dataset("oxford_pets", tmp_path)
    assert str(tmp_path / "oxford_pets" / "images") in str(err.value)


def test_coop_missing_first_image(tmp_path):
    make_pets(tmp_path)
    missing = tmp_path / "oxford_pets" / "images" / "abyssinian_val_0.jpg"
    missing.unlink()
    with pytest.raises(DatasetError, match="not found") as err:
        build_dataset("oxford_pets", tmp_path)
    assert str(missing) in str(err.value)


def test_unreadable_image_names_file(tmp_path):
    make_pets(tmp_path)
    bad = tmp_path / "oxford_pets" / "images" / "beagle_test_1.jpg"
    bad.write_bytes(b"this is not a jpeg")
    test = build_dataset("oxford_pets", tmp_path).split("test")
    with pytest.raises(DatasetError, match="beagle_test_1.jpg"):
        test.load(test.ids.index("images/beagle_test_1.jpg"))


def test_unknown_name_and_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="oxford_pets") as err:
        build_dataset("oxford_kittens", tmp_path)
    assert "imagefolder:<path>" in str(err.value)
    with pytest.raises(DatasetError, match="data root"):
        build_dataset("dtd")
    with pytest.raises(DatasetError, match="data root not found"):
        build_dataset("dtd", tmp_path / "nowhere")


def test_list_and_aliases(tmp_path):
    names = list_datasets()
    for name in ("caltech101", "imagenet", "imagenet_a", "fgvc_aircraft", "fashion_mnist"):
        assert name in names
    make_aircraft(tmp_path)
    assert build_dataset("FGVC-Aircraft", tmp_path).name == "fgvc_aircraft"


def test_fgvc_aircraft(tmp_path):
    make_aircraft(tmp_path)
    ds = build_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == ["707-320", "A300B4", "Cessna 172"]
    assert ds.templates == ["a photo of a {}, a type of aircraft."]
    assert sorted(ds.splits) == ["test", "train", "val"]
    assert ds.split("val").labels == [0, 1, 2]
    assert ds.split("train").ids[0] == "images/1000000.jpg"
    assert ds.split("test").load(2).mode == "RGB"


def test_fgvc_aircraft_unknown_class(tmp_path):
    make_aircraft(tmp_path)
    path = tmp_path / "fgvc_aircraft" / "images_variant_val.txt"
    path.write_text(path.read_text() + "1000099 Boeing 999\n")
    with pytest.raises(DatasetError, match="line 4") as err:
        build_dataset("fgvc_aircraft", tmp_path)
    assert str(path) in str(err.value)


# --- ImageNet family --------------------------------------------------------------------------

def test_imagenet(tmp_path):
    make_imagenet(tmp_path)
    ds = build_dataset("imagenet", tmp_path)
    assert sorted(ds.splits) == ["test", "train"]
    assert ds.classnames == ["tench", "goldfish", "great white shark", "tiger shark"]
    assert len(ds.templates) == 8 and ds.templates[0] == "a photo of a {}."
    assert "itap of a {}." in ds.templates
    assert len(ds.split("train")) == 12 and len(ds.split("test")) == 8
    assert ds.split("test").labels == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds.split("test").ids[0] == "images/val/n01440764/n01440764_0.JPEG"


def test_imagenet_missing_class_folder(tmp_path):
    make_imagenet(tmp_path)
    folder = tmp_path / "imagenet" / "images" / "val" / "n01484850"
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    ds = build_dataset("imagenet", tmp_path)   # each split is listed (and checked) on first use
    with pytest.raises(DatasetError, match="n01484850") as err:
        ds.split("test")
    assert str(folder) in str(err.value)


def test_imagenet_a_subset_relabels(tmp_path):
    make_imagenet(tmp_path)  # provides imagenet/classnames.txt
    base = tmp_path / "imagenet-adversarial" / "imagenet-a"
    for wnid in ("n01491361", "n01443537"):  # written out of order on purpose
        for k in range(2):
            write_image(base / wnid / f"{k}.jpg")
    ds = build_dataset("imagenet-a", tmp_path)
    assert list(ds.splits) == ["test"]
    assert ds.classnames == ["goldfish", "tiger shark"]
    assert ds.split("test").labels == [0, 0, 1, 1]
    assert ds.split("test").ids[0] == "imagenet-a/n01443537/0.jpg"


def test_imagenet_sketch_and_v2(tmp_path):
    make_imagenet(tmp_path)
    write_image(tmp_path / "imagenet-sketch" / "images" / "n01484850" / "s.png")
    sketch = build_dataset("imagenet_sketch", tmp_path)
    assert sketch.split("test").labels == [2] and len(sketch.classnames) == 4
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    write_image(v2 / "3" / "a.jpeg")
    write_image(v2 / "1" / "b.jpeg")
    ds = build_dataset("imagenetv2", tmp_path)
    assert ds.split("test").labels == [1, 3]
    write_image(v2 / "17" / "c.jpeg")
    with pytest.raises(DatasetError, match="17"):
        build_dataset("imagenetv2", tmp_path)


def test_imagenet_variant_needs_classnames(tmp_path):
    write_image(tmp_path / "imagenet-rendition" / "imagenet-r" / "n01443537" / "a.jpg")
    with pytest.raises(DatasetError, match="classnames.txt"):
        build_dataset("imagenet_r", tmp_path)


# --- generic datasets -------------------------------------------------------------------------

def test_image_folder_with_splits(tmp_path):
    root = tmp_path / "mine"
    write_image(root / "train" / "red_fox" / "1.png")
    write_image(root / "train" / "cat" / "2.JPG")
    write_image(root / "test" / "zebra" / "3.jpeg")
    write_image(root / "test" / "cat" / "4.webp")
    (root / "test" / "cat" / "notes.txt").write_text("not an image")
    ds = build_dataset(f"imagefolder:{root}")
    assert ds.classnames == ["cat", "red fox", "zebra"]
    assert ds.templates == ["a photo of a {}."]
    assert ds.split("train").labels == [0, 1]
    assert ds.split("test").labels == [0, 2]
    assert ds.split("test").ids == ["test/cat/4.webp", "test/zebra/3.jpeg"]


def test_image_folder_flat_and_errors(tmp_path):
    root = tmp_path / "flat"
    write_image(root / "b" / "x.bmp")
    write_image(root / "a" / "y.tiff", mode="L")
    ds = build_dataset(f"imagefolder:{root}", root="ignored")
    assert list(ds.splits) == ["test"] and ds.classnames == ["a", "b"]
    assert ds.split("test").load(0).mode == "RGB"
    (root / "c").mkdir()
    with pytest.raises(DatasetError, match="holds no images") as err:
        build_dataset(f"imagefolder:{root}")
    assert str(root / "c") in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        build_dataset(f"imagefolder:{empty}")


def test_csv_dataset(tmp_path):
    folder = tmp_path / "csvset"
    write_image(folder / "imgs" / "a.png")
    write_image(folder / "imgs" / "b.png")
    absolute = write_image(tmp_path / "elsewhere" / "c.png")
    csv_path = folder / "data.csv"
    csv_path.write_text(f"path,label,split\nimgs/a.png,golden_retriever,train\n"
                        f"imgs/b.png,cat,test\n{absolute},cat,\n")
    ds = build_dataset(f"csv:{csv_path}")
    assert ds.classnames == ["cat", "golden retriever"]
    assert ds.split("train").labels == [1]
    assert ds.split("test").labels == [0, 0]
    assert ds.split("test").load(1).size == (8, 8)
    # classnames.txt fixes the order
    (folder / "classnames.txt").write_text("golden_retriever\ncat\n")
    assert build_dataset(f"csv:{csv_path}").split("test").labels == [1, 1]


@pytest.mark.parametrize("content, message", [
    ("file,label\nimgs/a.png,cat\n", "line 1"),
    ("path,label\nimgs/a.png,cat\nimgs/missing.png,cat\n", "line 3"),
    ("path,label\nimgs/a.png\n", "line 2"),
    ("path,label,split\nimgs/a.png,cat,holdout\n", "line 2"),
])
def test_csv_errors_name_line(tmp_path, content, message):
    write_image(tmp_path / "imgs" / "a.png")
    csv_path = tmp_path / "data.csv"
    csv_path.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        build_dataset(f"csv:{csv_path}")
    assert str(csv_path) in str(err.value)


def test_csv_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.csv"):
        build_dataset(f"csv:{tmp_path / 'nope.csv'}")


# --- few-shot, base/new, subsample ------------------------------------------------------------

def test_few_shot_deterministic_and_exact():
    labels = [i % 4 for i in range(40)]
    split = make_split(labels)
    a = few_shot_indices(split, 3, seed=1)
    assert a == few_shot_indices(split, 3, seed=1)
    assert a == sorted(a) and len(set(a)) == len(a)
    assert [sum(labels[i] == c for i in a) for c in range(4)] == [3, 3, 3, 3]
    assert a != few_shot_indices(split, 3, seed=2)


def test_few_shot_errors():
    split = make_split([0, 0, 0, 1, 2, 2, 2])
    with pytest.raises(DatasetError, match=r"class 1 \('dog'\) has 1 image.*2 shots"):
        few_shot_indices(split, 2, seed=0, classnames=["cat", "dog", "eel"])
    with pytest.raises(DatasetError, match="shots"):
        few_shot_indices(split, 0, seed=0)


def test_few_shot_cache_written_reused_and_refreshed(tmp_path):
    split = make_split([i % 3 for i in range(30)])
    first = few_shot_indices(split, 2, seed=5, cache_key="toy/train")
    path = tmp_path / "cache" / "fewshot" / "toy" / "train" / "shot_2-seed_5.json"
    record = json.loads(path.read_text())
    assert record["indices"] == first and len(record["fingerprint"]) == 40
    # the cached draw wins over a fresh one while the fingerprint matches
    planted = [0, 1, 2, 3, 4, 5]
    assert planted != first
    path.write_text(json.dumps({**record, "indices": planted}))
    assert few_shot_indices(split, 2, seed=5, cache_key="toy/train") == planted
    # a different split (same length, other ids) -> redrawn and overwritten
    changed = Split([i + "x" for i in split.ids], split.labels, split.load)
    redrawn = few_shot_indices(changed, 2, seed=5, cache_key="toy/train")
    assert redrawn == first
    assert json.loads(path.read_text())["indices"] == redrawn
    assert json.loads(path.read_text())["fingerprint"] != record["fingerprint"]


def test_base_new_split_odd_class_count():
    names = ["c0", "c1", "c2", "c3", "c4"]
    labels = [0, 1, 2, 3, 4, 4, 3, 0]
    ds = Dataset("toy", names, {"train": make_split(labels), "test": make_split([4, 2])},
                 ["a {}."])
    base = base_new_split(ds, "base")
    new = base_new_split(ds, "new")
    assert base.name == "toy/base" and new.name == "toy/new"
    assert base.classnames == ["c0", "c1", "c2"] and new.classnames == ["c3", "c4"]
    assert base.split("train").labels == [0, 1, 2, 0]
    assert base.split("train").ids == ["img/000", "img/001", "img/002", "img/007"]
    assert new.split("train").labels == [0, 1, 1, 0]
    assert new.split("train").load(1).getpixel((0, 0)) == (4, 4, 4)
    assert new.split("test").labels == [1] and base.split("test").labels == [2]
    assert base_new_split(ds, "all") is ds
    with pytest.raises(DatasetError, match="base"):
        base_new_split(ds, "old")


def test_subsample():
    split = make_split(list(range(20)))
    sub = subsample(split, 5, seed=3)
    assert len(sub) == 5 and sub.ids == sorted(sub.ids)
    assert sub.ids == subsample(split, 5, seed=3).ids
    assert subsample(split, 50, seed=3) is split


# --- Fashion-MNIST ----------------------------------------------------------------------------

def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def make_tiny_fashion(root: Path) -> Path:
    folder = root / "fashion-mnist"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051,
                  rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.arange(n) % 10)
    return folder


def test_fashion_mnist_from_data_root(tmp_path):
    make_tiny_fashion(tmp_path)
    ds = build_dataset("fashion_mnist", tmp_path)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "test": 4}
    assert ds.split("test").labels == [0, 1, 2, 3]
    assert ds.split("test").ids[2] == "fashion_mnist/test/00002"
    assert ds.classnames[0] == "t-shirt" and ds.classnames[9] == "ankle boot"
    assert len(ds.templates) == 8
    image = ds.split("train").load(5)
    assert image.mode == "RGB" and image.size == (28, 28)


def test_fashion_mnist_bad_magic(tmp_path):
    folder = make_tiny_fashion(tmp_path)
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    write_idx(bad, 2051, np.arange(4))
    with pytest.raises(DatasetError, match="magic") as err:
        build_dataset("fashion_mnist", tmp_path)
    assert str(bad) in str(err.value)


def test_fashion_mnist_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-copy")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", tmp_path / "nothing-here")


@pytest.mark.skipif(not (fm.SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_system_copy():
    ds = build_dataset("fashion-mnist")
    assert len(ds.split("train")) == 60000 and len(ds.split("test")) == 10000
    labels = ds.split("test").labels
    assert min(labels) == 0 and max(labels) == 9
    image = ds.split("test").load(0)
    assert image.mode == "RGB" and image.size == (28, 28)
