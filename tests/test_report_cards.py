"""report with several attacks per run (issue 9): the worst-case column by default, separate tables
for different attack sets, old runs still read, and the robustness cards.

Fake run directories are written by hand in the metrics.json format of issue 9 (``attacks`` and
``worst_case``), their accuracies drawn from simulated per-image outcomes so that each worst case
really is the per-image worst case. Every expected number is recomputed here from the files.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import statistics
from pathlib import Path

import pytest

from robustprompt.cli import main
from robustprompt.errors import ConfigError
from robustprompt.report.cards import parse_cards_markdown, robustness_cards
from robustprompt.report.collect import collect_runs, select_attack
from robustprompt.report.tables import parse_markdown_table, results_table

N = 40
SEEDS = [1, 2, 3]
PGD10 = {"attack": "pgd", "norm": "linf", "eps": 4 / 255, "eps_255": 4.0, "alpha": 1 / 255, "alpha_255": 1.0,
         "steps": 10, "restarts": 1, "loss": "ce", "random_start": True, "precision": "float32"}
PGD10_LABEL = "PGD-10 ℓ∞ ε=4/255 α=1/255"
AA = {"attack": "autoattack", "norm": "linf", "eps": 4 / 255, "eps_255": 4.0, "aa_version": "standard"}
SPEC = {"steps": 100, "eot": 16, "loss": "ce", "restarts": 1, "schedule": "apgd", "through_update": True}
TITLES = {"nonadaptive": "non-adaptive (CLIP, initial prompt)",
          "adaptive_secret": "adaptive, randomness secret (EOT-16 APGD-100)",
          "adaptive_known": "adaptive, randomness known (APGD-100)",
          "pgd": "PGD-10 linf eps=4/255", "autoattack": "AutoAttack standard linf eps=4/255"}
TTA_ALL = ("nonadaptive", "adaptive_secret", "adaptive_known")
TTA_TWO = ("nonadaptive", "adaptive_secret")


def entry(key: str, acc: float, spec: dict | None = None) -> dict:
    """One `attacks` entry as the engine writes it."""
    e = {"key": key, "title": TITLES[key], "acc": acc,
         "randomness": key[len("adaptive_"):] if key.startswith("adaptive_") else None}
    if key.startswith("adaptive_"):
        e["attack"] = dict(spec or SPEC)
    else:
        e["threat"] = dict(AA if key == "autoattack" else PGD10)
    return e


def simulated(rng: random.Random, keys: tuple[str, ...], clean_p: float, robust_p: dict[str, float],
              spec: dict | None = None) -> dict:
    """Accuracies from per-image outcomes: each attack fools each image with its own probability;
    the worst case is right only where every attack is."""
    right = {k: [rng.random() < robust_p[k] for _ in range(N)] for k in keys}
    worst = [all(right[k][i] for k in keys) for i in range(N)]
    pct = lambda xs: 100.0 * sum(xs) / N  # noqa: E731
    return {"clean_acc": pct(rng.random() < clean_p for _ in range(N)), "robust_acc": pct(worst),
            "attacks": [entry(k, pct(right[k]), spec) for k in keys],
            "worst_case": {"acc": pct(worst), "over": list(keys)}}


def tta_metrics(method: str, seed: int, dataset: str = "fashion_mnist", **kw) -> dict:
    m = {"kind": "tta", "tta_method": method, "method": "zeroshot", "dataset": dataset, "split": "test",
         "classes": "all", "n_classes": 10, "backbone": {"name": "demo", "weights": "demo"}, "seed": seed,
         "threat": {**PGD10, "adaptive": ["secret", "known"]}, "adaptive": ["secret", "known"],
         "quantize_adv": False, "base_clean_acc": 90.0, "base_robust_acc": 30.0, "n": N, "wall_time_s": 1.0}
    m.update(kw)
    return m


def eval_metrics(method: str, seed: int, **kw) -> dict:
    m = {"kind": "eval", "method": method, "dataset": "fashion_mnist", "split": "test", "classes": "all",
         "n_classes": 10, "backbone": {"name": "demo", "weights": "demo"}, "shots": 16, "seed": seed,
         "threat": dict(PGD10), "adaptive": False, "n": N, "wall_time_s": 1.0}
    m.update(kw)
    return m


def write(root: Path, rel: str, m: dict) -> None:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """R-TPT and A-TPT × 3 seeds × 2 datasets with all three attacks; R-TPT with two attacks; an
    old adaptive and an old non-adaptive R-TPT run; CoOp with PGD + AutoAttack (new format), and
    an old single-attack PGD CoOp run."""
    rng = random.Random(9)
    root = tmp_path / "runs"
    p = {"nonadaptive": 0.7, "adaptive_secret": 0.6, "adaptive_known": 0.45, "pgd": 0.4, "autoattack": 0.35}
    for method in ("rtpt", "atpt"):
        for ds in ("fashion_mnist", "dtd"):
            for s in SEEDS:
                write(root, f"tta-{method}-{ds}/seed-{s}", tta_metrics(method, s, ds, **simulated(rng, TTA_ALL, 0.8, p)))
    for s in SEEDS[:2]:
        write(root, f"tta-rtpt-two/seed-{s}", tta_metrics("rtpt", s, **simulated(rng, TTA_TWO, 0.8, p),
                                                           adaptive=["secret"]))
    write(root, "old/rtpt-adaptive", tta_metrics("rtpt", 1, adaptive=True, threat={**PGD10, "adaptive": True},
                                                 clean_acc=77.5, robust_acc=52.5))
    write(root, "old/rtpt-nonadaptive", tta_metrics("rtpt", 1, adaptive=False, threat={**PGD10, "adaptive": False},
                                                    clean_acc=77.5, robust_acc=67.5))
    for s in SEEDS[:2]:
        write(root, f"eval-coop/seed-{s}", eval_metrics("coop", s, **simulated(rng, ("pgd", "autoattack"), 0.85, p)))
    write(root, "eval-coop-old/seed-1", eval_metrics("coop", 1, clean_acc=85.0, robust_acc=40.0))
    return root


TTA_TITLES = {"rtpt": "R-TPT", "atpt": "A-TPT"}


def files(root: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(root.rglob("metrics.json"))]


def attack_set(m: dict) -> tuple[str, ...]:
    return tuple(a["key"] for a in m.get("attacks", []))


def worst_label(keys: tuple[str, ...]) -> str:
    return "ℓ∞ ε=4/255, worst case over: " + "; ".join(TITLES[k] for k in keys)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def check(got: dict, values: list[float], where) -> None:
    mean, std = mean_std(values)
    assert got["mean"] == pytest.approx(round(mean, 2), abs=1e-9), where
    if std is None:
        assert got["std"] is None, where
    else:
        assert got["std"] == pytest.approx(round(std, 2), abs=1e-9), where


# ---------------------------------------------------------------- tables

def test_worst_case_is_the_default_column_and_attack_sets_split_tables(root):
    recs = parse_markdown_table(results_table(collect_runs([root]), "md"))
    by = {(r["threat"], r["block"], r["method"], r["column"]): r for r in recs if r["column"] != "Average"}
    want: dict[tuple, list[float]] = {}
    for m in files(root):
        keys = attack_set(m)
        if m["kind"] != "tta" or len(keys) < 2:
            continue
        k = (worst_label(keys), TTA_TITLES[m["tta_method"]], m["dataset"])
        want.setdefault(k, []).append(m["worst_case"]["acc"])  # the worst case, not any one attack
    assert len(want) == 5  # 2 methods × 2 datasets with three attacks, R-TPT with two
    for (label, method, col), values in want.items():
        check(by[(label, "robust", method, col)], values, (label, method, col))
    # the worst case is below every single attack's mean in these files, so no attack's column was shown
    for (label, method, col), values in want.items():
        per_attack = [statistics.mean(a["acc"] for m in files(root) for a in m.get("attacks", [])
                                      if a["key"] == key and m.get("tta_method") == {"R-TPT": "rtpt", "A-TPT": "atpt"}[method]
                                      and m["dataset"] == col and worst_label(attack_set(m)) == label)
                      for key in TTA_ALL if TITLES[key] in label]
        assert statistics.mean(values) <= min(per_attack)
    headings = {r["threat"] for r in recs}
    assert worst_label(TTA_ALL) in headings and worst_label(TTA_TWO) in headings
    two = {r["method"] for r in recs if r["threat"] == worst_label(TTA_TWO)}
    assert two == {"R-TPT"}  # the two-attack runs never share a table with the three-attack ones
    assert {r["column"] for r in recs if r["threat"] == worst_label(TTA_TWO)} == {"fashion_mnist"}


def test_old_runs_read_as_before(root):
    runs = collect_runs([root])
    old_adaptive = [r for r in runs if r.path.name == "rtpt-adaptive"]
    assert len(old_adaptive) == 1 and old_adaptive[0].threat_label == PGD10_LABEL + " (adaptive)"
    assert old_adaptive[0].robust_acc == 52.5 and old_adaptive[0].attacks == ()
    recs = parse_markdown_table(results_table(runs, "md"))
    got = {(r["threat"], r["block"], r["method"]): r["mean"] for r in recs if r["column"] == "fashion_mnist"}
    assert got[(PGD10_LABEL + " (adaptive)", "robust", "R-TPT")] == 52.5
    assert got[(PGD10_LABEL, "robust", "R-TPT")] == 67.5
    # an old single-attack eval run is its own table; the two-attack CoOp runs are a worst case
    coop_wc = [m["worst_case"]["acc"] for m in files(root) if attack_set(m) == ("pgd", "autoattack")]
    wc_label = "ℓ∞ ε=4/255, worst case over: " + "; ".join(TITLES[k] for k in ("pgd", "autoattack"))
    check({"mean": got[(wc_label, "robust", "CoOp")], "std": None}, [statistics.mean(coop_wc)], "coop")
    assert got[(PGD10_LABEL, "robust", "CoOp")] == 40.0


def test_select_attack_lines_up_with_single_attack_runs(root):
    runs = select_attack(collect_runs([root]), "nonadaptive")
    recs = parse_markdown_table(results_table(runs, "md"))
    rtpt = [r for r in recs if (r["threat"], r["block"], r["method"], r["column"])
            == (PGD10_LABEL, "robust", "R-TPT", "fashion_mnist")]
    # one cell: the old non-adaptive run and every new run's non-adaptive accuracy, over seeds
    values = [m["robust_acc"] for m in files(root) if m.get("tta_method") == "rtpt" and m["dataset"] == "fashion_mnist"
              and m.get("adaptive") is False]
    values += [a["acc"] for m in files(root) if m.get("tta_method") == "rtpt" and m["dataset"] == "fashion_mnist"
               for a in m.get("attacks", []) if a["key"] == "nonadaptive"]
    assert len(rtpt) == 1 and len(values) == 1 + 3 + 2
    check(rtpt[0], values, "rtpt nonadaptive")
    known = select_attack(collect_runs([root]), "adaptive_known")
    assert not any(r.path.parent.name == "tta-rtpt-two" for r in known)  # that set did not run it
    assert {r.threat_label for r in known if r.attacks} == {"ℓ∞ ε=4/255, " + TITLES["adaptive_known"]}
    with pytest.raises(ConfigError, match="no run has an attack"):
        select_attack(collect_runs([root / "tta-rtpt-two"]), "adaptive_known")


def test_attack_settings_and_seeds_in_the_identity(tmp_path):
    rng = random.Random(1)
    p = {k: 0.5 for k in TTA_ALL}
    write(tmp_path, "eot16", tta_metrics("rtpt", 1, **simulated(rng, TTA_ALL, 0.8, p)))
    write(tmp_path, "eot32", tta_metrics("rtpt", 1, **simulated(rng, TTA_ALL, 0.8, p, spec={**SPEC, "eot": 32})))
    write(tmp_path, "eot16-other-seeds", tta_metrics("rtpt", 2, **simulated(rng, TTA_ALL, 0.8, p,
                                                                             spec={**SPEC, "attack_seed": 7})))
    runs = {r.path.name: r for r in collect_runs([tmp_path])}
    assert runs["eot16"].threat_key != runs["eot32"].threat_key  # a different attack: a different column
    assert runs["eot16"].threat_key == runs["eot16-other-seeds"].threat_key  # the attacker's seeds are not
    # a known-randomness attack does not use EOT: its count does not split the known attack's identity
    known = {r.path.name: dict(r.attacks[2].identity[2]) for r in runs.values()}
    assert "eot" not in known["eot16"] and runs["eot16"].attacks[2].identity == runs["eot32"].attacks[2].identity


def test_malformed_attacks_are_skipped_or_flagged(tmp_path, caplog):
    rng = random.Random(2)
    good = tta_metrics("rtpt", 1, **simulated(rng, TTA_ALL, 0.8, {k: 0.5 for k in TTA_ALL}))
    dup = json.loads(json.dumps(good))
    dup["attacks"].append(dup["attacks"][0])
    above = json.loads(json.dumps(good))
    above["robust_acc"] = above["worst_case"]["acc"] = max(a["acc"] for a in above["attacks"]) + 5
    write(tmp_path, "good", good)
    write(tmp_path, "dup", dup)
    write(tmp_path, "above", above)
    with caplog.at_level(logging.WARNING, logger="robustprompt"):
        runs = collect_runs([tmp_path])
    assert sorted(r.path.name for r in runs) == ["above", "good"]
    msgs = [rec.getMessage() for rec in caplog.records]
    assert any("dup" in m and "repeats" in m for m in msgs)
    assert any("above" in m and "not a worst case" in m for m in msgs)


# ---------------------------------------------------------------- cards

def expected_cards(root: Path) -> dict[tuple, dict[str, tuple[list[float], str | None]]]:
    """(defence, dataset, attack set) → {line title: (values over seeds, randomness)} from the files."""
    out: dict[tuple, dict[str, tuple[list[float], str | None]]] = {}
    for m in files(root):
        keys = attack_set(m)
        if not keys:
            continue
        defence = TTA_TITLES.get(m.get("tta_method"), "CoOp")
        card = out.setdefault((defence, m["dataset"], keys), {})
        card.setdefault("clean (no attack)", ([], None))[0].append(m["clean_acc"])
        for a in m["attacks"]:
            card.setdefault(a["title"], ([], a["randomness"]))[0].append(a["acc"])
        card.setdefault(f"worst case per image over {len(keys)} attacks", ([], None))[0].append(m["worst_case"]["acc"])
    return out


def test_cards_parse_back_to_the_metrics(root):
    md = robustness_cards(collect_runs([root]), "md")
    recs = parse_cards_markdown(md)
    want = expected_cards(root)
    assert len({(r["defence"], r["column"], r["threat"]) for r in recs}) == len(want) == 6
    for (defence, ds, keys), lines in want.items():
        label = "ℓ∞ ε=4/255, worst case over: " + "; ".join(TITLES[k] for k in keys)
        card = [r for r in recs if (r["defence"], r["column"], r["threat"]) == (defence, ds, label)]
        assert [r["attack"] for r in card] == list(lines), (defence, ds)  # clean, attacks in run order, worst
        for r in card:
            values, randomness = lines[r["attack"]]
            check(r, values, (defence, ds, r["attack"]))
            assert r["randomness"] == randomness
            assert r["worst"] == r["attack"].startswith("worst case")
    # a card says which randomness each attack had
    rtpt = [r for r in recs if r["defence"] == "R-TPT" and r["column"] == "dtd"]
    assert [r["randomness"] for r in rtpt] == [None, None, "secret", "known", None]


def test_cards_csv_and_latex(root):
    runs = collect_runs([root])
    rows = list(csv.DictReader(io.StringIO(robustness_cards(runs, "csv"))))
    want = expected_cards(root)
    assert len(rows) == sum(len(v) for v in want.values())
    for (defence, ds, keys), lines in want.items():
        mine = [r for r in rows if (r["defence"], r["column"]) == (defence, ds)
                and r["threat"].endswith("; ".join(TITLES[k] for k in keys))]
        assert [r["attack"] for r in mine] == list(lines)
        assert [r["attack_key"] for r in mine] == ["clean", *keys, "worst_case"]
        for r in mine:
            mean, std = mean_std(lines[r["attack"]][0])
            assert float(r["mean"]) == pytest.approx(mean, abs=1e-6)
            assert (r["std"] == "") if std is None else float(r["std"]) == pytest.approx(std, abs=1e-6)
            assert int(r["n_seeds"]) == len(lines[r["attack"]][0])
    tex = robustness_cards(runs, "latex")
    assert tex.count(r"\begin{tabular}{llr}") == tex.count(r"\end{table}") == len(want)
    assert tex.count(r"\textbf{worst case per image") == len(want) and "±" not in tex and "ℓ" not in tex


def test_no_cards_without_several_attacks(root):
    # the engine's record of a non-adaptive-only run: a single attack, the same table as the old runs
    single = tta_metrics("rtpt", 2, adaptive=[], **simulated(random.Random(3), ("nonadaptive",), 0.8,
                                                             {"nonadaptive": 0.7}))
    write(root, "old/rtpt-single", single)
    runs = {r.path.name: r for r in collect_runs([root / "old"])}
    assert runs["rtpt-single"].threat_key == runs["rtpt-nonadaptive"].threat_key
    old = collect_runs([root / "old", root / "eval-coop-old"])
    assert robustness_cards(old, "md") == ""
    assert robustness_cards(old, "csv").splitlines() == [
        "defence,column,threat,attack_key,attack,randomness,mean,std,n_seeds"]
    with pytest.raises(ConfigError, match="format"):
        robustness_cards(old, "html")


def test_report_command_writes_cards(root, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    cards = (out / "cards.md").read_text()
    assert parse_cards_markdown(cards) == parse_cards_markdown(robustness_cards(collect_runs([root]), "md"))
    assert "#### R-TPT · dtd" in printed
    assert {r["threat"] for r in parse_markdown_table((out / "results.md").read_text())} >= {worst_label(TTA_ALL)}
    # --attack: that attack's accuracies instead of the worst case
    assert main(["report", str(root / "tta-atpt-dtd"), "--attack", "adaptive_secret", "--out", str(out / "s")]) == 0
    recs = parse_markdown_table((out / "s" / "results.md").read_text())
    values = [a["acc"] for m in files(root / "tta-atpt-dtd") for a in m["attacks"] if a["key"] == "adaptive_secret"]
    robust = [r for r in recs if r["block"] == "robust"]
    assert len(robust) == 1 and robust[0]["threat"] == "ℓ∞ ε=4/255, " + TITLES["adaptive_secret"]
    check(robust[0], values, "atpt secret")


def test_figures_one_file_pair_per_attack_set(root, tmp_path):
    from robustprompt.report.plots import tradeoff_scatter

    runs = [r for r in collect_runs([root]) if r.kind == "tta"]
    names = sorted(p.name for p in tradeoff_scatter(runs, tmp_path / "t.png") if p.suffix == ".png")
    assert len(names) == 4  # three attacks, two attacks, old adaptive, old non-adaptive
    assert "t_worst_linf_eps4_adaptive_known-adaptive_secret-nonadaptive.png" in names
    assert "t_worst_linf_eps4_adaptive_secret-nonadaptive.png" in names


def test_console_prints_each_attack_and_the_worst_case(root, capsys):
    from robustprompt.report.console import print_metrics

    m = json.loads((root / "tta-rtpt-dtd" / "seed-1" / "metrics.json").read_text())
    print_metrics(m)
    text = capsys.readouterr().out
    for a in m["attacks"]:
        assert f"under {a['title']}: {a['acc']:.2f}%" in text
    assert f"robust accuracy: {m['worst_case']['acc']:.2f}%  worst case per image over 3 attacks" in text
