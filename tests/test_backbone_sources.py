"""Backbones from hf-hub: and local-dir: sources, their provenance and their preprocessing (issue 11 §1).

No network: a `local-dir:` model folder is written by the test (open_clip_config.json with the
rp-tiny architecture plus open_clip_model.safetensors of a seeded random rp-tiny), and the Hub is
an offline cache layout in a temporary HF_HOME (hub/models--ORG--REPO/{refs/main, blobs/,
snapshots/<commit>/…}) read with HF_HUB_OFFLINE=1. Hub error answers come from a stub HTTP server
on 127.0.0.1. Every expected value is computed independently: tensors with safetensors.load_file,
hashes with hashlib, images with torchvision/PIL operations written out here.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.transforms import InterpolationMode

from robustprompt.cli import main
from robustprompt.config import DataSpec, ModelSpec
from robustprompt.engine.identity import model_fingerprint, weights_fingerprint
from robustprompt.engine.tasks import Task, preprocess_of
from robustprompt.errors import ConfigError, ModelError
from robustprompt.models import PromptConfig, PromptedClassifier, load_backbone
from robustprompt.models.sources import model_slug, snapshot_commit

TINY_CFG = json.loads((Path(__file__).parents[1] / "src/robustprompt/models/configs/rp-tiny.json").read_text())
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


# ----------------------------------------------------------------------------- builders
def tiny_state(seed: int, model_cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """A seeded random model of `model_cfg` (rp-tiny), its state dict as contiguous tensors."""
    torch.manual_seed(seed)
    if model_cfg is None:
        model = open_clip.create_model("rp-tiny")
    else:
        model = open_clip.CLIP(**model_cfg)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_model_dir(folder: Path, state: dict, preprocess: dict | None = None, model_cfg: dict | None = None,
                    weights_name: str = "open_clip_model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg or TINY_CFG}
    if preprocess is not None:
        config["preprocess_cfg"] = preprocess
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    if weights_name.endswith(".safetensors"):
        save_file(state, str(folder / weights_name))
    else:
        torch.save(state, folder / weights_name)
    return folder


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A temporary HF_HOME read offline. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE
    into `constants` at import time, so the constants are patched too (the environment for any
    subprocess)."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def place_snapshot(home: Path, repo: str, commit: str, files: dict[str, bytes], ref: str | None = "main") -> Path:
    """A repo snapshot as huggingface_hub's cache stores it: content in blobs/<hash>, the snapshot
    entries as relative links to them, refs/<ref> holding the commit."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


