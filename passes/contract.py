"""The pass contract, as a check anyone can run on any pass.

What every pass owes the pipeline, whatever it rewrites: it returns a graph
that lints, every value-producing node keeps `meta["val"]`, the parameters it
was given are unchanged (passes make new attributes, never edit weights in
place), its statistics are a plain dict, and the graph computes what the eager
model computes on fresh random inputs. A pass that does not apply to a model
must still pass: it returns the graph it got.

The check applies the pass as the pass manager does (`pass_(gm, ctx)`: the
pass, then its end, `api.finish`) and judges it with the manager's own
instruments. The contract tests run `check` for every registered pass on
every sample; a new pass's own test (see `passlab new-pass`) calls it too.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from passlab.graphs import capture, clone, load, parse_dtype

from .api import Pass, PassContext, PassResult
from .manager import TOLERANCE, CheckNumerics, PassRejected, StepRecord, VerifyGraph
from .pipeline import parse
from .registry import get_pass


class ContractViolation(AssertionError):
    """A pass broke the pass contract; the message says which clause and how."""


@dataclass
class ContractReport:
    pass_name: str
    model: str
    result: PassResult
    max_error: float


@functools.lru_cache(maxsize=16)
def captured(model: str, preset: str = "tiny", dtype: torch.dtype | None = None):
    """(Sample, GraphModule) for a model, captured once per process; clone the graph before changing it.
    `dtype` None: the preset's dtype (tiny: fp32)."""
    sample = load(model, preset, dtype=dtype)
    return sample, capture(sample.module, sample.example_inputs)


@functools.lru_cache(maxsize=16)
def prepared(model: str, after: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """(Sample, GraphModule) of a model after the pipeline `after` (unchecked), cached."""
    sample, gm = captured(model, "tiny", dtype)
    gm = clone(gm)
    ctx = PassContext(device=device, dtype=sample.dtype, example_inputs=sample.example_inputs, sample=sample)
    with torch.no_grad():
        for step in parse(after):
            gm = step.pass_(gm, replace(ctx, options=dict(step.options))).gm
    return sample, gm


def check(pass_: str | Pass, model: str, *, options: dict | None = None, after: str | None = None,
          seed: int = 1234, tolerance: float | None = None, device: str = "cpu",
          dtype: torch.dtype | str | None = None) -> ContractReport:
    """Run one pass on a captured tiny model and check every clause of the contract.

    `after` is a pipeline run first (unchecked), to test the pass on the graphs
    it meets in practice, e.g. after="cleanup". `dtype` ("bf16", torch.bfloat16,
    ...) builds the model in that dtype (default: the tiny preset's fp32); the
    tolerance follows it. The graph and numerics clauses are the pass manager's
    own instruments (`VerifyGraph`, `CheckNumerics`). Raises ContractViolation
    naming the clause broken; returns the report otherwise.
    """
    p = get_pass(pass_) if isinstance(pass_, str) else pass_
    dtype = parse_dtype(dtype) if dtype is not None else None
    sample, gm = prepared(model, after or "", device, dtype)
    gm = clone(gm)
    ctx = PassContext(device=device, dtype=sample.dtype, example_inputs=sample.example_inputs,
                      sample=sample, options=dict(options or {}))
    weights = {k: (v, v.detach().clone()) for k, v in list(gm.named_parameters()) + list(gm.named_buffers())}
    where = f"pass {p.name!r} on {model}" + (f" in {str(dtype).replace('torch.', '')}" if dtype else "") \
        + (f" after {after}" if after else "")
    with torch.no_grad():
        try:
            res = p(gm, ctx)
        except Exception as e:
            raise ContractViolation(f"{where} raised {type(e).__name__}: {e}") from e
    if not isinstance(res.stats, dict):
        raise ContractViolation(f"{where}: stats must be a dict, got {type(res.stats).__name__}")
    record = StepRecord(p.name)
    try:
        VerifyGraph().after_pass(None, res.gm, ctx, record)
    except Exception as e:
        raise ContractViolation(f"{where} returned a graph the verifier rejects: {type(e).__name__}: {e}") from e
    for k, (now, before) in weights.items():
        if not torch.equal(now, before):
            captured.cache_clear()     # the cached model is spoiled for the checks after this one
            prepared.cache_clear()
            raise ContractViolation(f"{where} changed weight {k!r} in place; register a new attribute instead")
    tol = tolerance if tolerance is not None else TOLERANCE.get(sample.dtype, 1e-4)
    try:
        CheckNumerics(sample.module, sample.make_inputs, device, tol, seed=seed).after_pass(None, res.gm, ctx, record)
    except PassRejected as e:
        raise ContractViolation(f"{where}: {e} on fresh inputs (seed {seed})") from e
    except Exception as e:
        raise ContractViolation(f"{where}: the rewritten graph does not run: {type(e).__name__}: {e}") from e
    return ContractReport(p.name, model, res, record.max_error)
