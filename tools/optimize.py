"""The two doors into passlab for users.

`passlab.optimize(model, example_inputs, pipeline=..., device=...)` returns a
callable with the model's signature whose `.record` holds the per-pass record;
`torch.compile(model, backend="passlab")` reaches `dynamo_backend` through
torch's `torch_dynamo_backends` entry-point group.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.utils._pytree as pytree

from passlab.graphs import Sample, capture
from passlab.passes import parse
from passlab.passes.pipeline import available_default
from passlab.runtime.executor import compile_graph

from . import record as records
from .runner import context, make_manager


class Optimized:
    """The optimized model: call it like the original."""

    def __init__(self, fn, gm, result, record):
        self.fn, self.gm, self.result, self.record = fn, gm, result, record
        self.out_spec = gm.meta.get("out_spec")

    def __call__(self, *args, **kwargs):
        flat = pytree.tree_leaves((args, kwargs))
        out = self.fn(*flat)
        if self.out_spec is not None and not self.out_spec.is_leaf():
            return pytree.tree_unflatten(list(out), self.out_spec)
        return out


def optimize(model: torch.nn.Module, example_inputs, pipeline=None, device: str = "cpu", *,
             strict: bool = False, tolerance: float | None = None, check_numerics: bool = True) -> Optimized:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    floats = [t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
    sample = Sample(type(model).__name__, model, inputs, dtype=floats[0] if floats else torch.float32,
                    device=device, preset="user")
    pipeline = available_default() if pipeline is None else pipeline
    steps = parse(pipeline)
    gm = capture(model, inputs)
    result = make_manager(steps, sample, device, strict=strict, tolerance=tolerance,
                          check_numerics=check_numerics).run(gm, context(sample, device))
    rec = records.build(model=sample.name, preset="user", device=device, pipeline=[str(s) for s in steps],
                        baseline=result.baseline, steps=result.steps)
    return Optimized(compile_graph(result.gm, device), result.gm, result, rec)


def dynamo_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """torch.compile backend: export dynamo's graph to core aten, run the
    pipeline (env PASSLAB_PIPELINE, default the built-in one), compile it.

    Inference only: with autograd recording it falls back to dynamo's graph."""
    needs_grad = torch.is_grad_enabled() and (
        any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
        or any(p.requires_grad for p in gm.parameters()))
    if needs_grad:
        warnings.warn("passlab backend: autograd is recording; running the graph unoptimized "
                      "(use torch.no_grad() for inference)")
        return gm.forward
    device = next((x.device.type for x in example_inputs if isinstance(x, torch.Tensor)), "cpu")
    opt = optimize(gm, list(example_inputs), pipeline=os.environ.get("PASSLAB_PIPELINE"), device=device,
                   check_numerics=False)
    dynamo_backend.last = opt

    def run(*args):
        out = opt(*args)
        return out if isinstance(out, (tuple, list)) else (out,)
    return run
