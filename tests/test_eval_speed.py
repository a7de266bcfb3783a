"""Issue 14 §1: the attack loop near the hardware's limit — compiled image forward (with a clean
fallback), automatic batch size, fused attention on every untraced path, the loader's options."""
from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from robustprompt.attacks import pgd
from robustprompt.engine.autobatch import CPU_AUTO_BATCH, auto_batch_size, is_oom, probe_batch_size
from robustprompt.engine.compiled import CompiledAttackModel, attack_model, compile_record
from robustprompt.models import PromptedClassifier
from robustprompt.models.prompts import PromptConfig
from robustprompt.models.trace import TraceSpec

CLASSES = ["cat", "dog", "car", "ship"]


@pytest.fixture
def tiny_clf(tiny_backbone):
    return PromptedClassifier(tiny_backbone, CLASSES).eval()


# ---------------------------------------------------------------- torch.compile and its fallback

def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here (forced by the test)")


def test_forced_compile_failure_falls_back_to_eager_with_one_warning(tiny_clf, tiny_images, caplog):
    model = CompiledAttackModel(tiny_clf, backend=_failing_backend)
    with torch.no_grad():   # eager, the classifier itself, at the same batch sizes
        expected, expected_2 = tiny_clf(tiny_images), tiny_clf(tiny_images[:2])
    with caplog.at_level(logging.WARNING, logger="robustprompt"):
        with torch.no_grad():
            first = model(tiny_images)
            second = model(tiny_images[:2])
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "running eager" in warnings[0] and "no compiler here" in warnings[0]
    assert not model.active
    torch.testing.assert_close(first, expected, rtol=0, atol=0)   # eager after the fallback: same numbers
    torch.testing.assert_close(second, expected_2, rtol=0, atol=0)
    rec = compile_record(model)
    assert rec["enabled"] and not rec["active"] and "no compiler here" in rec["fallback"]


def test_a_failing_backward_compile_falls_back_before_the_attack_s_gradient(tiny_clf, tiny_images, caplog):
    """The backward graph compiles lazily, at the first backward: without the probe its failure would be
    raised inside the attack's autograd.grad. A backend whose forward compiles and backward does not:
    PGD still runs (eager after one warning) and gives the eager attack's examples exactly."""
    from torch._dynamo.backends.common import aot_autograd

    from robustprompt.attacks.pgd import pgd

    def broken_backward(gm, example_inputs):
        raise RuntimeError("backward compiler broken (forced by the test)")

    backend = aot_autograd(fw_compiler=lambda gm, ex: gm.forward, bw_compiler=broken_backward)
    model = CompiledAttackModel(tiny_clf, backend=backend)
    y = torch.arange(len(tiny_images)) % 3
    kw = dict(eps=4 / 255, alpha=1 / 255, steps=2, random_start=False)
    with caplog.at_level(logging.WARNING, logger="robustprompt"):
        got = pgd(model, tiny_images, y, **kw)
    assert not model.active and "backward compiler broken" in model.fallback_reason
    assert sum("torch.compile" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(got, pgd(tiny_clf, tiny_images, y, **kw), rtol=0, atol=0)


def test_fallback_keeps_genuine_input_errors(tiny_clf):
    """A wrong image size still ends in the classifier's own error, not a silent fallback result."""
    from robustprompt.errors import ModelError

    model = CompiledAttackModel(tiny_clf, backend=_failing_backend)
    with pytest.raises(ModelError, match="expected images"):
        model(torch.rand(2, 3, 16, 16))


def test_attack_model_is_the_classifier_unless_asked(tiny_clf):
    assert attack_model(tiny_clf, False) is tiny_clf
    assert compile_record(tiny_clf) == {"enabled": False}
    assert isinstance(attack_model(tiny_clf, True, backend=_failing_backend), CompiledAttackModel)


def test_compiled_pgd_matches_eager(tiny_backbone, tiny_images):
    """Inductor-compiled image forward against eager, in float64 so that no sign of the gradient
    sits on a rounding edge: PGD-3 adversarial images within 1e-9 (the sign steps agree on every
    pixel), logits at them within 1e-9, same predictions. Skipped, with inductor's reason, when
    it cannot compile here. One graph (forward + backward at batch 4) is compiled: ~1-2 min on 2
    shared CPU cores, most of it the C++ compiler."""
    clf = PromptedClassifier(copy.deepcopy(tiny_backbone), CLASSES).double().eval()
    x = tiny_images.double()
    y = torch.tensor([0, 1, 2, 3])
    seeds = [11, 12, 13, 14]
    model = CompiledAttackModel(clf)
    adv_c = pgd(model, x, y, 8 / 255, 2 / 255, 3, seeds=seeds)
    if not model.active:
        pytest.skip(f"torch.compile (inductor) cannot run here: {model.fallback_reason}")
    adv_e = pgd(clf, x, y, 8 / 255, 2 / 255, 3, seeds=seeds)
    torch.testing.assert_close(adv_c, adv_e, rtol=0, atol=1e-9)
    assert (adv_e - x).abs().max() > 1e-3   # the attack moved the images: the comparison means something
    xa = adv_c.clone().requires_grad_(True)   # with grad, as inside the attack: the graph already compiled
    got, want = model(xa), clf(adv_c)
    assert model.active, model.fallback_reason
    torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-9)
    assert torch.equal(got.argmax(1), want.argmax(1))


