"""Answers kept for the length of a pass that changes nothing they depend on: `FixedAnswers`.

Planning and building code ask the same questions of the same objects many times (a module's
tree, the libraries in it, whether a graph can run as the base model alone). A pass that knows
the answers cannot change while it runs enters `FixedAnswers.fixed` and each question is
computed once; outside it, and on other threads, every question is computed again.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, TypeVar

__all__ = ["FixedAnswers"]

T = TypeVar("T")


class FixedAnswers:
    """A per-thread table of answers by the identity of the objects asked about, kept while
    `fixed` is entered on that thread (nested entries share the outermost one's table)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def fixed(self) -> Iterator[None]:
        """Keep this thread's answers until the outermost entry exits."""
        outer = getattr(self._local, "table", None)
        if outer is None:
            self._local.table = {}
        try:
            yield
        finally:
            if outer is None:
                self._local.table = None

    def answer(self, about: tuple[Any, ...], compute: Callable[[], T]) -> T:
        """``compute()``, or inside `fixed` the answer it gave for the same objects `about`
        (compared by identity; the table holds them, so no id is reused meanwhile)."""
        table = getattr(self._local, "table", None)
        if table is None:
            return compute()
        key = tuple(map(id, about))
        known = table.get(key)
        if known is None or any(a is not b for a, b in zip(known[0], about)):
            known = table[key] = (about, compute())
        return known[1]
