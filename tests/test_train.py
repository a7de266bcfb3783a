"""Training engine and methods: every method trains, resume is exact, processes agree, errors are clear."""
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from robustprompt.config import set_dotted
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from robustprompt.cli import main
from robustprompt.config import AttackSpec, DataSpec, ModelSpec
from robustprompt.engine.evaluate import EvalConfig, evaluate
from robustprompt.engine.train import TrainingError, train, train_config_from_dict
from robustprompt.errors import ConfigError
from robustprompt.methods import list_methods, register
from robustprompt.methods.base import Method, StepResult

ROOT = Path(__file__).resolve().parents[1]
ALL = list_methods()


def demo_cfg(method, **over):
    raw = {"model": {"name": "demo", "prompt": {"depth": 2, "n_ctx": 4}}, "method": {"name": method},
           "data": {"dataset": "fashion_mnist", "shots": 2, "batch_size": 10, "augment": "flip"},
           "optim": {"epochs": 2, "lr": 0.01}, "train_attack": {"eps": 4, "alpha": 2, "steps": 2}, "device": "cpu"}
    for k, v in over.items():
        set_dotted(raw, k, v)
    return train_config_from_dict(raw)


@pytest.mark.parametrize("method", ALL)
def test_every_method_trains_on_the_demo_backbone(method, tmp_path):
    m = train(demo_cfg(method), tmp_path / "run", progress=False)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "metrics.json", "prompts.safetensors"} <= files
    prompts = load_file(str(tmp_path / "run" / "prompts.safetensors"))
    if method == "zeroshot":
        assert prompts == {} and m["epochs"] == []
        return
    assert len(m["epochs"]) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in m["epochs"])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "epoch-000.json", "epoch-000.safetensors", "epoch-001.json", "epoch-001.safetensors"]
    # the checkpoint holds prompt tensors (and optimiser state), nothing of the backbone
    ck = load_file(str(tmp_path / "run" / "checkpoints" / "epoch-001.safetensors"))
    assert all(k.split(".")[0] in ("prompt", "extra", "optim") for k in ck)
    assert not any("visual.transformer" in k or "token_embedding" in k for k in ck)
    # learning happened: prompts moved away from their seeded initialisation
    init = train(demo_cfg(method, **{"optim.epochs": 1, "optim.lr": 1e-12, "optim.warmup_epochs": 0}),
                 tmp_path / "init", progress=False)
    assert init is not None
    p0 = load_file(str(tmp_path / "init" / "prompts.safetensors"))
    assert any(not torch.allclose(prompts[k], p0[k]) for k in prompts)


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_every_method_trains_on_random_init_vitb32(method, tmp_path):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
        Image.new("RGB", (224, 224), (200, 10, 10) if c == "cat" else (10, 10, 200)).save(root / "train" / c / "a.png")
    raw = {"model": {"name": "ViT-B-32"}, "method": {"name": method},
           "data": {"dataset": f"imagefolder:{root}", "shots": 1, "batch_size": 2, "augment": "none"},
           "optim": {"epochs": 1, "warmup_epochs": 0}, "device": "cpu"}
    m = train(train_config_from_dict(raw), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "prompts.safetensors").exists()
    if method != "zeroshot":
        assert m["prompt"]["depth"] in (1, 9) and torch.isfinite(torch.tensor(m["epochs"][0]["loss"]))


