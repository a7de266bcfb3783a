"""Loading is data only: no checkpoint runs code, nothing corrupt or non-finite is loaded silently,
and every bad file ends in a one-line RobustPromptError that names it (issue 10, §1, §5, §7)."""
from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import open_clip

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from robustprompt.errors import ConfigError, ModelError, RobustPromptError
from robustprompt.models import load_backbone

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::torch.jit.TracerWarning")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert 0 < len(msg) < 700, msg
    return msg


# ----------------------------------------------------------------- §1: malicious files never run
class _Evil(nn.Module):
    """TorchScript runs an exported __setstate__ inside torch.jit.load: this one maps a file
    (torch.from_file with shared=True creates it) and writes 'AAAAAAAA' into it."""

    def __init__(self, marker: str, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool, torch.Tensor]:
        return (self.marker, self.training, self.w)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool, torch.Tensor]) -> None:
        self.marker = state[0]
        self.training = state[1]
        t = torch.from_file(state[0], shared=True, size=8, dtype=torch.uint8)
        t.fill_(65)
        self.w = state[2] + 0.0 * t[0].float()   # uses t, so the scripted code keeps the write


class _EvilDictState(nn.Module):
    """As _Evil, but its state is a mapping of tensors, so a reader could take it as attributes."""

    def __init__(self, marker: str):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, 2))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w

    @torch.jit.export
    def __getstate__(self) -> Dict[str, torch.Tensor]:
        return {"w": self.w, "m": torch.tensor([ord(c) for c in self.marker])}

    @torch.jit.export
    def __setstate__(self, state: Dict[str, torch.Tensor]) -> None:
        codes: List[int] = state["m"].tolist()
        self.marker = "".join([chr(c) for c in codes])
        t = torch.from_file(self.marker, shared=True, size=8, dtype=torch.uint8)
        t.fill_(65)
        self.w = state["w"] + 0.0 * t[0].float()


@pytest.mark.parametrize("evil", [_Evil, _EvilDictState])
def test_torchscript_setstate_never_runs(tmp_path, evil):
    marker = tmp_path / "pwned"
    module = evil(str(marker), torch.ones(2, 2)) if evil is _Evil else evil(str(marker))
    torch.jit.script(module).save(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    with pytest.raises(ModelError) as exc:
        load_backbone("rp-tiny", tmp_path / "evil.pt")
    msg = _one_line(exc)
    assert not marker.exists(), "loading a checkpoint ran the archive's code"
    assert "evil.pt" in msg and "cannot read without running its code" in msg and "__setstate__" in msg


class _WritesOnUnpickle:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_with_code_is_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    sd = {"w": torch.ones(2), "payload": _WritesOnUnpickle(str(marker))}
    torch.save(sd, tmp_path / "evil.pt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ModelError) as exc:
        load_backbone("rp-tiny", tmp_path / "evil.pt")
    msg = _one_line(exc)
    assert not marker.exists()
    assert "evil.pt" in msg and "io.open" in msg and "state dict" in msg


class _RunsCommandOnUnpickle:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_naming_a_blocked_module_is_named_not_called_corrupt(tmp_path):
    """torch words a blocked module (os/posix) differently from other globals; both are named."""
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "payload": _RunsCommandOnUnpickle(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ModelError) as exc:
        load_backbone("rp-tiny", tmp_path / "evil.pt")
    msg = _one_line(exc)
    assert not marker.exists()
    assert "system" in msg and "only running code could rebuild" in msg and "corrupt" not in msg


# ----------------------------------------------------------------- §1: the reader reads what jit reads
class _Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("steps", torch.tensor([3, 1, 4], dtype=torch.int64))
        self.plain = torch.full((2,), 7.0)   # a tensor attribute: neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.plain.sum() + self.steps.sum()


class _Top(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.sub = _Sub()
        base = torch.randn(4, 6, generator=g)
        self.wt = nn.Parameter(base.t())                  # non-contiguous strides
        self.part = nn.Parameter(base.t()[1:3, 2:4])      # storage offset into a shared storage
        self.seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1, bias=False))
        self.register_buffer("hbuf", torch.randn(3, generator=g).half())
        self.register_buffer("flag", torch.tensor([True, False]))
        self.register_buffer("bf", torch.randn(2, generator=g).bfloat16())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sub(x)
        return self.seq(y) + self.wt.sum() + self.part.sum() + self.hbuf.float().sum() + self.bf.float().sum()


def test_reader_reproduces_jit_state_dict(tmp_path):
    from robustprompt.models.safe_archive import read_torchscript_state

    path = tmp_path / "nested.pt"
    torch.jit.script(_Top()).save(str(path))
    expected = torch.jit.load(str(path)).state_dict()   # a benign archive built here: safe to run
    got = read_torchscript_state(path)
    assert list(got) == list(expected)   # the same names in the same order
    assert set(got) == {"wt", "part", "hbuf", "flag", "bf", "sub.steps", "sub.lin.weight", "sub.lin.bias",
                        "seq.0.weight", "seq.0.bias", "seq.2.weight"}
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].stride() == v.stride(), k
        assert torch.equal(got[k], v), k
    assert got["part"].storage_offset() == expected["part"].storage_offset() > 0