def repo_files(state: dict, preprocess: dict | None = None, model_cfg: dict | None = None,
               weights_name: str = "open_clip_model.safetensors") -> dict[str, bytes]:
    """The files of an open_clip Hub repo (written to a scratch folder, returned as bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        folder = write_model_dir(Path(scratch), state, preprocess, model_cfg, weights_name)
        return {p.name: p.read_bytes() for p in folder.iterdir()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_weights_equal(bb, expected: dict[str, torch.Tensor]) -> None:
    own = bb.model.state_dict()
    assert set(expected) <= set(own)
    for k, v in expected.items():
        assert torch.equal(own[k], v), k


def assert_one_line(exc: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 1000, text
    for part in parts:
        assert part in text, (part, text)


# ----------------------------------------------------------------------------- local-dir
def test_local_dir_loads_its_weights_and_records_them(tmp_path):
    state = tiny_state(1)
    folder = write_model_dir(tmp_path / "tiny model", state, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    weights = folder / "open_clip_model.safetensors"
    bb = load_backbone(f"local-dir:{folder}")
    assert_weights_equal(bb, load_file(str(weights)))   # the file's tensors, read independently
    digest = sha(weights.read_bytes())
    src = bb.describe()["source"]
    assert src["kind"] == "local-dir" and src["id"] == str(folder.resolve()) and src["revision"] is None
    assert src["files"] == [{"name": "open_clip_model.safetensors", "sha256": digest}]
    assert src["config"]["sha256"] == sha((folder / "open_clip_config.json").read_bytes())
    assert bb.weights_sha256 == digest == bb.describe()["weights_sha256"]
    assert weights_fingerprint(ModelSpec(name=f"local-dir:{folder}")) == digest
    assert bb.name == f"local-dir:{folder}" and bb.weights == str(weights)
    assert (bb.mean, bb.std) == ((0.5,) * 3, (0.25,) * 3)   # the folder's preprocess_cfg


def test_local_dir_prefers_the_file_open_clip_would(tmp_path):
    """open_clip_model.safetensors over model.safetensors; a .bin alone is read as data."""
    a, b = tiny_state(1), tiny_state(2)
    folder = write_model_dir(tmp_path / "m", a)
    save_file(b, str(folder / "model.safetensors"))
    assert_weights_equal(load_backbone(f"local-dir:{folder}"), a)
    only_bin = write_model_dir(tmp_path / "bin", b, weights_name="open_clip_pytorch_model.bin")
    bb = load_backbone(f"local-dir:{only_bin}")
    assert_weights_equal(bb, b)
    assert bb.weights_sha256 == sha((only_bin / "open_clip_pytorch_model.bin").read_bytes())


def test_local_dir_config_quick_gelu_is_used_and_recorded(tmp_path):
    cfg = {**TINY_CFG, "quick_gelu": True}
    folder = write_model_dir(tmp_path / "qg", tiny_state(1), model_cfg=cfg)
    bb = load_backbone(f"local-dir:{folder}")
    assert bb.quick_gelu and bb.describe()["quick_gelu"]
    assert isinstance(bb.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert not load_backbone(f"local-dir:{write_model_dir(tmp_path / 'plain', tiny_state(1))}").quick_gelu


# ----------------------------------------------------------------------------- the Hub, offline
def test_hub_offline_cache_loads_with_the_served_commit(hf_home):
    state = tiny_state(3)
    files = repo_files(state)
    place_snapshot(hf_home, "org/tiny", COMMIT, files)
    bb = load_backbone("hf-hub:org/tiny")
    assert_weights_equal(bb, load_file(str(hf_home / "hub/models--org--tiny/snapshots" / COMMIT /
                                           "open_clip_model.safetensors")))
    src = bb.describe()["source"]
    assert (src["kind"], src["id"], src["revision"]) == ("hf-hub", "org/tiny", COMMIT)
    weights_sha = sha(files["open_clip_model.safetensors"])
    assert src["files"] == [{"name": "open_clip_model.safetensors", "sha256": weights_sha}]
    assert src["config"] == {"name": "open_clip_config.json", "sha256": sha(files["open_clip_config.json"])}
    assert bb.weights_sha256 == sha(files["open_clip_model.safetensors"])
    assert bb.weights == f"hf-hub:org/tiny@{COMMIT}" and bb.name == "hf-hub:org/tiny"
    info = bb.describe()
    assert (info["hub_repo"], info["hub_revision"]) == ("org/tiny", COMMIT)   # what prompt files read
    spec = ModelSpec(name="hf-hub:org/tiny")
    assert weights_fingerprint(spec) == bb.weights_sha256
    assert model_fingerprint(spec) == {"weights": bb.weights_sha256, "config": sha(files["open_clip_config.json"])}


def test_hub_revision_pins_a_commit_or_branch(hf_home):
    """refs/main points to the new commit; @<old commit> and @<branch> load what they name."""
    new, old = tiny_state(4), tiny_state(5)
    place_snapshot(hf_home, "org/tiny", COMMIT, repo_files(new))
    place_snapshot(hf_home, "org/tiny", OLD_COMMIT, repo_files(old), ref="v1")
    assert_weights_equal(load_backbone("hf-hub:org/tiny"), new)
    for name in (f"hf-hub:org/tiny@{OLD_COMMIT}", "hf-hub:org/tiny@v1"):
        bb = load_backbone(name)
        assert_weights_equal(bb, old)
        src = bb.describe()["source"]
        assert src["revision"] == OLD_COMMIT and src["requested_revision"] == name.split("@")[1]
    assert load_backbone("hf-hub:org/tiny@main").describe()["source"]["revision"] == COMMIT


def test_hub_pickle_weights_are_read_as_data_only(hf_home, tmp_path):
    """A Hub .bin is read like a local file: a plain state dict loads, a pickle naming code is
    refused before anything runs."""
    state = tiny_state(6)
    place_snapshot(hf_home, "org/bin", COMMIT, repo_files(state, weights_name="open_clip_pytorch_model.bin"))
    assert_weights_equal(load_backbone("hf-hub:org/bin"), state)

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):   # unpickling with code allowed would create the marker file
            return (open, (str(marker), "w"))

    files = repo_files(state)
    files.pop("open_clip_model.safetensors")
    buffer = io.BytesIO()
    torch.save({**state, "visual.proj": Evil()}, buffer)   # a torch.save file whose unpickling runs a command
    files["open_clip_pytorch_model.bin"] = buffer.getvalue()
    place_snapshot(hf_home, "org/evil", COMMIT, files)
    with pytest.raises(ModelError) as exc:
        load_backbone("hf-hub:org/evil")
    assert_one_line(exc, "only running code could rebuild", "was not loaded")
    assert not marker.exists()


def test_hub_non_finite_and_mismatched_weights_are_refused(hf_home):
    bad = tiny_state(7)
    bad["visual.proj"][0, 0] = float("nan")
    place_snapshot(hf_home, "org/nan", COMMIT, repo_files(bad))
    with pytest.raises(ModelError) as exc:
        load_backbone("hf-hub:org/nan")
    assert_one_line(exc, "hf-hub:org/nan", "non-finite", "visual.proj")
    short = tiny_state(7)
    short.pop("text_projection")
    place_snapshot(hf_home, "org/short", COMMIT, repo_files(short))
    with pytest.raises(ModelError) as exc:
        load_backbone("hf-hub:org/short")
    assert_one_line(exc, "does not match", "1 missing keys", "text_projection")


def test_tag_downloaded_from_the_hub_records_its_commit(hf_home, monkeypatch):
    """An open_clip tag whose file open_clip fetches from the Hub (a test tag for rp-tiny, cached
    offline): the file is hashed and read by us, the commit comes from its cache path, and the
    tag's preprocess entries and QuickGELU flag apply."""
    from open_clip import pretrained as oc_pretrained

    tag_cfg = oc_pretrained._pcfg(hf_hub="org/tiny-tag/", interpolation="bilinear", resize_mode="squash",
                                  mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), quick_gelu=True)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "rp-tiny", {"testtag": tag_cfg})
    state = tiny_state(8)
    files = repo_files(state)
    place_snapshot(hf_home, "org/tiny-tag", COMMIT,
                   {"open_clip_model.safetensors": files["open_clip_model.safetensors"]})
    bb = load_backbone("rp-tiny", "testtag")
    assert_weights_equal(bb, state)
    src = bb.describe()["source"]
    assert (src["kind"], src["id"], src["revision"], src["hf_hub"]) == ("tag", "testtag", COMMIT, "org/tiny-tag/")
    assert bb.weights_sha256 == sha(files["open_clip_model.safetensors"]) == weights_fingerprint(
        ModelSpec(name="rp-tiny", pretrained="testtag"))
    assert (bb.interpolation, bb.resize_mode) == ("bilinear", "squash")
    assert (bb.mean, bb.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert bb.quick_gelu and isinstance(bb.model.visual.transformer.resblocks[0].mlp.gelu,
                                        open_clip.transformer.QuickGELU)


def test_random_init_records_no_weights():
    bb = load_backbone("rp-tiny")
    assert bb.weights_sha256 is None and bb.describe()["source"]["kind"] == "random"
    assert weights_fingerprint(ModelSpec(name="rp-tiny")) is None


def test_path_checkpoint_records_file(tmp_path):
    state = tiny_state(9)
    save_file(state, str(tmp_path / "w.safetensors"))
    bb = load_backbone("rp-tiny", tmp_path / "w.safetensors")
    src = bb.describe()["source"]
    digest = sha((tmp_path / "w.safetensors").read_bytes())
    assert (src["kind"], src["id"], src["files"]) == ("file", str(tmp_path / "w.safetensors"),
                                                       [{"name": "w.safetensors", "sha256": digest}])
    spec = ModelSpec(name="rp-tiny", pretrained=str(tmp_path / "w.safetensors"))
    assert bb.weights_sha256 == digest == weights_fingerprint(spec)


def test_snapshot_commit_reads_the_path_not_the_link_target(tmp_path):
    assert snapshot_commit(tmp_path / "hub/models--a--b/snapshots" / COMMIT / "f.bin") == COMMIT
    assert snapshot_commit(tmp_path / "elsewhere" / COMMIT / "f.bin") is None


def test_combined_hash_of_several_files():
    from robustprompt.models.sources import WeightFile, combined_sha256

    files = [WeightFile("b.bin", Path("b"), "22" * 32), WeightFile("a.bin", Path("a"), "11" * 32)]
    listing = f"{'11' * 32}  a.bin\n{'22' * 32}  b.bin\n"   # sha256sum's format, sorted by name
    assert combined_sha256(files) == sha(listing.encode())
    assert combined_sha256(files[:1]) == "22" * 32 and combined_sha256([]) is None


# ----------------------------------------------------------------------------- preprocessing
def _photo(w: int = 40, h: int = 20) -> Image.Image:
    g = torch.Generator().manual_seed(0)
    return TF.to_pil_image(torch.rand(3, h, w, generator=g))


def test_default_preprocess_is_shortest_bicubic(tmp_path):
    folder = write_model_dir(tmp_path / "m", tiny_state(1))   # no preprocess_cfg: open_clip's defaults
    bb = load_backbone(f"local-dir:{folder}")
    img = _photo()
    expected = TF.to_tensor(TF.center_crop(TF.resize(img, 32, InterpolationMode.BICUBIC), [32, 32]))
    torch.testing.assert_close(bb.preprocess.transform()(img), expected, atol=0, rtol=0)


def test_squash_bilinear_from_the_config(tmp_path):
    folder = write_model_dir(tmp_path / "m", tiny_state(1), {"resize_mode": "squash", "interpolation": "bilinear"})
    bb = load_backbone(f"local-dir:{folder}")
    img = _photo()
    expected = TF.to_tensor(TF.resize(img, [32, 32], InterpolationMode.BILINEAR))
    torch.testing.assert_close(bb.preprocess.transform()(img), expected, atol=0, rtol=0)
    assert bb.describe()["preprocess"] == {"image_size": 32, "interpolation": "bilinear", "resize_mode": "squash",
                                           "fill_color": 0}


def test_longest_pads_with_the_fill_colour(tmp_path):
    """open_clip's `longest`: the 40×20 photo's long side to 32 (→ 32×16), centred on a 32×32
    canvas of the fill colour (8 rows above, 8 below)."""
    folder = write_model_dir(tmp_path / "m", tiny_state(1), {"resize_mode": "longest", "fill_color": 128})
    bb = load_backbone(f"local-dir:{folder}")
    img = _photo(40, 20)
    canvas = Image.new("RGB", (32, 32), (128, 128, 128))
    canvas.paste(img.resize((32, 16), Image.BICUBIC), (0, 8))
    torch.testing.assert_close(bb.preprocess.transform()(img), TF.to_tensor(canvas), atol=0, rtol=0)
    # an odd remainder goes to the bottom, as open_clip pads: 40×21 → 32×17 (16.8 rounded): 7 rows above, 8 below
    img = _photo(40, 21)
    canvas = Image.new("RGB", (32, 32), (128, 128, 128))
    canvas.paste(img.resize((32, 17), Image.BICUBIC), (0, 7))
    torch.testing.assert_close(bb.preprocess.transform()(img), TF.to_tensor(canvas), atol=0, rtol=0)


def test_another_image_size_follows_the_model(tmp_path):
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["vision_cfg"]["image_size"] = 48
    folder = write_model_dir(tmp_path / "m", tiny_state(1, cfg), {"size": 999}, model_cfg=cfg)   # size: the model's
    bb = load_backbone(f"local-dir:{folder}")
    assert bb.image_size == 48
    img = _photo(60, 50)
    expected = TF.to_tensor(TF.center_crop(TF.resize(img, 48, InterpolationMode.BICUBIC), [48, 48]))
    torch.testing.assert_close(bb.preprocess.transform()(img), expected, atol=0, rtol=0)
    clf = PromptedClassifier(bb, ["a", "b"])
    assert clf(bb.preprocess.transform()(img)[None]).shape == (1, 2)


def test_data_resize_mode_auto_follows_and_explicit_forces(tmp_path):
    folder = write_model_dir(tmp_path / "m", tiny_state(1), {"resize_mode": "squash", "interpolation": "bilinear"})
    bb = load_backbone(f"local-dir:{folder}")
    clf = PromptedClassifier(bb, ["a", "b"])
    assert preprocess_of(clf) == bb.preprocess   # what the classifier's recorded description says
    img = _photo()
    task = lambda mode: Task(None, None, [], resize_mode=mode)   # noqa: E731 (only the transform is used)
    squash = TF.to_tensor(TF.resize(img, [32, 32], InterpolationMode.BILINEAR))
    shortest = TF.to_tensor(TF.center_crop(TF.resize(img, 32, InterpolationMode.BILINEAR), [32, 32]))
    torch.testing.assert_close(task("auto").transform(clf)(img), squash, atol=0, rtol=0)
    torch.testing.assert_close(task("shortest").transform(clf)(img), shortest, atol=0, rtol=0)
    assert task("shortest").preprocess(clf).interpolation == "bilinear"   # forced mode, the backbone's interpolation
    assert DataSpec().resize_mode == "auto"
    with pytest.raises(ConfigError, match="data.resize_mode must be one of auto, shortest, squash, longest"):
        DataSpec(resize_mode="crop")


def test_train_transform_follows_the_backbone_unless_forced(tmp_path):
    from robustprompt.engine.train import TrainDataSpec, _train_transform

    folder = write_model_dir(tmp_path / "m", tiny_state(1), {"resize_mode": "squash", "interpolation": "bilinear"})
    bb = load_backbone(f"local-dir:{folder}")
    img = _photo()
    squash = TF.to_tensor(TF.resize(img, [32, 32], InterpolationMode.BILINEAR))
    shortest = TF.to_tensor(TF.center_crop(TF.resize(img, 32, InterpolationMode.BILINEAR), [32, 32]))
    torch.testing.assert_close(_train_transform(bb.preprocess, "none", "auto")(img), squash, atol=0, rtol=0)
    torch.testing.assert_close(_train_transform(bb.preprocess, "none", "shortest")(img), shortest, atol=0, rtol=0)
    assert TrainDataSpec().resize_mode == "auto"


def test_protocol_configs_still_force_squash_for_training():
    from robustprompt.config import load_yaml

    root = Path(__file__).parents[1] / "configs"
    for name in ("cba_fapt/few_shot.yaml", "cba_fapt/base_to_new.yaml", "cba_fapt/cross_dataset.yaml",
                 "apd/few_shot.yaml"):
        assert load_yaml(root / name)["train"]["data"]["resize_mode"] == "squash", name


def test_demo_backbone_keeps_its_preprocessing_and_gets_a_provenance():
    """The demo backbone resolves to what it always used (28 px, bicubic, shortest side + crop),
    and records a demo source whose hash is its fingerprint."""
    from robustprompt.api import get_backbone

    bb = get_backbone("demo")
    assert bb.preprocess.to_dict() == {"image_size": 28, "interpolation": "bicubic", "resize_mode": "shortest",
                                       "fill_color": 0}
    src = bb.describe()["source"]
    assert src["kind"] == "demo" and src["files"][0]["name"] == "model.safetensors"
    assert bb.weights_sha256 == weights_fingerprint(ModelSpec(name="demo")) == bb.extra["sha256"]


# ----------------------------------------------------------------------------- towers
def test_timm_image_tower_loads_zero_shot_but_takes_no_vision_prompts(tmp_path):
    pytest.importorskip("timm")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                          "timm_pool": "token", "timm_proj": "linear", "image_size": 224},
           "text_cfg": TINY_CFG["text_cfg"]}
    state = tiny_state(0, cfg)
    folder = write_model_dir(tmp_path / "timm", state, model_cfg=cfg)
    bb = load_backbone(f"local-dir:{folder}")
    assert_weights_equal(bb, state)
    clf = PromptedClassifier(bb, ["a", "b"])
    assert clf(torch.rand(2, 3, 224, 224)).shape == (2, 2)
    with pytest.raises(ModelError) as exc:
        PromptedClassifier(bb, ["a", "b"], PromptConfig(coupling="vision", n_ctx=2, depth=1))
    assert_one_line(exc, "vision prompts need a ViT image tower", "TimmModel")


