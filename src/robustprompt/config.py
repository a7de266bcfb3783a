"""Typed, validated configuration: YAML/dict ⇄ dataclasses, with errors that name the key.

Sections shared by every command (model, data, attack) live here; commands add their own.
Units follow the CLI: attack eps/alpha are in /255 units (eps: 4 means 4/255).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .attacks.threat import AA_CHUNK, ThreatModel
from .errors import ConfigError
from .messages import one_line, quote
from .models.prompts import PromptConfig

# A YAML document may hold at most this many nodes once every alias is expanded (a real config
# has a few hundred), and at most this many characters of scalars (aliases expanded): anything
# downstream (merging, hashing, an error message) may walk the expanded structure.
MAX_YAML_NODES = 100_000
MAX_YAML_SCALAR_CHARS = 10_000_000
MAX_YAML_BYTES = 10_000_000
SEED_LIMIT = 2**31  # seeds are drawn from [0, 2**31): every RNG we feed accepts them, none aliases


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {quote(value)} fits none of "
                          f"{', '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        if not _hashable(value) or value not in args:
            raise ConfigError(f"{where}: {quote(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {quote(value)}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {quote(value)}")
        return dict(value)
    if is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {quote(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {quote(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {quote(value)}")
        return finite(value, where)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {quote(value)}")
        return value
    return value


def finite(value: int | float, where: str) -> float:
    """``value`` as a finite float, or a ConfigError naming ``where`` (NaN and ±inf would pass
    every range check written as a comparison and silently poison a run)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {quote(value)}")
    try:
        out = float(value)
    except OverflowError:  # an integer beyond float range
        raise ConfigError(f"{where}: {quote(value, 20)} is not a finite number") from None
    if not math.isfinite(out):
        raise ConfigError(f"{where}: {out} is not a finite number")
    return out


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; missing keys take defaults."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {quote(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted((k for k in data if k not in names), key=str)  # YAML keys need not be strings
    if unknown:
        shown = ", ".join(k if isinstance(k, str) and len(k) <= 40 else quote(k, 40) for k in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ConfigError(f"{where}: unknown key(s) {shown}{more}; known: {', '.join(sorted(names))}")
    defaults = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(_onto_field_default(defaults[k], v), hints[k], f"{where}.{k}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {one_line(str(exc), 300)}") from exc


def _onto_field_default(f: dataclasses.Field, value: Any) -> Any:
    """A partial mapping for a dataclass-valued field overrides that field's own default (e.g. a
    training attack given as {eps: 4} keeps the training default steps=2, not the class default)."""
    if not isinstance(value, dict):
        return value
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return value
    if not is_dataclass(default):
        return value
    inherited = to_dict(default)
    if isinstance(default, AttackSpec) and "eps" in value and "alpha" not in value:
        # a step size belongs to its budget: a new ε without an α takes the one rule, α = ε/4,
        # not the default threat's α (training's PGD-2 has α = ε = 1/255; --train-eps 4 → α = 1/255)
        inherited.pop("alpha", None)
    return {**inherited, **value}


def to_dict(obj: Any) -> Any:
    """Dataclasses → plain dicts/lists suitable for YAML/JSON."""
    if is_dataclass(obj):
        omit = obj.omitted_fields() if hasattr(obj, "omitted_fields") else ()
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj) if f.name not in omit}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_yaml(path: str | Path) -> dict:
    """The mapping in YAML file ``path`` ({} for an empty file), read as data only (safe loader:
    no Python tags) and bounded (see ``parse_yaml``). Every problem is a one-line ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"config file {path} is {size} bytes; a config is at most {MAX_YAML_BYTES} bytes")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    data = parse_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


_YAMLLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml also caps nesting at depth 1000


def parse_yaml(text: str, where: str) -> Any:
    """YAML ``text`` as plain data (mappings, lists, strings, numbers, booleans, null).

    The document is composed to a node graph first and measured with every alias expanded
    (``yaml_node_count``); above MAX_YAML_NODES nodes or MAX_YAML_SCALAR_CHARS characters it is
    refused before any Python object is built, so an alias bomb costs milliseconds, not memory.
    ``where`` names the source in error messages ("config file c.yaml", "--param lr=…")."""
    loader = _YAMLLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        nodes, chars = _expanded_size(node, where)
        if nodes > MAX_YAML_NODES:
            raise ConfigError(f"{where}: its aliases expand to more than {MAX_YAML_NODES} nodes; "
                              f"a config needs far fewer (is it an alias bomb?)")
        if chars > MAX_YAML_SCALAR_CHARS:
            raise ConfigError(f"{where}: its values expand to more than {MAX_YAML_SCALAR_CHARS} characters")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        reason = str(exc).replace(' in "<unicode string>",', " at")  # `where` names the source
        raise ConfigError(f"{where} is not valid YAML: {one_line(reason, 300)}") from None
    except RecursionError:  # the pure-Python parser on very deep nesting
        raise ConfigError(f"{where} is not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def yaml_node_count(text: str) -> int:
    """Nodes of YAML ``text`` with every alias expanded (what MAX_YAML_NODES limits)."""
    loader = _YAMLLoader(text)
    try:
        node = loader.get_single_node()
        return 0 if node is None else _expanded_size(node, "yaml")[0]
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node, where: str) -> tuple[int, int]:
    """(nodes, scalar characters) of the tree under ``root`` with aliases expanded.

    An alias is the same node object reached twice, so sizes are memoised per node: the cost is
    linear in the composed graph, however large its expansion. Iterative (no recursion limit);
    a node met again while still open is an alias to one of its own ancestors."""
    done: dict[int, tuple[int, int]] = {}
    open_ids: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in done:
            continue
        kids = _children(node)
        if not children_done:
            if key in open_ids:
                raise ConfigError(f"{where}: an alias refers to itself (a recursive structure)")
            open_ids.add(key)
            stack.append((node, True))
            for kid in kids:
                if id(kid) in open_ids:
                    raise ConfigError(f"{where}: an alias refers to itself (a recursive structure)")
                if id(kid) not in done:
                    stack.append((kid, False))
            continue
        nodes = 1 + sum(done[id(k)][0] for k in kids)
        chars = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(done[id(k)][1] for k in kids)
        # saturate: sizes past the limit only need to stay past it (and Python ints stay small)
        done[key] = (min(nodes, MAX_YAML_NODES + 1), min(chars, MAX_YAML_SCALAR_CHARS + 1))
        open_ids.discard(key)
    return done[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def deep_merge(base: dict, override: dict) -> dict:
    """override wins; nested mappings merge key by key."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_type(cls: Any, name: str) -> Any:
    """The type of field `name` of dataclass `cls`, Optional[...] unwrapped."""
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else Any
    return tp


