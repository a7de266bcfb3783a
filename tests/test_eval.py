"""`robustprompt eval`: run directories, resume, sharding, CLI errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from robustprompt.cli import main
from robustprompt.config import AttackSpec, DataSpec, ModelSpec
from robustprompt.engine import rundir
from robustprompt.engine.evaluate import EvalConfig, evaluate

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**attack):
    return EvalConfig(model=ModelSpec(name="demo"), data=DataSpec(dataset="fashion_mnist", subset=24, batch_size=5),
                      attack=AttackSpec(eps=4, steps=3, **attack), device="cpu")


def _records(path):
    return [json.loads(line) for line in (Path(path) / "records.jsonl").read_text().splitlines()]


def test_run_directory_contents(tmp_path):
    m = evaluate(_cfg(), tmp_path / "run", progress=False)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    # marker, results and the run's logs; the lock file is gone (released)
    assert files == [".robustprompt-run.json", "config.yaml", "log.txt", "metrics.json", "records.jsonl",
                     "scalars.csv"]
    recs = _records(tmp_path / "run")
    assert len(recs) == 24 == m["n"] and len({r["index"] for r in recs}) == 24
    assert set(recs[0]) >= {"index", "id", "label", "clean_pred", "adv_pred"}
    assert m["clean_acc"] == pytest.approx(100 * sum(r["clean_pred"] == r["label"] for r in recs) / 24)
    assert m["robust_acc"] == pytest.approx(100 * sum(r["adv_pred"] == r["label"] for r in recs) / 24)
    assert m["robust_acc"] <= m["clean_acc"]
    assert m["threat"]["eps_255"] == 4 and m["threat"]["steps"] == 3 and m["method"] == "zeroshot"
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["attack"]["eps"] == 4 and cfg["model"]["prompt"]["coupling"] == "none"


def test_resume_after_kill_gives_same_result(tmp_path, monkeypatch):
    reference = evaluate(_cfg(), tmp_path / "ref", progress=False)
    calls = {"n": 0}
    original = rundir.RunDir.append_records

    def dying(self, rank, records):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed after two batches were written
        original(self, rank, records)

    monkeypatch.setattr(rundir.RunDir, "append_records", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_cfg(), tmp_path / "run", progress=False)
    monkeypatch.setattr(rundir.RunDir, "append_records", original)
    [part] = (tmp_path / "run").glob("records.*.part-0.jsonl")   # named by the config's hash
    assert len(part.read_text().splitlines()) == 10
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "records.jsonl").exists()
    with open(part, "a") as fh:
        fh.write('{"index": 99, "clean_pr')  # a torn line, as a kill mid-write leaves
    resumed = evaluate(_cfg(), tmp_path / "run", progress=False)
    for key in ("clean_acc", "robust_acc", "n"):
        assert resumed[key] == reference[key]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "sec"} for r in rs]  # noqa: E731
    assert strip(_records(tmp_path / "run")) == strip(_records(tmp_path / "ref"))
    assert not part.exists()


def test_same_dir_other_config_is_refused(tmp_path):
    evaluate(_cfg(), tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="holds a different run.*attack.steps"):
        evaluate(EvalConfig(model=ModelSpec(name="demo"), data=DataSpec(dataset="fashion_mnist", subset=24, batch_size=5),
                            attack=AttackSpec(eps=4, steps=4), device="cpu"), tmp_path / "run", progress=False)
    m = evaluate(_cfg(), tmp_path / "run", progress=False)  # same config: finished run is returned as is
    assert m["n"] == 24


def _imagefolder(tmp_path):
    root = tmp_path / "folder"
    for c, color in [("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200)), ("gray", (128,) * 3)]:
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), tuple(min(255, v + 10 * i) for v in color)).save(root / c / f"{i}.png")
    return root


def test_cli_yaml_and_flags_on_an_image_folder(tmp_path, capsys):
    root = _imagefolder(tmp_path)
    cfg = {"model": {"name": "rp-tiny"}, "data": {"dataset": f"imagefolder:{root}", "batch_size": 4},
           "attack": {"eps": 2, "steps": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["eval", "--config", str(tmp_path / "c.yaml"), "--steps", "3", "--out", str(tmp_path / "run"),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "clean accuracy" in out and "robust accuracy" in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["attack"]["steps"] == 3 and saved["attack"]["eps"] == 2 and saved["model"]["name"] == "rp-tiny"
    assert len(_records(tmp_path / "run")) == 12


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "no_such_set"], "unknown dataset"),
    (["--dataset", "oxford_pets"], "data root"),
    (["--eps", "-1"], "eps must be >= 0"),
    (["--model", "ViT-B-99", "--dataset", "fashion_mnist"], "unknown open_clip architecture"),  # dataset: see issue 12
    (["--config", "/nonexistent.yaml"], "does not exist"),
])
def test_cli_user_mistakes_give_one_clear_line(tmp_path, capsys, argv, message):
    rc = main(["eval", *argv, "--subset", "4", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bad_yaml_key_is_named(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("attack:\n  epsilon: 4\n")
    assert main(["eval", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown key(s) epsilon" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_shard_exactly(tmp_path):
    args = ["eval", "--dataset", "fashion_mnist", "--subset", "23", "--batch-size", "4", "--steps", "2",
            "--eps", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "robustprompt",
                    *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = _records(tmp_path / "two"), _records(tmp_path / "one")
    assert [r["index"] for r in two] == [r["index"] for r in one]  # every image once, no padding
    assert [(r["clean_pred"], r["adv_pred"]) for r in two] == [(r["clean_pred"], r["adv_pred"]) for r in one]


def test_worst_case_over_several_attacks(tmp_path):
    """eval with PGD and FGSM: an image is robust only if both fail; each attack's accuracy equals
    a separate evaluation with that attack alone (same seeds)."""
    data = DataSpec(dataset="fashion_mnist", subset=16, batch_size=8)
    pgd_only = evaluate(EvalConfig(model=ModelSpec(name="demo"), data=data, attack=AttackSpec(eps=4, steps=3),
                                   device="cpu"), tmp_path / "pgd", progress=False)
    fgsm_only = evaluate(EvalConfig(model=ModelSpec(name="demo"), data=data, attack=AttackSpec(attack="fgsm", eps=4),
                                    device="cpu"), tmp_path / "fgsm", progress=False)
    both = evaluate(EvalConfig(model=ModelSpec(name="demo"), data=data, attack=AttackSpec(eps=4, steps=3),
                               also=[AttackSpec(attack="fgsm", eps=4)], device="cpu"), tmp_path / "both", progress=False)
    acc = {a["key"]: a["acc"] for a in both["attacks"]}
    assert acc == {"pgd": pgd_only["robust_acc"], "fgsm": fgsm_only["robust_acc"]}
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "records.jsonl").read_text().splitlines()]  # noqa: E731
    for r, rp, rf in zip(read("both"), read("pgd"), read("fgsm")):
        assert r["adv_preds"] == {"pgd": rp["adv_pred"], "fgsm": rf["adv_pred"]}
        assert (r["adv_pred"] == r["label"]) == (rp["adv_pred"] == r["label"] and rf["adv_pred"] == r["label"])
    assert both["robust_acc"] == both["worst_case"]["acc"] <= min(acc.values())
    assert both["worst_case"]["over"] == ["pgd", "fgsm"]
