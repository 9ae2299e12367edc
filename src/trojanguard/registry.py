"""Name -> factory registries (timm's ``create_model`` style) for datasets, models,
attacks and defenses, so every component is reachable from config, CLI and Python."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = ""):
        key = name.lower()  # looked up case-insensitively (get, in): stored the same way

        def deco(fn):
            old = self._items.get(key)
            # a reloaded plugin module registers its own class again: replace it
            same = old is not None and getattr(old, "__qualname__", None) == getattr(fn, "__qualname__", 0) \
                and getattr(old, "__module__", None) == getattr(fn, "__module__", 0)
            if old is not None and not same:
                raise UserError(f"{self.kind} {name!r} is registered already (by {getattr(old, '__module__', '?')}); "
                                "pick another name")
            self._items[key] = fn
            self._help[key] = help or (fn.__doc__ or "").strip().split("\n")[0]
            return fn
        return deco

    def get(self, name: str) -> Callable[..., T]:
        key = name.lower()
        if key not in self._items:
            close = difflib.get_close_matches(key, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown {self.kind} {name!r}{hint}; choose one of: "
                            f"{', '.join(sorted(self._items))}")
        return self._items[key]

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        return {n: self._help[n] for n in self.names()}

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items
