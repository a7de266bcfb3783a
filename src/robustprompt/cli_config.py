"""What the CLI settles before a command runs, so that it says what will happen: dotted `--set`
overrides (a typo gets the nearest key), `--print-config` (the resolved config, then exit), the
effective defaults in `--help` (read from the config dataclasses, the one place they live) and
the checks that refuse a surprising default (a forgotten --dataset, --model beside --run)."""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Mapping, Optional, Sequence

from .errors import ConfigError
from .messages import quote

# Shown for a default of None, where "none" would not say what happens.
NONE_MEANS = {
    "attack.alpha": "eps/4", "train_attack.alpha": "eps/4 when --train-eps is given, else FAP's PGD-2 α = ε",
    "data.subset": "the whole split", "model.pretrained": "none: random init, or the --run's weights",
    "model.run": "none: no learned prompts", "defence_seed": "--seed + 1", "data.root": "the dataset's usual place",
    "data.shots": "all images", "model.quick_gelu": "automatic",
}
_HAND_TYPED = (re.compile(r" ?\(default(:? [^;()]*)?\)"), re.compile(r"\(default:? [^;()]*; "))


def add_config_args(g: argparse._ArgumentGroup, *, dotted_set: bool = True) -> None:
    """--print-config (and --set KEY=VALUE) for a command built from a config dataclass."""
    if dotted_set:
        g.add_argument("--set", action="append", metavar="KEY=VALUE", dest="set_items",
                       help="override a dotted config key, e.g. attack.steps=10 (VALUE read as YAML); applied "
                            "after --config and the flags; repeatable")
    g.add_argument("--print-config", action="store_true",
                   help="print the fully resolved config as YAML and exit, without running or writing anything")


def apply_sets(raw: dict, items: Optional[Sequence[str]], cls: type) -> None:
    """--set KEY=VALUE items into `raw`, each KEY checked against config dataclass `cls` first."""
    from .cli import _parse_set
    from .config import check_dotted_key, set_dotted

    for item in items or []:
        key, value = _parse_set(item)
        check_dotted_key(cls, key)
        set_dotted(raw, key, value)


def print_config(cfg: Any) -> None:
    """The resolved config as YAML on stdout (what a run would record, before fingerprints)."""
    import yaml

    from .config import to_dict

    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def check_dataset_given(raw: Mapping, cfg: Any, command: str) -> None:
    """Refuse a non-demo backbone on the demo's default dataset when no dataset was named.

    The default data (Fashion-MNIST, 28 px) is the demo backbone's; a forgotten --dataset with
    --model ViT-B-32 would upscale it to 224 px and, at eval, attack all 10 000 images with
    PGD-100 — hours spent on a number nobody asked for. Naming it (--dataset fashion_mnist) runs it."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if "dataset" in data or cfg.model.name == "demo" or cfg.model.run is not None:
        return
    default = cfg.data.dataset
    raise ConfigError(f"no --dataset given: the default, {default}, is the demo backbone's 28-px data; pass "
                      f"--dataset {default} to {command} {quote(cfg.model.name, 60)} on it anyway, or name your "
                      "dataset (`robustprompt list datasets`)")


def check_run_model(raw: Mapping) -> None:
    """--model next to --run: the run's recorded backbone is used, so another name is refused."""
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    run, name = model.get("run"), model.get("name")
    if run is None or name is None:
        return
    from .api import open_prompts

    recorded = open_prompts(run=run).backbone.name
    if name != recorded:
        raise ConfigError(f"--model {quote(name, 60)} conflicts with --run {quote(str(run), 120)}, whose prompts were "
                          f"trained on {quote(recorded, 60)}; drop --model (the run's backbone is used) or "
                          f"give --model {recorded}")


def default_text(cls: type, key: str) -> str:
    """The default of dotted `key` in `cls`, as --help shows it."""
    from .config import field_default

    try:
        value = field_default(cls, key)
    except AttributeError:       # below a section whose default is None (model.prompt: the method's)
        has_method = any(f == "method" for f in getattr(cls, "__dataclass_fields__", {}))
        return "the method's" if has_method and key.startswith("model.prompt.") else "none"
    if value is None:
        return NONE_MEANS.get(key, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def annotate_defaults(parser: argparse.ArgumentParser, cls: type, *tables: Mapping[str, str],
                      flips: Sequence[str] = ("no_random_start",)) -> None:
    """Append "(default: X)" to the help of every flag of `parser` that sets a key of `cls`
    (through `tables`: flag dest → dotted key), X read from the dataclass. A hand-typed default
    in the help text is dropped first, so the two can never disagree. `flips`: store_const
    False flags (--no-random-start), whose default is the opposite of the key's."""
    keys = {dest: key for table in tables for dest, key in table.items()}
    for action in parser._actions:
        key = keys.get(action.dest)
        if key is None or action.help == argparse.SUPPRESS:
            continue
        text = default_text(cls, key)
        if action.dest in flips:
            text = "off" if text == "on" else "on"
        help_text = action.help or ""
        for pattern in _HAND_TYPED:
            help_text = pattern.sub("(" if pattern.pattern.endswith("; ") else "", help_text)
        action.help = f"{help_text} (default: {text.replace('%', '%%')})".strip()


def eval_description(cls: type) -> str:
    """What a bare `robustprompt eval` does, numbers read from the config dataclass."""
    steps, eps = default_text(cls, "attack.steps"), default_text(cls, "attack.eps")
    return (f"By default: {default_text(cls, 'attack.attack').upper()}-{steps} at ε = {eps}/255 "
            f"(ℓ∞, α = ε/4) on every image of the {default_text(cls, 'data.split')} split — expensive on a large "
            f"backbone: use --subset N and --steps. Without --dataset only the demo backbone runs (on "
            f"{default_text(cls, 'data.dataset')}); another --model is refused until a dataset is named.")
