"""The CLI says what will happen (issue 12, §1): defaults in --help, --print-config, --set with
suggestions, one α rule for eval and training, the run directory printed and a `latest`
pointer, a run without results does not block its rerun, --model beside --run, -v anywhere."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from robustprompt.cli import build_parser, main
from robustprompt.errors import ConfigError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """4 RGB images of 2 classes in an imagefolder layout."""
    root = tmp_path / "images"
    for c, color in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (36, 36), tuple(v + 10 * i for v in color)).save(root / c / f"{i}.png")
    return root


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[command].format_help().split())   # one line: wrapping does not matter


def _printed(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


# ------------------------------------------------------------------------------ --help
def test_help_states_the_effective_defaults():
    text = _help("eval")
    # the numbers the README promises, typed here independently of the dataclasses
    for part in ("--steps STEPS (default: 100)", "--eps EPS (default: 1)", "--split SPLIT split to evaluate (default: test)",
                 "--batch-size N|auto images per batch", "metrics.environment.batch_size (default: 64)",
                 "--attack {none,fgsm,pgd,autoattack} (default: pgd)",
                 "(default: eps/4)", "PGD-100 at ε = 1/255", "runs/latest-<command>"):
        assert part in text, part
    assert "(default eps/4)" not in text   # a hand-typed default is replaced, never shown twice
    tta = _help("tta")
    assert "--eps EPS (default: 4)" in tta and "--adaptive-steps ADAPTIVE_STEPS iterations of the adaptive attack " \
                                                 "(default: 100)" in tta
    train = _help("train")
    assert "--train-steps TRAIN_STEPS (default: 2)" in train and "--shots SHOTS" in train
    assert "eps/4 unless given" in train and "eps/4 unless given" in text   # one rule, stated in both
    assert "--device DEVICE auto (default" in _help("explain")


def test_help_defaults_come_from_the_dataclass():
    from robustprompt.cli_config import annotate_defaults

    @dataclass
    class Toy:
        steps: int = 7
        rate: float = 0.5
        name: str = "x"

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, help="iterations (default 3)")   # a stale hand-typed default
    p.add_argument("--rate", type=float)
    p.add_argument("--name")
    annotate_defaults(p, Toy, {"steps": "steps", "rate": "rate", "name": "name"})
    helps = {a.dest: a.help for a in p._actions}
    assert helps["steps"] == "iterations (default: 7)"
    assert helps["rate"] == "(default: 0.5)" and helps["name"] == "(default: x)"


def test_explain_uses_the_same_device_resolution():
    args = build_parser(defaults_in_help=False).parse_args(["explain", "--image", "example"])
    assert args.device == "auto"


# ------------------------------------------------------------------------------ --print-config and --set
@pytest.mark.parametrize("argv", [
    ["eval", "--dataset", "fashion_mnist"],
    ["tta", "--dataset", "fashion_mnist"],
    ["train", "--dataset", "fashion_mnist"],
])
def test_print_config_prints_and_writes_nothing(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = _printed(capsys, [*argv, "--steps" if argv[0] != "train" else "--epochs", "5", "--print-config"])
    assert cfg["seed"] == 0 and cfg["device"] == "auto" and cfg["data"]["dataset"] == "fashion_mnist"
    assert list(tmp_path.iterdir()) == []   # no run directory, no runs/ folder


def test_set_overrides_flags_and_yaml(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("attack: {steps: 7, eps: 2}\ndata: {dataset: fashion_mnist}\n")
    cfg = _printed(capsys, ["eval", "--config", str(tmp_path / "c.yaml"), "--steps", "5", "--set", "attack.steps=3",
                            "--set", "data.subset=10", "--print-config"])
    assert cfg["attack"]["steps"] == 3 and cfg["attack"]["eps"] == 2 and cfg["data"]["subset"] == 10
    cfg = _printed(capsys, ["train", "--dataset", "fashion_mnist", "--set", "method.params.alpha=2", "--print-config"])
    assert cfg["method"]["params"] == {"alpha": 2}   # free-form params: the method checks its keys


@pytest.mark.parametrize("argv, hint", [
    (["eval", "--set", "atack.steps=3"], "did you mean attack.steps?"),
    (["eval", "--set", "attack.step=3"], "did you mean attack.steps?"),
    (["tta", "--set", "adaptive_attack.eott=3"], "did you mean adaptive_attack.eot?"),
    (["train", "--set", "optim.lrr=0.1"], "did you mean optim.lr?"),
    (["train", "--set", "zzz=1"], "the config has model, data"),
])
def test_set_typo_suggests_the_nearest_key(argv, hint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--dataset", "fashion_mnist", "--print-config"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"robustprompt {argv[0]}: error: --set ") and hint in line


def test_run_print_config_and_set_typo(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text("name: tiny\ntrain: {method: {name: coop}}\nseeds: [1]\n")
    cfg = _printed(capsys, ["run", str(tmp_path / "e.yaml"), "--set", "seeds=[4, 5]", "--print-config"])
    assert cfg["seeds"] == [4, 5] and cfg["name"] == "tiny"
    assert not (tmp_path / "runs").exists()
    assert main(["run", str(tmp_path / "e.yaml"), "--set", "train.optim.epoch=2", "--print-config"]) == 2
    assert "did you mean train.optim.epochs?" in capsys.readouterr().err


def test_explain_print_config(capsys, tmp_path):
    cfg = _printed(capsys, ["explain", "--image", "example", "--eps", "8", "--print-config",
                            "--out", str(tmp_path / "x.png")])
    assert cfg["attack"]["eps"] == 8 and cfg["device"] == "auto" and cfg["model"]["name"] == "demo"
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------ one α rule
def test_train_eps_follows_the_eval_rule(capsys):
    def threat(argv):
        from robustprompt.config import AttackSpec, from_dict

        return from_dict(AttackSpec, _printed(capsys, argv + ["--print-config"])["train_attack"]).threat()

    base = ["train", "--dataset", "fashion_mnist"]
    assert threat(base).step_size == pytest.approx(1 / 255)                    # FAP's PGD-2, ε = α = 1/255
    assert threat(base + ["--train-eps", "8"]).step_size == pytest.approx(2 / 255)   # 8/255 ÷ 4
    assert threat(base + ["--train-eps", "8", "--train-alpha", "3"]).step_size == pytest.approx(3 / 255)
    ev = _printed(capsys, ["eval", "--dataset", "fashion_mnist", "--eps", "8", "--print-config"])["attack"]
    from robustprompt.config import AttackSpec, from_dict

    assert from_dict(AttackSpec, ev).threat().step_size == pytest.approx(2 / 255)   # the same rule at eval


def test_demo_training_threat_is_unchanged():
    """The demo gives its α explicitly: the rule does not touch it (ε = 4/255, α = 2/255)."""
    from robustprompt.demo.run import DEMO_TRAIN
    from robustprompt.engine.train import train_config_from_dict

    t = train_config_from_dict({**DEMO_TRAIN, "method": {"name": "fap"}}).train_attack.threat()
    assert (t.eps, t.step_size, t.steps) == pytest.approx((4 / 255, 2 / 255, 2))


# ------------------------------------------------------------------------------ surprising defaults
def test_a_forgotten_dataset_with_another_backbone_is_refused(capsys):
    assert main(["eval", "--model", "rp-tiny", "--print-config"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "no --dataset given" in line and "--dataset fashion_mnist" in line
    assert main(["eval", "--model", "rp-tiny", "--dataset", "fashion_mnist", "--print-config"]) == 0
    assert main(["eval", "--print-config"]) == 0   # the demo backbone on its own data


def test_model_beside_run_must_name_the_recorded_backbone(monkeypatch, tmp_path, capsys):
    import robustprompt.api

    monkeypatch.setattr(robustprompt.api, "open_prompts",
                        lambda run: SimpleNamespace(backbone=SimpleNamespace(name="ViT-B-32")))
    run = str(tmp_path / "trained")
    assert main(["eval", "--run", run, "--model", "ViT-B-16", "--print-config"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--model 'ViT-B-16' conflicts with --run" in line and "'ViT-B-32'" in line
    assert main(["eval", "--run", run, "--model", "ViT-B-32", "--dataset", "fashion_mnist", "--print-config"]) == 0


# ------------------------------------------------------------------------------ run directories
def test_a_run_without_results_does_not_block_its_rerun(tmp_path, capsys):
    from robustprompt.engine.rundir import RunDir

    out = tmp_path / "out"
    with RunDir(out, {"kind": "eval", "attack": {"steps": 1}}).open():
        pass   # failed at start: config.yaml and the marker only
    with RunDir(out, {"kind": "eval", "attack": {"steps": 2}}).open() as resumed:
        assert not resumed
    assert yaml.safe_load((out / "config.yaml").read_text())["attack"]["steps"] == 2
    (out / "records.jsonl").write_text('{"index": 0}\n')   # now it holds a result: refused as before
    with pytest.raises(ConfigError, match="holds a different run"):
        with RunDir(out, {"kind": "eval", "attack": {"steps": 3}}).open():
            pass


def test_a_run_without_results_but_a_foreign_file_is_still_refused(tmp_path):
    from robustprompt.engine.rundir import RunDir

    out = tmp_path / "out"
    with RunDir(out, {"kind": "eval", "attack": {"steps": 1}}).open():
        pass
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds a different run"):
        with RunDir(out, {"kind": "eval", "attack": {"steps": 2}}).open():
            pass
    assert (out / "notes.txt").read_text() == "mine"


def test_latest_pointer(tmp_path):
    from robustprompt.engine.rundir import update_latest

    runs = tmp_path / "runs" / "eval"
    for name in ("a-1", "b-2"):
        (runs / name).mkdir(parents=True)
        pointer = update_latest(runs / name, "eval")
        assert pointer == tmp_path / "runs" / "latest-eval"
        target = os.readlink(pointer) if pointer.is_symlink() else pointer.read_text().strip()
        assert target == f"eval/{name}"
    assert (tmp_path / "runs" / "latest-eval").resolve() == (runs / "b-2").resolve()
    assert sorted(p.name for p in runs.iterdir()) == ["a-1", "b-2"]   # runs/eval holds run directories only
    assert update_latest(tmp_path / "elsewhere" / "x", "eval") is None   # --out outside runs/<command>/
    assert not (tmp_path / "elsewhere").exists()


def test_cli_prints_the_run_directory_and_keeps_latest(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", "rp-tiny", "--dataset", f"imagefolder:{folder}", "--attack", "none", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (run,) = list((tmp_path / "runs" / "eval").iterdir())
    assert out.count(f"run directory: {Path('runs') / 'eval' / run.name}") == 2   # at the start and the end
    assert (tmp_path / "runs" / "latest-eval").resolve() == run.resolve()
    assert (tmp_path / "runs" / "latest-eval" / "metrics.json").is_file()


# ------------------------------------------------------------------------------ -v
@pytest.mark.parametrize("argv", [["-v", "methods"], ["methods", "-v"], ["methods", "--verbose"]])
def test_verbose_before_or_after_the_command(argv):
    assert main(argv) == 0
    assert logging.getLogger("robustprompt").level == logging.DEBUG
    assert main(["methods"]) == 0
    assert logging.getLogger("robustprompt").level == logging.INFO
