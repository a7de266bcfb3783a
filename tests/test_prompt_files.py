"""Self-describing prompt files (issue 11 §2): the metadata a training run writes into
prompts.safetensors, rebuilding a classifier from the file alone, refusing other backbone weights,
and one-line errors for damaged or foreign metadata.

Everything runs on rp-tiny (3 blocks, width 32) with its weights in a file, so the weights have a
SHA-256 and a classifier can be rebuilt bit for bit; images are a 3-class folder of solid colours."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save, save_file

import robustprompt as rp
from robustprompt.cli import main
from robustprompt.config import ModelSpec
from robustprompt.errors import ConfigError, ModelError, RobustPromptError
from robustprompt.models import PromptConfig, PromptedClassifier, load_backbone
from robustprompt.models.prompt_file import FORMAT_VERSION, META_KEY, read_meta, write_prompts

CLASSES = ["red", "green", "blue"]   # folder names; sorted by the image-folder reader: blue, green, red
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
PROMPT = {"coupling": "independent", "n_ctx": 2, "depth": 2, "text_init_mode": "phrase"}


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def error_line(stderr: str) -> str:
    """The CLI's error: exactly one line of stderr says 'error:' (log notes may come before it)."""
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def image_folder(root: Path) -> Path:
    """root/{train,test}/<colour>/<i>.png: 2 training and 2 test images per class."""
    for split in ("train", "test"):
        for c, colour in COLOURS.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                shade = tuple(min(255, v + 20 * i + (5 if split == "test" else 0)) for v in colour)
                Image.new("RGB", (36, 40), shade).save(root / split / c / f"{i}.png")
    return root


