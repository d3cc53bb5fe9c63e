"""The pass API: `Pass`, `PassResult`, `PassContext`.

A pass is `run(gm, ctx) -> PassResult`. It matches, checks legality, rewrites
and reports statistics; it does not time itself, print, or check numerics:
the pass manager's instruments do that around every pass. A rewrite whose
gain depends on the machine asks the measured-choice service
(`passlab.runtime.autotune.fastest`: timed once per shape, cached) which form
is faster (`fuse_attention`, `merge_projections`, `decode_attention`,
`decode_gemm`; `choose=always` skips it); the overlap passes measure the link
they plan for.

Calling a pass applies it: `pass_(gm, ctx)` runs `run` and then the end every
pass shares (`finish`: lint, recompile, and where the graph changed, recompute
every node's `meta["val"]`), so a pass body ends with its rewrite. The pass
manager, the contract check and the tools all call passes this way.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from .meta import propagate


@dataclass
class PassResult:
    gm: torch.fx.GraphModule
    changed: bool | None = None          # None: the manager infers it from the graph
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may know about the run: device, dtype, inputs, options, the device profile."""
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    example_inputs: tuple = ()
    options: dict[str, Any] = field(default_factory=dict)
    sample: Any = None                   # passlab.graphs.Sample when the run has one
    world_size: int = 1
    rank: int = 0
    device_profile: dict | None = None   # the rates cost estimates use (None: the run's own, measured)


@dataclass(frozen=True)
class Option:
    type: type
    default: Any
    help: str = ""


class Pass:
    """Subclass and set `name`, `description`, `options`; implement `run`.

    `keeps_meta`: the pass keeps every node's `meta["val"]` right itself (it
    only removes, merges or reorders nodes), so `finish` does not recompute it."""
    name: str = ""
    description: str = ""
    options: dict[str, Option] = {}
    keeps_meta: bool = False

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult | torch.fx.GraphModule:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        """Apply the pass: `run`, then `finish`."""
        before = str(gm.graph)
        return finish(as_result(self.run(gm, ctx), gm), before, keeps_meta=self.keeps_meta)

    def __repr__(self):
        return f"<pass {self.name}>"


class FunctionPass(Pass):
    """A plain `fn(gm, ctx, *, opt=default, ...)`; keyword-only parameters with
    defaults are its options, typed by their annotation or default."""

    def __init__(self, fn: Callable, name: str, description: str | None = None, *, keeps_meta: bool = False):
        self.fn, self.name, self.keeps_meta = fn, name, keeps_meta
        self.description = summary(description or inspect.getdoc(fn))
        self.options = {}
        try:  # annotations are strings under `from __future__ import annotations`
            hints = typing.get_type_hints(fn)
        except Exception:
            hints = {}
        for p in list(inspect.signature(fn).parameters.values())[2:]:
            if p.default is inspect.Parameter.empty:
                continue
            self.options[p.name] = Option(option_type(hints.get(p.name, p.annotation), p.default), p.default)

    def run(self, gm, ctx):
        kwargs = {k: v for k, v in ctx.options.items() if k in self.options}
        return self.fn(gm, ctx, **kwargs)


def option_type(annotation, default) -> type:
    """The type a pipeline string converts an option to: the annotation, the
    non-None member of `X | None`, else the default's type (str for None)."""
    if isinstance(annotation, type) and annotation not in (type(None), inspect.Parameter.empty):
        return annotation
    members = [a for a in typing.get_args(annotation) if isinstance(a, type) and a is not type(None)]
    if members:
        return members[0]
    return str if default is None else type(default)


def summary(doc: str | None) -> str:
    """A docstring's first paragraph, its lines joined: the description `passlab list passes` shows."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def finish(res: PassResult, before: str, *, keeps_meta: bool = False) -> PassResult:
    """The end of every pass: where the graph changed (`res.changed`, else compared with
    `before`, the graph's text when the pass began), lint it and recompute every node's
    `meta["val"]` (unless the pass `keeps_meta`); always regenerate its code."""
    gm = res.gm
    if res.changed is None:
        res.changed = str(gm.graph) != before
    if res.changed:
        gm.graph.lint()
    gm.recompile()
    if res.changed and not keeps_meta:
        propagate(gm)
    return res


def as_result(out, gm_in: torch.fx.GraphModule) -> PassResult:
    if isinstance(out, PassResult):
        return out
    if isinstance(out, torch.fx.GraphModule):
        return PassResult(out)
    if out is None:  # in-place passes
        return PassResult(gm_in)
    raise TypeError(f"a pass must return a GraphModule or a PassResult, got {type(out).__name__}")
