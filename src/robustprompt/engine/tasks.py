"""From a DataSpec to the images a run works on: dataset, class subset, split and indices."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from ..config import DataSpec, ModelSpec
from ..data import base_new_split, build_dataset, clip_transform
from ..data.base import Dataset, Split


@dataclass
class Task:
    dataset: Dataset
    split: Split
    indices: list[int]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def transform(self, image_size: int, train: bool = False) -> Callable:
        return clip_transform(image_size, self.interpolation, train=train, resize_mode=self.resize_mode)


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
