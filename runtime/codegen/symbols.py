"""A kernel's exported name and its whole source, the same way for every printer."""
from __future__ import annotations

import hashlib
from typing import Callable


def kernel_symbol(body: Callable, fk) -> str:
    """A kernel's exported name: a hash of the body a printer makes for it, so
    the name, the cache key and the source agree for every printer."""
    return "pl_" + hashlib.sha256(body(fk, "KERNEL").encode()).hexdigest()[:16]


def naming(body: Callable) -> tuple[Callable, Callable]:
    """A printer's `symbol(fk)` and `render(fk)` from its `body(fk, name)`."""
    def symbol(fk) -> str:
        return kernel_symbol(body, fk)

    def render(fk) -> str:
        return body(fk, symbol(fk))
    return symbol, render
