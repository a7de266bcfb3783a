"""Core dataset types: a Split (ids, labels, image loader), a Dataset, and a torch wrapper."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import functional as TF

from robustprompt.errors import DatasetError

SPLIT_NAMES = ("train", "val", "test")


class _SubsetLoader:
    """Loader of a subset: maps a subset index to the parent's index (picklable)."""

    def __init__(self, parent: Callable[[int], Image.Image], indices: Sequence[int]) -> None:
        self.parent = parent
        self.indices = list(indices)

    def __call__(self, index: int) -> Image.Image:
        return self.parent(self.indices[index])


@dataclass
class Split:
    """One split: stable per-image ids, integer labels, and a loader index -> RGB PIL image."""

    ids: list[str]
    labels: list[int]
    load: Callable[[int], Image.Image]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.labels):
            raise ValueError(f"Split has {len(self.ids)} ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> "Split":
        """The images at ``indices`` (in that order), with ids, labels and loader kept in step."""
        indices = [int(i) for i in indices]
        n = len(self)
        for i in indices:
            if not 0 <= i < n:
                raise IndexError(f"subset index {i} out of range for a split of {n} images")
        return Split(
            ids=[self.ids[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            load=_SubsetLoader(self.load, indices),
        )


class LazySplits(Mapping):
    """``{split name: Split}`` whose splits are built on first access and kept: an eval-only run
    of ImageNet never lists its 1.28 M training files. Iterating the names builds nothing."""

    def __init__(self, builders: dict[str, Callable[[], Split]]) -> None:
        self._builders = dict(builders)
        self._built: dict[str, Split] = {}

    def __getitem__(self, name: str) -> Split:
        if name not in self._built:
            self._built[name] = self._builders[name]()   # KeyError for an unknown split, as a dict
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


@dataclass
class Dataset:
    """A named set of splits sharing one class list and one set of prompt templates."""

    name: str
    classnames: list[str]
    splits: Mapping[str, Split]   # a dict, or LazySplits
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> Split:
        """The split called ``name``; DatasetError listing the available ones if absent."""
        try:
            return self.splits[name]
        except KeyError:
            available = ", ".join(sorted(self.splits)) or "none"
            raise DatasetError(
                f"dataset {self.name!r} has no {name!r} split (available: {available})"
            ) from None


class ImageDataset(TorchDataset):
    """Torch view of a Split: item i -> (image tensor 3 x H x W float in [0, 1], label, i)."""

    def __init__(
        self, split: Split, transform: Callable[[Image.Image], torch.Tensor] | None = None
    ) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.split.load(index)
        tensor = self.transform(image) if self.transform is not None else TF.to_tensor(image)
        return tensor, int(self.split.labels[index]), int(index)
