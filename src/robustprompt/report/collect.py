"""Find evaluation results on disk and read them into flat records for tables and plots.

A run directory holds ``metrics.json``; experiments nest them
(``<exp>/<point>/seed-<s>/eval-<target>/metrics.json``). `collect_runs` walks any folders it is
given and keeps the results of kind ``eval`` and ``tta``; training runs are skipped.

Every number a report shows is tied to a threat model, so each record carries ``threat_key``, a
hashable canonical identity of the attack (plus ``adaptive`` and ``quantize_adv``). Tables and
plots group by it and never put two threat models in one column.

A run that ran several attacks (issue 9: ``attacks`` and ``worst_case`` in metrics.json) reports
its worst case per image as ``robust_acc``; its threat key is the budget plus the set of attacks
the worst case is over, each with its own identity (the threat of a fixed attack, the settings of
an adaptive one), so runs that ran different attacks never share a column. `select_attack` gives
one attack's accuracy instead. Old runs (no ``attacks``) are read as before.
"""
from __future__ import annotations

import json
import logging
import math
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..attacks.threat import eps_text
from ..errors import ConfigError

log = logging.getLogger("robustprompt")

RESULT_KINDS = ("eval", "tta")

# Display titles, in the row order tables use: zero-shot first, then baselines roughly as papers
# introduce them, adversarial prompt methods, then test-time methods.
METHOD_TITLES: dict[str, str] = {
    "zeroshot": "Zero-shot CLIP",
    "coop": "CoOp",
    "vpt": "VPT",
    "ivlp": "IVLP",
    "maple": "MaPLe",
    "advvp": "AdvVP",
    "advvlp": "AdvVLP",
    "advmaple": "AdvMaPLe",
    "apt": "APT",
    "fap": "FAP",
    "cba_fapt": "CBA-FAPT",
    "apd": "APD",
    "tpt": "TPT",
    "ctpt": "C-TPT",
    "mta": "MTA",
    "rtpt": "R-TPT",
    "atpt": "A-TPT",
}

# Column order of the prompt-learning literature (ImageNet, the 10 CoOp sets, then the ImageNet
# variants); other datasets follow alphabetically.
DATASET_ORDER: tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
    "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r",
)

_NORM_TEXT = {"linf": "ℓ∞", "l2": "ℓ2", "l1": "ℓ1"}


def method_title(name: str) -> str:
    """The display title of a method name; unknown names are shown as they are."""
    return METHOD_TITLES.get(name, name)


def method_rank(name: str) -> int:
    """Position of a raw method name in the table row order (unknown names sort last)."""
    keys = list(METHOD_TITLES)
    return keys.index(name) if name in keys else len(keys)


def dataset_rank(column: str) -> tuple[int, str]:
    """Sort key for a column name such as ``dtd`` or ``caltech101/base``."""
    base = column.split("/")[0].split("@")[0]
    return (DATASET_ORDER.index(base) if base in DATASET_ORDER else len(DATASET_ORDER), column)


@dataclass(frozen=True)
class RunResult:
    """One evaluated run, flattened for reporting.

    ``seed`` is the training seed when the prompts came from a training run (so that seeds line
    up across the datasets a trained prompt is evaluated on), else the evaluation seed.
    ``method`` is the display title; ``method_key`` the raw name (the test-time method for a
    ``tta`` run); ``base_method`` the raw ``method`` field (the prompts a test-time method ran on).
    ``attacks`` holds each attack of a multi-attack run (empty for an old single-attack run); then
    ``robust_acc`` is the worst case per image over them.
    """

    path: Path
    method: str
    method_key: str
    dataset: str
    classes: str
    shots: Optional[int]
    seed: Optional[int]
    clean_acc: float
    robust_acc: float
    n: Optional[int]
    threat: dict[str, Any] = field(compare=False, hash=False)
    threat_key: tuple[tuple[str, Any], ...]
    threat_label: str
    backbone: str
    kind: str = field(default="eval", kw_only=True)
    split: str = field(default="test", kw_only=True)
    base_method: str = field(default="", kw_only=True)
    attacks: tuple["AttackResult", ...] = field(default=(), compare=False, hash=False, kw_only=True)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False, kw_only=True)

    @property
    def column(self) -> str:
        """The table column of this result: the dataset, with ``/base`` or ``/new`` for a
        base-to-new split and ``@<split>`` when it is not the test split."""
        col = self.dataset if self.classes in ("all", "", None) else f"{self.dataset}/{self.classes}"
        return col if self.split in ("test", "", None) else f"{col}@{self.split}"


