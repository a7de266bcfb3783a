"""Typed, validated configuration: YAML/dict ⇄ dataclasses, with errors that name the key.

Sections shared by every command (model, data, attack) live here; commands add their own.
Units follow the CLI: attack eps/alpha are in /255 units (eps: 4 means 4/255).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .attacks.threat import ThreatModel
from .errors import ConfigError
from .models.prompts import PromptConfig


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
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of "
                          f"{', '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; missing keys take defaults."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    defaults = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(_onto_field_default(defaults[k], v), hints[k], f"{where}.{k}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


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
    return {**to_dict(default), **value}


def to_dict(obj: Any) -> Any:
    """Dataclasses → plain dicts/lists suitable for YAML/JSON."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """override wins; nested mappings merge key by key."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """set_dotted(cfg, "attack.eps", 4) — for CLI flags that override YAML keys."""
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


# ---------------------------------------------------------------------------- shared sections
@dataclass
class ModelSpec:
    """Which backbone and prompts. name "demo" is the embedded Fashion-MNIST backbone.
    run: a training run directory whose learned prompts to load (its prompt settings win)."""

    name: str = "demo"
    pretrained: Optional[str] = None
    quick_gelu: Optional[bool] = None
    prompt: Optional[PromptConfig] = None  # None: no prompts (eval) / the method's defaults (train)
    templates: str = "dataset"          # "dataset" (its main template), "ensemble" or one template with {}
    run: Optional[str] = None


@dataclass
class DataSpec:
    """Which images. subset: evaluate a fixed random subset of this many images (seeded).
    resize_mode: shortest (shorter side + centre crop; CLIP's and Dassl's test transform) or
    squash (both sides straight to the model's size). Interpolation is the backbone's (bicubic)."""

    dataset: str = "fashion_mnist"
    root: Optional[str] = None
    split: str = "test"
    classes: str = "all"                # all | base | new (base-to-new protocol)
    subset: Optional[int] = None
    subset_seed: int = 0
    batch_size: int = 64
    workers: int = 0
    download: bool = False
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.classes not in ("all", "base", "new"):
            raise ConfigError(f"data.classes must be all, base or new, got {self.classes!r}")
        if self.resize_mode not in ("shortest", "squash"):
            raise ConfigError(f"data.resize_mode must be shortest or squash, got {self.resize_mode!r}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"data.subset must be >= 1, got {self.subset}")


@dataclass
class AttackSpec:
    """An attack as users write it: eps and alpha in /255 units (alpha null: eps/4)."""

    attack: str = "pgd"
    norm: str = "linf"
    eps: float = 1.0
    alpha: Optional[float] = None
    steps: int = 100
    restarts: int = 1
    loss: str = "ce"
    random_start: bool = True
    aa_version: str = "standard"

    def __post_init__(self) -> None:
        self.threat()  # validate now, with ThreatModel's messages

    def threat(self) -> ThreatModel:
        return ThreatModel.from_255(self.eps, self.alpha, attack=self.attack, norm=self.norm, steps=self.steps,
                                    restarts=self.restarts, loss=self.loss, random_start=self.random_start,
                                    aa_version=self.aa_version)


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)
