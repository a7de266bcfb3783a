"""Protocol data choices (issue 8 §4): resize modes and Dassl few-shot files."""
from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustprompt.config import DataSpec
from robustprompt.data import clip_transform
from robustprompt.data.base import Split
from robustprompt.data.dassl import (coop_dataset_dir, dassl_fewshot_path, match_dassl_items,
                                     read_dassl_fewshot)
from robustprompt.errors import ConfigError, DatasetError


# ----------------------------------------------------------------------------- resize modes
def _non_square_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8))  # H=30, W=50


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_squash_resizes_both_sides_without_cropping():
    img = _non_square_image()
    expected = _to_tensor(img.resize((16, 16), Image.BICUBIC))  # PIL, both sides straight to 16
    got = clip_transform(16, "bicubic", resize_mode="squash")(img)
    assert got.shape == (3, 16, 16)
    assert torch.allclose(got, expected, atol=1.5 / 255)


def test_shortest_resizes_short_side_then_centre_crops():
    img = _non_square_image()
    # shorter side 30 → 16: width 50·16/30 = 26.67 → 26 (torchvision truncates), then centre 16×16
    resized = img.resize((26, 16), Image.BICUBIC)
    left = round((26 - 16) / 2.0)
    expected = _to_tensor(resized.crop((left, 0, left + 16, 16)))
    got = clip_transform(16, "bicubic", resize_mode="shortest")(img)
    assert torch.allclose(got, expected, atol=1.5 / 255)
    # the two modes really differ on a non-square image
    assert (got - clip_transform(16, "bicubic", resize_mode="squash")(img)).abs().max() > 0.05


def test_resize_mode_is_validated():
    with pytest.raises(ConfigError, match="resize_mode"):
        clip_transform(16, resize_mode="stretch")
    with pytest.raises(ConfigError, match="resize_mode"):
        DataSpec(resize_mode="crop")


def test_train_transform_none_squash_matches_dassl_notransform():
    """FAP's configs (INPUT.TRANSFORMS: []) train on Resize((224, 224)) + ToTensor: no randomness."""
    from robustprompt.engine.train import _train_transform

    img = _non_square_image()
    tf = _train_transform(16, "none", "squash")
    a, b = tf(img), tf(img)
    assert torch.equal(a, b)
    assert torch.allclose(a, _to_tensor(img.resize((16, 16), Image.BICUBIC)), atol=1.5 / 255)


# ----------------------------------------------------------------------------- Dassl files
class _FakeDatum:
    """What Dassl's Datum pickles as: four private attributes."""

    def __init__(self, impath: str, label: int, classname: str) -> None:
        self._impath, self._label, self._domain, self._classname = impath, label, 0, classname