@dataclass(frozen=True)
class AttackResult:
    """One attack of a multi-attack run: ``key`` (nonadaptive, adaptive_secret, adaptive_known,
    pgd, autoattack, …), its display ``title``, ``randomness`` ("known", "secret" or None when the
    attack is not against the defence's randomness), accuracy ``acc`` (%) and ``identity``, a
    hashable canonical form of what was run (runs agree on an attack only if identities match)."""

    key: str
    title: str
    randomness: Optional[str]
    acc: float
    identity: tuple


def collect_runs(paths: Sequence[str | Path]) -> list[RunResult]:
    """Every ``eval``/``tta`` result under ``paths`` (run directories, experiment folders, any
    folder, or ``metrics.json`` files), sorted by path. Unreadable or malformed files are skipped
    with a warning; ConfigError if no result is found at all."""
    if isinstance(paths, (str, Path)):  # a single path is an easy mistake; accept it
        paths = [paths]
    files: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            log.warning("report: %s does not exist; skipped", p)
            continue
        found = [p] if p.is_file() else sorted(p.rglob("metrics.json"))
        for f in found:
            r = f.resolve()
            if r not in seen:  # overlapping paths must not count a run twice
                seen.add(r)
                files.append(f)
    runs = [r for r in (_read_run(f) for f in sorted(files)) if r is not None]
    if not runs:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise ConfigError(f"no evaluation results (metrics.json of kind 'eval' or 'tta') found under {where}")
    return runs


def _read_run(path: Path) -> Optional[RunResult]:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("report: cannot read %s (%s); skipped", path, e)
        return None
    if not isinstance(m, dict):
        log.warning("report: %s does not hold a JSON object; skipped", path)
        return None
    kind = m.get("kind")
    if kind not in RESULT_KINDS:
        if kind != "train":
            log.debug("report: %s has kind %r; not a result, skipped", path, kind)
        return None
    try:
        return run_from_metrics(m, path.parent)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("report: %s is malformed (%s); skipped", path, e)
        return None


def run_from_metrics(m: dict[str, Any], path: str | Path = ".") -> RunResult:
    """A RunResult from a parsed metrics dict; KeyError/TypeError/ValueError when malformed."""
    base_method = _str(m, "method")
    method_key = str(m["tta_method"]) if m.get("tta_method") else base_method
    threat = m.get("threat") or {}
    if not isinstance(threat, dict):
        raise TypeError("'threat' is not an object")
    seed = m.get("train_seed", m.get("seed"))
    shots = m.get("shots")
    quantize_adv = m.get("quantize_adv", threat.get("quantize_adv"))
    attacks = attack_results(m)
    robust_acc = _num(m, "robust_acc")
    if attacks:
        over = _worst_case_over(m, attacks, robust_acc, path)
        key, label = multi_attack_key(threat, [a for a in attacks if a.key in over], quantize_adv=quantize_adv)
    else:
        key = threat_key(threat, adaptive=m.get("adaptive", threat.get("adaptive", False)), quantize_adv=quantize_adv)
        label = threat_label(key)
    return RunResult(
        path=Path(path),
        method=method_title(method_key),
        method_key=method_key,
        dataset=_str(m, "dataset"),
        classes=str(m.get("classes") or "all"),
        shots=None if shots is None else _int(shots, "shots"),
        seed=None if seed is None else _int(seed, "seed"),
        clean_acc=_num(m, "clean_acc"),
        robust_acc=robust_acc,
        n=None if m.get("n") is None else _int(m["n"], "n"),
        threat=threat,
        threat_key=key,
        threat_label=label,
        backbone=backbone_label(m.get("backbone")),
        kind=str(m["kind"]),
        split=str(m.get("split") or "test"),
        base_method=base_method,
        attacks=tuple(attacks),
        raw=m,
    )


def attack_results(m: dict[str, Any]) -> list[AttackResult]:
    """The ``attacks`` list of a metrics dict as AttackResults ([] when absent); ValueError or
    TypeError when malformed (not a list of objects with a unique string key and a finite acc)."""
    entries = m.get("attacks")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise TypeError("'attacks' is not a list")
    out = []
    for e in entries:
        if not isinstance(e, dict):
            raise TypeError("an 'attacks' entry is not an object")
        key = _str(e, "key")
        randomness = e.get("randomness")
        if randomness not in (None, "known", "secret"):
            raise ValueError(f"attack {key!r}: randomness should be 'known', 'secret' or null, got {randomness!r}")
        out.append(AttackResult(key, str(e.get("title") or key), randomness, _num(e, "acc"), attack_identity(e)))
    keys = [a.key for a in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"'attacks' repeats a key: {keys}")
    return out


