"""From a DataSpec to the images a run works on: dataset, class subset, split and indices."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..config import DataSpec, ModelSpec
from ..data import base_new_split, build_dataset
from ..data.base import Dataset, Split
from ..data.transforms import Preprocess


@dataclass
class Task:
    """The images of a run. resize_mode: "auto" (the backbone's own) or a mode that forces it;
    interpolation: None (the backbone's own) or one that forces it."""

    dataset: Dataset
    split: Split
    indices: list[int]
    interpolation: Optional[str] = None
    resize_mode: str = "auto"

    def preprocess(self, model: Any) -> Preprocess:
        """The preprocessing this task applies for `model` (a classifier, a Backbone, a
        Preprocess, or a bare image size: bicubic shortest-side): the model's own, with this
        task's resize_mode / interpolation laid over it."""
        return preprocess_of(model).forced(self.resize_mode, self.interpolation)

    def transform(self, model: Any, train: bool = False) -> Callable:
        """PIL image → 3×S×S tensor in [0, 1] for `model` (see `preprocess`)."""
        return self.preprocess(model).transform(train=train)


def preprocess_of(model: Any) -> Preprocess:
    """A model's own preprocessing: a Preprocess as is; a Backbone's `.preprocess`; a
    PromptedClassifier's from the backbone description it keeps; an int: that image size with
    the defaults (bicubic, shortest side + centre crop)."""
    if isinstance(model, Preprocess):
        return model
    if isinstance(model, int) and not isinstance(model, bool):
        return Preprocess(model)
    if isinstance(getattr(model, "preprocess", None), Preprocess):
        return model.preprocess
    info = getattr(model, "backbone_info", None)
    if isinstance(info, dict) and isinstance(info.get("preprocess"), dict):
        return Preprocess.from_dict(info["preprocess"])
    if isinstance(getattr(model, "image_size", None), int):
        return Preprocess(model.image_size)
    raise TypeError(f"no image preprocessing known for a {type(model).__name__}")


def load_task(spec: DataSpec) -> Task:
    dataset = build_dataset(spec.dataset, spec.root, download=spec.download)
    if spec.classes != "all":
        dataset = base_new_split(dataset, spec.classes)
    split = dataset.split(spec.split)
    return Task(dataset, split, subset_indices(len(split), spec.subset, spec.subset_seed),
                resize_mode=spec.resize_mode)


def subset_indices(n: int, subset: int | None, seed: int) -> list[int]:
    """A fixed random subset (sorted) of range(n); indices stay those of the full split, so a
    record names the same image whatever subset it came from."""
    if subset is None or subset >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), subset))


def method_of(model: ModelSpec) -> dict:
    """The method and shots a result row reports: from the training run if prompts were loaded."""
    if model.run:
        from pathlib import Path

        from ..config import load_yaml
        from ..errors import ConfigError

        cfg_file = Path(model.run) / "config.yaml"
        cfg = load_yaml(cfg_file)   # ConfigError if missing, not YAML or not a mapping
        if not cfg:
            raise ConfigError(f"{cfg_file} is empty: it is not the config of a `robustprompt train` run")
        method, data = cfg.get("method") or {}, cfg.get("data") or {}
        for key, value in (("method", method), ("data", data)):
            if not isinstance(value, dict):
                raise ConfigError(f"{cfg_file}: {key} must be a mapping, got a {type(value).__name__}")
        return {"method": method.get("name", "unknown"), "shots": data.get("shots"),
                "train_run": str(model.run), "train_seed": cfg.get("seed")}
    coupling = model.prompt.coupling if model.prompt else "none"
    return {"method": "zeroshot" if coupling == "none" else f"untrained-{coupling}",
            "shots": None}
