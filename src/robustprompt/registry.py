"""A name → class registry (timm-style) for plug-ins: training methods and test-time procedures."""
from __future__ import annotations

from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound=type)


def _key(name: str) -> str:
    """Names match ignoring case, '-' and '_': cba_fapt = CBA-FAPT = cbafapt."""
    return name.lower().replace("-", "").replace("_", "")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: the class's `name` attribute is its key."""
        name = getattr(cls, "name", "")
        if not name or _key(name) in {_key(n) for n in self._classes}:
            raise ValueError(f"{self.kind} name {name!r} missing or taken")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> T:
        for registered, cls in self._classes.items():
            if _key(registered) == _key(name):
                return cls
        raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
