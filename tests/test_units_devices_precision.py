"""Issue 12 §2-3: ℓ2 budgets in pixel units, the device asked for is the device used, precision
and TF32 declared and recorded."""
import json
import logging
import math
import re

import pytest
import torch
from torch import nn

from robustprompt import api
from robustprompt.attacks.pgd import pgd
from robustprompt.attacks.threat import ThreatModel
from robustprompt.cli import warn_pixel_units
from robustprompt.config import AttackSpec, DataSpec, ModelSpec, to_dict
from robustprompt.engine import evaluate as evaluate_mod
from robustprompt.engine import runtime
from robustprompt.errors import ConfigError


class Linear(nn.Module):
    """A fixed linear classifier on 3×8×8 images (float32), with what its last forward saw."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, 3 * 8 * 8, generator=g))
            self.fc.bias.zero_()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        self.seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out


# ------------------------------------------------------------------ ℓ2 in pixel units
def test_l2_eps_is_in_pixel_units_and_reaches_beyond_one():
    threat = AttackSpec(norm="l2", eps=3.0, steps=10).threat()
    assert threat.eps == 3.0 and threat.step_size == 0.75     # α = ε/4, in pixel units too
    x = torch.full((6, 3, 8, 8), 0.5)   # mid-grey: the [0,1] box does not bind before ‖δ‖₂ = 3
    y = torch.arange(6) % 4
    x_adv = threat.run(Linear(), x, y, seeds=list(range(6)))
    # the norm by hand, in float64, one image at a time
    norms = [math.sqrt(sum(float(v) ** 2 for v in (x_adv[i].double() - x[i].double()).flatten()))
             for i in range(6)]
    assert all(n <= 3.0 + 1e-5 for n in norms)
    assert max(n for n in norms) > 1.0          # under the old /255 reading it would be ≤ 3/255


def test_linf_keeps_255_units_and_the_cap_is_linf_only():
    assert AttackSpec(eps=4).threat().eps == pytest.approx(4 / 255)
    assert ThreatModel(norm="l2", eps=3.0).eps == 3.0
    with pytest.raises(ConfigError, match="larger than the whole"):
        ThreatModel(norm="linf", eps=3.0)


def test_an_old_255_unit_l2_budget_is_refused_with_the_pixel_value():
    with pytest.raises(ConfigError) as e:
        AttackSpec(norm="l2", eps=765)
    msg = str(e.value)
    assert "\n" not in msg and "pixel units" in msg and "--eps 3" in msg


def test_identity_of_linf_fp32_configs_is_unchanged_and_l2_is_marked():
    # the ℓ∞ fp32 record, written out by hand as it was before precision/eps_units existed
    assert to_dict(AttackSpec()) == {"attack": "pgd", "norm": "linf", "eps": 1.0, "alpha": None, "steps": 100,
                                     "restarts": 1, "loss": "ce", "random_start": True, "aa_version": "standard"}
    assert to_dict(AttackSpec(norm="l2", eps=0.5))["eps_units"] == "pixel"
    assert to_dict(AttackSpec(precision="bf16"))["precision"] == "bf16"
    with pytest.raises(ConfigError, match="pixel"):
        AttackSpec(norm="l2", eps=0.5, eps_units="/255")


@pytest.mark.parametrize("value,norm,warned", [(0.03, None, True), (0.03, "linf", True), (0.5, None, False),
                                               (0.03, "l2", False), (4.0, None, False)])
def test_small_linf_eps_at_the_cli_is_flagged(caplog, value, norm, warned):
    with caplog.at_level(logging.WARNING, logger="robustprompt"):
        warn_pixel_units(value, norm)
    text = caplog.text
    assert ("did you mean --eps 8" in text) == warned if value == 0.03 else not text


# ------------------------------------------------------------------ devices
@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_resolve_device_keeps_the_index(two_gpus):
    assert api.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert api.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="only 2 CUDA"):
        api.resolve_device("cuda:2")


def test_auto_picks_mps_after_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert api.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert api.resolve_device("auto") == torch.device("cpu")


class _FakeState:
    """accelerate's PartialState as a single (or multi-) process run on a CUDA machine sees it."""

    def __init__(self, num_processes: int, device: torch.device):
        self.num_processes, self.device = num_processes, device


@pytest.mark.parametrize("asked,procs,accel,expected", [
    ("cuda:1", 1, torch.device("cuda"), torch.device("cuda", 1)),     # the bug: accelerate said cuda (0)
    ("cuda", 1, torch.device("cuda"), torch.device("cuda")),
    ("cuda:1", 2, torch.device("cuda", 0), torch.device("cuda", 0)),  # a launcher: the local rank's GPU
    ("cpu", 1, torch.device("cpu"), torch.device("cpu")),
])
def test_process_state_honours_the_device_index(two_gpus, monkeypatch, asked, procs, accel, expected):
    import accelerate

    made, current = [], []
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu=False: made.append(cpu) or _FakeState(procs, accel))
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    state, dev = runtime.process_state(asked)
    assert dev == expected and made == [asked == "cpu"]
    assert current == ([expected] if expected.index is not None else [])   # a bare "cuda" means it too


# ------------------------------------------------------------------ precision
def test_attack_precision_is_public_and_recorded():
    assert ThreatModel().describe()["precision"] == "float32"
    t = ThreatModel(precision="bf16", steps=2)
    assert t.describe()["precision"] == "bfloat16" and "bf16" in t.short()
    with pytest.raises(ConfigError, match="AutoAttack runs in fp32"):
        ThreatModel(attack="autoattack", precision="bf16")
    with pytest.raises(ConfigError, match="attack precision"):
        ThreatModel(precision="fp16")


