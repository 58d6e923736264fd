"""One way to look a name up: every registry of medssl is a :class:`Registry`.

Methods, backbones, optimisers, task types, protocols, checkpoint formats,
statistical tests...: each is a table from a name in the config to the thing
that implements it. A wrong name must fail the same way everywhere, with the
names that exist and the closest one (a typo is the usual cause), so every
table is built on this class and every miss raises :class:`UnknownNameError`.
MONAI's ``look_up_option`` is the model for the message.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that no registry entry has.

    A ``KeyError`` (it is a failed look-up) and a ``ValueError`` (it is a bad
    setting), so callers that catch either keep working; ``str()`` is the plain
    message, not ``KeyError``'s quoted repr.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_name_message(kind: str, name: object, known: Iterable[str]) -> str:
    """``unknown optimizer 'lasr'; did you mean 'lars'? known: adamw, lamb, lars, sgd``."""
    known = sorted(known)
    message = f"unknown {kind} {name!r}"
    if isinstance(name, str):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {close[0]!r}?"
    return f"{message}; known: {', '.join(known) if known else '(none)'}"


def look_up(kind: str, name: object, options: Mapping[str, T] | Iterable[str]) -> T | str:
    """``options[name]`` for a mapping, ``name`` itself for a set of names; a miss raises."""
    if isinstance(options, Mapping):
        if isinstance(name, str) and name in options:
            return options[name]
        raise UnknownNameError(unknown_name_message(kind, name, options))
    names = list(options)
    if isinstance(name, str) and name in names:
        return name
    raise UnknownNameError(unknown_name_message(kind, name, names))


class Registry(Mapping[str, T], Generic[T]):
    """A named table of implementations, filled by :meth:`register` or :meth:`add`.

    It is a read-only ``Mapping`` (``name in registry``, ``sorted(registry)``),
    whose ``[name]`` raises :class:`UnknownNameError` with the known names.
    """

    def __init__(self, kind: str, entries: Mapping[str, T] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        for name, value in (entries or {}).items():
            self.add(name, value)

    def add(self, name: str, value: T) -> T:
        """Register ``value`` under ``name``; a second entry of one name is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = value
        return value

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@REGISTRY.register("name")``."""

        def decorate(value: T) -> T:
            return self.add(name, value)

        return decorate

    def names(self) -> list[str]:
        """The registered names, sorted (for ``--help`` choices and messages)."""
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(unknown_name_message(self.kind, name, self._entries)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