# ---------------------------------------------------------------- --batch-size auto

class FakeOOM(RuntimeError):
    pass


def _fake_step(capacity: int, calls: list[int]):
    """A step that 'runs out of memory' above `capacity` images, as CUDA says it."""
    def step(batch: int) -> None:
        calls.append(batch)
        if batch > capacity:
            raise FakeOOM("CUDA out of memory. Tried to allocate 2.00 GiB")
    return step


def test_probe_doubles_until_oom_then_keeps_a_margin():
    calls: list[int] = []
    freed = []
    probe = probe_batch_size(_fake_step(300, calls), start=16, limit=4096, margin=0.75,
                             on_oom=lambda: freed.append(1))
    assert calls == [16, 32, 64, 128, 256, 512]
    assert (probe.largest_ok, probe.first_oom) == (256, 512)
    assert probe.batch == 192          # 0.75 · 256, a multiple of 8
    assert freed == [1]


def test_probe_rounds_down_to_a_multiple_of_8():
    probe = probe_batch_size(_fake_step(100, []), start=10, limit=4096, margin=0.75)
    assert (probe.largest_ok, probe.first_oom) == (80, 160)
    assert probe.batch == 56           # 0.75 · 80 = 60 → 56


def test_probe_without_oom_keeps_the_limit():
    calls: list[int] = []
    probe = probe_batch_size(_fake_step(10**6, calls), start=16, limit=100)
    assert calls == [16, 32, 64]
    assert probe.batch == 64 and probe.first_oom is None


def test_probe_halves_when_the_start_does_not_fit():
    calls: list[int] = []
    probe = probe_batch_size(_fake_step(5, calls), start=16, limit=4096, margin=0.75)
    assert calls == [16, 8, 4]
    assert (probe.largest_ok, probe.first_oom, probe.batch) == (4, 16, 3)
    with pytest.raises(RuntimeError, match="not even a batch of 1"):
        probe_batch_size(_fake_step(0, []), start=4)


def test_probe_reraises_other_errors():
    def step(batch: int) -> None:
        raise ValueError("a bug, not memory")
    with pytest.raises(ValueError, match="a bug"):
        probe_batch_size(step)


def test_is_oom():
    assert is_oom(FakeOOM("CUDA out of memory."))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))   # only runtime errors carry CUDA's message


def test_auto_batch_on_cpu_is_the_documented_default(tiny_clf):
    probe = auto_batch_size(tiny_clf, tiny_clf.image_size, len(CLASSES), torch.device("cpu"))
    assert probe.batch == CPU_AUTO_BATCH == 64 and "CPU default" in probe.rule


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the probe only runs on a GPU)")
def test_auto_batch_on_cuda_runs(tiny_backbone):
    clf = PromptedClassifier(tiny_backbone, CLASSES).cuda().eval()
    probe = auto_batch_size(clf, clf.image_size, len(CLASSES), torch.device("cuda"), limit=256)
    assert 1 <= probe.batch <= 256


# ---------------------------------------------------------------- fused attention