def test_reader_without_code_takes_every_tensor(tmp_path):
    """Without the printed class declarations (code/ stripped) every tensor attribute is taken."""
    from robustprompt.models.safe_archive import read_torchscript_state

    torch.jit.script(_Top()).save(str(tmp_path / "ok.pt"))
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / "nocode.pt", "w") as dst:
        for info in src.infolist():
            if "/code/" not in info.filename:
                dst.writestr(info, src.read(info))
    expected = torch.jit.load(str(tmp_path / "ok.pt")).state_dict()
    got = read_torchscript_state(tmp_path / "nocode.pt")
    assert set(got) == set(expected) | {"sub.plain"}
    assert torch.equal(got["sub.plain"], torch.full((2,), 7.0))
    assert all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("how", ["script", "trace"])
def test_reader_on_open_clip_archives(tmp_path, how):
    from robustprompt.models.safe_archive import read_torchscript_state

    torch.manual_seed(3)
    if how == "script":
        archive = open_clip.create_model("rp-tiny", jit=True)
    else:   # OpenAI's own archives were traced
        archive = torch.jit.trace_module(open_clip.create_model("rp-tiny").eval(),
                                         {"encode_image": torch.rand(1, 3, 32, 32)}, check_trace=False)
    torch.jit.save(archive, str(tmp_path / "tiny.pt"))
    expected = torch.jit.load(str(tmp_path / "tiny.pt")).state_dict()
    got = read_torchscript_state(tmp_path / "tiny.pt")
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    # and load_backbone takes them as they are (QuickGELU for a TorchScript archive, as before)
    bb = load_backbone("rp-tiny", tmp_path / "tiny.pt")
    assert bb.quick_gelu
    own = bb.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in expected.items() if k in own)


def test_unknown_global_in_torchscript_is_refused(tmp_path):
    """An archive whose data.pkl names anything beyond tensors and TorchScript classes."""
    torch.jit.script(_Top()).save(str(tmp_path / "ok.pt"))
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                assert b"collections\nOrderedDict" in data
                data = data.replace(b"collections\nOrderedDict", b"os\nsystem")
            dst.writestr(info, data)
    with pytest.raises(ModelError) as exc:
        load_backbone("rp-tiny", bad)
    msg = _one_line(exc)
    assert "TorchScript archive" in msg and "os.system" in msg and "convert" in msg


# ----------------------------------------------------------------- §7: unreadable files say why
@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in load_backbone("rp-tiny").model.state_dict().items()}


def test_unreadable_checkpoints_say_why(tmp_path, tiny_state):
    torch.save(tiny_state, tmp_path / "good.pt")
    torch.save(tiny_state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(tiny_state, str(tmp_path / "good.safetensors"))
    torch.jit.save(open_clip.create_model("rp-tiny", jit=True), str(tmp_path / "ts.pt"))
    cases = {
        "empty.pt": (b"", "empty file"),
        "text.pt": (b"101 not a checkpoint\n", "not a PyTorch checkpoint (neither a zip archive nor a pickle)"),
        "trunc-zip.pt": ((tmp_path / "good.pt").read_bytes()[:3000], "truncated"),
        "trunc-ts.pt": ((tmp_path / "ts.pt").read_bytes()[:5000], "truncated"),
        "trunc-legacy.pt": ((tmp_path / "legacy.pt").read_bytes()[:3000], "truncated"),
        "trunc.safetensors": ((tmp_path / "good.safetensors").read_bytes()[:3000], "safetensors"),
        "empty.safetensors": (b"", "empty file"),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError) as exc:
            load_backbone("rp-tiny", tmp_path / name)
        msg = _one_line(exc)
        assert name in msg and words in msg, (name, msg)
    # the intact ones still load
    for name in ("good.pt", "legacy.pt", "good.safetensors"):
        bb = load_backbone("rp-tiny", tmp_path / name)
        assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in tiny_state.items())


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    torch.save({"a": torch.ones(2), "b": 3}, tmp_path / "mixed.pt")
    for name, words in (("list.pt", "holds a list"), ("mixed.pt", "'b'")):
        with pytest.raises(ModelError) as exc:
            load_backbone("rp-tiny", tmp_path / name)
        assert words in _one_line(exc)