def check_dotted_key(cls: type, dotted: str, prefix: str = "") -> None:
    """A one-line ConfigError, with the nearest known key, if `dotted` (e.g. "attack.eps") is not a
    key of config dataclass `cls`. Below a free-form field (a mapping such as method.params) any
    key is accepted: the method checks its own. `prefix` ("train.") is shown before the key."""
    import difflib

    tp: Any = cls
    for i, key in enumerate(dotted.split(".")):
        if not is_dataclass(tp):
            return
        names = [f.name for f in fields(tp) if f.init]
        if key not in names:
            parts = dotted.split(".")
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            where = prefix + ".".join(parts[:i]) if i else (prefix.rstrip(".") or "the config")
            hint = (f"; did you mean {prefix}{'.'.join([*parts[:i], near[0], *parts[i + 1:]])}?" if near
                    else f"; {where} has {', '.join(names)}")
            raise ConfigError(f"--set {quote(prefix + dotted, 100)}: unknown key{hint}")
        tp = _field_type(tp, key)


def field_default(cls: type, dotted: str) -> Any:
    """The default of dotted key `dotted` of config dataclass `cls` (e.g. "attack.steps" → 100), as
    the dataclasses state it: --help shows these, so the numbers live in one place."""
    obj: Any = cls()
    for key in dotted.split("."):
        obj = getattr(obj, key)
    return to_dict(obj)


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """set_dotted(cfg, "attack.eps", 4) — for CLI flags that override YAML keys."""
    keys = dotted.split(".")
    for i, k in enumerate(keys[:-1]):
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"cannot set {quote(dotted, 100)}: {'.'.join(keys[:i + 1])} is not a mapping")
    d[keys[-1]] = value


# ---------------------------------------------------------------------------- shared sections
@dataclass
class ModelSpec:
    """Which backbone and prompts. name "demo" is the embedded Fashion-MNIST backbone.
    run: a training run directory whose learned prompts to load (its prompt settings and backbone
    win; `pretrained` may point at the same weights elsewhere), or "hf-hub:ORG/REPO[@REVISION]",
    downloaded once here and replaced by its snapshot folder (robustprompt.hub.resolve_run).
    allow_backbone_mismatch: load run prompts onto weights whose SHA-256 differs from the recorded
    one (recorded in a run's config only when true)."""

    name: str = "demo"
    pretrained: Optional[str] = None
    quick_gelu: Optional[bool] = None
    prompt: Optional[PromptConfig] = None  # None: no prompts (eval) / the method's defaults (train)
    templates: str = "dataset"          # "dataset" (its main template), "ensemble" or one template with {}
    run: Optional[str] = None
    allow_backbone_mismatch: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.run, str) and self.run.startswith("hf-hub:"):
            from .hub import resolve_run

            self.run = resolve_run(self.run)

    def omitted_fields(self) -> tuple[str, ...]:
        return () if self.allow_backbone_mismatch else ("allow_backbone_mismatch",)


@dataclass
class DataSpec:
    """Which images. subset: evaluate a fixed random subset of this many images (seeded).
    resize_mode: auto (the backbone's own open_clip preprocess config: shortest for CLIP, squash
    for SigLIP, …), or forced: shortest (shorter side + centre crop; CLIP's and Dassl's test
    transform), squash (both sides straight to the model's size) or longest (longer side, padded
    to a square). Interpolation is always the backbone's."""

    dataset: str = "fashion_mnist"
    root: Optional[str] = None
    split: str = "test"
    classes: str = "all"                # all | base | new (base-to-new protocol)
    subset: Optional[int] = None
    subset_seed: int = 0
    batch_size: int = 64
    workers: int = 0
    download: bool = False
    resize_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.classes not in ("all", "base", "new"):
            raise ConfigError(f"data.classes must be all, base or new, got {quote(self.classes)}")
        check_resize_mode(self.resize_mode)
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"data.subset must be >= 1, got {self.subset}")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        check_seed(self.subset_seed, "data.subset_seed")


