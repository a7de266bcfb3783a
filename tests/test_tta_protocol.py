"""Test-time protocols: which views each procedure gets on which dataset (TPT's ImageNet rule),
resolved from the config and recorded in the run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from robustprompt.config import AttackSpec, DataSpec, ModelSpec
from robustprompt.engine.tta import TTAConfig, TTAMethodSpec, is_imagenet_family, resolve_augmix, run_tta
from robustprompt.errors import ConfigError
from robustprompt.tta.procedures import build_procedure

IMAGENET_NAMES = ["imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r",
                  "ImageNet-A", "imagenet-rendition", "imagenet-sketch", "ImageNetV2"]


def augmix_for(name: str, dataset: str, **params) -> bool:
    resolved, _ = resolve_augmix(TTAMethodSpec(name, params), dataset)
    return build_procedure(name, resolved).params.augmix


@pytest.mark.parametrize("dataset", IMAGENET_NAMES)
def test_imagenet_family_is_recognised_under_its_spellings(dataset):
    assert is_imagenet_family(dataset)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "oxford_pets", "dtd", "imagefolder:/data/imagenet",
                                     "csv:imagenet.csv", "no-such-set"])
def test_other_datasets_are_not(dataset):
    assert not is_imagenet_family(dataset)


@pytest.mark.parametrize("name", ["tpt", "rtpt"])
@pytest.mark.parametrize("dataset", IMAGENET_NAMES)
def test_tpt_rule_drops_augmix_on_the_imagenet_family(name, dataset):
    assert augmix_for(name, dataset) is False
    params, source = resolve_augmix(TTAMethodSpec(name, {"n_views": 8}), dataset)
    assert params == {"n_views": 8, "augmix": False} and "ImageNet" in source


@pytest.mark.parametrize("name", ["tpt", "rtpt"])
def test_tpt_rule_keeps_augmix_elsewhere(name):
    assert augmix_for(name, "fashion_mnist") is True
    assert augmix_for(name, "oxford_flowers") is True
    params, source = resolve_augmix(TTAMethodSpec(name, {}), "dtd")
    assert params == {} and source.startswith("auto")


@pytest.mark.parametrize("value", [True, False])
def test_an_explicit_augmix_wins(value):
    assert augmix_for("tpt", "imagenet_a", augmix=value) is value
    assert augmix_for("tpt", "fashion_mnist", augmix=value) is value
    assert resolve_augmix(TTAMethodSpec("tpt", {"augmix": value}), "imagenet")[1] == "config"


def test_ctpt_mta_and_atpt_follow_their_own_released_code():
    # C-TPT's distribution-shift scripts pass --I_augmix: AugMix on the ImageNet family as well
    assert augmix_for("ctpt", "imagenet_r") is True and augmix_for("ctpt", "dtd") is True
    # MTA's main.py: augmix only with --tpt, so an MTA run uses crops + flips on every dataset
    assert augmix_for("mta", "imagenet_r") is False and augmix_for("mta", "fashion_mnist") is False
    assert augmix_for("mta", "imagenet", augmix=True) is True
    # A-TPT's released atpt.py follows TPT's rule: its views are the crop bases on ImageNet
    assert augmix_for("atpt", "imagenet_a") is False and augmix_for("atpt", "dtd") is True


def test_an_unknown_procedure_is_still_a_config_error():
    with pytest.raises(ConfigError, match="unknown test-time procedure"):
        resolve_augmix(TTAMethodSpec("ttt", {}), "imagenet")


def _fake_imagenet_sketch(root):
    """Two classes, two 32×32 images each, in the CoOp layout of ImageNet-Sketch."""
    base = root / "imagenet-sketch"
    (base / "images").mkdir(parents=True)
    (base / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        (base / "images" / wnid).mkdir()
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(base / "images" / wnid / f"{k}.png")


def test_a_run_records_the_resolved_augmix(tmp_path, tiny_backbone, monkeypatch):
    _fake_imagenet_sketch(tmp_path / "data")
    # the tiny random backbone stands in for a real model; nothing here depends on its weights
    monkeypatch.setattr("robustprompt.api.get_backbone", lambda *a, **k: tiny_backbone)

    def run(params, name):
        cfg = TTAConfig(model=ModelSpec(name="rp-tiny"),
                        data=DataSpec(dataset="imagenet-sketch", root=str(tmp_path / "data"), batch_size=4),
                        method=TTAMethodSpec("tpt", params), attack=AttackSpec(eps=1, alpha=1, steps=1),
                        device="cpu")
        m = run_tta(cfg, tmp_path / name, progress=False)
        return m, json.loads((tmp_path / name / "metrics.json").read_text())

    torch.manual_seed(0)
    m, saved = run({"n_views": 4}, "auto")
    assert m["n"] == 4 and saved["augmix"] is False and saved["tta_params"]["augmix"] is False
    assert "ImageNet" in saved["augmix_source"]
    assert "augmix: false" in (tmp_path / "auto" / "config.yaml").read_text()
    m, saved = run({"n_views": 4, "augmix": True}, "explicit")
    assert saved["augmix"] is True and saved["augmix_source"] == "config"
