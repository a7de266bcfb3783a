"""`robustprompt run` on a test-time protocol: a grid of defences × settings, resumable, with mean ± std
taken from the runs' own metrics."""
import json
import statistics
from pathlib import Path

import pytest
import yaml

from robustprompt.cli import main
from robustprompt.config import from_dict
from robustprompt.engine.experiment import ExperimentConfig, load_experiment, run_experiment, validate_experiment
from robustprompt.errors import ConfigError

VIEWS = {"n_views": 4, "select_ratio": 0.5, "crop_scale": 0.6}
SMALL = {
    "name": "tt",
    "tta": {"model": {"name": "demo"},
            "data": {"dataset": "fashion_mnist", "subset": 3, "batch_size": 3},
            "attack": {"eps": 4, "alpha": 1, "steps": 2}},
    "seeds": [0, 1],
    "grid": {"tta.method": [{"name": "tpt", "params": VIEWS}, {"name": "rtpt", "params": {**VIEWS, "top_k": 2}}]},
    "device": "cpu",
}


def test_tta_protocol_summary_matches_the_runs(tmp_path):
    cfg = from_dict(ExperimentConfig, SMALL)
    summary = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert summary["kind"] == "tta" and len(summary["rows"]) == 4
    assert [g["point"] for g in summary["aggregate"]] == ["method=tpt", "method=rtpt"]
    for g in summary["aggregate"]:
        metrics = [json.loads((Path(r) / "metrics.json").read_text()) for r in g["runs"]]
        assert {m["seed"] for m in metrics} == {0, 1}
        assert {m["defence_seed"] for m in metrics} == {1, 2}          # the view seed follows the attack seed
        assert all(m["tta_method"] == g["method"] and m["n"] == 3 for m in metrics)
        robust = [m["robust_acc"] for m in metrics]
        assert g["robust_mean"] == pytest.approx(statistics.fmean(robust))
        assert g["robust_std"] == pytest.approx(statistics.stdev(robust))
        clean = [m["clean_acc"] for m in metrics]
        assert g["clean_mean"] == pytest.approx(statistics.fmean(clean))
        nonadaptive = [next(a["acc"] for a in m["attacks"] if a["key"] == "nonadaptive") for m in metrics]
        assert g["attacks"]["nonadaptive"]["mean"] == pytest.approx(statistics.fmean(nonadaptive))
    table = [line for line in (tmp_path / "exp" / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert "non-adaptive" in table[0] and "worst case" in table[0]
    assert len(table) == 2 + 2 and sum(line.count("±") for line in table) == 2 * 3
    # a second run redoes nothing
    records = tmp_path / "exp" / "method=tpt" / "seed-1" / "tta" / "metrics.json"
    before = records.stat().st_mtime_ns
    again = run_experiment(cfg, tmp_path / "exp", progress=False)
    assert records.stat().st_mtime_ns == before
    assert [g["robust_mean"] for g in again["aggregate"]] == [g["robust_mean"] for g in summary["aggregate"]]


def test_cli_set_pins_a_tta_grid_key(tmp_path, capsys):
    raw = {**SMALL, "grid": {"tta.method.name": ["tpt", "mta"]}, "seeds": [0]}
    raw["tta"] = {**raw["tta"], "method": {"params": VIEWS}}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(raw))
    rc = main(["run", str(tmp_path / "e.yaml"), "--set", "tta.method.name=mta", "--set", "tta.data.subset=2",
               "--out", str(tmp_path / "exp"), "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir() if p.is_dir()) == ["method=mta"]
    m = json.loads((tmp_path / "exp" / "method=mta" / "seed-0" / "tta" / "metrics.json").read_text())
    assert m["n"] == 2 and m["tta_method"] == "mta"
    assert "± 0.00" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"train": {"method": {"name": "fap"}}}, "either trains prompts"),
    ({"grid": {"train.method.name": ["tpt"]}}, "must start with 'tta.'"),
    ({"grid": {"tta.method.name": []}}, "non-empty list"),
    ({"tta": {**SMALL["tta"], "seed": 3}}, "tta.seed is set by the experiment's seeds"),
    ({"grid": {"tta.method": [{"name": "tpt"}, {"name": "tpt", "params": {"n_views": 8}}]}}, "share the label 'method=tpt'"),
    ({"grid": {"tta.method.name": ["tptt"]}}, "unknown test-time procedure 'tptt'"),
    ({"grid": {"tta.method": [{"name": "rtpt", "params": {"top_k": 0}}]}}, "top_k >= 1"),
    ({"grid": {"tta.attack.eps": [-1]}}, "eps"),
])
def test_bad_tta_protocols_are_refused_before_anything_runs(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        cfg = from_dict(ExperimentConfig, {**SMALL, **change})
        validate_experiment(cfg)
    assert not any(tmp_path.iterdir())


def test_a_bad_tta_set_key_is_one_line_at_the_cli(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(SMALL))
    rc = main(["run", str(tmp_path / "e.yaml"), "--set", "tta.methd.name=tpt", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "methd" in err[0]
    assert not (tmp_path / "x").exists()


def test_the_atpt_protocol_lists_the_six_procedures_on_atpts_datasets():
    cfg = load_experiment("atpt/test_time")
    assert [m["name"] for m in cfg.grid["tta.method"]] == ["tpt", "mta", "rtpt", "ttc", "tapt", "atpt"]
    assert sorted(cfg.grid["tta.data.dataset"]) == sorted(
        ["oxford_pets", "caltech101", "stanford_cars", "dtd", "ucf101", "eurosat", "oxford_flowers", "fgvc_aircraft"])
    assert (cfg.tta["model"]["name"], cfg.tta["attack"]["eps"], cfg.tta["attack"]["steps"]) == ("ViT-B-16", 4, 100)


def test_a_missing_statistics_file_stops_the_protocol_before_any_run(tmp_path):
    raw = {**SMALL, "grid": {"tta.method": [{"name": "tpt", "params": VIEWS},
                                            {"name": "tapt", "params": {**VIEWS, "stats": str(tmp_path / "no.safetensors")}}]}}
    cfg = from_dict(ExperimentConfig, raw)
    validate_experiment(cfg)          # loading and printing a protocol does not need the file yet
    with pytest.raises(ConfigError, match="does not exist"):
        run_experiment(cfg, tmp_path / "exp", progress=False)
    assert not (tmp_path / "exp" / "method=tpt").exists()