class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _attention_ops(count: collections.Counter) -> dict[str, int]:
    return {k: v for k, v in count.items() if "softmax" in k or "attention" in k}


@pytest.mark.parametrize("coupling", ["none", "coupled"])
def test_untraced_attack_step_uses_fused_attention(tiny_backbone, tiny_images, coupling):
    """An attack step's forward + backward w.r.t. the image runs one fused SDPA kernel per
    vision block (forward and backward) and never materialises a softmax of attention scores;
    the text tower (class features) likewise. rp-tiny has 3 blocks per tower."""
    clf = PromptedClassifier(tiny_backbone, CLASSES, PromptConfig(coupling=coupling, depth=3)).eval()
    x = tiny_images.clone().requires_grad_(True)
    with clf.static_text():
        with _Ops() as ops:
            torch.autograd.grad(clf(x).sum(), x)
    ops_seen = _attention_ops(ops.count)
    fused = {k: v for k, v in ops_seen.items() if "scaled_dot_product" in k}
    assert sum(v for k, v in fused.items() if not k.endswith("_backward")) == 3, ops_seen
    assert sum(v for k, v in fused.items() if k.endswith("_backward")) == 3, ops_seen
    assert not any("softmax" in k for k in ops_seen), ops_seen
    with _Ops() as ops, torch.no_grad():
        clf.encode_text()
    ops_seen = _attention_ops(ops.count)
    assert not any("softmax" in k for k in ops_seen) and ops_seen, ops_seen
    # the recorder does see an explicit softmax where there is one: a trace that keeps the maps
    with _Ops() as ops, torch.no_grad():
        clf.features(tiny_images, vision_trace=TraceSpec(blocks="all", attn=True))
    assert ops.count["aten._softmax"] == 3, _attention_ops(ops.count)


# ---------------------------------------------------------------- data loading

def test_loader_options_pin_and_prefetch_only_where_they_help():
    from robustprompt.engine.sharded import loader_options

    assert loader_options(torch.device("cpu"), 0) == {"num_workers": 0, "pin_memory": False}
    cpu4 = loader_options(torch.device("cpu"), 4)
    assert cpu4 == {"num_workers": 4, "pin_memory": False, "persistent_workers": True, "prefetch_factor": 4}
    cuda = loader_options(torch.device("cuda", 0), 2)
    assert cuda["pin_memory"] is True and cuda["persistent_workers"] is True


# ---------------------------------------------------------------- the CLI: --compile, --batch-size auto