def test_pgd_runs_the_model_in_the_precision_asked_for():
    x, y = torch.full((2, 3, 8, 8), 0.5), torch.tensor([0, 1])
    model = Linear()
    pgd(model, x, y, 4 / 255, 1 / 255, 2, precision="bf16")
    assert model.seen and all(s == (True, torch.bfloat16) for s in model.seen)
    model.seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):   # a bf16 training step around an fp32 attack
        pgd(model, x, y, 4 / 255, 1 / 255, 2, precision="fp32")
    assert model.seen and all(s == (False, torch.float32) for s in model.seen)


def test_precision_flags_are_refused_in_one_line():
    from robustprompt.engine.evaluate import EvalConfig

    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16"):
        EvalConfig(precision="fp8")
    with pytest.raises(ConfigError, match="tf32 must be true or false"):
        EvalConfig(tf32="yes")
    assert "precision" not in to_dict(EvalConfig()) and "tf32" not in to_dict(EvalConfig())


# ------------------------------------------------------------------ TF32 and the environment record
@pytest.fixture
def restore_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_is_set_explicitly_and_recorded(restore_tf32, enabled):
    torch.backends.cuda.matmul.allow_tf32 = not enabled
    torch.backends.cudnn.allow_tf32 = not enabled
    assert runtime.set_tf32(enabled) == {"matmul": enabled, "cudnn": enabled}
    assert torch.backends.cuda.matmul.allow_tf32 is enabled and torch.backends.cudnn.allow_tf32 is enabled
    env = evaluate_mod.environment()
    assert env["tf32"] == {"matmul": enabled, "cudnn": enabled}
    assert {"torch", "open_clip", "torchvision", "cuda", "cudnn", "git_commit"} <= set(env)


def test_git_commit_is_none_outside_a_checkout(monkeypatch):
    commit = evaluate_mod.git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    import subprocess

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert evaluate_mod.git_commit() is None


def test_eval_records_precision_and_tf32(tmp_path, restore_tf32):
    from robustprompt.engine.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(model=ModelSpec(name="demo"), data=DataSpec(dataset="fashion_mnist", subset=6, batch_size=6),
                     attack=AttackSpec(eps=4, steps=1, precision="bf16"), device="cpu", precision="bf16", tf32=True)
    evaluate(cfg, tmp_path / "run", progress=False)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["precision"] == "bf16" and m["threat"]["precision"] == "bfloat16"
    assert m["environment"]["tf32"] == {"matmul": True, "cudnn": True}
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "tf32: true" in text and "precision: bf16" in text


@pytest.mark.parametrize("argv,message", [
    (["eval", "--norm", "l2", "--eps", "765"], "attack.eps=765 for norm l2 looks like /255 units"),
    (["eval", "--attack", "autoattack", "--attack-precision", "bf16"], "AutoAttack runs in fp32"),
    (["train", "--precision", "fp8"], "invalid choice"),
])
def test_cli_bad_units_and_precision_are_one_line(capsys, argv, message):
    from robustprompt.cli import main

    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv + ["--no-progress"]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_under_autocast_is_recorded_and_finite(tmp_path, precision):
    from robustprompt.engine.train import train, train_config_from_dict

    raw = {"model": {"name": "demo", "prompt": {"depth": 1, "n_ctx": 2}}, "method": {"name": "fap"},
           "data": {"dataset": "fashion_mnist", "shots": 1, "batch_size": 10, "augment": "none"},
           "optim": {"epochs": 1, "lr": 0.01, "warmup_epochs": 0},
           "train_attack": {"eps": 4, "alpha": 2, "steps": 1}, "device": "cpu", "precision": precision}
    m = train(train_config_from_dict(raw), tmp_path / "run", progress=False)
    assert m["precision"] == precision and m["train_threat"]["precision"] == "float32"   # the attack stays fp32
    assert math.isfinite(m["epochs"][0]["loss"])
    assert f"precision: {precision}" in (tmp_path / "run" / "config.yaml").read_text()


def test_l2_budgets_are_shown_in_pixel_units_everywhere(capsys):
    """Reports, the console and the Hub model card show an ℓ2 budget as given (ε=3), never as 765/255."""
    from robustprompt.attacks.threat import ThreatModel
    from robustprompt.config import ModelSpec
    from robustprompt.hub import model_card
    from robustprompt.models import PromptConfig
    from robustprompt.models.prompt_file import build_meta
    from robustprompt.report.collect import threat_key, threat_label
    from robustprompt.report.console import _threat_text

    l2 = ThreatModel(eps=3.0, norm="l2", steps=10).describe()
    linf = ThreatModel.from_255(4, steps=10).describe()
    assert threat_label(threat_key(l2)) == "PGD-10 ℓ2 ε=3 α=0.75"
    assert threat_label(threat_key(linf)) == "PGD-10 ℓ∞ ε=4/255 α=1/255"
    assert _threat_text(l2).startswith("l2 eps=3 steps=10 alpha=0.75")
    assert _threat_text(linf).startswith("linf eps=4/255 steps=10 alpha=1/255")
    meta = build_meta(prompt=PromptConfig(coupling="text", n_ctx=2, depth=1), model=ModelSpec(name="rp-tiny"),
                      classnames=["a", "b"], templates=["a photo of a {}."], method="coop",
                      train_threat=ThreatModel(eps=3.0, norm="l2", steps=2), weights_sha256=None)
    card = model_card(meta, "org/repo")
    assert "--norm l2 --eps 3" in card and "765" not in card
