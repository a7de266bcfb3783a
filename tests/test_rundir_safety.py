"""Run directories never lose data, never mix runs, never resume stale work (issue 10 §2–§5, §7).

Every test here failed on the code before the fix (checked against a copy of that commit).
"""
import errno
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from robustprompt.config import set_dotted
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from robustprompt.cli import main
from robustprompt.config import AttackSpec, DataSpec, ModelSpec, from_dict
from robustprompt.engine import rundir
from robustprompt.engine.evaluate import EvalConfig, evaluate, image_seed
from robustprompt.engine.experiment import ExperimentConfig, run_experiment
from robustprompt.engine.identity import model_fingerprint, sha256_file, split_fingerprint
from robustprompt.engine.rundir import LOCK, MARKER
from robustprompt.engine.train import TrainingError, train, train_config_from_dict
from robustprompt.engine.tta import TTAConfig, TTAMethodSpec, run_tta
from robustprompt.errors import ConfigError, StorageError
from robustprompt.methods import list_methods, register
from robustprompt.methods.base import Method, StepResult


# ---------------------------------------------------------------------------- helpers
def _cfg(steps=2, batch_size=4, subset=12, **kw):
    return EvalConfig(model=ModelSpec(name="demo"), data=DataSpec(dataset="fashion_mnist", subset=subset,
                                                                  batch_size=batch_size),
                      attack=AttackSpec(eps=4, steps=steps), device="cpu", **kw)


def _records(path):
    """records.jsonl without the timing field."""
    return [{k: v for k, v in json.loads(line).items() if k != "sec"}
            for line in (Path(path) / "records.jsonl").read_text().splitlines()]


def _kill_after(monkeypatch, batches):
    """Make the next evaluation die (KeyboardInterrupt) after `batches` batches were recorded."""
    original = rundir.RunDir.append_records
    calls = {"n": 0}

    def dying(self, rank, records):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        original(self, rank, records)

    monkeypatch.setattr(rundir.RunDir, "append_records", dying)
    return lambda: monkeypatch.setattr(rundir.RunDir, "append_records", original)


def _killed_eval(monkeypatch, cfg, out, batches=2):
    restore = _kill_after(monkeypatch, batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, out, progress=False)
    restore()
    [part] = Path(out).glob("records*.part-0.jsonl")
    return part