def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    cfg = demo_cfg("cba_fapt", **{"optim.epochs": 3})
    train(cfg, tmp_path / "ref", progress=False)
    from robustprompt.methods import cba_fapt

    original = cba_fapt.CBAFAPT.step
    calls = {"n": 0}

    def dying(self, clf, x, y):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2 (of 0,1,2), after epoch 1's checkpoint
            raise KeyboardInterrupt
        return original(self, clf, x, y)

    monkeypatch.setattr(cba_fapt.CBAFAPT, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(cba_fapt.CBAFAPT, "step", original)
    assert not (tmp_path / "run" / "prompts.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "epoch-001.safetensors").exists()
    m = train(cfg, tmp_path / "run", progress=False)
    ref = load_file(str(tmp_path / "ref" / "prompts.safetensors"))
    got = load_file(str(tmp_path / "run" / "prompts.safetensors"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)
    ref_m = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert [h["loss"] for h in m["epochs"]] == pytest.approx([h["loss"] for h in ref_m["epochs"]], abs=1e-6)


@pytest.mark.slow
def test_two_processes_average_gradients_exactly(tmp_path):
    """Clean training without augmentation is deterministic: 2 processes (gloo) splitting each
    batch and averaging gradients must land where 1 process does."""
    raw = {"model": {"name": "demo", "prompt": {"depth": 2}}, "method": {"name": "ivlp"},
           "data": {"dataset": "fashion_mnist", "shots": 3, "batch_size": 8, "augment": "none"},
           "optim": {"epochs": 2, "lr": 0.05, "warmup_epochs": 0}, "device": "cpu"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "robustprompt", "train", "--config", str(tmp_path / "c.yaml"), "--out",
                           str(tmp_path / "two"), "--no-progress"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    one = load_file(str(tmp_path / "one" / "prompts.safetensors"))
    two = load_file(str(tmp_path / "two" / "prompts.safetensors"))
    moved = load_file(str(tmp_path / "one" / "checkpoints" / "epoch-000.safetensors"))
    assert any(not torch.allclose(moved["prompt." + k], one[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4)


@dataclass
class _Nothing:
    pass


class _Explodes(Method):
    name = "_explodes_for_test"
    adversarial = False

    def step(self, clf, x, y):
        loss = clf(x).logsumexp(1).mean()
        bad = loss * float("nan") if self.calls_so_far() >= 1 else loss * 0
        return StepResult(loss + bad, {"ce": loss, "bad": bad})

    def calls_so_far(self):
        self._n = getattr(self, "_n", -1) + 1
        return self._n


def test_non_finite_loss_names_step_and_term(tmp_path):
    if "_explodes_for_test" not in list_methods():
        register(_Explodes)
    with pytest.raises(TrainingError, match=r"'bad' is nan at epoch 0, step 1"):
        train(demo_cfg("_explodes_for_test", **{"model.prompt": {"coupling": "text", "n_ctx": 2, "depth": 1}}),
              tmp_path / "run", progress=False)


def test_config_errors_are_named():
    with pytest.raises(ConfigError, match="unknown method 'cba'"):
        demo_cfg("cba")
    with pytest.raises(ConfigError, match="unknown key.*alfa"):
        train_config_from_dict({"method": {"name": "cba_fapt", "params": {"alfa": 5}}})
    with pytest.raises(ConfigError, match="augment"):
        demo_cfg("fap", **{"data.augment": "mixup"})
    with pytest.raises(ConfigError, match="teacher must be online or frozen"):
        train_config_from_dict({"method": {"name": "apd", "params": {"teacher": "big"}}})


def test_partial_sections_keep_their_defaults():
    cfg = train_config_from_dict({"method": {"name": "fap"}, "model": {"prompt": {"depth": 3}},
                                  "train_attack": {"eps": 4}})
    assert cfg.train_attack.steps == 2  # training defaults, not eval's
    assert cfg.train_attack.alpha is None  # a new ε without α: α = ε/4, the eval rule (issue 12)
    assert cfg.model.prompt.coupling == "coupled-v2t" and cfg.model.prompt.depth == 3 and cfg.model.prompt.n_ctx == 2


def test_apd_teacher_modes(tmp_path):
    m = train(demo_cfg("apd"), tmp_path / "online", progress=False)
    teacher = load_file(str(tmp_path / "online" / "method_state.safetensors"))
    student = load_file(str(tmp_path / "online" / "prompts.safetensors"))
    assert set(teacher) == {f"teacher.{k}" for k in student}
    assert any(not torch.allclose(teacher[f"teacher.{k}"], student[k]) for k in student)
    assert "teacher_ce" in m["epochs"][0]
    m = train(demo_cfg("apd", **{"method.params": {"teacher": "frozen"}}), tmp_path / "frozen", progress=False)
    assert not (tmp_path / "frozen" / "method_state.safetensors").exists() and "teacher_ce" not in m["epochs"][0]


@pytest.mark.slow
def test_adversarial_methods_beat_zero_shot_robustness(tmp_path):
    attack = AttackSpec(eps=4, steps=10)
    data = DataSpec(dataset="fashion_mnist", subset=500, batch_size=250)
    zs = evaluate(EvalConfig(model=ModelSpec(name="demo"), data=data, attack=attack, device="cpu"),
                  tmp_path / "zs", progress=False)
    for method in ("advmaple", "fap", "cba_fapt", "apd"):
        cfg = demo_cfg(method, **{"data.shots": 32, "data.batch_size": 32, "optim.epochs": 10, "optim.lr": 0.01,
                                  "model.prompt": {"depth": 3}})
        train(cfg, tmp_path / method, progress=False)
        m = evaluate(EvalConfig(model=ModelSpec(run=str(tmp_path / method)), data=data, attack=attack, device="cpu"),
                     tmp_path / f"{method}-eval", progress=False)
        assert m["robust_acc"] > zs["robust_acc"] + 3, (method, m["robust_acc"], zs["robust_acc"])
        assert m["method"] == method and m["shots"] == 32


def test_epochs_record_each_terms_gradient_share(tmp_path):
    m = train(demo_cfg("cba_fapt", **{"optim.epochs": 1}), tmp_path / "run", progress=False)
    h = m["epochs"][0]
    assert {k[len("grad_share."):] for k in h if k.startswith("grad_share.")} == {"nat", "adv", "vaa", "taa"}
    assert sum(h[f"grad_share.{t}"] for t in ("nat", "adv", "vaa", "taa")) == pytest.approx(1.0)
    assert (h["grad_weight.nat"], h["grad_weight.adv"], h["grad_weight.vaa"], h["grad_weight.taa"]) == (1, 5, 0.05, 0.03)
    assert all(math.isfinite(h[f"grad_norm.{t}"]) and h[f"grad_norm.{t}"] > 0 for t in ("nat", "adv", "vaa", "taa"))


def test_apd_logs_the_teachers_accuracy_under_its_own_name(tmp_path):
    m = train(demo_cfg("apd", **{"optim.epochs": 1}), tmp_path / "run", progress=False)
    h = m["epochs"][0]
    assert "train_teacher_clean_acc" in h and "train_adv_acc" in h
    assert "train_clean_acc" not in h  # the student is never evaluated on clean images in its step