def tiny_weights(path: Path, seed: int) -> Path:
    """rp-tiny's weights, randomly initialised from `seed`, as a state-dict file."""
    torch.manual_seed(seed)
    bb = load_backbone("rp-tiny")
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_cfg(root: Path, weights: Path, **method):
    from robustprompt.engine.train import train_config_from_dict

    raw = {"model": {"name": "rp-tiny", "pretrained": str(weights), "prompt": dict(PROMPT)},
           "method": {"name": "advvlp", **method},
           "data": {"dataset": f"imagefolder:{root}", "shots": 2, "batch_size": 3, "augment": "none"},
           "optim": {"epochs": 1, "warmup_epochs": 0, "lr": 0.05},
           "train_attack": {"eps": 4, "alpha": 2, "steps": 1}, "seed": 3, "device": "cpu"}
    return train_config_from_dict(raw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished training run on rp-tiny-from-a-file, and the classifier training ended with."""
    import robustprompt.engine.train as train_mod

    tmp = tmp_path_factory.mktemp("tiny_run")
    root = image_folder(tmp / "colours")
    weights = tiny_weights(tmp / "weights.safetensors", seed=0)
    captured = {}
    original = train_mod._write_prompt_file

    def capture(run, clf, *a, **k):   # the trained classifier itself, as training saves it
        captured["clf"] = clf
        return original(run, clf, *a, **k)

    train_mod._write_prompt_file = capture
    try:
        metrics = train_mod.train(train_cfg(root, weights), tmp / "run", progress=False)
    finally:
        train_mod._write_prompt_file = original
    return {"tmp": tmp, "root": root, "weights": weights, "run": tmp / "run", "metrics": metrics,
            "clf": captured["clf"].eval()}


def colour_images(root: Path) -> torch.Tensor:
    """The test images as the classifier sees them (rp-tiny: 32×32), in [0,1]."""
    import torchvision.transforms.functional as TF

    files = sorted((root / "test").rglob("*.png"))
    return torch.stack([TF.to_tensor(Image.open(f).convert("RGB").resize((32, 32))) for f in files])


# ----------------------------------------------------------------------------- the metadata
def raw_header(path: Path) -> dict:
    """The safetensors header, parsed by hand (independent of the reader under test)."""
    data = Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n])


def test_training_writes_the_description(tiny_run):
    file = tiny_run["run"] / "prompts.safetensors"
    header = raw_header(file)
    # one metadata key, holding JSON: the bytes do not depend on a hash map's order
    assert list(header["__metadata__"]) == [META_KEY]
    doc = json.loads(header["__metadata__"][META_KEY])
    assert doc["format"] == "robustprompt-prompts" and doc["version"] == FORMAT_VERSION == 1
    assert doc["prompt"] == {**PromptConfig().to_dict(), **PROMPT}
    assert doc["classnames"] == sorted(CLASSES) and doc["templates"] == ["a photo of a {}."]
    bb = doc["backbone"]
    assert (bb["name"], bb["pretrained"], bb["quick_gelu"]) == ("rp-tiny", str(tiny_run["weights"]), False)
    assert bb["weights_sha256"] == sha256(tiny_run["weights"]) and bb["hub"] is None
    assert doc["method"]["name"] == "advvlp"
    threat = doc["train_threat"]
    assert (threat["attack"], threat["norm"], threat["eps_255"], threat["steps"]) == ("pgd", "linf", 4.0, 1)
    assert threat["short"] == "PGD-1 ℓ∞ ε=4/255 α=2/255"
    assert doc["dataset"]["shots"] == 2 and doc["dataset"]["seed"] == 3 and doc["dataset"]["classes"] == "all"
    assert doc["toolkit"] == {"name": "robustprompt", "version": rp.__version__}
    # the tensors are untouched by the metadata: the same names and shapes the layout makes
    assert set(load_file(str(file))) == set(tiny_run["clf"].prompt_state_dict())
    # and the reader gives back what is there
    meta = read_meta(file)
    assert meta.prompt == PromptConfig(**PROMPT) and meta.classnames == doc["classnames"]
    assert meta.weights_sha256 == bb["weights_sha256"] and meta.train_threat == threat
    # a resume of the finished run reuses it: the file is not rewritten
    before = file.read_bytes()
    from robustprompt.engine.train import train

    train(train_cfg(tiny_run["root"], tiny_run["weights"]), tiny_run["run"], progress=False)
    assert file.read_bytes() == before


def test_write_prompts_round_trip(tmp_path):
    """A hand-made description survives write → read exactly; a directory target is a loadable run."""
    state = {"text_ctx.0": torch.arange(8.0).view(2, 4)}
    threat = {"attack": "pgd", "eps_255": 1.0, "short": "PGD-10 ℓ∞ ε=1/255 α=0.25/255"}
    kw = dict(prompt=PromptConfig(coupling="text", n_ctx=2, depth=1), model=ModelSpec(name="ViT-B-32",
              pretrained="openai"), classnames=["cat", "dog", "a b|c"], templates=["a photo of a {}."],
              method="fap", method_params={"lam": 1.5}, train_threat=threat,
              dataset={"name": "imagenet", "classes": "base", "shots": 16, "seed": 1}, weights_sha256="ab" * 32,
              backbone_info={"quick_gelu": True, "hub_repo": "org/clip", "hub_revision": "c" * 40},
              source={"kind": "dassl", "file": "model.pth.tar-5"})
    f = write_prompts(tmp_path / "p.safetensors", state, **kw)
    meta = read_meta(f)
    assert meta.prompt == PromptConfig(coupling="text", n_ctx=2, depth=1)
    assert meta.classnames == ["cat", "dog", "a b|c"] and meta.method == {"name": "fap", "params": {"lam": 1.5}}
    assert meta.backbone["name"] == "ViT-B-32" and meta.backbone["pretrained"] == "openai"
    assert meta.backbone["quick_gelu"] is True    # the loaded backbone's resolved value wins over the spec's None
    assert meta.hub == {"repo_id": "org/clip", "revision": "c" * 40} and meta.weights_sha256 == "ab" * 32
    assert meta.train_threat == threat and meta.dataset["classes"] == "base" and meta.source["kind"] == "dassl"
    assert torch.equal(load_file(str(f))["text_ctx.0"], state["text_ctx.0"])
    # the same inputs give the same bytes
    g = write_prompts(tmp_path / "q.safetensors", state, **kw)
    assert f.read_bytes() == g.read_bytes()
    # a directory: prompts.safetensors + config.yaml, which the run readers accept
    d = write_prompts(tmp_path / "imported", state, **kw).parent
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["model"]["fingerprint"]["weights"] == "ab" * 32 and cfg["method"]["name"] == "fap"
    from robustprompt.engine.tasks import method_of

    assert method_of(ModelSpec(run=str(d)))["method"] == "fap"
    opened = rp.open_prompts(run=str(d))
    assert opened.prompt.coupling == "text" and opened.weights_sha256 == "ab" * 32


# ----------------------------------------------------------------------------- rebuilding
def test_a_prompt_file_alone_rebuilds_the_trained_classifier(tiny_run, tmp_path):
    x = colour_images(tiny_run["root"])
    with torch.no_grad():
        ref = tiny_run["clf"](x)
    alone = tmp_path / "elsewhere" / "fancy-name.safetensors"   # no config.yaml, no metrics, another name
    alone.parent.mkdir()
    shutil.copyfile(tiny_run["run"] / "prompts.safetensors", alone)
    clf = rp.load_classifier(prompts=str(alone))
    assert clf.classnames == sorted(CLASSES) and clf.prompt_cfg == PromptConfig(**PROMPT)
    assert clf.prompt_origin == str(alone)      # it knows its prompts are trained ones (TAPT relies on it)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), ref, rtol=0, atol=0)
    # the run directory gives the same classifier
    with torch.no_grad():
        torch.testing.assert_close(rp.load_classifier(run=str(tiny_run["run"]))(x), ref, rtol=0, atol=0)
    # other class names (base → new transfer): allowed, the prompts are kept
    other = rp.load_classifier(prompts=str(alone), classnames=["blue", "red"])
    with torch.no_grad():
        assert other(x).shape == (len(x), 2)
    assert all(torch.equal(other.prompt_state_dict()[k], v) for k, v in clf.prompt_state_dict().items())


def test_moved_weights_load_from_their_new_place_when_the_hash_matches(tiny_run, tmp_path):
    """The recorded weight file is gone: a one-line error naming the hash; the same bytes elsewhere load."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    moved_from = tmp_path / "w.safetensors"
    shutil.copyfile(tiny_run["weights"], moved_from)
    meta = read_meta(run / "prompts.safetensors")
    # rewrite the record as if trained on tmp/w.safetensors, then move that file away
    meta.backbone["pretrained"] = str(moved_from)
    from robustprompt.models.prompt_file import write_prompt_file

    write_prompt_file(run / "prompts.safetensors", load_file(str(run / "prompts.safetensors")), meta)
    new_place = tmp_path / "archive" / "clip.safetensors"
    new_place.parent.mkdir()
    moved_from.rename(new_place)
    with pytest.raises(ModelError) as exc:
        rp.load_classifier(run=str(run))
    msg = one_line(exc)
    assert "moved?" in msg and str(moved_from) in msg and sha256(new_place) in msg
    x = colour_images(tiny_run["root"])
    clf = rp.load_classifier(run=str(run), pretrained=str(new_place))
    with torch.no_grad():
        torch.testing.assert_close(clf(x), tiny_run["clf"](x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- other weights
def test_other_backbone_weights_are_refused_unless_allowed(tiny_run, tmp_path, capsys):
    other = tiny_weights(tmp_path / "other.safetensors", seed=1)
    want, got = sha256(tiny_run["weights"]), sha256(other)
    assert want != got
    with pytest.raises(ModelError) as exc:
        rp.load_classifier(run=str(tiny_run["run"]), pretrained=str(other))
    msg = one_line(exc)
    assert want in msg and got in msg and "allow_backbone_mismatch" in msg
    x = colour_images(tiny_run["root"])
    clf = rp.load_classifier(run=str(tiny_run["run"]), pretrained=str(other), allow_backbone_mismatch=True)
    with torch.no_grad():
        assert not torch.allclose(clf(x), tiny_run["clf"](x))   # it really is the other backbone
    # the engines' path (eval / tta / explain): ModelSpec(run=..., allow_backbone_mismatch=...)
    from types import SimpleNamespace

    from robustprompt.api import classifier_from_spec

    data = SimpleNamespace(classnames=sorted(CLASSES), templates=["a photo of a {}."])
    with pytest.raises(ModelError, match=got):
        classifier_from_spec(ModelSpec(run=str(tiny_run["run"]), pretrained=str(other)), data)
    classifier_from_spec(ModelSpec(run=str(tiny_run["run"]), pretrained=str(other), allow_backbone_mismatch=True),
                         data)
    # the CLI: one line on stderr, exit code 2; the flag loads them anyway
    base = ["eval", "--run", str(tiny_run["run"]), "--pretrained", str(other), "--dataset",
            f"imagefolder:{tiny_run['root']}", "--attack", "none", "--device", "cpu", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "e1")]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("robustprompt eval: error:") and want in err and got in err
    assert main(base + ["--out", str(tmp_path / "e2"), "--allow-backbone-mismatch"]) == 0
    assert yaml.safe_load((tmp_path / "e2" / "config.yaml").read_text())["model"]["allow_backbone_mismatch"] is True


def test_weights_replaced_in_place_are_refused(tiny_run, tmp_path):
    """The file at the recorded path now holds other weights (a re-download, an edit)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    weights = tmp_path / "w.safetensors"
    shutil.copyfile(tiny_run["weights"], weights)
    meta = read_meta(run / "prompts.safetensors")
    meta.backbone["pretrained"] = str(weights)
    from robustprompt.models.prompt_file import write_prompt_file

    write_prompt_file(run / "prompts.safetensors", load_file(str(run / "prompts.safetensors")), meta)
    rp.load_classifier(run=str(run))   # fine as recorded
    tiny_weights(weights, seed=2)
    with pytest.raises(ModelError) as exc:
        rp.load_classifier(run=str(run))
    assert sha256(weights) in one_line(exc) and meta.weights_sha256 in one_line(exc)


def test_an_older_run_without_metadata_still_loads_and_is_checked(tiny_run, tmp_path):
    """A run written before prompt files described themselves: tensors only, config.yaml says the rest
    (its model.fingerprint.weights is the recorded hash)."""
    run = tmp_path / "old"
    shutil.copytree(tiny_run["run"], run)
    save_file(load_file(str(run / "prompts.safetensors")), str(run / "prompts.safetensors"))   # no metadata
    assert read_meta(run / "prompts.safetensors") is None
    x = colour_images(tiny_run["root"])
    clf = rp.load_classifier(run=str(run))   # class names from the run's dataset
    assert clf.classnames == sorted(CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), tiny_run["clf"](x), rtol=0, atol=0)
    other = tiny_weights(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(ModelError, match=sha256(other)):
        rp.load_classifier(run=str(run), pretrained=str(other))
    # the file alone cannot say what it is
    with pytest.raises(ModelError) as exc:
        rp.load_classifier(prompts=str(shutil.copyfile(run / "prompts.safetensors", tmp_path / "bare.safetensors")))
    assert "does not describe itself" in one_line(exc)


# ----------------------------------------------------------------------------- bad files
def _with_metadata(path: Path, metadata: dict | None, tensors=None) -> Path:
    path.write_bytes(save(tensors or {"text_ctx.0": torch.zeros(2, 32)}, metadata=metadata))
    return path


def _doc(tiny_run, **change) -> str:
    doc = json.loads(raw_header(tiny_run["run"] / "prompts.safetensors")["__metadata__"][META_KEY])
    for k, v in change.items():
        if v is KeyError:
            doc.pop(k)
        else:
            doc[k] = v
    return json.dumps(doc)


BAD = [
    # name, metadata (a function of the good document), words in the message
    ("not-json", lambda r: {META_KEY: "{not json"}, "not valid JSON"),
    ("foreign-format", lambda r: {META_KEY: json.dumps({"format": "someone-else", "version": 1})}, "someone-else"),
    ("a-list", lambda r: {META_KEY: "[1, 2]"}, "not a robustprompt prompt description"),
    ("newer", lambda r: {META_KEY: _doc(r, version=99)}, "newer robustprompt"),
    ("no-classnames", lambda r: {META_KEY: _doc(r, classnames=KeyError)}, "lacks 'classnames'"),
    ("empty-classnames", lambda r: {META_KEY: _doc(r, classnames=[])}, "classnames"),
    ("bad-coupling", lambda r: {META_KEY: _doc(r, prompt={"coupling": "sideways"})}, "sideways"),
    ("bad-prompt-key", lambda r: {META_KEY: _doc(r, prompt={"coupling": "text", "colour": 1})}, "colour"),
    ("bad-hash", lambda r: {META_KEY: _doc(r, backbone={"name": "rp-tiny", "weights_sha256": "xyz"})},
     "not a SHA-256"),
    ("no-backbone", lambda r: {META_KEY: _doc(r, backbone="rp-tiny")}, "'backbone' must be a mapping"),
    ("huge-junk", lambda r: {META_KEY: "\n" * 50 + "x" * 100_000}, "not valid JSON"),
]


@pytest.mark.parametrize("name,metadata,words", BAD, ids=[b[0] for b in BAD])
def test_damaged_or_foreign_metadata_is_one_line(tiny_run, tmp_path, name, metadata, words):
    f = _with_metadata(tmp_path / f"{name}.safetensors", metadata(tiny_run))
    for load in (lambda: rp.load_classifier(prompts=str(f)), lambda: read_meta(f)):
        with pytest.raises(ModelError) as exc:
            load()
        msg = one_line(exc)
        assert words in msg and name in msg and len(msg) < 1000, msg


def test_files_that_are_not_prompt_files(tiny_run, tmp_path):
    foreign = _with_metadata(tmp_path / "model.safetensors", {"format": "pt"})   # another tool's safetensors
    with pytest.raises(ModelError) as exc:
        rp.load_classifier(prompts=str(foreign))
    assert "does not describe itself" in one_line(exc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 40)
    with pytest.raises(ModelError) as exc:
        rp.load_classifier(prompts=str(garbage))
    assert "garbage.safetensors" in one_line(exc)
    with pytest.raises(ConfigError, match="is not a file"):
        rp.load_classifier(prompts=str(tmp_path / "missing.safetensors"))
    # tensors that do not match the recorded layout
    wrong = _with_metadata(tmp_path / "wrong.safetensors", {META_KEY: _doc(tiny_run)})
    with pytest.raises(ModelError) as exc:
        rp.load_classifier(prompts=str(wrong))
    assert "does not hold the prompts" in one_line(exc) and "wrong.safetensors" in one_line(exc)


def test_call_forms_are_checked():
    with pytest.raises(ConfigError, match="needs a backbone name, run= .* or prompts="):
        rp.load_classifier()
    with pytest.raises(ConfigError, match="needs classnames="):
        rp.load_classifier("rp-tiny")
    with pytest.raises(ConfigError, match="prompt layout is recorded"):
        rp.load_classifier(prompts="x.safetensors", prompt=PromptConfig(coupling="text"))
    with pytest.raises(RobustPromptError):
        rp.open_prompts(run="a", prompts="b")


def test_a_hub_backbone_is_rebuilt_at_the_recorded_commit(tmp_path):
    """Prompts trained on hf-hub:ORG/REPO record the commit the Hub served; reloading pins it, so a
    later push to the backbone repo cannot change what the prompts are loaded onto."""
    commit = "c" * 40
    f = write_prompts(tmp_path / "p.safetensors", {}, prompt=PromptConfig(), model=ModelSpec(name="hf-hub:org/clip"),
                      classnames=["a"], templates=["{}"], method="zeroshot", weights_sha256="ab" * 32,
                      backbone_info={"hub_repo": "org/clip", "hub_revision": commit})
    assert rp.open_prompts(prompts=str(f)).backbone.name == f"hf-hub:org/clip@{commit}"
    g = write_prompts(tmp_path / "q.safetensors", {}, prompt=PromptConfig(), model=ModelSpec(name="hf-hub:org/clip@v2"),
                      classnames=["a"], templates=["{}"], method="zeroshot", weights_sha256="ab" * 32,
                      backbone_info={"hub_repo": "org/clip", "hub_revision": commit})
    assert rp.open_prompts(prompts=str(g)).backbone.name == f"hf-hub:org/clip@{commit}"   # a branch moves on
