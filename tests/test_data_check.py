"""`robustprompt data check` / `data prepare` on fixture trees built here (no network)."""
import json

import pytest
from PIL import Image

from robustprompt.cli import main
from robustprompt.data.check import check_dataset
from robustprompt.data.prepare import PLANS, prepare


def _eurosat(root, n_classes=10, per_split=1):
    """A complete tiny EuroSAT in the CoOp layout: one image per class and split."""
    images = root / "eurosat" / "2750"
    split = {"train": [], "val": [], "test": []}
    for c in range(n_classes):
        (images / f"C{c}").mkdir(parents=True)
        for s in split:
            for k in range(per_split):
                rel = f"C{c}/{s}{k}.png"
                Image.new("RGB", (4, 4), (c * 20, 0, 0)).save(images / rel)
                split[s].append([rel, c, f"class{c}"])
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return images


def test_complete_tree_passes(tmp_path):
    _eurosat(tmp_path)
    report = check_dataset("eurosat", tmp_path, full=True)
    assert report.problems == []
    assert "10 classes" in report.ok
    assert report.lines()[-1] == "eurosat: all checks passed"


def test_missing_split_file_names_the_path(tmp_path):
    _eurosat(tmp_path)
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    report = check_dataset("EuroSAT", tmp_path)
    assert len(report.problems) == 1
    assert f"split file not found: {tmp_path / 'eurosat' / 'split_zhou_EuroSAT.json'}" in report.problems[0]


def test_missing_and_unreadable_images_are_counted(tmp_path):
    images = _eurosat(tmp_path)
    (images / "C3" / "test0.png").unlink()
    (images / "C5" / "test0.png").write_bytes(b"not an image")
    report = check_dataset("eurosat", tmp_path, full=True)
    assert len(report.problems) == 2
    assert report.problems[0].startswith("split 'test': 1 of 10 images missing (first: ")
    assert str(images / "C3" / "test0.png") in report.problems[0]
    assert report.problems[1].startswith("split 'test': 1 of 9 images checked are unreadable")
    assert "C5/test0.png" in report.problems[1]


def test_sample_decodes_only_a_few(tmp_path):
    images = _eurosat(tmp_path, per_split=3)
    for c in range(10):   # every train image corrupt: any sample finds them, and counts only the sample
        for k in range(3):
            (images / f"C{c}" / f"train{k}.png").write_bytes(b"x")
    report = check_dataset("eurosat", tmp_path, sample=4)
    assert any(p.startswith("split 'train': 4 of 4 images checked are unreadable") for p in report.problems)


def test_wrong_class_count_is_reported(tmp_path):
    _eurosat(tmp_path, n_classes=3)
    report = check_dataset("eurosat", tmp_path)
    assert report.problems == ["3 classes found; the eurosat benchmark has 10"]


def test_imagenet_lists_every_missing_class_folder(tmp_path):
    base = tmp_path / "imagenet"
    wnids = ["n001", "n002", "n003"]
    (base).mkdir()
    (base / "classnames.txt").write_text("".join(f"{w} thing {w}\n" for w in wnids))
    for folder, present in (("train", wnids[:1]), ("val", wnids)):
        for w in present:
            (base / "images" / folder / w).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(base / "images" / folder / w / "a.png")
    report = check_dataset("imagenet", tmp_path)
    assert report.problems == [f"2 of 3 class folders missing in {base / 'images' / 'train'} (first: n002, n003)"]


