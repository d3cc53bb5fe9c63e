"""The pass API: `Pass`, `PassResult`, `PassContext`.

A pass is `run(gm, ctx) -> PassResult`. It matches, checks legality, rewrites
and reports statistics; it never times itself, prints, or checks numerics:
the pass manager's instruments do that around every pass.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx


@dataclass
class PassResult:
    gm: torch.fx.GraphModule
    changed: bool | None = None          # None: the manager infers it from the graph
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may know about the run: device, dtype, inputs, cost model, options."""
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    example_inputs: tuple = ()
    options: dict[str, Any] = field(default_factory=dict)
    sample: Any = None                   # passlab.graphs.Sample when the run has one
    world_size: int = 1
    rank: int = 0
    device_profile: dict | None = None   # the rates cost estimates use (None: the run's own, measured)

    @property
    def cost_model(self):
        from passlab.runtime import costmodel
        return costmodel


@dataclass(frozen=True)
class Option:
    type: type
    default: Any
    help: str = ""


class Pass:
    """Subclass and set `name`, `description`, `options`; implement `run`."""
    name: str = ""
    description: str = ""
    options: dict[str, Option] = {}

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult | torch.fx.GraphModule:
        raise NotImplementedError

    def __call__(self, gm, ctx):
        return self.run(gm, ctx)

    def __repr__(self):
        return f"<pass {self.name}>"


class FunctionPass(Pass):
    """A plain `fn(gm, ctx, *, opt=default, ...)`; keyword-only parameters with
    defaults are its options, typed by their annotation or default."""

    def __init__(self, fn: Callable, name: str, description: str | None = None):
        self.fn, self.name = fn, name
        doc = (description or inspect.getdoc(fn) or "").strip()
        self.description = doc.splitlines()[0] if doc else ""
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


def as_result(out, gm_in: torch.fx.GraphModule) -> PassResult:
    if isinstance(out, PassResult):
        return out
    if isinstance(out, torch.fx.GraphModule):
        return PassResult(out)
    if out is None:  # in-place passes
        return PassResult(gm_in)
    raise TypeError(f"a pass must return a GraphModule or a PassResult, got {type(out).__name__}")