def attack_identity(entry: dict[str, Any]) -> tuple:
    """What an attack entry ran, canonically: its key plus the threat key of a fixed attack
    (``threat``) or the scalar settings of an adaptive one (``attack``; seeds left out, since the
    attacker's seeds differ between runs of the same attack, and the EOT count of a known-randomness
    attack, which does not use it), else its title."""
    key = str(entry.get("key"))
    if isinstance(entry.get("threat"), dict):
        return (key, "threat", threat_key(entry["threat"]))
    spec = entry.get("attack")
    if isinstance(spec, dict):
        # a known-randomness attack uses the evaluation's one view set, so its EOT count is unused
        unused = {"eot"} if entry.get("randomness") == "known" else set()
        fields = tuple(sorted((k, _round(v)) for k, v in spec.items()
                              if (v is None or isinstance(v, (str, int, float, bool))) and "seed" not in k
                              and k not in unused))
        return (key, "attack", fields)
    return (key, "title", str(entry.get("title") or key))


def _worst_case_over(m: dict[str, Any], attacks: list[AttackResult], robust_acc: float, path: Any) -> list[str]:
    """The attack keys the run's worst case is over (``worst_case.over``, else every attack),
    with warnings where the file contradicts itself (a worst case above one of its attacks, or a
    ``worst_case.acc`` that is not ``robust_acc``)."""
    keys = [a.key for a in attacks]
    wc = m.get("worst_case")
    over = keys
    if isinstance(wc, dict):
        if isinstance(wc.get("over"), list) and wc["over"]:
            over = [str(k) for k in wc["over"]]
            unknown = [k for k in over if k not in keys]
            if unknown:
                raise ValueError(f"worst_case.over names attacks that are not in 'attacks': {unknown}")
        if isinstance(wc.get("acc"), (int, float)) and abs(float(wc["acc"]) - robust_acc) > 1e-6:
            log.warning("report: %s: worst_case.acc %s differs from robust_acc %s; robust_acc is shown",
                        path, wc["acc"], robust_acc)
    worst = min(a.acc for a in attacks if a.key in over)
    if robust_acc > worst + 1e-6:  # per image worst case can never beat the weakest-defended attack
        log.warning("report: %s: robust_acc %s is above the accuracy under one of its attacks (%s); "
                    "it is not a worst case", path, robust_acc, worst)
    return over


def multi_attack_key(threat: dict[str, Any], attacks: Sequence[AttackResult], *,
                     quantize_adv: Any = None) -> tuple[tuple[tuple[str, Any], ...], str]:
    """The threat key and label of a worst case over ``attacks``: the budget (norm, ε, precision,
    quantisation) plus the sorted identities of the attacks. A single attack with a fixed threat
    keeps that threat's own key, so it lines up with single-attack runs of the same attack."""
    if len(attacks) == 1 and attacks[0].identity[1] == "threat":
        key = threat_key(dict(attacks[0].identity[2]), quantize_adv=quantize_adv)
        return key, threat_label(key)
    budget = threat if threat.get("norm") is not None else {}
    eps = budget.get("eps_255")
    if eps is None and budget.get("eps") is not None:
        eps = float(budget["eps"]) * 255
    d: dict[str, Any] = {"attack": "worst_case", "norm": budget.get("norm"), "eps_255": _round(eps),
                         "attacks": tuple(sorted(a.identity for a in attacks))}
    if budget.get("precision") not in (None, "float32"):
        d["precision"] = budget["precision"]
    if quantize_adv:
        d["quantize_adv"] = quantize_adv if isinstance(quantize_adv, (str, int, float)) else True
    key = tuple(sorted(d.items()))
    return key, threat_label(key, titles=[a.title for a in attacks])


def select_attack(runs: Iterable[RunResult], attack: str) -> list[RunResult]:
    """The runs with ``robust_acc`` replaced by the accuracy under one attack (``nonadaptive``,
    ``adaptive_secret``, ``pgd``, …) instead of the worst case. Multi-attack runs that did not run
    it are left out; old single-attack runs are kept as they are. The threat key becomes the
    attack's own (a fixed attack's threat key, so it lines up with single-attack runs of it)."""
    out = []
    for r in runs:
        if not r.attacks:
            out.append(r)
            continue
        a = next((a for a in r.attacks if a.key == attack), None)
        if a is None:
            continue
        key, label = multi_attack_key(r.threat, [a], quantize_adv=dict(r.threat_key).get("quantize_adv"))
        out.append(dataclasses.replace(r, robust_acc=a.acc, threat_key=key, threat_label=label))
    if not out:
        raise ConfigError(f"no run has an attack {attack!r}")
    return out


