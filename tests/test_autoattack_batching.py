"""AutoAttack's example for an image depends only on (seed, image, model): not on the batch it is in,
the order of the images, how a run is resumed, or how it is split. And a ThreatModel refuses
non-finite or non-numeric budgets.

The attacks run with small budgets (a few APGD/FAB iterations, tens of Square queries) so that the
tests are fast; the budgets change how strong the attacks are, not where their randomness enters.
"""
import math

import pytest
import torch
from PIL import Image

import pyautoattack
from robustprompt.attacks import ThreatModel
from robustprompt.errors import ConfigError
from robustprompt.models import PromptedClassifier

N_IMAGES = 8
SEEDS = [1_000_003 * 7 + i for i in range(N_IMAGES)]   # what the engine's image_seed gives seed 7


def small_budgets(monkeypatch, attacks=None, square_queries=60):
    """Shrink pyautoattack's budgets (and optionally its attack list) wherever it sets a version."""
    original = pyautoattack.AutoAttack._set_version

    def shrunk(self, version="standard"):
        original(self, version)
        for apgd in (self.apgd, self.apgd_targeted):
            apgd.n_iter = apgd.n_iter_orig = 3
            apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = 1, 1, 1   # step-size checkpoints every step
        self.fab.n_iter = 2
        self.square.n_queries = square_queries
        if attacks is not None:
            self.attacks_to_run = list(attacks)

    monkeypatch.setattr(pyautoattack.AutoAttack, "_set_version", shrunk)


