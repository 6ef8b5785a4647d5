"""``KernelCache``: built kernels / launch configurations of one backend, keyed by problem shape."""

from __future__ import annotations

from collections.abc import Callable, Hashable


class KernelCache:
    """Per-backend cache of built kernels / launch configurations keyed by problem shape."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._entries: dict[Hashable, object] = {}

    def lookup(self, key: Hashable) -> object | None:
        return self._entries.get(key)

    def get(self, key: Hashable, build: Callable[[], object]) -> object:
        value = self._entries.get(key)
        if value is None:
            value = self._entries[key] = build()
        return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()
