"""What exists, by name: backbones, pretrained weights, training methods, test-time procedures,
datasets and attacks — the lists `robustprompt list ...` prints, for Python too::

    import robustprompt as rp
    rp.catalog.methods()            # [MethodInfo(name='apd', adversarial=True, ...), ...]
    rp.catalog.pretrained("ViT-B-32")

Every list is read from the registry or table that consumes the names (open_clip, the method and
test-time registries, the dataset registry, the attack validation), so a listed name is one the
toolkit accepts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .models.prompts import PromptConfig

BACKBONE_PREFIXES = ("hf-hub:", "local-dir:")   # open_clip names beyond its architectures


@dataclass(frozen=True)
class MethodInfo:
    """A training method: name, title, whether it trains on adversarial examples, its default
    prompt layout and a one-line summary."""

    name: str
    title: str
    adversarial: bool
    prompt: PromptConfig
    summary: str

    @property
    def prompt_text(self) -> str:
        p = self.prompt
        return "no prompts" if p.coupling == "none" else f"{p.coupling}, n_ctx={p.n_ctx}, depth={p.depth}"


@dataclass(frozen=True)
class TTAInfo:
    """A test-time procedure: name, title, whether it tunes the prompt, a one-line summary."""

    name: str
    title: str
    tunes_prompt: bool
    summary: str


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset name and what building it needs: whether `root` is required, the folder it
    reads under the root, and whether it can be downloaded (`download=True` / --download)."""

    name: str
    needs_root: bool
    folder: str
    download: bool
    note: str = ""


@dataclass(frozen=True)
class AttackInfo:
    """An attack name the config accepts (`attack.attack` / --attack), with the norms, losses and
    (AutoAttack) versions that go with it."""

    name: str
    norms: tuple[str, ...]
    losses: tuple[str, ...]
    summary: str
    versions: tuple[str, ...] = ()


def models() -> list[str]:
    """Backbone names `load_backbone` / --model accept: "demo" and open_clip's architectures
    (plus ``hf-hub:org/repo`` and ``local-dir:PATH``, see BACKBONE_PREFIXES)."""
    from .models.backbone import list_architectures

    return ["demo", *list_architectures()]


