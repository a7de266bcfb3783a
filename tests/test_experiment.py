"""`robustprompt run`: grids × seeds, resumable, mean ± std from the runs' own metrics."""
import contextlib
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from robustprompt.cli import main
from robustprompt.config import from_dict
from robustprompt.engine.experiment import ExperimentConfig, expand, load_experiment, run_experiment
from robustprompt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "name": "t",
    "train": {"model": {"name": "demo", "prompt": {"depth": 2}},
              "data": {"dataset": "fashion_mnist", "shots": 2, "batch_size": 10, "augment": "flip"},
              "optim": {"epochs": 1}, "train_attack": {"eps": 4, "alpha": 2}},
    "eval": {"attack": {"eps": 4, "steps": 2}, "targets": [{"subset": 20, "batch_size": 20}]},
    "seeds": [1, 2],
    "grid": {"train.method.name": ["advvp", "cba_fapt"]},
    "device": "cpu",
}


def test_experiment_summary_matches_the_runs(tmp_path):
    cfg = from_dict(ExperimentConfig, SMALL)
    summary = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert len(summary["aggregate"]) == 2 and len(summary["rows"]) == 4
    for g in summary["aggregate"]:
        metrics = [json.loads((Path(r) / "metrics.json").read_text()) for r in g["runs"]]
        robust = [m["robust_acc"] for m in metrics]
        assert g["robust_mean"] == pytest.approx(statistics.fmean(robust))
        assert g["robust_std"] == pytest.approx(statistics.stdev(robust))
        assert all(m["method"] == g["method"] and m["threat"]["eps_255"] == 4 for m in metrics)
        assert {m["train_seed"] for m in metrics} == {1, 2}
    table = [line for line in (tmp_path / "exp" / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert sum(line.count("±") for line in table) == 4
    # a second run redoes nothing
    prompts = tmp_path / "exp" / "method=cba_fapt" / "seed-1" / "train" / "prompts.safetensors"
    before = prompts.stat().st_mtime_ns
    again = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert prompts.stat().st_mtime_ns == before
    assert [g["robust_mean"] for g in again["aggregate"]] == [g["robust_mean"] for g in summary["aggregate"]]


def test_cli_set_pins_a_grid_key(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(SMALL))
    rc = main(["run", str(tmp_path / "e.yaml"), "--set", "train.method.name=advvp", "--set", "seeds=[3]",
               "--out", str(tmp_path / "exp"), "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir() if p.is_dir()) == ["method=advvp"]
    assert "± 0.00" in capsys.readouterr().out


def test_pin_grid_by_hand():
    from robustprompt.cli import pin_grid

    grid = {"tta.method": [{"name": "tpt", "params": {"n_views": 4}}, {"name": "mta"}], "tta.attack.eps": [1, 4]}
    pinned = pin_grid(grid, {"tta.method.params.n_views": 16, "tta.attack.eps": 2, "tta.seed": 5})
    assert pinned == {"tta.method": [{"name": "tpt", "params": {"n_views": 16}}, {"name": "mta", "params": {"n_views": 16}}],
                      "tta.attack.eps": [2]}
    assert grid["tta.method"][0]["params"]["n_views"] == 4 and "params" not in grid["tta.method"][1]   # untouched
    with pytest.raises(ConfigError, match="plain values"):
        pin_grid({"train.method.name": ["advvp"]}, {"train.method.name.x": 1})


def _printed_grid(tmp_path, *sets: str) -> dict:
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(SMALL))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", str(tmp_path / "e.yaml"), *[a for s in sets for a in ("--set", s)], "--print-config"]) == 0
    return yaml.safe_load(out.getvalue())["grid"]


def test_cli_set_on_the_grid(tmp_path, capsys):
    """The last --set of a grid key wins (as for any key); --set grid=… replaces the whole grid (it was
    overwritten by the file's); grid.KEY is refused in one line (grid keys hold dots)."""
    assert _printed_grid(tmp_path, "train.method.name=advvp", "train.method.name=fap") == {"train.method.name": ["fap"]}
    assert _printed_grid(tmp_path, "grid={train.method.name: [apd], train.optim.lr: [0.1]}") == {
        "train.method.name": ["apd"], "train.optim.lr": [0.1]}
    assert main(["run", str(tmp_path / "e.yaml"), "--set", "grid.train.method.name=[apd]", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grid keys hold dots" in err[0]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_shipped_configs_validate(path):
    cfg = load_experiment(ROOT / path)   # validates every grid point, training or test-time
    assert cfg.grid


def _fake_rows(points, seeds):
    """Summary rows as runs would give them (the numbers are made up: only the table is under test)."""
    return [{"point": p.key, "target": "fashion_mnist", "seed": s, "method": "advvp", "clean_acc": 50.0 + s,
             "robust_acc": 10.0 * (i + 1), "n": 20, "threat": {}, "run": f"r{i}{s}", "attack_accs": {}}
            for i, p in enumerate(points) for s in seeds]


def test_summary_names_each_point_s_attack_when_the_grid_varies_it():
    from robustprompt.engine.experiment import summarize

    cfg = from_dict(ExperimentConfig, {**SMALL, "grid": {"eval.attack.eps": [1, 4]}})
    points = expand(cfg)
    md = summarize(_fake_rows(points, cfg.seeds), cfg, {p.key: p.attack for p in points})["markdown"]
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert "attack" in lines[0]
    assert "ε=1/255" in lines[2] and "ε=4/255" in lines[3] and "under each row's attack" in md
    same = from_dict(ExperimentConfig, SMALL)          # one attack for every point: named once, no column
    points = expand(same)
    md = summarize(_fake_rows(points, same.seeds), same, {p.key: p.attack for p in points})["markdown"]
    assert "attack" not in md.splitlines()[0] and "under PGD-2 ℓ∞ ε=4/255" in md


def test_repeated_seeds_and_labels_are_refused():
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        from_dict(ExperimentConfig, {**SMALL, "seeds": [1, 2, 2]})
    with pytest.raises(ConfigError, match="share the label 'templates=a_photo'"):   # both slug to a_photo
        expand(from_dict(ExperimentConfig, {**SMALL, "grid": {"train.model.templates": ["a {} photo", "a {}, photo"]}}))


def test_bad_experiment_configs():
    with pytest.raises(ConfigError, match="grid key 'data.shots'"):
        expand(from_dict(ExperimentConfig, {**SMALL, "grid": {"data.shots": [1]}}))
    with pytest.raises(ConfigError, match="unknown method 'fapp'"):
        expand(from_dict(ExperimentConfig, {**SMALL, "grid": {"train.method.name": ["fapp"]}}))
    with pytest.raises(ConfigError, match="distinct names"):
        expand(from_dict(ExperimentConfig, {**SMALL, "eval": {"targets": [{}, {}]}}))


@pytest.mark.parametrize("path, epochs", [("configs/cba_fapt/few_shot.yaml", 10), ("configs/cba_fapt/base_to_new.yaml", 10),
                                          ("configs/cba_fapt/cross_dataset.yaml", 5), ("configs/apd/few_shot.yaml", 10)])
def test_protocol_configs_match_faps_released_settings(path, epochs):
    """FAP's vit_b32_ep{10,5}_batch4_2ctx_notransform.yaml: no augmentation, squash resize, batch 4,
    SGD lr 0.0035, 10 epochs (5 cross-dataset), PGD-2 ε = α = 1/255 training attack."""
    raw = yaml.safe_load((ROOT / path).read_text())
    data, optim = raw["train"]["data"], raw["train"]["optim"]
    assert (data["augment"], data["resize_mode"], data["batch_size"]) == ("none", "squash", 4)
    assert (optim["epochs"], optim["lr"], optim["warmup_epochs"], optim["warmup_lr"]) == (epochs, 0.0035, 1, 1e-5)
    assert raw["train"]["train_attack"] == {"attack": "pgd", "norm": "linf", "eps": 1, "alpha": 1, "steps": 2}