def test_cli_check_exit_codes(tmp_path, capsys):
    _eurosat(tmp_path)
    assert main(["data", "check", "--dataset", "eurosat", "--root", str(tmp_path)]) == 0
    assert "eurosat: all checks passed" in capsys.readouterr().out
    assert main(["data", "check", "--dataset", "eurosat", "--root", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert f"problem: data root not found: {tmp_path / 'nope'}" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustprompt data: error: eurosat under")


def test_cli_unknown_dataset_is_one_line(tmp_path, capsys):
    assert main(["data", "check", "--dataset", "nosuch", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ------------------------------------------------------------------ prepare (downloader mocked)
def test_prepare_fetches_archives_and_lists_manual_steps(tmp_path):
    calls = []
    lines = prepare("oxford-pets", tmp_path, download=lambda url, folder: calls.append((url, folder)))
    assert calls == [("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
                      str(tmp_path / "oxford_pets"))]
    assert lines[1] == "by hand:"
    assert "split_zhou_OxfordPets.json" in lines[2] and str(tmp_path / "oxford_pets") in lines[2]
    assert lines[-1] == f"then: robustprompt data check --dataset oxford_pets --root {tmp_path}"


def test_prepare_moves_fgvc_into_the_coop_folder(tmp_path):
    def fake(url, folder):   # the archive extracts to fgvc-aircraft-2013b/data
        (tmp_path / "fgvc-aircraft-2013b" / "data" / "images").mkdir(parents=True)

    lines = prepare("fgvc_aircraft", tmp_path, download=fake)
    assert (tmp_path / "fgvc_aircraft" / "images").is_dir()
    assert lines[1] == f"moved {tmp_path / 'fgvc-aircraft-2013b' / 'data'} to {tmp_path / 'fgvc_aircraft'}"


def test_prepare_dry_run_downloads_nothing(tmp_path):
    def refuse(url, folder):
        raise AssertionError("downloaded in a dry run")

    lines = prepare("food101", tmp_path, dry_run=True, download=refuse)
    assert lines[0].startswith("would download Food-101 (http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["stanford_cars", "ucf101", "imagenet", "caltech101"])
def test_manual_only_datasets_download_nothing(name, tmp_path):
    assert all(step.kind == "manual" for step in PLANS[name])
    lines = prepare(name, tmp_path, download=lambda *a: pytest.fail("no download expected"))
    assert lines[0] == "by hand:"


def test_loader_errors_point_to_data_check(tmp_path):
    from robustprompt.data import build_dataset
    from robustprompt.errors import DatasetError

    _eurosat(tmp_path)
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    with pytest.raises(DatasetError) as err:
        build_dataset("eurosat", tmp_path)
    message = str(err.value)
    assert "split file not found" in message
    assert message.endswith(f"run `robustprompt data check --dataset eurosat --root {tmp_path}` for everything "
                            "that is missing")
    with pytest.raises(DatasetError, match="robustprompt data prepare --dataset eurosat"):
        build_dataset("eurosat")


# ------------------------------------------------------------------ ImageNet: lazy, cached listings
def _imagenet_tree(root, wnids=("n001", "n002", "n003"), per_class=2):
    base = root / "imagenet"
    base.mkdir(parents=True)
    (base / "classnames.txt").write_text("".join(f"{w} thing {w}\n" for w in wnids))
    for folder in ("train", "val"):
        for w in wnids:
            d = base / "images" / folder / w
            d.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (4, 4)).save(d / f"{k}.png")
    return base


def _count_listings(monkeypatch):
    """Every os.scandir of robustprompt's image lister, by folder."""
    import os

    from robustprompt.data import images

    calls = []
    real = os.scandir

    def counting(path="."):
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(images.os, "scandir", counting)
    return calls


def test_imagenet_eval_lists_only_val_and_caches_listings(tmp_path, monkeypatch):
    import os

    from robustprompt.data import build_dataset

    monkeypatch.setenv("ROBUSTPROMPT_CACHE", str(tmp_path / "cache"))
    base = _imagenet_tree(tmp_path / "data")
    calls = _count_listings(monkeypatch)
    test = build_dataset("imagenet", tmp_path / "data").split("test")
    assert len(test) == 6
    assert not any(f"{os.sep}train" in c for c in calls)          # the training folders were never listed
    assert sorted(calls) == sorted(str(base / "images" / "val" / w) for w in ("n001", "n002", "n003"))

    calls.clear()
    again = build_dataset("imagenet", tmp_path / "data").split("test")   # a second run: from the cache
    assert calls == [] and again.ids == test.ids

    new = base / "images" / "val" / "n002" / "9.png"   # a folder that changes is listed again
    Image.new("RGB", (4, 4)).save(new)
    st = os.stat(new.parent)
    os.utime(new.parent, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = build_dataset("imagenet", tmp_path / "data").split("test")
    assert calls == [str(base / "images" / "val" / "n002")]
    assert "images/val/n002/9.png" in third.ids and len(third) == 7


def test_imagenet_base_classes_stay_lazy(tmp_path, monkeypatch):
    from robustprompt.data import base_new_split, build_dataset

    monkeypatch.setenv("ROBUSTPROMPT_CACHE", str(tmp_path / "cache"))
    _imagenet_tree(tmp_path / "data")
    calls = _count_listings(monkeypatch)
    base = base_new_split(build_dataset("imagenet", tmp_path / "data"), "base")
    assert calls == []
    assert base.split("test").labels == [0, 0, 1, 1]   # ceil(3/2) = 2 base classes
    assert not any("train" in c for c in calls)


def test_negative_sample_is_one_line(tmp_path, capsys):
    _eurosat(tmp_path)
    assert main(["data", "check", "--dataset", "eurosat", "--root", str(tmp_path), "--sample", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["robustprompt data: error: --sample must be a whole number >= 0, got -1"]


def test_lazy_imagenet_split_error_points_to_data_check(tmp_path, monkeypatch):
    from robustprompt.data import build_dataset
    from robustprompt.errors import DatasetError

    monkeypatch.setenv("ROBUSTPROMPT_CACHE", str(tmp_path / "cache"))

    base = _imagenet_tree(tmp_path)
    (base / "images" / "val" / "n002" / "0.png").unlink()
    (base / "images" / "val" / "n002" / "1.png").unlink()
    (base / "images" / "val" / "n002").rmdir()
    ds = build_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="class folder not found") as err:
        ds.split("test")
    assert str(err.value).endswith(f"run `robustprompt data check --dataset imagenet --root {tmp_path}` for "
                                   "everything that is missing")