def _snapshot(path):
    """{relative path: bytes} of everything under `path`."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def _imagefolder(root, extra=()):
    for c, color in [("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200)), ("gray", (128,) * 3)]:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (40, 36), tuple(min(255, v + 10 * i) for v in color)).save(root / c / f"{i}.png")
    for rel, color in extra:
        Image.new("RGB", (40, 36), color).save(root / rel)
    return root


def _enospc_when(monkeypatch, fragment):
    """os.fsync raises ENOSPC for files whose path contains `fragment` (a full disk, as the
    engines meet it: every write is fsynced before it counts)."""
    real = os.fsync

    def fsync(fd):
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# ---------------------------------------------------------------------------- §2 --overwrite
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    """`--out .` in a repository with a config.yaml: nothing is deleted, nothing is written."""
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "config.yaml").write_text("name: my project\n")
    (repo / "README.md").write_text("# mine\n")
    (repo / "src" / "main.py").write_text("print('hi')\n")
    before = _snapshot(repo)
    for overwrite in (True, False):
        with pytest.raises(ConfigError, match="not a robustprompt run directory .no marker."):
            evaluate(_cfg(), repo, overwrite=overwrite, progress=False)
    assert _snapshot(repo) == before and sorted(p.name for p in repo.iterdir()) == ["README.md", "config.yaml", "src"]


def test_overwrite_deletes_only_what_the_toolkit_wrote(tmp_path):
    run = tmp_path / "run"
    evaluate(_cfg(subset=10), run, progress=False)
    (run / "notes.txt").write_text("my notes\n")
    (run / "plots").mkdir()
    (run / "plots" / "fig.png").write_bytes(b"png")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "mine.txt").write_text("keep\n")
    marker = json.loads((run / MARKER).read_text())
    assert marker["kind"] == "eval" and marker["config_hash"] == rundir.config_hash(
        yaml.safe_load((run / "config.yaml").read_text()))
    m = evaluate(_cfg(subset=10, steps=1), run, overwrite=True, progress=False)
    assert (run / "notes.txt").read_text() == "my notes\n" and (run / "plots" / "fig.png").read_bytes() == b"png"
    assert (run / "checkpoints" / "mine.txt").read_text() == "keep\n"
    assert yaml.safe_load((run / "config.yaml").read_text())["attack"]["steps"] == 1 and m["threat"]["steps"] == 1
    assert json.loads((run / MARKER).read_text())["config_hash"] != marker["config_hash"]


def test_an_empty_existing_folder_is_a_fine_out(tmp_path):
    (tmp_path / "run").mkdir()
    assert evaluate(_cfg(subset=5), tmp_path / "run", overwrite=True, progress=False)["n"] == 5


def _make_legacy(run):
    """Turn a run directory into one written before markers and fingerprints existed."""
    (run / MARKER).unlink()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"].pop("fingerprint")
    cfg["data"].pop("fingerprint")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for part in run.glob("records.*.part-*.jsonl"):
        part.rename(run / re.sub(r"^records\.[0-9a-f]{10}\.", "records.", part.name))


def test_legacy_run_directories(tmp_path, monkeypatch, capsys):
    # an unfinished legacy run resumes as before (old part-file naming included) and gets a marker
    ref = tmp_path / "ref"
    evaluate(_cfg(), ref, progress=False)
    run = tmp_path / "run"
    _killed_eval(monkeypatch, _cfg(), run)
    _make_legacy(run)
    assert (run / "records.part-0.jsonl").exists()
    appended = []
    original = rundir.RunDir.append_records
    monkeypatch.setattr(rundir.RunDir, "append_records",
                        lambda self, rank, recs: (appended.extend(recs), original(self, rank, recs)))
    evaluate(_cfg(), run, progress=False)
    monkeypatch.setattr(rundir.RunDir, "append_records", original)
    assert len(appended) == 4 and _records(run) == _records(ref)   # the 8 old records were kept
    assert "earlier robustprompt" in capsys.readouterr().err
    assert json.loads((run / MARKER).read_text())["kind"] == "eval"
    assert not list(run.glob("records*.part-*"))
    # a finished legacy run with only toolkit files may be overwritten ...
    _make_legacy(run)
    assert evaluate(_cfg(steps=1), run, overwrite=True, progress=False)["threat"]["steps"] == 1
    # ... but not one that also holds a file robustprompt did not write
    _make_legacy(run)
    (run / "thesis.tex").write_text("years of work\n")
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="thesis.tex"):
        evaluate(_cfg(steps=2), run, overwrite=True, progress=False)
    assert _snapshot(run) == before


def test_experiment_root_follows_the_same_rule(tmp_path, monkeypatch):
    root = tmp_path / "exp"
    root.mkdir()
    (root / "data.csv").write_text("a,b\n")

    def no_work(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr("robustprompt.engine.experiment.train", no_work)
    cfg = from_dict(ExperimentConfig, {"train": {"model": {"name": "demo"}, "method": {"name": "coop"}},
                                       "seeds": [1], "device": "cpu"})
    with pytest.raises(ConfigError, match="not a robustprompt run directory"):
        run_experiment(cfg, root, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["data.csv"]
    # a run directory is not an experiment folder either
    evaluate(_cfg(subset=5), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="eval run directory"):
        run_experiment(cfg, tmp_path / "run", progress=False)


# ---------------------------------------------------------------------------- §3 concurrency
HOLDER = """
import sys, time
from robustprompt.engine.rundir import RunDir
with RunDir(sys.argv[1], {"kind": "eval", "holder": "test"}).open():
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run, 120)
    try:
        before = _snapshot(run)
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=rf"in use by another robustprompt process \(PID {proc.pid}\b"):
                evaluate(_cfg(subset=5), run, overwrite=overwrite, progress=False)
        assert _snapshot(run) == before
    finally:
        proc.kill()   # kill -9: the kernel drops the lock with the process
        proc.wait()
    assert evaluate(_cfg(subset=5), run, overwrite=True, progress=False)["n"] == 5
    assert not (run / LOCK).exists()


def test_wait_for_lock_waits_for_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _holder(run, 2)
    try:
        m = evaluate(_cfg(subset=5), run, overwrite=True, progress=False, wait_for_lock=True)
    finally:
        proc.wait()
    assert m["n"] == 5 and f"waiting for PID {proc.pid}" in capsys.readouterr().err