@pytest.fixture(scope="module")
def four_class():
    """rp-tiny (its own copy, weights from seed 0) over 4 classes, 8 random images and the labels
    it predicts for them (all clean-correct)."""
    from robustprompt.models import load_backbone

    with torch.random.fork_rng():
        torch.manual_seed(0)
        clf = PromptedClassifier(load_backbone("rp-tiny"), ["a", "b", "c", "d"])
    x = torch.rand(N_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = clf(x).argmax(1)
    return clf, x, y


def in_batches(threat, clf, x, y, seeds, batch_size):
    """What the engine does: each batch gets the seeds of its own images."""
    out = [threat.run(clf, x[i:i + batch_size], y[i:i + batch_size], seeds=seeds[i:i + batch_size])
           for i in range(0, len(x), batch_size)]
    return torch.cat(out)


# The standard cascade (APGD-CE, APGD-T, FAB-T, Square; APGD's random start decides which examples
# it finds), and Square alone (its random squares are drawn once per batch inside pyautoattack).
CASES = {"standard": dict(attacks=None, eps=3), "square": dict(attacks=["square"], eps=32)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_example_does_not_depend_on_batching_or_order(case, four_class, monkeypatch):
    small_budgets(monkeypatch, CASES[case]["attacks"])
    clf, x, y = four_class
    threat = ThreatModel.from_255(CASES[case]["eps"], attack="autoattack", aa_chunk=1)   # per image
    alone = in_batches(threat, clf, x, y, SEEDS, 1)
    with torch.no_grad():
        fooled = clf(alone).argmax(1) != y
    assert 2 <= int(fooled.sum()) < N_IMAGES, "the case must have images the attack fools and some it does not"
    assert torch.equal(alone[~fooled], x[~fooled])   # an image the attack cannot fool stays clean
    for batch_size in (3, 8):
        batched = in_batches(threat, clf, x, y, SEEDS, batch_size)
        for i in range(N_IMAGES):
            assert torch.equal(batched[i], alone[i]), f"image {i}, batch size {batch_size}"
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled = threat.run(clf, x[order], y[order], seeds=[SEEDS[i] for i in order])
    for j, i in enumerate(order.tolist()):
        assert torch.equal(shuffled[j], alone[i]), f"image {i} at position {j}"
    # the seeds matter: other seeds give other examples (so the comparisons above test the seeding)
    other = threat.run(clf, x, y, seeds=[s + 1 for s in SEEDS])
    assert any(not torch.equal(other[i], alone[i]) for i in range(N_IMAGES) if fooled[i])


def test_autoattack_leaves_the_global_generator_alone(four_class, monkeypatch):
    """pyautoattack reseeds torch's global generator; what runs after an attack (the next batch's
    views, another attack) must not depend on which image happened to be attacked last."""
    small_budgets(monkeypatch, ["apgd-ce", "square"])
    clf, x, y = four_class
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ThreatModel.from_255(1.5, attack="autoattack").run(clf, x[:3], y[:3], seeds=SEEDS[:3])
    assert torch.equal(torch.get_rng_state(), before)


def test_chunks_are_attacked_as_units(four_class, monkeypatch):
    """aa_chunk=4: a chunk's examples depend only on the chunk (and its first seed), not on what
    else is in the batch; they differ from the per-image examples (the chunk is the unit)."""
    small_budgets(monkeypatch, CASES["square"]["attacks"])
    clf, x, y = four_class
    threat = ThreatModel.from_255(CASES["square"]["eps"], attack="autoattack", aa_chunk=4)
    whole = threat.run(clf, x, y, seeds=SEEDS)
    parts = torch.cat([threat.run(clf, x[:4], y[:4], seeds=SEEDS[:4]), threat.run(clf, x[4:], y[4:], seeds=SEEDS[4:])])
    assert torch.equal(whole, parts)
    per_image = ThreatModel.from_255(CASES["square"]["eps"], attack="autoattack", aa_chunk=1).run(clf, x, y, seeds=SEEDS)
    assert not torch.equal(whole, per_image)


def test_describe_records_the_seeding():
    assert ThreatModel.from_255(4, attack="autoattack").describe(10)["autoattack"]["seeding"].startswith(
        "per chunk of 64 consecutive images")
    d = ThreatModel.from_255(4, attack="autoattack", aa_chunk=1).describe(10)
    assert d["autoattack"]["seeding"] == "per image"
    assert d["autoattack"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert ThreatModel.from_255(4, attack="autoattack", aa_version="rand").describe(10)["autoattack"]["attacks"] \
        == ["apgd-ce", "apgd-dlr"]


def test_a_seed_per_image_is_required_in_number(four_class):
    clf, x, y = four_class
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        ThreatModel.from_255(4, attack="autoattack").run(clf, x[:3], y[:3], seeds=SEEDS[:2])


# --- the engine: resume and batch size give the records of one uninterrupted run ---------------------

def _imagefolder(root, per_class=6):
    """4 classes of random-noise images: rp-tiny gets about a quarter right, each by its own margin."""
    g = torch.Generator().manual_seed(3)
    for c in ("red", "green", "blue", "gray"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (36, 40, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def _records(run):
    import json

    rows = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "sec"} for r in rows]


@pytest.mark.parametrize("chunk", [1, 3])
def test_resumed_and_rebatched_autoattack_runs_equal_one_run(tmp_path, monkeypatch, chunk):
    """evaluate() with AutoAttack (per image, or in chunks of 3 images) at batch size 8, at batch
    size 3, and killed while writing its second batch (one record of it written: a torn chunk) then
    resumed at batch size 5: the same records, and the same example for every image (caught on its
    way out of ThreatModel.run, keyed by the image's seed, which the engine derives from its index)."""
    from robustprompt.config import AttackSpec, DataSpec, ModelSpec
    from robustprompt.engine import rundir
    from robustprompt.engine.evaluate import EvalConfig, evaluate

    small_budgets(monkeypatch, ["apgd-ce", "square"], square_queries=20)
    root = _imagefolder(tmp_path / "folder")
    examples = {}
    run = ThreatModel.run

    def caught(self, model, x, y, *, seeds=None, **kw):
        out = run(self, model, x, y, seeds=seeds, **kw)
        for s, example in zip(seeds, out):
            examples.setdefault(s, []).append(example.clone())
        return out

    monkeypatch.setattr(ThreatModel, "run", caught)

    def go(name, batch_size):
        data = DataSpec(dataset=f"imagefolder:{root}", batch_size=batch_size)
        cfg = EvalConfig(model=ModelSpec(name="rp-tiny"), data=data,
                         attack=AttackSpec(attack="autoattack", eps=5, aa_chunk=chunk), device="cpu")
        with torch.random.fork_rng():
            torch.manual_seed(0)   # rp-tiny's random weights come from the global generator: the same model each time
            return evaluate(cfg, tmp_path / name, progress=False)

    whole = go("whole", 8)
    rebatched = go("rebatched", 3)
    original, calls = rundir.RunDir.append_records, {"n": 0}

    def dying(self, rank, records):
        calls["n"] += 1
        if calls["n"] == 2:
            original(self, rank, list(records)[:1])
            raise KeyboardInterrupt   # killed while writing the second batch: one record of it made it
        original(self, rank, records)

    monkeypatch.setattr(rundir.RunDir, "append_records", dying)
    with pytest.raises(KeyboardInterrupt):
        go("resumed", 3)
    monkeypatch.setattr(rundir.RunDir, "append_records", original)
    resumed = go("resumed", 5)   # resumed with another batch size

    assert _records(tmp_path / "rebatched") == _records(tmp_path / "whole")
    assert _records(tmp_path / "resumed") == _records(tmp_path / "whole")
    assert resumed["robust_acc"] == rebatched["robust_acc"] == whole["robust_acc"]
    assert 0 < whole["robust_acc"] < whole["clean_acc"], "some images must be fooled for the test to mean anything"
    assert len(examples) == 24
    for s, seen in examples.items():
        assert len(seen) >= 3 and all(torch.equal(e, seen[0]) for e in seen[1:]), f"image with seed {s}"


SHARD_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_autoattack_batching import small_budgets
from robustprompt.attacks import ThreatModel
from robustprompt.cli import main

class Patch:
    def setattr(self, obj, name, value):
        setattr(obj, name, value)

small_budgets(Patch(), ["apgd-ce", "square"], square_queries=20)
run = ThreatModel.run

def caught(self, model, x, y, *, seeds=None, **kw):
    out = run(self, model, x, y, seeds=seeds, **kw)
    path = os.path.join({examples!r}, f"{{os.getpid()}}-{{seeds[0]}}.pt")
    torch.save(dict(zip(seeds, out.clone())), path)
    return out

ThreatModel.run = caught
torch.manual_seed(0)   # rp-tiny's random weights: the same in every process
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_processes_give_the_autoattack_examples_of_one(tmp_path):
    """The same AutoAttack eval as one process and as two (torch.distributed.run): the same records
    and the same example for every image."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    # the demo backbone gets most images right, so attacked images sit on both sides of the shard
    # boundary (12); and shards of 12 cut batches of 5 where one process does not
    args = ["eval", "--model", "demo", "--dataset", "fashion_mnist", "--subset", "24", "--attack", "autoattack",
            "--eps", "2", "--aa-chunk", "3", "--batch-size", "5", "--device", "cpu", "--no-progress"]
    # one thread per process: two processes share 2 cores without their thread pools fighting
    env = {**os.environ, "PYTHONPATH": str(Path(tests).parent / "src"), "OMP_NUM_THREADS": "1"}
    examples = {}
    two = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for name, launcher in (("one", []), ("two", two)):
        (tmp_path / f"ex-{name}").mkdir()
        script = tmp_path / f"eval_{name}.py"
        script.write_text(SHARD_SCRIPT.format(tests=tests, examples=str(tmp_path / f"ex-{name}")))
        proc = subprocess.run([sys.executable, *launcher, str(script), *args, "--out", str(tmp_path / name)],
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        examples[name] = {}
        for f in (tmp_path / f"ex-{name}").iterdir():
            examples[name].update(torch.load(f))
    assert _records(tmp_path / "two") == _records(tmp_path / "one")
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert 0 < metrics["robust_acc"] < metrics["clean_acc"], "some images must be fooled for the test to mean anything"
    assert sorted(examples["two"]) == sorted(examples["one"]) and len(examples["one"]) == 24
    for s in examples["one"]:
        assert torch.equal(examples["two"][s], examples["one"][s]), f"image with seed {s}"


# --- bad budgets ---------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("kwargs,message", [
    (dict(eps=NAN), "eps: nan is not a finite number"),
    (dict(eps=INF), "eps: inf is not a finite number"),
    (dict(eps=-INF), "eps: -inf is not a finite number"),
    (dict(eps="4"), "eps: expected a number, got '4'"),
    (dict(eps=True), "eps: expected a number, got True"),
    (dict(alpha=NAN), "alpha: nan is not a finite number"),
    (dict(alpha=INF), "alpha: inf is not a finite number"),
    (dict(alpha=0.0), "alpha must be > 0, got 0.0"),
    (dict(steps=NAN), "steps must be an integer, got nan"),
    (dict(steps=2.5), "steps must be an integer, got 2.5"),
    (dict(restarts=0), "restarts >= 1"),
    (dict(attack="autoattack", aa_version="bogus"), "unknown AutoAttack version 'bogus'"),
])
def test_threat_model_rejects_bad_budgets(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ThreatModel(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(eps=NAN), "eps: nan is not a finite number"),
    (dict(eps=INF), "eps: inf is not a finite number"),
    (dict(eps=4, alpha=NAN), "alpha: nan is not a finite number"),
    (dict(eps=4, alpha=INF), "alpha: inf is not a finite number"),
    (dict(eps="4"), "eps: expected a number, got '4'"),
])
def test_from_255_rejects_bad_budgets(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        ThreatModel.from_255(**kwargs)


@pytest.mark.parametrize("version,classes,least", [("rand", 2, 3), ("plus", 3, 4), ("standard", 3, 4)])
def test_too_few_classes_for_the_version(tiny_backbone, version, classes, least):
    """pyautoattack would index past the logits (an IndexError deep inside its DLR losses)."""
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c", "d"][:classes])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=f"AutoAttack '{version}' needs at least {least} classes"):
        ThreatModel.from_255(4, attack="autoattack", aa_version=version).run(clf, x, torch.tensor([0, 1]), seeds=[1, 2])


@pytest.mark.parametrize("build", [lambda: ThreatModel(eps="x" * 10_000), lambda: ThreatModel.from_255(10**400),
                                   lambda: ThreatModel(attack="autoattack", aa_version="v" * 10_000)])
def test_bad_value_in_a_message_is_capped(build):
    """A 400-digit integer is not finite as a float (and no OverflowError escapes); the value quoted
    in the message is cut short."""
    with pytest.raises(ConfigError) as info:
        build()
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)
