"""report: collecting run directories, paper tables (md/csv/latex) and figures.

Synthetic run directories are written by hand, laid out as `robustprompt run` lays them out;
every expected number is recomputed here straight from the metrics.json files, not through
the code under test.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import random
import statistics
from pathlib import Path

import pytest

from robustprompt.errors import ConfigError
from robustprompt.report.collect import collect_runs, threat_key, threat_label
from robustprompt.report.plots import few_shot_curves, output_paths, tradeoff_scatter
from robustprompt.report.tables import parse_markdown_table, results_table

DATASETS = ["caltech101", "dtd", "eurosat"]
SEEDS = [1, 2, 3]
SHOTS = [1, 2, 4, 16]
PGD = {"attack": "pgd", "norm": "linf", "eps": 1 / 255, "alpha": 1 / 255, "steps": 100, "restarts": 1,
       "loss": "ce", "random_start": True, "eps_255": 1.0, "alpha_255": 1.0, "precision": "float32"}
AA = {"attack": "autoattack", "norm": "linf", "eps": 4 / 255, "aa_version": "standard", "eps_255": 4.0,
      "autoattack": {"package": "pyautoattack", "version": "standard", "norm": "linf"}, "precision": "float32"}
PGD_LABEL = "PGD-100 ℓ∞ ε=1/255 α=1/255"
AA_LABEL = "AutoAttack ℓ∞ ε=4/255"


def metrics(**kw):
    """An eval metrics.json shaped like the one `robustprompt eval` writes."""
    m = {"kind": "eval", "dataset": "caltech101", "split": "test", "classes": "all", "n_classes": 10,
         "backbone": {"name": "ViT-B-32", "weights": "openai", "image_size": 224},
         "method": "zeroshot", "shots": None, "seed": 0, "threat": copy.deepcopy(PGD), "adaptive": False,
         "clean_acc": 50.0, "robust_acc": 10.0, "n": 100, "wall_time_s": 1.0}
    m.update(kw)
    return m


def write(root: Path, rel: str, m) -> Path:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(m if isinstance(m, str) else json.dumps(m))
    return d


def acc(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 3)  # 3 decimals so rounding to 2 matters


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    return make_runs(tmp_path / "runs")


def make_runs(root: Path) -> Path:
    """Zero-shot (one seed), CoOp and CBA-FAPT (3 seeds × 4 shot counts × 3 datasets), APT
    (16-shot, no dtd), CBA-FAPT base/new, an AutoAttack group, a training run, and two broken files."""
    rng = random.Random(0)
    for ds in DATASETS:
        write(root, f"zeroshot/{ds}", metrics(dataset=ds, clean_acc=acc(rng, 60, 80), robust_acc=acc(rng, 0, 5)))
        for method, lo in (("coop", 60), ("cba_fapt", 55)):
            for shots in SHOTS:
                for s in SEEDS:
                    seed_dir = f"exp-{method}/shots={shots}/seed-{s}"
                    write(root, f"{seed_dir}/eval-{ds}",
                          metrics(dataset=ds, method=method, shots=shots, seed=0, train_seed=s,
                                  clean_acc=acc(rng, lo + shots, lo + 10 + shots),
                                  robust_acc=acc(rng, 20 + shots, 30 + shots)))
                    write(root, f"{seed_dir}/train", {"kind": "train", "method": method, "dataset": ds})
        if ds != "dtd":
            for s in SEEDS:
                write(root, f"apt/{ds}/seed-{s}", metrics(dataset=ds, method="apt", shots=16, seed=s,
                                                          clean_acc=acc(rng, 50, 60), robust_acc=acc(rng, 30, 40)))
    for classes in ("base", "new"):
        for s in SEEDS:
            write(root, f"b2n/seed-{s}/eval-caltech101_{classes}",
                  metrics(method="cba_fapt", classes=classes, shots=16, train_seed=s,
                          clean_acc=acc(rng, 40, 90), robust_acc=acc(rng, 10, 40)))
    for ds in DATASETS[:2]:
        for method, seeds in (("zeroshot", [0]), ("cba_fapt", SEEDS)):
            for s in seeds:
                write(root, f"aa/{method}/{ds}/seed-{s}",
                      metrics(dataset=ds, method=method, shots=None if method == "zeroshot" else 16, seed=s,
                              threat=copy.deepcopy(AA), n=500,
                              clean_acc=acc(rng, 50, 80), robust_acc=acc(rng, 0, 20)))
    write(root, "broken/not-json", "{this is not json")
    bad = metrics()
    del bad["robust_acc"]
    write(root, "broken/no-robust", bad)
    return root


def expected(root: Path, keep) -> dict[tuple[str, str, str, str], tuple[float, float | None, int]]:
    """(threat label, block, method title, column) → (mean, sample std or None, n) recomputed from the files."""
    titles = {"zeroshot": "Zero-shot CLIP", "coop": "CoOp", "cba_fapt": "CBA-FAPT", "apt": "APT"}
    labels = {"pgd": PGD_LABEL, "autoattack": AA_LABEL}
    vals: dict[tuple[str, str, str, str], list[float]] = {}
    for f in root.rglob("metrics.json"):
        try:
            m = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if m.get("kind") != "eval" or "robust_acc" not in m or not keep(m):
            continue
        col = m["dataset"] if m["classes"] == "all" else f"{m['dataset']}/{m['classes']}"
        for block, k in (("natural", "clean_acc"), ("robust", "robust_acc")):
            vals.setdefault((labels[m["threat"]["attack"]], block, titles[m["method"]], col), []).append(m[k])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None, len(v)) for k, v in vals.items()}


def shots16(m) -> bool:
    return m["shots"] in (None, 16)


def table_runs(root: Path):
    return [r for r in collect_runs([root]) if r.shots in (None, 16)]


# ---------------------------------------------------------------- collect

def test_collect_reads_results_and_skips_the_rest(runs_root, caplog):
    with caplog.at_level(logging.WARNING, logger="robustprompt"):
        runs = collect_runs([runs_root])
    n_expected = 3 + 2 * 4 * 3 * 3 + 2 * 3 + 2 * 3 + (2 + 2 * 3)
    assert len(runs) == n_expected
    assert {r.kind for r in runs} == {"eval"}
    broken = [rec.getMessage() for rec in caplog.records]
    assert any("not-json" in msg for msg in broken) and any("no-robust" in msg for msg in broken)
    coop = [r for r in runs if r.method_key == "coop"]
    assert {r.method for r in coop} == {"CoOp"} and {r.seed for r in coop} == set(SEEDS)  # train_seed wins
    assert {r.method for r in runs} == {"Zero-shot CLIP", "CoOp", "CBA-FAPT", "APT"}
    assert {r.threat_label for r in runs} == {PGD_LABEL, AA_LABEL}
    assert len({r.threat_key for r in runs}) == 2
    assert {r.backbone for r in runs} == {"ViT-B-32 (openai)"}
    assert {r.column for r in runs if r.classes != "all"} == {"caltech101/base", "caltech101/new"}
    # a run directory itself, and overlapping paths, count each run once
    one = runs_root / "zeroshot" / "dtd"
    assert len(collect_runs([one, runs_root / "zeroshot"])) == 3


def test_collect_raises_when_nothing_found(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="empty"):
        collect_runs([empty])
    write(tmp_path, "only-bad", "[1, 2")
    write(tmp_path, "only-train", {"kind": "train", "method": "coop"})
    with pytest.raises(ConfigError, match="only-bad"):
        collect_runs([tmp_path / "only-bad", tmp_path / "only-train"])


def test_duplicate_seed_warns(tmp_path, caplog):
    write(tmp_path, "a/seed-1", metrics(method="coop", seed=1, clean_acc=60.0))
    write(tmp_path, "copy-of-a/seed-1", metrics(method="coop", seed=1, clean_acc=62.0))
    with caplog.at_level(logging.WARNING, logger="robustprompt"):
        rows = list(csv.DictReader(io.StringIO(results_table(collect_runs([tmp_path]), "csv"))))
    assert any("several runs for seed" in rec.getMessage() for rec in caplog.records)
    assert rows[0]["n_seeds"] == "2" and float(rows[0]["mean"]) == 61.0


def test_threat_identity_and_labels():
    pgd = threat_key(PGD)
    assert threat_label(pgd) == PGD_LABEL
    assert threat_label(threat_key(AA)) == AA_LABEL
    # an omitted default matches a recorded one; float noise in eps does not split groups
    assert threat_key({k: v for k, v in PGD.items() if k not in ("precision", "random_start")}) == pgd
    assert threat_key({**PGD, "eps_255": 0.9999999999}) == pgd
    adaptive = threat_key(PGD, adaptive=True)
    assert adaptive != pgd and threat_label(adaptive) == PGD_LABEL + " (adaptive)"
    assert threat_key(PGD, quantize_adv=True) != pgd
    assert threat_key({**PGD, "steps": 10}) != pgd


def test_tta_method_label(tmp_path):
    write(tmp_path, "t1", metrics(kind="tta", method="zeroshot", tta_method="atpt", adaptive=True))
    write(tmp_path, "t2", metrics(kind="tta", method="zeroshot", tta_method="my_tta"))
    runs = {r.method_key: r for r in collect_runs([tmp_path])}
    assert runs["atpt"].method == "A-TPT" and runs["atpt"].threat_label.endswith("(adaptive)")
    assert runs["my_tta"].method == "my_tta"
    assert runs["atpt"].threat_key != runs["my_tta"].threat_key


# ---------------------------------------------------------------- tables

def test_markdown_parses_back_to_the_metrics(runs_root):
    md = results_table(table_runs(runs_root), "md")
    got = {(r["threat"], r["block"], r["method"], r["column"]): r for r in parse_markdown_table(md)}
    want = expected(runs_root, shots16)
    cells = {k: v for k, v in got.items() if k[3] != "Average"}
    assert set(cells) == set(want)
    for k, (mean, std, n) in want.items():
        assert cells[k]["mean"] == pytest.approx(round(mean, 2), abs=1e-9), k
        if std is None:
            assert cells[k]["std"] is None, k  # a single seed shows the mean only
        else:
            assert cells[k]["std"] == pytest.approx(round(std, 2), abs=1e-9), k
    # Average = mean of the per-dataset means over the row's columns
    for (threat, block, method, col), rec in got.items():
        if col != "Average":
            continue
        means = [v[0] for k, v in want.items() if k[:3] == (threat, block, method)]
        assert rec["mean"] == pytest.approx(round(statistics.mean(means), 2), abs=1e-9)
    assert "Mean ± sample std (ddof=1) over 1–3 seeds per cell" in md


def test_best_bold_second_underlined(runs_root):
    md = results_table(table_runs(runs_root), "md")
    recs = parse_markdown_table(md)
    checked = 0
    for threat in (PGD_LABEL, AA_LABEL):
        for block in ("natural", "robust"):
            for col in {r["column"] for r in recs if r["threat"] == threat}:
                cell = [r for r in recs if (r["threat"], r["block"], r["column"]) == (threat, block, col)
                        and not r["partial"]]
                values = sorted({r["mean"] for r in cell}, reverse=True)
                for r in cell:
                    if len(cell) < 2:
                        assert not r["bold"] and not r["underline"]
                        continue
                    assert r["bold"] == (r["mean"] == values[0]), (threat, block, col, r)
                    second = len(cell) >= 3 and len(values) > 1 and r["mean"] == values[1]
                    assert r["underline"] == second, (threat, block, col, r)
                    checked += 1
    assert checked > 30
    # the best natural-accuracy cell of a column really is the column's maximum from the files
    want = expected(runs_root, shots16)
    dtd = {k[2]: v[0] for k, v in want.items() if k[:2] == (PGD_LABEL, "natural") and k[3] == "dtd"}
    top = max(dtd, key=dtd.get)
    row = next(line for line in md.splitlines() if line.startswith(f"| {top} "))
    assert f"**{dtd[top]:.2f}" in row


def test_ties_are_all_marked(tmp_path):
    for method, clean in (("coop", 70.0), ("vpt", 70.0), ("maple", 60.0), ("ivlp", 50.0)):
        write(tmp_path, method, metrics(method=method, clean_acc=clean, robust_acc=clean / 2))
    recs = {r["method"]: r for r in parse_markdown_table(results_table(collect_runs([tmp_path])))
            if r["block"] == "natural"}
    assert recs["CoOp"]["bold"] and recs["VPT"]["bold"]
    assert recs["MaPLe"]["underline"] and not recs["MaPLe"]["bold"]
    assert not recs["IVLP"]["bold"] and not recs["IVLP"]["underline"]


def test_threat_models_get_separate_tables(runs_root):
    md = results_table(table_runs(runs_root), "md")
    headings = [line[4:] for line in md.splitlines() if line.startswith("### ")]
    assert headings == [PGD_LABEL, AA_LABEL]  # PGD before AutoAttack, whatever the paths
    recs = parse_markdown_table(md)
    aa_cols = {r["column"] for r in recs if r["threat"] == AA_LABEL}
    assert aa_cols == {"caltech101", "dtd", "Average"}  # no eurosat: AA runs never mix with PGD
    assert {r["method"] for r in recs if r["threat"] == AA_LABEL} == {"Zero-shot CLIP", "CBA-FAPT"}
    # each caption states its threat model and its n
    captions = [line for line in md.splitlines() if line.startswith("Accuracy (%) under")]
    assert len(captions) == 2
    assert any(PGD_LABEL in c and "n = 100 images" in c for c in captions)
    assert any(AA_LABEL in c and "n = 500 images" in c for c in captions)
    assert all("ViT-B-32 (openai)" in c for c in captions)


def test_row_order_and_columns(runs_root):
    md = results_table(table_runs(runs_root), "md")
    first_table = md.split("**Robust accuracy (%)**")[0]
    rows = [line.split("|")[1].strip() for line in first_table.splitlines() if line.startswith("| ")]
    assert rows[0] == "Method" and rows[1] == "Zero-shot CLIP"
    assert rows.index("CoOp") < rows.index("APT") < rows.index("CBA-FAPT")
    header = [c.strip() for c in first_table.splitlines()[4].strip("|").split("|")]
    assert header == ["Method", "caltech101", "caltech101/base", "caltech101/new", "dtd", "eurosat", "Average"]


def test_partial_average_gets_dagger_and_footnote(runs_root):
    runs = [r for r in table_runs(runs_root) if r.classes == "all"]
    md = results_table(runs, "md")
    recs = parse_markdown_table(md)
    apt = [r for r in recs if r["method"] == "APT" and r["column"] == "Average"]
    assert len(apt) == 2 and all(r["partial"] and not r["bold"] and not r["underline"] for r in apt)
    want = expected(runs_root, lambda m: shots16(m) and m["classes"] == "all")
    for r in apt:  # averaged over what APT has: caltech101 and eurosat
        means = [v[0] for k, v in want.items() if k[1:3] == (r["block"], "APT")]
        assert len(means) == 2 and r["mean"] == pytest.approx(round(statistics.mean(means), 2), abs=1e-9)
    others = [r for r in recs if r["method"] != "APT" and r["column"] == "Average"]
    assert others and not any(r["partial"] for r in others)
    note = [line for line in md.splitlines() if line.startswith("†")]
    assert len(note) == 1 and note[0].startswith("† APT") and "2 of 3" in note[0] and "(no dtd)" in note[0]


def test_csv_round_trip(runs_root):
    runs = table_runs(runs_root)
    rows = list(csv.DictReader(io.StringIO(results_table(runs, "csv"))))
    assert list(rows[0]) == ["threat", "block", "method", "column", "mean", "std", "n_seeds", "partial"]
    want = expected(runs_root, shots16)
    got = {(r["threat"], r["block"], r["method"], r["column"]): r for r in rows if r["column"] != "Average"}
    assert set(got) == set(want)
    for k, (mean, std, n) in want.items():
        assert float(got[k]["mean"]) == pytest.approx(mean, abs=1e-6)
        assert (got[k]["std"] == "") if std is None else float(got[k]["std"]) == pytest.approx(std, abs=1e-6)
        assert int(got[k]["n_seeds"]) == n
    assert all("*" not in r["mean"] and "<u>" not in r["mean"] for r in rows)
    apt = [r for r in rows if r["method"] == "APT" and r["column"] == "Average"]
    assert apt and all(r["partial"] == "1" for r in apt)
    # the markdown says the same, rounded
    md = {(r["threat"], r["block"], r["method"], r["column"]): r["mean"]
          for r in parse_markdown_table(results_table(runs, "md"))}
    for r in rows:
        assert md[(r["threat"], r["block"], r["method"], r["column"])] == pytest.approx(round(float(r["mean"]), 2))


def test_latex_structure(runs_root):
    runs = table_runs(runs_root)
    tex = results_table(runs, "latex")
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 2  # one per threat model
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 2
    assert tex.count(r"\multicolumn") == 4 and r"\textit{Natural accuracy (\%)}" in tex
    assert r"caltech101/base" in tex and r"\$" not in tex
    assert r"$\ell_\infty$" in tex and "ℓ" not in tex and "±" not in tex
    # \textbf on the column maximum of eurosat's robust accuracy under PGD
    want = expected(runs_root, shots16)
    col = {k[2]: v[0] for k, v in want.items() if k[:2] == (PGD_LABEL, "robust") and k[3] == "eurosat"}
    top = max(col, key=col.get)
    pgd_tex = tex.split(r"\end{table}")[0]
    assert "PGD-100" in pgd_tex
    robust_part = pgd_tex.split(r"\textit{Robust accuracy")[1]
    line = next(ln for ln in robust_part.splitlines() if ln.startswith(top + " &"))
    assert rf"\textbf{{{col[top]:.2f}" in line
    for ln in tex.splitlines():
        if " & " in ln:
            assert ln.endswith(r"\\") and ln.count("&") == len(ln.split("&")) - 1


def test_unknown_format_and_empty():
    with pytest.raises(ConfigError):
        results_table([], "md")


def test_unknown_format(runs_root):
    with pytest.raises(ConfigError, match="format"):
        results_table(collect_runs([runs_root / "zeroshot"]), "html")


def test_single_seed_table(runs_root):
    md = results_table(collect_runs([runs_root / "zeroshot"]), "md")
    assert "±" not in md.split("Accuracy (%) under")[0]
    assert "Single seed (seed 0)" in md
    assert "Best per column" in md


def test_shots_label_rows_when_they_vary(runs_root):
    runs = [r for r in collect_runs([runs_root]) if r.method_key == "coop"]
    methods = {r["method"] for r in parse_markdown_table(results_table(runs))}
    assert methods == {f"CoOp ({s}-shot)" for s in SHOTS}


# ---------------------------------------------------------------- plots

def png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.shape[1], img.shape[0]


def test_few_shot_curves(runs_root, tmp_path):
    runs = [r for r in collect_runs([runs_root]) if r.threat_label == PGD_LABEL]
    paths = few_shot_curves(runs, tmp_path / "fig" / "fewshot.png")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.exists() for p in paths)
    assert paths[1].read_bytes().startswith(b"%PDF")
    w3, h3 = png_size(paths[0])
    one = few_shot_curves([r for r in runs if r.dataset == "dtd"], tmp_path / "one.pdf")
    assert {p.suffix for p in one} == {".png", ".pdf"}
    w1, h1 = png_size(one[0])
    # 5 dataset columns (caltech101, its base and new halves, dtd, eurosat) vs 1: wider, same height
    assert h1 == h3 and w3 > 2.5 * w1
    assert h3 > 0.5 * w1  # two panel rows: natural above robust


def test_few_shot_needs_shots(runs_root, tmp_path):
    with pytest.raises(ConfigError, match="shot"):
        few_shot_curves(collect_runs([runs_root / "zeroshot"]), tmp_path / "x.png")


def test_few_shot_wraps_many_datasets(tmp_path):
    for i in range(8):
        for shots in (1, 4):
            write(tmp_path / "runs", f"d{i}/{shots}", metrics(dataset=f"set{i}", method="coop", shots=shots))
    runs = collect_runs([tmp_path / "runs"])
    w8, h8 = png_size(few_shot_curves(runs, tmp_path / "wrap.png")[0])
    w6, h6 = png_size(few_shot_curves([r for r in runs if r.dataset < "set6"], tmp_path / "six.png")[0])
    # 6 panel columns at most: 8 datasets keep the width of 6 and stack a second natural/robust row pair
    assert w8 == w6 and h8 > 1.6 * h6


def test_tradeoff_scatter_one_file_pair_per_threat(runs_root, tmp_path):
    runs = table_runs(runs_root)
    paths = tradeoff_scatter(runs, tmp_path / "tradeoff.pdf")
    assert len(paths) == 4 and all(p.exists() for p in paths)
    names = sorted(p.name for p in paths)
    assert names == sorted(["tradeoff_pgd100_linf_eps1_alpha1.png", "tradeoff_pgd100_linf_eps1_alpha1.pdf",
                            "tradeoff_autoattack_linf_eps4.png", "tradeoff_autoattack_linf_eps4.pdf"])
    w, h = png_size(next(p for p in paths if p.suffix == ".png"))
    assert (w, h) == (9 * 150, 6 * 150)
    single = tradeoff_scatter([r for r in runs if r.threat_label == AA_LABEL], tmp_path / "aa")
    assert [p.name for p in single] == ["aa.png", "aa.pdf"]


def test_output_paths():
    assert output_paths("a/fig.pdf") == [Path("a/fig.png"), Path("a/fig.pdf")]
    assert output_paths("fig", "pgd10") == [Path("fig_pgd10.png"), Path("fig_pgd10.pdf")]
    with pytest.raises(ConfigError):
        output_paths("fig.svg")
