"""One registry shape for every plug-in family (attention backends, KV transfer backends,
routing policies).

A family is a ``Registry`` of named entries; each entry is a loader that imports and
returns the plug-in class on first use, so asking for one plug-in never imports the others
(the CUDA transfer backend and FlashInfer stay unimported on a CPU host; a routing policy
that needs a latency profile is not loaded unless chosen). An unknown name is a
``ValueError`` that lists the choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str, entries: dict[str, Callable[[], T]] | None = None):
        self.family = family
        self._entries: dict[str, Callable[[], T]] = dict(entries or {})

    def register(self, name: str, loader: Callable[[], T]) -> None:
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is already registered")
        self._entries[name] = loader

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def get(self, name: str) -> T:
        """The plug-in registered as ``name`` (imported now if it was not yet)."""
        loader = self._entries.get(name)
        if loader is None:
            raise ValueError(f"unknown {self.family} {name!r}; choose from "
                             f"{', '.join(self._entries)}")
        return loader()