# ----------------------------------------------------------------- §5: non-finite weights refused
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "torchscript"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_are_refused(tmp_path, tiny_state, fmt, bad):
    sd = {k: v.clone() for k, v in tiny_state.items()}
    sd["visual.transformer.resblocks.1.mlp.c_fc.weight"][3, 5] = bad
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "pt":
        torch.save(sd, path)
    elif fmt == "safetensors":
        save_file(sd, str(path))
    else:
        scripted = open_clip.create_model("rp-tiny", jit=True)
        scripted.load_state_dict(sd, strict=False)
        torch.jit.save(scripted, str(path))
    with pytest.raises(ModelError) as exc:
        load_backbone("rp-tiny", path)
    msg = _one_line(exc)
    assert "visual.transformer.resblocks.1.mlp.c_fc.weight" in msg and "non-finite" in msg and path.name in msg


def test_first_non_finite_finds_buffers_too():
    from robustprompt.models.safe_archive import first_non_finite

    m = nn.BatchNorm1d(3)
    assert first_non_finite(m) is None
    m.running_var[1] = math.inf
    assert first_non_finite(m) == "running_var"
    m.running_var[1] = 1.0
    m.weight.data[0] = math.nan
    assert first_non_finite(m) == "weight"
    m.weight.data[0] = 1.0
    assert first_non_finite(m) is None   # the integer buffer num_batches_tracked is skipped, not an error
    # finite tensors whose sum overflows are finite; a lone -inf or NaN among huge values is found
    big = {"a": torch.full((8,), 3e38), "h": torch.full((4,), 60000.0).half(), "z": torch.zeros(0)}
    assert first_non_finite(big) is None
    big["h"][2] = -math.inf
    assert first_non_finite(big) == "h"
    assert first_non_finite({"c": torch.tensor([1 + 1j, complex(math.nan, 0)])}) == "c"