@pytest.mark.slow
def test_every_process_of_a_distributed_run_gets_the_refusal(tmp_path):
    """Only the main process claims the directory; the others receive its refusal and exit with
    the same one-line error instead of waiting at a barrier."""
    run = tmp_path / "run"
    proc = _holder(run, 300)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    try:
        dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "robustprompt", "eval", "--subset", "4", "--steps", "1", "--no-progress",
                               "--device", "cpu", "--out", str(run)], env=env, capture_output=True, text=True,
                              timeout=240)
    finally:
        proc.kill()
        proc.wait()
    assert dist.returncode != 0
    lines = [ln for ln in dist.stderr.splitlines() if "robustprompt eval: error:" in ln]
    assert len(lines) == 2 and all(f"PID {proc.pid}" in ln for ln in lines), dist.stderr[-2000:]


def test_part_files_of_another_configuration_are_never_read(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    evaluate(_cfg(), ref, progress=False)
    run = tmp_path / "run"
    _killed_eval(monkeypatch, _cfg(), run)
    # records of another configuration (right ids, wrong predictions) under both namings
    ids = [r["id"] for r in _records(ref)]
    index = [r["index"] for r in _records(ref)]
    bogus = "".join(json.dumps({"index": i, "id": d, "label": 0, "clean_pred": 0, "adv_pred": 0}) + "\n"
                    for i, d in zip(index, ids))
    (run / "records.0123456789.part-0.jsonl").write_text(bogus)
    (run / "records.part-1.jsonl").write_text(bogus)
    evaluate(_cfg(), run, progress=False)
    assert _records(run) == _records(ref)


# ---------------------------------------------------------------------------- §4 stale resumes and caches
def test_a_changed_image_folder_is_a_different_run(tmp_path, monkeypatch):
    root = _imagefolder(tmp_path / "folder")
    cfg = EvalConfig(model=ModelSpec(name="demo"), data=DataSpec(dataset=f"imagefolder:{root}", batch_size=4),
                     attack=AttackSpec(eps=8, steps=2), device="cpu")
    _killed_eval(monkeypatch, cfg, tmp_path / "run", batches=1)
    _imagefolder(root, extra=[("blue/00.png", (255, 255, 0)), ("gray/00.png", (0, 0, 0))])  # indices shift
    with pytest.raises(ConfigError, match="data.fingerprint.*images, labels or classes changed"):
        evaluate(cfg, tmp_path / "run", progress=False)
    resumed = evaluate(cfg, tmp_path / "run", overwrite=True, progress=False)
    fresh = evaluate(cfg, tmp_path / "fresh", progress=False)
    assert _records(tmp_path / "run") == _records(tmp_path / "fresh") and resumed["n"] == fresh["n"] == 14


def test_records_naming_another_image_are_redone(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    evaluate(_cfg(), ref, progress=False)
    part = _killed_eval(monkeypatch, _cfg(), tmp_path / "run")
    lines = [json.loads(line) for line in part.read_text().splitlines()]
    truth = {r["index"]: r for r in _records(ref)}
    for r in lines[:3]:   # three records that now belong to other images: wrong id, wrong predictions
        r["id"] = "test/elsewhere-" + str(r["index"])
        r["clean_pred"] = r["adv_pred"] = (truth[r["index"]]["label"] + 1) % 10
    part.write_text("".join(json.dumps(r) + "\n" for r in lines))
    evaluate(_cfg(), tmp_path / "run", progress=False)
    assert _records(tmp_path / "run") == _records(ref)
    assert "3 recorded images" in capsys.readouterr().err


def test_fingerprints_are_independent_hashes(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(6.0)}, str(f))
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    spec = ModelSpec(name="rp-tiny", pretrained=str(f))
    first = model_fingerprint(spec)["weights"]
    save_file({"w": torch.arange(6.0) + 1}, str(f))   # same size, rewritten in place
    assert model_fingerprint(spec)["weights"] == hashlib.sha256(f.read_bytes()).hexdigest() != first
    assert model_fingerprint(ModelSpec(name="rp-tiny", pretrained="openai"))["weights"] is None
    base = split_fingerprint(["a", "b", "c"], [0, 1, 1], [0, 2], ["x", "y"])
    assert base == split_fingerprint(["a", "B", "c"], [0, 0, 1], [0, 2], ["x", "y"])   # index 1 not used
    assert len({base, split_fingerprint(["a", "b", "d"], [0, 1, 1], [0, 2], ["x", "y"]),
                split_fingerprint(["a", "b", "c"], [0, 1, 0], [0, 2], ["x", "y"]),
                split_fingerprint(["a", "b", "c"], [0, 1, 1], [0, 1], ["x", "y"]),
                split_fingerprint(["a", "b", "c"], [0, 1, 1], [0, 2], ["x", "z"])}) == 5


def _tiny_train(**over):
    raw = {"model": {"name": "demo", "prompt": {"depth": 1, "n_ctx": 2}}, "method": {"name": "coop"},
           "data": {"dataset": "fashion_mnist", "shots": 1, "batch_size": 10, "augment": "none"},
           "optim": {"epochs": 1, "warmup_epochs": 0, "lr": 0.01}, "device": "cpu"}
    for k, v in over.items():
        set_dotted(raw, k, v)
    return train_config_from_dict(raw)


def test_eval_of_retrained_prompts_is_not_the_cached_result(tmp_path, monkeypatch):
    trained = tmp_path / "train"
    train(_tiny_train(), trained, progress=False)
    cfg = EvalConfig(model=ModelSpec(run=str(trained)), data=DataSpec(subset=8, batch_size=8),
                     attack=AttackSpec(eps=4, steps=2), device="cpu")
    evaluate(cfg, tmp_path / "eval", progress=False)
    monkeypatch.chdir(tmp_path)
    evaluate(cfg, None, progress=False)
    prompts = load_file(str(trained / "prompts.safetensors"))
    save_file({k: v * 3 + 0.5 for k, v in prompts.items()}, str(trained / "prompts.safetensors"))  # retrained
    with pytest.raises(ConfigError, match="model.fingerprint.prompts.*the prompts file changed"):
        evaluate(cfg, tmp_path / "eval", progress=False)
    evaluate(cfg, None, progress=False)   # the default folder is named by the new fingerprint
    assert len(list((tmp_path / "runs" / "eval").iterdir())) == 2
    again = evaluate(cfg, tmp_path / "eval", overwrite=True, progress=False)
    fresh = evaluate(cfg, tmp_path / "fresh", progress=False)
    assert _records(tmp_path / "eval") == _records(tmp_path / "fresh") and again["n"] == fresh["n"]
    sha = hashlib.sha256((trained / "prompts.safetensors").read_bytes()).hexdigest()
    assert yaml.safe_load((tmp_path / "eval" / "config.yaml").read_text())["model"]["fingerprint"]["prompts"] == sha


def test_batch_size_and_workers_are_part_of_a_training_run(tmp_path):
    out = tmp_path / "train"
    train(_tiny_train(), out, progress=False)
    first = json.loads((out / "metrics.json").read_text())
    with pytest.raises(ConfigError, match=r"data.batch_size: 10 there, 5 now"):
        train(_tiny_train(**{"data.batch_size": 5}), out, progress=False)
    with pytest.raises(ConfigError, match=r"data.workers: 0 there, 1 now"):
        train(_tiny_train(**{"data.workers": 1}), out, progress=False)
    assert train(_tiny_train(**{"device": "auto"}), out, progress=False) == first   # device stays runtime-only


def test_eval_and_tta_records_do_not_depend_on_batch_size(tmp_path):
    """eval/tta keep batch size and workers out of their identity: per-image seeds make every
    record the same whatever the batching (PGD, FGSM and a test-time defence checked here)."""
    for bs in (2, 5):
        evaluate(_cfg(subset=10, batch_size=bs, steps=3, also=[AttackSpec(attack="fgsm", eps=4)]), tmp_path / f"e{bs}",
                 progress=False)
        run_tta(TTAConfig(model=ModelSpec(name="demo"), data=DataSpec(subset=5, batch_size=bs),
                          method=TTAMethodSpec("tpt", {"n_views": 8}), attack=AttackSpec(eps=8, alpha=2, steps=2),
                          device="cpu"), tmp_path / f"t{bs}", progress=False)
    assert _records(tmp_path / "e2") == _records(tmp_path / "e5")
    assert _records(tmp_path / "t2") == _records(tmp_path / "t5")
    # and a finished eval is found again under another batch size
    assert evaluate(_cfg(subset=10, batch_size=7, steps=3, also=[AttackSpec(attack="fgsm", eps=4)]), tmp_path / "e2",
                    progress=False)["n"] == 10


# ---------------------------------------------------------------------------- §5/§7 training checkpoints
class _NaNGradient(Method):
    """A finite loss whose gradient is NaN (d/dp √(0·p) · 0): the prompts become NaN after one step."""
    name = "_nan_gradient_for_test"
    adversarial = False

    def step(self, clf, x, y):
        ce = torch.nn.functional.cross_entropy(clf(x), y)
        s = sum(p.sum() for p in clf.prompt_parameters())
        bad = 0.0 * torch.sqrt(s * 0.0)
        return StepResult(ce + bad, {"ce": ce})


def test_diverged_prompts_are_never_saved(tmp_path):
    if _NaNGradient.name not in list_methods():
        register(_NaNGradient)
    cfg = _tiny_train(**{"method.name": _NaNGradient.name, "model.prompt": {"coupling": "text", "n_ctx": 2,
                                                                            "depth": 1}})
    with pytest.raises(TrainingError, match=r"training diverged at epoch 0: prompts .* hold NaN.*lower optim.lr"):
        train(cfg, tmp_path / "run", progress=False)
    left = sorted(p.name for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert [f for f in left if f not in ("log.txt", "scalars.csv")] == [MARKER, "config.yaml"]   # no prompts


def test_non_finite_optimiser_settings_are_refused():
    from robustprompt.engine.train import OptimSpec

    for key in ("lr", "momentum", "weight_decay", "warmup_lr"):
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ConfigError, match=rf"optim.{key}\b.*finite number"):
                OptimSpec(**{key: bad})
            with pytest.raises(ConfigError, match=rf"optim.{key}\b.*finite number"):
                _tiny_train(**{f"optim.{key}": bad})


def test_negative_training_workers_are_refused():
    with pytest.raises(ConfigError, match="data.workers must be >= 0, got -1"):
        _tiny_train(**{"data.workers": -1})


def _train3(**over):
    return _tiny_train(**{"method.name": "ivlp", "data.batch_size": 5, "data.augment": "flip", "optim.epochs": 3,
                          "model.prompt": {"depth": 1, "n_ctx": 2}, **over})


@pytest.fixture(scope="module")
def reference_training(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(_train3(), out, progress=False)
    return out


def _kill_training_at_step(monkeypatch, step):
    """The next training dies (KeyboardInterrupt) at its `step`-th step (counted from 1)."""
    from robustprompt.engine import train as train_module

    original = train_module._check_finite
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(train_module, "_check_finite", dying)
    return lambda: monkeypatch.setattr(train_module, "_check_finite", original)


def _same_prompts(a, b):
    ref, got = load_file(str(a / "prompts.safetensors")), load_file(str(b / "prompts.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("damaged", ["epoch-001.safetensors", "epoch-001.json"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous(damaged, reference_training, tmp_path, monkeypatch,
                                                              capsys):
    run = tmp_path / "run"
    restore = _kill_training_at_step(monkeypatch, 5)   # 2 steps per epoch: dies in epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(_train3(), run, progress=False)
    restore()
    f = run / "checkpoints" / damaged
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])   # truncated, as a kill mid-write leaves it
    m = train(_train3(), run, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint epoch-001" in err and "damaged" in err and "resuming from epoch 0's checkpoint" in err
    _same_prompts(reference_training, run)
    ref_m = json.loads((reference_training / "metrics.json").read_text())
    assert [h["loss"] for h in m["epochs"]] == pytest.approx([h["loss"] for h in ref_m["epochs"]], abs=1e-6)


def test_a_full_disk_while_checkpointing_keeps_earlier_checkpoints(reference_training, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _enospc_when(monkeypatch, "epoch-001.safetensors")
    with pytest.raises(StorageError, match=r"cannot write .*epoch-001.safetensors: No space left on device"):
        train(_train3(), run, progress=False)
    monkeypatch.undo()
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["epoch-000.json", "epoch-000.safetensors"]  # no temporaries
    load_file(str(ck / "epoch-000.safetensors"))
    train(_train3(), run, progress=False)
    _same_prompts(reference_training, run)


# ---------------------------------------------------------------------------- §7 seeds, --out, full disk
@pytest.mark.parametrize("seed", [-1, 2**31, 2**63, 10**30])
def test_seeds_out_of_range_are_one_line_errors(seed):
    with pytest.raises(ConfigError, match=r"seed must be an integer from 0 to 2147483647"):
        _cfg(seed=seed)
    with pytest.raises(ConfigError, match=r"seed must be an integer from 0"):
        TTAConfig(seed=seed)
    with pytest.raises(ConfigError, match=r"defence_seed must be an integer from 0"):
        TTAConfig(defence_seed=seed)
    with pytest.raises(ConfigError, match=r"seed must be an integer from 0"):
        _tiny_train(seed=seed)
    with pytest.raises(ConfigError, match=r"seeds\[1\] must be an integer from 0"):
        from_dict(ExperimentConfig, {"seeds": [1, seed]})


def test_cli_seed_out_of_range(tmp_path, capsys):
    assert main(["eval", "--seed", "-3", "--subset", "2", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "seed must be an integer" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_image_seeds_never_overflow():
    from robustprompt.attacks.pgd import random_perturbation

    # the formula is unchanged over the valid range (records of earlier runs stay valid) ...
    assert image_seed(3, 5) == 3_000_014
    assert image_seed(2**31 - 1, 2**31 - 1) == (2**31 - 1) * 1_000_003 + 2**31 - 1
    # ... and any integer gives a seed that every derived seed (×1009 + restart, +7919) keeps in int64
    for seed in (-1, -(2**70), 2**63, 2**64 + 5, 10**40):
        s = image_seed(seed, 12345)
        assert 0 <= s < 2**52 and s * 1009 + 99 < 2**63 - 1
        torch.Generator().manual_seed(s * 1009 + 99)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    for norm in ("linf", "l2"):
        delta = random_perturbation(x, 4 / 255, norm, [image_seed(2**64, 0) * 1009, image_seed(-5, 1) * 1009 + 3])
        assert torch.isfinite(delta).all()


def test_out_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started")

    for module in ("evaluate", "tta"):
        monkeypatch.setattr(f"robustprompt.engine.{module}.load_task", no_work)
    monkeypatch.setattr("robustprompt.engine.train.build_dataset", no_work)
    monkeypatch.setattr("robustprompt.engine.experiment.expand", lambda cfg, where: [])
    for module in ("evaluate", "tta", "train", "experiment"):
        monkeypatch.setattr(f"robustprompt.engine.{module}.process_state", no_work)
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep\n")
    runs = {"eval": lambda out: evaluate(_cfg(), out, progress=False),
            "tta": lambda out: run_tta(TTAConfig(device="cpu"), out, progress=False),
            "train": lambda out: train(_tiny_train(), out, progress=False),
            "run": lambda out: run_experiment(from_dict(ExperimentConfig, {"seeds": [1]}), out, progress=False)}
    for name, run in runs.items():
        with pytest.raises(ConfigError, match=r"--out .*results.txt is an existing file, not a folder"):
            run(a_file)
        with pytest.raises(ConfigError, match=r"cannot be created: .*results.txt is a file"):
            run(a_file / "sub")
        with monkeypatch.context() as m:
            m.setattr(os, "access", lambda *a, **k: False)
            with pytest.raises(ConfigError, match="no permission to write in"):
                run(tmp_path / "new")
    assert a_file.read_text() == "keep\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="no permission to write in"):
            evaluate(_cfg(), ro / "run", progress=False)
    finally:
        ro.chmod(0o700)


def test_cli_out_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["eval", "--subset", "2", "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is an existing file" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_full_disk_ends_in_one_line_and_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    evaluate(_cfg(), ref, progress=False)
    run = tmp_path / "run"
    part = _killed_eval(monkeypatch, _cfg(), run)
    kept = part.read_text()
    # appending records: the part file keeps its complete lines
    with monkeypatch.context() as m:
        _enospc_when(m, ".part-0.jsonl")
        with pytest.raises(StorageError, match=rf"cannot write .*{re.escape(part.name)}: No space left on device"):
            evaluate(_cfg(), run, progress=False)
    assert part.read_text().startswith(kept)
    # the final files: no metrics.json, no temporary left behind, the records still there
    with monkeypatch.context() as m:
        _enospc_when(m, "metrics.json")
        with pytest.raises(StorageError, match=r"metrics.json: No space left on device"):
            evaluate(_cfg(), run, progress=False)
    assert not (run / "metrics.json").exists() and not list(run.glob(".*tmp*"))
    # the CLI prints it as one line
    args = ["eval", "--subset", "4", "--eps", "4", "--steps", "1", "--out", str(tmp_path / "cli"), "--no-progress",
            "--device", "cpu"]
    with monkeypatch.context() as m:
        _enospc_when(m, "config.yaml")
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    evaluate(_cfg(), run, progress=False)   # room again: the run completes, exactly
    assert _records(run) == _records(ref)
