"""One small registry for adapters, samplers, rewards and trainers.

Entries are either objects or *lazy* references ``"module.path:attr"`` so that listing what exists never
imports torch-heavy modules (open_clip style: ``list_models()`` is cheap, ``create_model`` does the work).
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate registry name. ``str()`` gives a readable message (KeyError would quote it)."""

    def __str__(self) -> str:  # KeyError.__str__ repr()s its argument; we want the plain message.
        return str(self.args[0]) if self.args else ""


@dataclass
class _Entry:
    target: Any  # an object, or "module:attr" to import on first use
    description: str = ""


@dataclass
class Registry(Generic[T]):
    """A named table of factories. ``kind`` is what the entries are ("reward", "model adapter", ...)."""

    kind: str
    _entries: dict[str, _Entry] = field(default_factory=dict)

    def register(self, name: str, target: Any = None, *, description: str = "") -> Any:
        """Register ``target`` under ``name``; usable as a decorator when ``target`` is omitted.

        ``target`` may be a ``"module.path:attr"`` string, imported lazily by :meth:`get`.
        Registering a name twice raises :class:`RegistryError`.
        """
        if not isinstance(name, str) or not name or name != name.strip():
            raise RegistryError(f"{self.kind} name must be a non-empty string without spaces at the ends, got {name!r}")

        def _add(obj: Any) -> Any:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = _Entry(obj, description)
            return obj

        return _add if target is None else _add(target)

    def get(self, name: str) -> T:
        """The registered object for ``name`` (importing it if it was registered lazily)."""
        try:
            entry = self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self.names(), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names()) or 'none'})"
            ) from None
        if isinstance(entry.target, str):
            module_name, _, attr = entry.target.partition(":")
            entry.target = getattr(importlib.import_module(module_name), attr)
        return entry.target

    def names(self) -> list[str]:
        """Sorted names of every entry."""
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        """``{name: one-line description}`` for listings."""
        return {n: self._entries[n].description for n in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


MODELS: Registry[Callable[..., Any]] = Registry("model adapter")
SAMPLERS: Registry[Callable[..., Any]] = Registry("sampler")
REWARDS: Registry[Callable[..., Any]] = Registry("reward")
TRAINERS: Registry[Callable[..., Any]] = Registry("trainer")