def _imagefolder(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c, color in [("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))]:
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), tuple(min(255, v + 10 * i) for v in color)).save(root / c / f"{i}.png")
    return root


def _records(run):
    import json

    return sorted((json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()),
                  key=lambda r: r["index"])


def test_cli_compile_and_auto_batch_change_no_result(tmp_path, monkeypatch):
    """eval --compile --batch-size auto against a plain run: the same predictions, the same
    config.yaml (not part of the identity), and both options recorded in metrics.environment.
    Compilation is forced to fail (torch.compile replaced), so the run also shows the fallback."""
    import json

    import yaml

    from robustprompt.cli import main
    from robustprompt.engine.rundir import semantic_config

    root = _imagefolder(tmp_path)
    base = ["eval", "--model", "rp-tiny", "--dataset", f"imagefolder:{root}", "--eps", "4", "--steps", "2",
            "--device", "cpu", "--no-progress"]
    torch.manual_seed(0)   # rp-tiny is random-init: the same weights for both runs
    assert main([*base, "--batch-size", "4", "--out", str(tmp_path / "plain")]) == 0

    def no_compiler(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("forced: no compiler")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    torch.manual_seed(0)
    assert main([*base, "--batch-size", "auto", "--compile", "--out", str(tmp_path / "fast")]) == 0
    plain, fast = _records(tmp_path / "plain"), _records(tmp_path / "fast")
    assert [(r["clean_pred"], r["adv_pred"]) for r in plain] == [(r["clean_pred"], r["adv_pred"]) for r in fast]
    # the same run identity (batch size is a runtime key; compile is not in the config at all)
    assert semantic_config(yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())) == \
        semantic_config(yaml.safe_load((tmp_path / "fast" / "config.yaml").read_text()))
    env = json.loads((tmp_path / "fast" / "metrics.json").read_text())["environment"]
    assert env["compile"]["enabled"] and not env["compile"]["active"] and "forced" in env["compile"]["fallback"]
    assert env["batch_size"]["auto"] and env["batch_size"]["batch"] == 64
    env_plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["environment"]
    assert "compile" not in env_plain and "batch_size" not in env_plain


@pytest.mark.parametrize("attack, also, probed", [
    ({"precision": "bf16"}, [], ["bf16"]),
    ({"precision": "bf16"}, [{"attack": "fgsm", "eps": 4}], ["fp32"]),      # an fp32 attack must fit as well
    ({"attack": "autoattack", "eps": 4, "aa_chunk": 4}, [], []),            # every batch is one chunk
])
def test_auto_batch_probes_the_widest_arithmetic_and_not_under_autoattack(attack, also, probed, tmp_path,
                                                                          monkeypatch, caplog):
    import logging

    import robustprompt.engine.autobatch as autobatch
    from robustprompt.attacks.threat import ThreatModel
    from robustprompt.config import AttackSpec, DataSpec, ModelSpec
    from robustprompt.engine.autobatch import BatchProbe
    from robustprompt.engine.evaluate import EvalConfig, evaluate

    calls = []

    def fake_probe(model, image_size, n_classes, device, precision="fp32", **kw):
        calls.append(precision)
        return BatchProbe(batch=2, largest_ok=2, first_oom=None, rule="test")

    monkeypatch.setattr(autobatch, "auto_batch_size", fake_probe)
    monkeypatch.setattr(ThreatModel, "run", lambda self, model, x, y, **kw: x.clone())   # only batching is tested
    root = _imagefolder(tmp_path)
    cfg = EvalConfig(model=ModelSpec(name="rp-tiny"), data=DataSpec(dataset=f"imagefolder:{root}"),
                     attack=AttackSpec(**{"eps": 4, "steps": 1, **attack}), also=[AttackSpec(**a) for a in also],
                     device="cpu")
    with caplog.at_level(logging.WARNING, logger="robustprompt"):
        m = evaluate(cfg, tmp_path / "run", progress=False, auto_batch=True)
    assert calls == probed
    assert ("batch_size" in m["environment"]) == bool(probed)
    assert ("no batch size is probed" in caplog.text) == (not probed)


def test_cli_bad_batch_size_is_one_line(capsys):
    from robustprompt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--batch-size", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("expected an integer or auto" in line for line in err)


def test_tta_compile_records_and_changes_no_result(tmp_path, monkeypatch):
    """run_tta(compile=True) against a plain run (compilation forced to fail): the same records,
    and the compile outcome in metrics.environment (absent from the plain run's)."""
    import json

    from robustprompt.config import AttackSpec, DataSpec, ModelSpec
    from robustprompt.engine.tta import TTAConfig, TTAMethodSpec, run_tta

    cfg = TTAConfig(model=ModelSpec(name="demo"), data=DataSpec(dataset="fashion_mnist", subset=4, batch_size=4),
                    method=TTAMethodSpec("mta", {"n_views": 8}), attack=AttackSpec(eps=8, alpha=2, steps=2),
                    device="cpu")
    plain = run_tta(cfg, tmp_path / "plain", progress=False)

    def no_compiler(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("forced: no compiler")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    fast = run_tta(cfg, tmp_path / "fast", progress=False, compile=True)
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if k != "sec"}   # noqa: E731
                         for line in (tmp_path / run / "records.jsonl").read_text().splitlines()]
    assert strip("plain") == strip("fast")
    assert fast["robust_acc"] == plain["robust_acc"] and "compile" not in plain["environment"]
    assert fast["environment"]["compile"]["enabled"] and not fast["environment"]["compile"]["active"]


def test_out_of_memory_is_not_a_compile_failure(tiny_clf, tiny_images):
    """An OOM inside the compiled call propagates (the batch is too large either way) and
    leaves compilation on, so a smaller batch, or the batch-size probe, still runs compiled."""
    def oom_backend(gm, example_inputs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    model = CompiledAttackModel(tiny_clf, backend=oom_backend)
    with pytest.raises(Exception, match="out of memory"):
        model(tiny_images)
    assert model.active and model.fallback_reason is None