def _str(m: dict[str, Any], k: str) -> str:
    v = m[k]
    if not isinstance(v, str) or not v:
        raise ValueError(f"{k!r} should be a non-empty string, got {v!r}")
    return v


def _num(m: dict[str, Any], k: str) -> float:
    v = m[k]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{k!r} should be a finite number, got {v!r}")
    return float(v)


def _int(v: Any, k: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise ValueError(f"{k!r} should be an integer, got {v!r}")
    return int(v)


def _round(v: Any) -> Any:
    # eps*255 from a float eps is 3.9999999…; identity must not hinge on float noise
    return round(v, 4) if isinstance(v, float) else v


def threat_key(threat: dict[str, Any], *, adaptive: Any = False, quantize_adv: Any = None) -> tuple[tuple[str, Any], ...]:
    """A hashable canonical identity of a threat model: sorted (field, value) pairs.

    Defaults are normalised away (random start on, float32, standard AutoAttack, not adaptive,
    no quantisation) so that a run recording a default and one omitting it match.
    """
    attack = str(threat.get("attack", "none"))
    eps = threat.get("eps_255")
    if eps is None and threat.get("eps") is not None:
        eps = float(threat["eps"]) * 255
    if attack == "none" or (eps is not None and float(eps) == 0):
        key: dict[str, Any] = {"attack": "none"}
    else:
        key = {"attack": attack, "norm": threat.get("norm"), "eps_255": _round(eps)}
        if attack == "autoattack":
            aa = threat.get("autoattack") if isinstance(threat.get("autoattack"), dict) else {}
            version = threat.get("aa_version") or aa.get("version") or "standard"
            if version != "standard":
                key["aa_version"] = version
        else:
            alpha = threat.get("alpha_255")
            if alpha is None and threat.get("alpha") is not None:
                alpha = float(threat["alpha"]) * 255
            for k, v in (("alpha_255", alpha), ("steps", threat.get("steps")),
                         ("restarts", threat.get("restarts")), ("loss", threat.get("loss"))):
                if v is not None:
                    key[k] = _round(v)
            if threat.get("random_start") is False:
                key["random_start"] = False
        if threat.get("precision") not in (None, "float32"):
            key["precision"] = threat["precision"]
    key["adaptive"] = bool(adaptive)
    if quantize_adv:
        key["quantize_adv"] = quantize_adv if isinstance(quantize_adv, (str, int, float)) else True
    return tuple(sorted(key.items()))


def threat_label(key: Iterable[tuple[str, Any]], titles: Optional[Sequence[str]] = None) -> str:
    """Human text for a threat key: 'PGD-100 ℓ∞ ε=1/255 α=1/255', 'AutoAttack ℓ∞ ε=4/255 (adaptive)',
    'ℓ∞ ε=4/255, worst case over: <attack titles>' (``titles`` in the run's order; without them,
    the attack keys)."""
    t = dict(key)
    attack = t.get("attack", "none")
    if attack == "none":
        text = "clean (no attack)"
    elif attack == "worst_case":
        names = list(titles) if titles else [ident[0] for ident in t.get("attacks", ())]
        norm = _NORM_TEXT.get(str(t.get("norm")), str(t.get("norm")))
        what = f"worst case over: {'; '.join(names)}" if len(names) > 1 else "; ".join(names)
        text = f"{norm} ε={eps_text(t)}, {what}"
    else:
        norm = _NORM_TEXT.get(str(t.get("norm")), str(t.get("norm")))
        eps = f"ε={eps_text(t)}"
        if attack == "autoattack":
            name = "AutoAttack" if "aa_version" not in t else f"AutoAttack-{t['aa_version']}"
            text = f"{name} {norm} {eps}"
        elif attack == "pgd":
            restarts = f" ×{t['restarts']}" if t.get("restarts", 1) != 1 else ""
            loss = f" {t['loss']}" if t.get("loss", "ce") != "ce" else ""
            alpha = f" α={eps_text(t, 'alpha')}" if "alpha_255" in t else ""
            text = f"PGD-{t.get('steps', '?')}{restarts}{loss} {norm} {eps}{alpha}"
        else:
            loss = f" {t['loss']}" if t.get("loss", "ce") != "ce" else ""
            text = f"{attack.upper()}{loss} {norm} {eps}"
    notes = []
    if t.get("random_start") is False:
        notes.append("no random start")
    if "precision" in t:
        notes.append(str(t["precision"]))
    if t.get("adaptive"):
        notes.append("adaptive")
    if t.get("quantize_adv"):
        q = t["quantize_adv"]
        notes.append("quantized adv." if q is True else f"quantized adv. {q}")
    return text + (f" ({', '.join(notes)})" if notes else "")


def _g(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def backbone_label(b: Any) -> str:
    """'ViT-B-32 (openai)' from a metrics ``backbone`` entry (a dict or a plain name)."""
    if isinstance(b, dict):
        name, weights = b.get("name") or "?", b.get("weights")
        return f"{name} ({weights})" if weights and weights != name else str(name)
    return str(b) if b else "?"


RowKey = tuple[str, str, Optional[int], str]


def row_key(run: RunResult) -> RowKey:
    """What makes a table row (or a plot series): method, the prompts under a test-time method,
    shots and backbone. Seeds of the same row key are aggregated."""
    return (run.method_key, run.base_method, run.shots, run.backbone)


def sort_row_keys(keys: Iterable[RowKey]) -> list[RowKey]:
    """Known methods in METHOD_TITLES order, unknown ones after by name; then shots ascending
    (all-data runs last), then base method and backbone."""
    return sorted(set(keys), key=lambda k: (method_rank(k[0]), k[0], method_rank(k[1]), k[1],
                                           k[2] is None, k[2] or 0, k[3]))


def row_labels(keys: Iterable[RowKey]) -> dict[RowKey, str]:
    """Display labels for row keys: the method title, plus whichever of base method, shots and
    backbone varies among the rows of the same method, e.g. 'CoOp (16-shot)', 'A-TPT (on CoOp)'."""
    keys = sort_row_keys(keys)
    labels = {}
    for k in keys:
        same = [o for o in keys if o[0] == k[0]]
        notes = []
        if len({o[1] for o in same}) > 1 and k[1] != k[0]:
            notes.append(f"on {method_title(k[1])}")
        if len({o[2] for o in same}) > 1:
            notes.append("all data" if k[2] is None else f"{k[2]}-shot")
        if len({o[3] for o in same}) > 1:
            notes.append(k[3])
        labels[k] = method_title(k[0]) + (f" ({', '.join(notes)})" if notes else "")
    return labels


_ATTACK_ORDER = ("none", "fgsm", "pgd", "autoattack", "worst_case")


def threat_sort_key(key: Iterable[tuple[str, Any]]) -> tuple:
    """Order of threat models in reports: non-adaptive first, then clean, FGSM, PGD, AutoAttack,
    worst cases over several attacks, then by norm, budget and steps; anything else by its text."""
    t = dict(key)
    attack = t.get("attack")
    rank = _ATTACK_ORDER.index(attack) if attack in _ATTACK_ORDER else len(_ATTACK_ORDER)
    num = lambda v: float(v) if isinstance(v, (int, float)) else 0.0  # noqa: E731
    return (bool(t.get("adaptive")), bool(t.get("quantize_adv")), rank, str(attack), str(t.get("norm")),
            num(t.get("eps_255")), num(t.get("steps")), repr(sorted(t.items(), key=lambda kv: kv[0])))


def group_by_threat(runs: Iterable[RunResult]) -> dict[tuple, list[RunResult]]:
    """Runs grouped by threat model, groups in ``threat_sort_key`` order."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.threat_key, []).append(r)
    return {k: groups[k] for k in sorted(groups, key=threat_sort_key)}


def threat_slug(key: Iterable[tuple[str, Any]]) -> str:
    """A file-name-safe short name for a threat key: 'pgd100_linf_eps4_alpha1_adaptive'."""
    t = dict(key)
    if t.get("attack") == "none":
        parts = ["clean"]
    elif t.get("attack") == "worst_case":
        parts = ["worst", str(t.get("norm")), f"eps{_g(t.get('eps_255'))}", "+".join(i[0] for i in t.get("attacks", ()))]
    else:
        parts = [f"{t['attack']}{t.get('steps', '')}", str(t.get("norm")), f"eps{_g(t.get('eps_255'))}"]
        if "alpha_255" in t:
            parts.append(f"alpha{_g(t['alpha_255'])}")
        for k in ("restarts", "loss", "aa_version", "precision"):
            if k in t and not (k == "restarts" and t[k] == 1) and not (k == "loss" and t[k] == "ce"):
                parts.append(f"{k}{t[k]}" if k == "restarts" else str(t[k]))
        if t.get("random_start") is False:
            parts.append("norand")
    if t.get("adaptive"):
        parts.append("adaptive")
    if t.get("quantize_adv"):
        parts.append("quant")
    return re.sub(r"[^A-Za-z0-9._]+", "-", "_".join(parts)).strip("-_") or "threat"
