"""The pass registry: built-in passes, third-party plugins, pipeline aliases.

Built-in passes register themselves when their module in `passes/` is
imported (every module there is); plugins register through the entry-point
group `passlab.passes`. The registry is the one piece of global state.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
import warnings

from .api import FunctionPass, Pass

_PASSES: dict[str, Pass] = {}
ALIASES: dict[str, list[str]] = {"cleanup": ["dce", "cse", "remove_noops", "fold_constants"]}
_loaded = False
LOAD_ERRORS: dict[str, str] = {}   # module or "plugin NAME" -> why it did not load


class UnknownPassError(ValueError):
    """A pipeline names a pass nobody registered."""


def register_pass(name_or_obj=None, *, description: str | None = None, replace: bool = True,
                  keeps_meta: bool = False):
    """Register a pass: `@register_pass("name")` on a function `(gm, ctx)` or a
    `Pass` subclass, or `register_pass(pass_instance)`. `keeps_meta=True`: the
    pass keeps `meta["val"]` right itself (see `Pass.keeps_meta`)."""
    def add(obj, name):
        if isinstance(obj, type) and issubclass(obj, Pass):
            p = obj()
            p.name = name or p.name
        elif isinstance(obj, Pass):
            p = obj
            p.name = name or p.name
        elif callable(obj):
            p = FunctionPass(obj, name or obj.__name__, description, keeps_meta=keeps_meta)
        else:
            raise TypeError(f"cannot register {obj!r} as a pass")
        if not p.name:
            raise ValueError("a pass needs a name")
        p.keeps_meta = p.keeps_meta or keeps_meta
        if p.name in _PASSES and not replace:
            raise ValueError(f"pass {p.name!r} is already registered")
        _PASSES[p.name] = p
        return obj

    if isinstance(name_or_obj, str) or name_or_obj is None:
        return lambda obj: add(obj, name_or_obj)
    return add(name_or_obj, None)


def unregister_pass(name: str) -> None:
    _PASSES.pop(name, None)


# modules of passes/ that register no pass: passes/inductor.py runs passlab's pipeline inside Inductor and
# imports torch._inductor (about 1 s), which `passlab.optimize` and `passlab run` must not pay for
NOT_PASS_MODULES = frozenset({"passlab.passes.inductor"})


def load_builtin_and_plugins() -> None:
    """Import every module of passes/ that registers passes (so built-ins register) and every plugin."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import passlab.passes as pkg
    failed = lambda name: LOAD_ERRORS.setdefault(name, "import failed")
    for info in pkgutil.walk_packages(pkg.__path__, prefix="passlab.passes.", onerror=failed):
        if info.name in NOT_PASS_MODULES:
            continue
        try:
            importlib.import_module(info.name)
        except Exception as e:  # one broken pass module must not take the others down; tests check LOAD_ERRORS
            LOAD_ERRORS[info.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"passlab pass module {info.name} failed to import: {type(e).__name__}: {e}; "
                          f"its passes are not registered (a default pipeline without them is listed in the "
                          f"run record as missing_default_passes)", stacklevel=2)
    for ep in importlib.metadata.entry_points(group="passlab.passes"):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break passlab
            LOAD_ERRORS[f"plugin {ep.name}"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"passlab plugin {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)
            continue
        if not (isinstance(obj, Pass) and obj.name in _PASSES and _PASSES[obj.name] is obj):
            already = any(getattr(p, "fn", None) is obj or p is obj or type(p) is obj for p in _PASSES.values())
            if not already:  # a Pass keeps its own name; a plain function takes the entry point's
                register_pass(getattr(obj, "name", None) or ep.name)(obj)


def get_pass(name: str) -> Pass:
    load_builtin_and_plugins()
    if name in ALIASES and name not in _PASSES:
        raise UnknownPassError(f"{name!r} is a pipeline alias for {','.join(ALIASES[name])}, not one pass: "
                               f"use it in a pipeline string (parse({name!r}), --pipeline {name}) "
                               f"or get_pass() each of its passes")
    if name not in _PASSES:
        known = sorted(list(_PASSES) + list(ALIASES))
        close = difflib.get_close_matches(name, [k for k in known if k != name], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownPassError(f"unknown pass {name!r}{hint} (known: {', '.join(known)})")
    return _PASSES[name]


def list_passes() -> dict[str, str]:
    load_builtin_and_plugins()
    out = {n: p.description for n, p in sorted(_PASSES.items())}
    for a, members in ALIASES.items():
        out.setdefault(a, "alias: " + ",".join(members))
    return out