def _write_dassl_pickle(path: Path, train: list[tuple[str, int, str]], protocol: int) -> None:
    """Pickle as Dassl does, with the stand-in class registered under Dassl's module path; the
    fake modules are removed again before anything reads the file."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[names[-1]].Datum = _FakeDatum
    old = (_FakeDatum.__module__, _FakeDatum.__qualname__)
    _FakeDatum.__module__, _FakeDatum.__qualname__ = names[-1], "Datum"
    try:
        data = {"train": [_FakeDatum(*t) for t in train], "val": [_FakeDatum(*train[0])]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(data, protocol=protocol))
    finally:
        _FakeDatum.__module__, _FakeDatum.__qualname__ = old
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
    assert "dassl.data.datasets.base_dataset" not in sys.modules or saved[names[-1]] is not None


def _split() -> Split:
    ids = ["101_ObjectCategories/cat/a.jpg", "101_ObjectCategories/cat/b.jpg",
           "101_ObjectCategories/dog/c.jpg", "101_ObjectCategories/dog/d.jpg",
           "101_ObjectCategories/eel/e.jpg"]
    return Split(ids, [0, 0, 1, 1, 2], load=lambda i: None)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_dassl_fewshot_file_is_read_and_matched(tmp_path, protocol):
    root = tmp_path / "data"
    folder = coop_dataset_dir("caltech101", root)
    assert folder == root / "caltech-101"
    pkl = dassl_fewshot_path(folder, 1, 2)
    assert pkl.name == "shot_1-seed_2.pkl" and pkl.parent.name == "split_fewshot"
    other_machine = "/home/someone/DATA/caltech-101/101_ObjectCategories"
    _write_dassl_pickle(pkl, [(f"{other_machine}/dog/d.jpg", 1, "dog"), (f"{other_machine}/cat/b.jpg", 0, "cat"),
                              (f"{other_machine}/eel/e.jpg", 2, "eel")], protocol)
    few = read_dassl_fewshot(pkl)
    assert [d.label for d in few.train] == [1, 0, 2] and len(few.val) == 1
    assert match_dassl_items(few.train, _split(), pkl) == [3, 1, 4]


def test_dassl_items_of_other_classes_are_dropped_and_unknown_paths_refused(tmp_path):
    pkl = tmp_path / "shot_1-seed_1.pkl"
    _write_dassl_pickle(pkl, [("/x/101_ObjectCategories/cat/a.jpg", 0, "cat"),
                              ("/x/101_ObjectCategories/eel/e.jpg", 2, "eel")], pickle.HIGHEST_PROTOCOL)
    items = read_dassl_fewshot(pkl).train
    full = _split()
    base = full.subset([0, 1, 2, 3])   # classes cat, dog (the base half)
    assert match_dassl_items(items, base, pkl, full_split=full) == [0]
    with pytest.raises(DatasetError, match="matches no image"):
        match_dassl_items(items, base, pkl)  # without the full split the eel image is unknown
    bad = tmp_path / "bad.pkl"
    _write_dassl_pickle(bad, [("/x/elsewhere/zebra.jpg", 0, "zebra")], pickle.HIGHEST_PROTOCOL)
    with pytest.raises(DatasetError, match="bad.pkl.*zebra"):
        match_dassl_items(read_dassl_fewshot(bad).train, full, bad)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilWrite:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("evil", [_Evil, _EvilWrite])
def test_malicious_pickle_is_refused_without_running_anything(tmp_path, evil):
    marker = tmp_path / "marker"
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps({"train": [evil(str(marker))], "val": []}))
    with pytest.raises(DatasetError, match=r"shot_1-seed_1\.pkl.*not allowed"):
        read_dassl_fewshot(pkl)
    assert not marker.exists()


def test_dassl_file_with_unexpected_content_is_refused(tmp_path):
    pkl = tmp_path / "x.pkl"
    pkl.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetError, match="x.pkl"):
        read_dassl_fewshot(pkl)
    pkl.write_bytes(pickle.dumps({"train": ["not a datum"]}))
    with pytest.raises(DatasetError, match="list of Datum"):
        read_dassl_fewshot(pkl)


def _coop_caltech(root: Path) -> None:
    """A two-class CoOp-layout caltech101 under root (3 train images per class)."""
    import json

    base = root / "caltech-101"
    entries = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(["cat", "dog"]):
        (base / "101_ObjectCategories" / cname).mkdir(parents=True)
        for k in range(4):
            rel = f"{cname}/{k}.png"
            Image.new("RGB", (40, 30), (60 * k, 100 * label, 30)).save(base / "101_ObjectCategories" / rel)
            entries["train" if k < 3 else "test"].append([rel, label, cname])
    entries["val"] = entries["test"]
    (base / "split_zhou_Caltech101.json").write_text(json.dumps(entries))


@pytest.mark.parametrize("with_file", [True, False])
def test_training_run_records_its_few_shot_source(tmp_path, with_file):
    from robustprompt.engine.train import train, train_config_from_dict

    root = tmp_path / "data"
    _coop_caltech(root)
    pkl = dassl_fewshot_path(root / "caltech-101", 1, 7)
    if with_file:
        far = "/mnt/other/caltech-101/101_ObjectCategories"
        _write_dassl_pickle(pkl, [(f"{far}/cat/2.png", 0, "cat"), (f"{far}/dog/1.png", 1, "dog")],
                            pickle.HIGHEST_PROTOCOL)
    raw = {"model": {"name": "rp-tiny"}, "method": {"name": "zeroshot"}, "seed": 7, "device": "cpu",
           "data": {"dataset": "caltech101", "root": str(root), "shots": 1, "augment": "none",
                    "resize_mode": "squash"}}
    m = train(train_config_from_dict(raw), tmp_path / "run", progress=False)
    if with_file:
        assert m["few_shot_source"] == f"dassl:{pkl}"
    else:
        assert m["few_shot_source"] == "seeded-draw"
    assert m["n_train"] == 2
    import yaml
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["data"]["resize_mode"] == "squash" and cfg["data"]["few_shot_source"] == "auto"
    if not with_file:
        raw["data"]["few_shot_source"] = "dassl"
        with pytest.raises(ConfigError, match="shot_1-seed_7.pkl"):
            train(train_config_from_dict(raw), tmp_path / "run2", progress=False)