RESIZE_MODES = ("auto", "shortest", "squash", "longest")   # data.resize_mode (data.transforms' modes + auto)


def check_resize_mode(value: Any, where: str = "data.resize_mode") -> str:
    """auto (the backbone's own preprocessing) or a mode that forces it: shortest, squash, longest."""
    if not isinstance(value, str) or value not in RESIZE_MODES:
        raise ConfigError(f"{where} must be one of {', '.join(RESIZE_MODES)} (auto: the backbone's own), "
                          f"got {quote(value, 60)}")
    return value


def check_seed(seed: int, where: str) -> int:
    """A seed must lie in [0, 2**31): negative seeds alias positive ones in some generators
    (random.Random(-1) draws what random.Random(1) draws) and huge ones overflow others."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{where} must be in [0, 2**31), got {quote(seed, 40)}")
    return seed


# ℓ2 budgets are in pixel units (ε₂ = 3.0, as torchattacks and AutoAttack write them); before
# issue 12 they were in /255 units. Anything above this bound is refused as a /255-unit leftover:
# it is above every published ℓ2 budget (0.5 CIFAR, 3.0 ImageNet) while the /255 writing of
# those (127.5, 765) is far above it.
L2_EPS_MAX = 32.0
EPS_UNITS = {"linf": "/255", "l2": "pixel"}


@dataclass
class AttackSpec:
    """An attack as users write it: ℓ∞ eps and alpha in /255 units (4 means 4/255), ℓ2 eps and
    alpha in pixel units (3.0 means ‖δ‖₂ ≤ 3.0); alpha null: eps/4. precision: fp32 or bf16
    (autocast inside PGD/FGSM). eps_units: filled in for ℓ2 ("pixel") so that a config written
    under the old /255 reading of ℓ2 budgets never shares a run identity with a new one."""

    attack: str = "pgd"
    norm: str = "linf"
    eps: float = 1.0
    alpha: Optional[float] = None
    steps: int = 100
    restarts: int = 1
    loss: str = "ce"
    random_start: bool = True
    aa_version: str = "standard"
    aa_chunk: int = AA_CHUNK            # AutoAttack: images per seeded pyautoattack run (1: per image)
    precision: str = "fp32"             # attack precision: fp32, or bf16 autocast (recorded)
    eps_units: Optional[str] = None     # ℓ2: "pixel" (filled in); ℓ∞: None ("/255" accepted)

    def __post_init__(self) -> None:
        # finite first (also when built in Python, without from_dict): NaN passes every comparison
        self.eps = finite(self.eps, "attack.eps")
        if self.alpha is not None:
            self.alpha = finite(self.alpha, "attack.alpha")
        units = EPS_UNITS.get(self.norm)
        if units is not None:   # an unknown norm: threat() below names it
            if self.eps_units not in (None, units):
                raise ConfigError(f"attack.eps_units: {self.norm} budgets are in {units} units, got "
                                  f"{quote(self.eps_units, 40)}")
            # stored for ℓ2 only: an ℓ∞ record (and run identity) stays what it always was
            self.eps_units = units if self.norm == "l2" else None
        if self.norm == "l2" and self.eps > L2_EPS_MAX:
            raise ConfigError(f"attack.eps={self.eps:g} for norm l2 looks like /255 units: ℓ2 budgets are in "
                              f"pixel units (as torchattacks/AutoAttack; --eps 3.0 means ε₂=3.0), so "
                              f"{self.eps:g}/255 is --eps {self.eps / 255:.4g}; at most {L2_EPS_MAX:g}")
        self.threat()  # validate now, with ThreatModel's messages

    def threat(self) -> ThreatModel:
        kw = dict(attack=self.attack, norm=self.norm, steps=self.steps, restarts=self.restarts, loss=self.loss,
                  random_start=self.random_start, aa_version=self.aa_version, aa_chunk=self.aa_chunk,
                  precision=self.precision)
        if self.norm == "l2":   # pixel units already
            return ThreatModel(eps=self.eps, alpha=self.alpha, **kw)
        return ThreatModel.from_255(self.eps, self.alpha, **kw)

    def omitted_fields(self) -> tuple[str, ...]:
        """Fields that mean nothing here, or hold their default, are kept out of records (and run
        identity), so existing ℓ∞ fp32 configs keep theirs: aa_chunk outside AutoAttack, precision
        when fp32, eps_units for ℓ∞ (ℓ2 keeps "pixel": its identity changed with its units)."""
        omit = () if self.attack == "autoattack" else ("aa_chunk",)
        if self.precision == "fp32":
            omit += ("precision",)
        if self.norm != "l2":
            omit += ("eps_units",)
        return omit


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)
