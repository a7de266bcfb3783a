"""`robustprompt explain` and `robustprompt report` on the demo backbone."""
import csv
import io

import matplotlib.image as mpimg
import pytest
import torch

from robustprompt.cli import main
from robustprompt.config import AttackSpec, DataSpec, ModelSpec
from robustprompt.engine.evaluate import EvalConfig, evaluate
from robustprompt.engine.train import train, train_config_from_dict
from robustprompt.explain import explain_pair, spearman
from robustprompt.models import PromptedClassifier
from robustprompt.report.tables import parse_markdown_table


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cba"
    cfg = train_config_from_dict({"model": {"name": "demo", "prompt": {"depth": 2}}, "method": {"name": "cba_fapt"},
                                  "data": {"shots": 2, "batch_size": 10, "augment": "flip"}, "optim": {"epochs": 1},
                                  "train_attack": {"eps": 4, "alpha": 2}, "device": "cpu"})
    train(cfg, out, progress=False)
    return out


def test_spearman_by_hand():
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_explain_single_image_figure(tmp_path, trained, capsys):
    rc = main(["explain", "--image", "example", "--run", str(trained), "--eps", "8", "--steps", "3",
               "--out", str(tmp_path / "fig.png")])
    assert rc == 0
    png, pdf = tmp_path / "fig.png", tmp_path / "fig.pdf"
    assert png.exists() and pdf.exists() and pdf.read_bytes().startswith(b"%PDF")
    img = mpimg.imread(png)
    assert img.shape[1] > 2.0 * img.shape[0]           # 7 panels side by side, 2 model rows
    out = capsys.readouterr().out
    assert "zero-shot CLIP" in out and "CBA-FAPT prompts" in out


def test_grid_of_dataset_images_has_one_row_per_image_and_model(tmp_path):
    assert main(["explain", "--n", "3", "--eps", "8", "--steps", "2", "--out", str(tmp_path / "one.png")]) == 0
    assert main(["explain", "--image", "example", "--eps", "8", "--steps", "2", "--out", str(tmp_path / "two.png")]) == 0
    grid, single = mpimg.imread(tmp_path / "one.png"), mpimg.imread(tmp_path / "two.png")
    assert grid.shape[0] > 2.2 * single.shape[0]        # 3 rows against 1


def test_maps_differ_between_clean_and_adversarial(tmp_path):
    from robustprompt.api import get_backbone
    from robustprompt.data import build_dataset, clip_transform

    ds = build_dataset("fashion_mnist")
    clf = PromptedClassifier(get_backbone("demo"), ds.classnames, templates=[ds.templates[0]])
    img = clip_transform(28)(ds.split("test").load(0))
    pair = explain_pair(clf, img, ds.split("test").labels[0], AttackSpec(eps=16, steps=5).threat(), "zs",
                        target="label")
    assert pair.clean.cba.shape == pair.adv.cba.shape == (4, 4)
    assert not torch.allclose(pair.clean.cba, pair.adv.cba) and pair.shift["cba_l2"] > 0
    assert not torch.allclose(pair.clean.rollout, pair.adv.rollout)
    assert pair.clean.tokens[0] == "<start>" and pair.clean.tokens[-1] == "<end>"
    assert len(pair.clean.tokens) == len(pair.clean.text)
    # the map explains the requested class on both images
    assert pair.clean.target == pair.adv.target == ds.split("test").labels[0]


def test_report_tables_parse_back_to_metrics(tmp_path, capsys):
    runs = []
    for seed in (0, 1):
        for name, att in (("zs", AttackSpec(eps=4, steps=2)),):
            m = evaluate(EvalConfig(model=ModelSpec(name="demo"), data=DataSpec(subset=16, subset_seed=seed, batch_size=16),
                                    attack=att, seed=seed, device="cpu"), tmp_path / f"{name}-{seed}", progress=False)
            runs.append(m)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep"), "--plot"]) == 0
    md = capsys.readouterr().out
    rows = parse_markdown_table(md)
    robust = [r for r in rows if r["block"] == "robust" and r["column"] == "fashion_mnist"][0]
    mean = sum(m["robust_acc"] for m in runs) / 2
    assert robust["mean"] == pytest.approx(mean, abs=0.01)
    assert (tmp_path / "rep" / "results.md").exists() and (tmp_path / "rep" / "tradeoff.png").exists()
    assert main(["report", str(tmp_path), "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    clean = [r for r in table if r["block"] == "natural" and r["column"] == "fashion_mnist"][0]
    assert float(clean["mean"]) == pytest.approx(sum(m["clean_acc"] for m in runs) / 2, abs=1e-4)
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