# ----------------------------------------------------------------- §7: --run directories
def _write_run(run: Path, cfg, prompts: Dict[str, torch.Tensor] | None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    if prompts is not None:
        save_file(prompts, str(run / "prompts.safetensors"))


_RUN_CFG = {"method": {"name": "apt"}, "seed": 1, "data": {"shots": 4},
            "model": {"name": "rp-tiny", "prompt": {"coupling": "independent", "n_ctx": 2, "depth": 2}}}


@pytest.fixture(scope="module")
def good_prompts():
    from robustprompt.models import PromptConfig, PromptedClassifier

    torch.manual_seed(0)
    clf = PromptedClassifier(load_backbone("rp-tiny"), ["a", "b"], PromptConfig(coupling="independent", n_ctx=2,
                                                                                  depth=2))
    return {k: v.contiguous() for k, v in clf.prompt_state_dict().items()}


def _classifier(run: Path):
    from robustprompt.api import classifier_from_spec
    from robustprompt.config import ModelSpec

    data = SimpleNamespace(classnames=["a", "b"], templates=["a photo of a {}."])
    return classifier_from_spec(ModelSpec(run=str(run)), data)


def test_good_run_loads(tmp_path, good_prompts):
    from robustprompt.engine.tasks import method_of
    from robustprompt.config import ModelSpec

    _write_run(tmp_path / "run", _RUN_CFG, good_prompts)
    clf = _classifier(tmp_path / "run")
    assert all(torch.equal(clf.prompt_state_dict()[k], v) for k, v in good_prompts.items())
    assert method_of(ModelSpec(run=str(tmp_path / "run")))["method"] == "apt"


def test_bad_run_directories(tmp_path, good_prompts):
    from robustprompt.config import ModelSpec
    from robustprompt.engine.tasks import method_of

    nan = {k: v.clone() for k, v in good_prompts.items()}
    first = sorted(nan)[1]
    nan[first][0, 0] = math.nan
    wrong = dict(good_prompts)
    wrong.pop(sorted(wrong)[0])
    wrong["extra"] = torch.zeros(2)
    cases = [
        # name, config, prompts (None: write the raw bytes below), raw bytes, error class, words
        ("corrupt", _RUN_CFG, None, b"\x00" * 64, ModelError, "prompts.safetensors"),
        ("empty", _RUN_CFG, None, b"", ModelError, "empty file"),
        ("truncated", _RUN_CFG, None, "TRUNC", ModelError, "prompts.safetensors"),
        ("empty-cfg", "", good_prompts, None, ConfigError, "no model section"),
        ("list-cfg", "- 1\n- 2\n", good_prompts, None, ConfigError, "mapping"),
        ("no-model", {"method": {"name": "apt"}}, good_prompts, None, ConfigError, "no model section"),
        ("model-not-map", {"model": 3}, good_prompts, None, ConfigError, "model"),
        ("no-prompt", {"model": {"name": "rp-tiny"}}, good_prompts, None, ConfigError, "prompt"),
        ("nan", _RUN_CFG, nan, None, ModelError, first),
        ("layout", _RUN_CFG, wrong, None, ModelError, "extra"),
        ("not-a-dir", None, None, None, ConfigError, "not a finished training run"),
    ]
    full = (tmp_path / "full.safetensors")
    save_file(good_prompts, str(full))
    for name, cfg, prompts, raw, err, words in cases:
        run = tmp_path / name
        if cfg is not None:
            _write_run(run, cfg, prompts)
        if raw == "TRUNC":
            (run / "prompts.safetensors").write_bytes(full.read_bytes()[:-20])
        elif raw is not None:
            (run / "prompts.safetensors").write_bytes(raw)
        with pytest.raises(err) as exc:
            _classifier(run)
        msg = _one_line(exc)
        assert words in msg and name in msg, (name, msg)
    # method_of reads only config.yaml: the config cases fail there too, with one line
    for name in ("empty-cfg", "list-cfg"):
        with pytest.raises(RobustPromptError) as exc:
            method_of(ModelSpec(run=str(tmp_path / name)))
        assert name in _one_line(exc)
    (tmp_path / "bad-method").mkdir()
    (tmp_path / "bad-method" / "config.yaml").write_text(yaml.safe_dump({**_RUN_CFG, "method": "apt"}))
    with pytest.raises(ConfigError) as exc:
        method_of(ModelSpec(run=str(tmp_path / "bad-method")))
    assert "method" in _one_line(exc)


# ----------------------------------------------------------------- §7: the demo cache's config.json
def _demo_cache_copy(tmp_path, monkeypatch):
    from robustprompt.demo import backbone as demo

    real = demo.demo_dir()
    if not (real / "model.safetensors").is_file():
        pytest.skip("the demo backbone is not built on this machine")
    monkeypatch.setenv("ROBUSTPROMPT_CACHE", str(tmp_path / "cache"))
    copy = demo.demo_dir()
    assert copy != real and str(copy).startswith(str(tmp_path))
    copy.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(real / f, copy / f)
    return demo, real, copy


@pytest.mark.parametrize("content", [b"", b"{\"recipe\": ", b"[1, 2]", b"\xff\xfe\x00garbage", b"null"])
def test_corrupt_demo_config_rebuilds(tmp_path, monkeypatch, content):
    from safetensors.torch import load_file

    demo, real, copy = _demo_cache_copy(tmp_path, monkeypatch)
    real_bytes = (real / "config.json").read_bytes(), (real / "model.safetensors").stat().st_mtime_ns
    meta = json.loads((real / "config.json").read_text())
    meta.pop("sha256")
    calls = []

    def fake_train(**kw):   # the real one takes minutes: hand back the cached weights instead
        calls.append(kw)
        return load_file(str(real / "model.safetensors")), dict(meta)

    monkeypatch.setattr(demo, "train_demo_backbone", fake_train)
    (copy / "config.json").write_bytes(content)
    bb = demo.load_demo_backbone(progress=False)
    assert len(calls) == 1
    assert json.loads((copy / "config.json").read_text())["sha256"] == bb.extra["sha256"]
    assert ((real / "config.json").read_bytes(), (real / "model.safetensors").stat().st_mtime_ns) == real_bytes


# ----------------------------------------------------------------- §7: --device
def test_bogus_device_is_a_config_error(monkeypatch):
    from robustprompt.api import resolve_device

    for bad in ("bogus", "cuda:x", "cpu:-3", "", "x" * 5000):
        with pytest.raises(ConfigError) as exc:
            resolve_device(bad)
        msg = _one_line(exc)
        assert "is not a device: use auto, cpu, cuda, cuda:N or mps" in msg and len(msg) < 400
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")