def test_hf_transformers_text_tower_without_transformers_is_one_line(tmp_path):
    if __import__("importlib.util").util.find_spec("transformers") is not None:
        pytest.skip("transformers is installed here")
    cfg = {"embed_dim": 32, "vision_cfg": TINY_CFG["vision_cfg"],
           "text_cfg": {"hf_model_name": "some-org/some-bert", "hf_tokenizer_name": "some-org/some-bert",
                        "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}}
    folder = write_model_dir(tmp_path / "hf", tiny_state(1), model_cfg=cfg)
    with pytest.raises(ModelError) as exc:
        load_backbone(f"local-dir:{folder}")
    assert_one_line(exc, f"local-dir:{folder}", "'some-org/some-bert'", "pip install transformers")


# ----------------------------------------------------------------------------- one-line errors
def test_local_dir_errors_are_one_line(tmp_path):
    cases = []
    cases.append((f"local-dir:{tmp_path / 'nope'}", "no such directory"))
    (tmp_path / "empty").mkdir()
    cases.append((f"local-dir:{tmp_path / 'empty'}", "has no open_clip_config.json"))
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    cases.append((f"local-dir:{no_weights}", "no weight file in the folder"))
    bare = write_model_dir(tmp_path / "bare", tiny_state(1))
    (bare / "open_clip_config.json").write_text(json.dumps(TINY_CFG))   # a bare model config: not open_clip's layout
    cases.append((f"local-dir:{bare}", "has no model_cfg"))
    broken = write_model_dir(tmp_path / "broken", tiny_state(1))
    (broken / "open_clip_config.json").write_text("{not json")
    cases.append((f"local-dir:{broken}", "is not valid JSON"))
    partial = write_model_dir(tmp_path / "partial", tiny_state(1), model_cfg={"embed_dim": 32, "vision_cfg": {}})
    cases.append((f"local-dir:{partial}", "lacks text_cfg"))
    odd = write_model_dir(tmp_path / "odd", tiny_state(1), {"interpolation": "cubic-spline"})
    cases.append((f"local-dir:{odd}", "preprocess config cannot be applied"))
    for name, part in cases:
        with pytest.raises(ModelError) as exc:
            load_backbone(name)
        assert_one_line(exc, part)
        assert "local-dir:" in str(exc.value)


def test_name_errors_are_one_line(tmp_path):
    for name, pretrained, part in [
        ("hf-hub:org/tiny", "openai", "brings its own weights: drop --pretrained 'openai'"),
        ("hf-hub:a/b/c", None, "is not a Hub model name"),
        ("hf-hub:org/tiny@", None, "nothing after '@'"),
        ("hf-hub:", None, "nothing after 'hf-hub:'"),
        ("ViT-B-33", None, "unknown open_clip architecture"),
        ("rp-tiny", str(tmp_path), "is a directory"),
    ]:
        with pytest.raises(ModelError) as exc:
            load_backbone(name, pretrained)
        assert_one_line(exc, part)


def test_hub_not_cached_offline_is_one_line(hf_home):
    with pytest.raises(ModelError) as exc:
        load_backbone("hf-hub:org/absent")
    assert_one_line(exc, "hf-hub:org/absent", "not in the local Hugging Face cache", "HF_HUB_OFFLINE is set")
    config_only = {"open_clip_config.json": json.dumps({"model_cfg": TINY_CFG}).encode()}
    place_snapshot(hf_home, "org/nofile", COMMIT, config_only)
    with pytest.raises(ModelError) as exc:   # the config is cached, no weight file is
        load_backbone("hf-hub:org/nofile")
    assert_one_line(exc, "hf-hub:org/nofile", f"no weight file at revision {COMMIT}", "HF_HUB_OFFLINE is set")
    place_snapshot(hf_home, "org/notoc", COMMIT, {"open_clip_config.json": b'{"architectures": ["Bert"]}'})
    with pytest.raises(ModelError) as exc:
        load_backbone("hf-hub:org/notoc")
    assert_one_line(exc, "hf-hub:org/notoc", "is not an open_clip model", "no model_cfg")


def test_without_huggingface_hub_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # import fails as if not installed
    with pytest.raises(ModelError) as exc:
        load_backbone("hf-hub:org/tiny")
    assert_one_line(exc, "needs the huggingface_hub package", "pip install huggingface_hub")


class _StubHub(http.server.BaseHTTPRequestHandler):
    """A Hub that knows no repo "org/missing", gates "org/gated", has no revision "nope" and holds
    no open_clip_config.json anywhere."""

    def _answer(self) -> None:
        if "/org/missing/" in self.path:
            code = "RepoNotFound"
        elif "/org/gated/" in self.path:
            code = "GatedRepo"
        elif "/resolve/nope/" in self.path:
            code = "RevisionNotFound"
        else:
            code = "EntryNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args) -> None:   # quiet
        pass


@pytest.fixture
def online_hub(tmp_path, monkeypatch):
    """huggingface_hub online, pointed at `endpoint(url)`; retries do not sleep."""
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    class _NoSleep:
        def __getattr__(self, name):
            return (lambda s: None) if name == "sleep" else getattr(time, name)

    monkeypatch.setattr(hub_http, "time", _NoSleep())

    def endpoint(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    return endpoint


def test_hub_answers_are_one_line(online_hub):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online_hub(f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(ModelError) as exc:
            load_backbone("hf-hub:org/missing")
        assert_one_line(exc, "hf-hub:org/missing", "repository not found on the Hugging Face Hub")
        with pytest.raises(ModelError) as exc:
            load_backbone("hf-hub:org/textonly")
        assert_one_line(exc, "hf-hub:org/textonly", "is not an open_clip repo", "no open_clip_config.json")
        with pytest.raises(ModelError) as exc:
            load_backbone("hf-hub:org/gated")
        assert_one_line(exc, "hf-hub:org/gated", "the repo is gated", "hf auth login")
        with pytest.raises(ModelError) as exc:
            load_backbone("hf-hub:org/tiny@nope")
        assert_one_line(exc, "hf-hub:org/tiny@nope", "revision not found")
    finally:
        server.shutdown()
        server.server_close()


def test_hub_unreachable_is_one_line(online_hub):
    with socket.socket() as s:   # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    online_hub(f"http://127.0.0.1:{port}")
    with pytest.raises(ModelError) as exc:
        load_backbone("hf-hub:org/tiny")
    assert_one_line(exc, "hf-hub:org/tiny", "not in the local Hugging Face cache", "could not be reached")


# ----------------------------------------------------------------------------- the CLI, end to end
@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for c, color in [("red", (200, 30, 30)), ("green", (30, 200, 30))]:
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 36), tuple(v + 10 * i for v in color)).save(root / c / f"{i}.png")
    return root


def test_cli_eval_with_a_hub_model_records_its_source(hf_home, folder, tmp_path, monkeypatch, capsys):
    files = repo_files(tiny_state(10), {"resize_mode": "squash", "interpolation": "bilinear"})
    place_snapshot(hf_home, "org/tiny", COMMIT, files)
    monkeypatch.chdir(tmp_path)   # the default run folder: runs/eval/<dataset>-<model slug>-<hash>
    assert main(["eval", "--model", "hf-hub:org/tiny", "--dataset", f"imagefolder:{folder}", "--attack", "none",
                 "--no-progress"]) == 0
    (run,) = list((tmp_path / "runs" / "eval").iterdir())
    assert "_images-hf-hub_org_tiny-" in run.name   # one folder, no ":" or "/" from the model name
    metrics = json.loads((run / "metrics.json").read_text())
    src = metrics["backbone"]["source"]
    assert (src["kind"], src["id"], src["revision"]) == ("hf-hub", "org/tiny", COMMIT)
    assert src["files"][0]["sha256"] == sha(files["open_clip_model.safetensors"])
    assert metrics["preprocess"] == {"image_size": 32, "interpolation": "bilinear", "resize_mode": "squash",
                                     "fill_color": 0}
    assert metrics["n"] == 4
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["fingerprint"] == {"weights": sha(files["open_clip_model.safetensors"]),
                                              "config": sha(files["open_clip_config.json"])}


def test_cli_train_tta_explain_with_a_local_dir_model(folder, tmp_path, monkeypatch):
    model = write_model_dir(tmp_path / "my model", tiny_state(11))
    name = f"local-dir:{model}"
    monkeypatch.chdir(tmp_path)
    assert main(["tta", "--model", name, "--dataset", f"imagefolder:{folder}", "--method", "tpt", "--attack", "none",
                 "--param", "n_views=4", "--param", "steps=1", "--no-progress"]) == 0
    (run,) = list((tmp_path / "runs" / "tta").iterdir())
    assert "local-dir_my_model" in run.name
    assert json.loads((run / "metrics.json").read_text())["backbone"]["source"]["kind"] == "local-dir"
    out = tmp_path / "train"
    assert main(["train", "--model", name, "--dataset", f"imagefolder:{folder}", "--split", "test", "--method", "coop",
                 "--n-ctx", "2", "--shots", "1", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["backbone"]["weights_sha256"] == sha(
        (model / "open_clip_model.safetensors").read_bytes())
    assert main(["eval", "--run", str(out), "--dataset", f"imagefolder:{folder}", "--attack", "none",
                 "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    assert main(["explain", "--model", name, "--dataset", f"imagefolder:{folder}", "--n", "1", "--steps", "1",
                 "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").is_file()


@pytest.mark.parametrize("argv, part", [
    (["eval", "--model", "hf-hub:org/absent"], "not in the local Hugging Face cache"),
    (["eval", "--model", "local-dir:/no/such/dir"], "no such directory"),
    (["eval", "--model", "hf-hub:org/tiny", "--pretrained", "openai"], "brings its own weights"),
])
def test_cli_bad_sources_are_one_line(argv, part, hf_home, folder, tmp_path, capsys):
    rc = main(argv + ["--dataset", f"imagefolder:{folder}", "--attack", "none", "--no-progress",
                      "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and part in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_model_slug_is_one_safe_path_component():
    assert model_slug("ViT-B/32") == "ViT-B-32" and model_slug("rp-tiny") == "rp-tiny"   # as before
    assert model_slug("hf-hub:org/repo@v1.0") == "hf-hub_org_repo_v1.0"
    assert model_slug("local-dir:/data/models/my model/") == "local-dir_my_model"
    assert "/" not in model_slug("hf-hub:" + "x" * 300 + "/y") and len(model_slug("hf-hub:" + "x" * 300)) <= 80