def pretrained(model: Optional[str] = None) -> list[tuple[str, str]]:
    """(architecture, tag) pairs --model/--pretrained accept: the demo backbone's own weights and
    the tags open_clip can download, optionally for one architecture ("ViT-B/32" and "ViT-B-32"
    both work); an unknown architecture is a one-line ModelError."""
    import open_clip

    pairs = [("demo", "demo"), *open_clip.list_pretrained()]
    if model is None:
        return pairs
    arch = model.replace("/", "-")
    known = models()
    if arch not in known:
        import difflib

        from .errors import ModelError
        from .messages import quote

        close = difflib.get_close_matches(arch, known, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else " (`robustprompt list models` lists them)"
        raise ModelError(f"--model {quote(model, 80)} is not a known architecture{hint}")
    return [(m, t) for m, t in pairs if m == arch]


def methods() -> list[MethodInfo]:
    """The training methods of the method registry, by name."""
    from .methods import list_methods, method_class

    out = []
    for name in list_methods():
        cls = method_class(name)
        out.append(MethodInfo(name, cls.title or name, bool(cls.adversarial), cls.default_prompt, cls.summary))
    return out


def tta() -> list[TTAInfo]:
    """The test-time procedures of the tta registry, by name."""
    from .tta.procedures import list_procedures, procedure_class

    out = []
    for name in list_procedures():
        cls = procedure_class(name)
        out.append(TTAInfo(name, cls.title or name, bool(cls.tunes_prompt), cls.summary))
    return out


# The folder each ImageNet-family builder reads under the data root (see robustprompt.data).
_IMAGENET_FOLDERS = {"imagenet": "imagenet/", "imagenetv2": "imagenetv2/", "imagenet_sketch": "imagenet-sketch/",
                     "imagenet_a": "imagenet-adversarial/", "imagenet_r": "imagenet-rendition/"}


def datasets() -> list[DatasetInfo]:
    """The dataset registry's names, with what each needs; plus the two path-based forms."""
    from .data.coop import SPLIT_JSON_LAYOUTS
    from .data.registry import FASHION_MNIST, list_datasets

    out = []
    for name in list_datasets():
        if name == FASHION_MNIST:
            out.append(DatasetInfo(name, False, "fashion-mnist/", True,
                                   "found under --root or the system copy; --download fetches it"))
        elif name in SPLIT_JSON_LAYOUTS:
            layout = SPLIT_JSON_LAYOUTS[name]
            out.append(DatasetInfo(name, True, f"{layout.folder}/", False, f"CoOp layout ({layout.split_file})"))
        elif name in _IMAGENET_FOLDERS:
            out.append(DatasetInfo(name, True, _IMAGENET_FOLDERS[name], False, "CoOp layout"))
        else:
            out.append(DatasetInfo(name, True, f"{name}/", False, "CoOp layout"))
    out.append(DatasetInfo("imagefolder:PATH", False, "PATH/<class>/*", False, "your own images, one folder a class"))
    out.append(DatasetInfo("csv:PATH", False, "PATH", False, "your own images listed in a CSV (path, label)"))
    return out


_ATTACK_SUMMARIES = {
    "none": "no attack: clean accuracy only",
    "fgsm": "one signed-gradient step of size eps",
    "pgd": "projected gradient descent: random start, steps of size alpha, restarts",
    "autoattack": "AutoAttack through pyautoattack (its own losses)",
}


def attacks() -> list[AttackInfo]:
    """The attack names `attack.attack` accepts, with the norms and losses it accepts."""
    from .attacks.autoattack import VERSIONS
    from .attacks.losses import ATTACK_LOSSES
    from .attacks.pgd import NORMS
    from .attacks.threat import ATTACKS

    def info(name: str) -> AttackInfo:
        if name == "none":
            return AttackInfo(name, (), (), _ATTACK_SUMMARIES[name])
        return AttackInfo(name, tuple(NORMS), tuple(ATTACK_LOSSES) if name != "autoattack" else (),
                          _ATTACK_SUMMARIES.get(name, ""), tuple(VERSIONS) if name == "autoattack" else ())

    return [info(name) for name in ATTACKS]


LISTS: dict[str, Callable[[], list]] = {"models": models, "pretrained": pretrained, "methods": methods,
                                       "tta": tta, "datasets": datasets, "attacks": attacks}


def format_lines(kind: str, model: Optional[str] = None) -> list[str]:
    """The lines `robustprompt list KIND` prints (one entry a line, name first); `model` filters
    the pretrained list and is refused for the others."""
    if model is not None and kind != "pretrained":
        from .errors import ConfigError

        raise ConfigError(f"--model filters `list pretrained` only, not `list {kind}`")
    if kind == "models":
        return models()
    if kind == "pretrained":
        return [f"{m:32s} {t}" for m, t in pretrained(model)]
    if kind == "methods":
        return [f"{m.name:10s} {'adversarial' if m.adversarial else 'clean':11s} [{m.prompt_text}]  {m.summary}"
                for m in methods()]
    if kind == "tta":
        return [f"{t.name:6s} {t.title:7s} {t.summary}" for t in tta()]
    if kind == "datasets":
        return [f"{d.name:17s} {'needs --root' if d.needs_root else 'no --root needed':16s} "
                f"{d.folder:24s} {'downloadable' if d.download else '':12s} {d.note}".rstrip() for d in datasets()]
    if kind == "attacks":
        def extras(a: AttackInfo) -> str:
            parts = [f"norms: {', '.join(a.norms)}"] if a.norms else []
            parts += [f"losses: {', '.join(a.losses)}"] if a.losses else []
            parts += [f"versions: {', '.join(a.versions)}"] if a.versions else []
            return "; ".join(parts)

        return [f"{a.name:10s} {a.summary}" + (f" ({extras(a)})" if extras(a) else "") for a in attacks()]
    from .errors import ConfigError

    raise ConfigError(f"unknown list {kind!r}; choose one of {', '.join(LISTS)}")


__all__ = ["MethodInfo", "TTAInfo", "DatasetInfo", "AttackInfo", "models", "pretrained", "methods", "tta",
           "datasets", "attacks", "LISTS", "format_lines", "BACKBONE_PREFIXES"]
