"""The pass manager: runs a pipeline, with instruments around every pass.

Each pass gets a clone of the graph (parameters shared), so a pass that raises,
breaks the graph or changes numerics is rolled back to the graph before it,
reported, and the pipeline goes on (or stops, under `strict`). Instruments —
graph verifier, numerics check, statistics, snapshot — run after every pass;
the passes themselves know nothing of them.
"""
from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from passlab.graphs import check_metadata, clone, fetch_attr, fresh_copies
from passlab.runtime import costmodel
from passlab.runtime.executor import compile_graph

from .api import PassContext
from .pipeline import Step, parse
from .routing import PinRouting, RecordRouting

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-2}


class PassRejected(RuntimeError):
    """An instrument refused the graph a pass produced."""


class PipelineFailed(RuntimeError):
    """A pass failed under strict mode; `records` holds everything measured so far."""

    def __init__(self, msg, records):
        super().__init__(msg)
        self.records = records


class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C during a pipeline; `records` holds (baseline, the steps done so far)."""

    def __init__(self, records):
        super().__init__()
        self.records = records


@dataclass
class StepRecord:
    name: str
    options: dict = field(default_factory=dict)
    status: str = "ok"                  # ok | rolled_back | failed
    changed: bool = False
    error: str | None = None
    nodes: int = 0
    launches: int = 0
    bytes: int = 0
    flops: int = 0
    max_error: float | None = None
    numerics_ok: bool | None = None
    pass_seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    snapshot: torch.fx.GraphModule | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        # not dataclasses.asdict: it deep-copies every field first, the snapshot
        # GraphModule (weights included) too
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "snapshot"}
        d["pass"] = d.pop("name")
        return d


# ---------------------------------------------------------------- instruments

def output_tensors(x) -> list[torch.Tensor]:
    """The tensors of any output pytree (tuples, dicts, HF ModelOutput, None), in order."""
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def relative_error(out, ref) -> float:
    """max |out - ref| / max |ref| over all outputs; exact match for non-floats.
    `out` and `ref` may be any pytrees: a graph's flat outputs compare with a
    model's ModelOutput / dict / nested tuple leaf by leaf."""
    outs, refs = output_tensors(out), output_tensors(ref)
    if len(outs) != len(refs):
        return float("inf")
    worst = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            return float("inf")
        if not r.dtype.is_floating_point:
            worst = max(worst, float((o != r).float().mean()) if r.numel() else 0.0)
            continue
        o, r = o.detach().float(), r.detach().float()
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))   # infinities and NaNs that agree
        diff = torch.where(same, torch.zeros_like(o), (o - r).abs())
        if torch.isnan(diff).any():
            return float("inf")
        finite = r[torch.isfinite(r)]
        scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-6)
        worst = max(worst, float(diff.max()) / scale if diff.numel() else 0.0)
    return worst


class VerifyGraph:
    """graph.lint() plus the metadata check: every value-producing node keeps meta['val']."""

    def after_pass(self, step, gm, ctx, record):
        gm.graph.lint()
        missing = check_metadata(gm)
        if missing:
            raise PassRejected(f"nodes lost meta['val']: {', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''} (a pass that makes nodes must not declare keeps_meta, "
                               "nor return changed=False: then the framework recomputes meta['val'])")


class CheckNumerics:
    """Runs the graph on fresh random inputs and compares with the eager reference.

    `make_inputs(seed)` gives the graph's flat inputs; `reference(*flat)` is the
    model called on them (`Sample.reference`, which re-nests them into the
    model's own args and kwargs). Where the graph writes inputs in place
    (`mutated`: flat positions, e.g. a KV cache, a step counter, lifted
    buffers), every run, the reference's too, gets its own copies of those, so
    no run sees another's writes, and the values written are compared too.
    MoE routing (`topk`) is pinned to the reference's choice where the
    candidate's own choice is a near tie (`passes/routing.py`); the rows
    pinned are counted in the step's stats (`routing_pinned`). Where the
    model itself raises on the random inputs (a divisor drawn as 0), the
    check runs on `fallback()` (copies of the example's values) instead and
    says so in `inputs_from`."""

    def __init__(self, reference: Callable, make_inputs: Callable[[int], tuple], device: str,
                 tolerance: float, seed: int = 1234, mutated: tuple | list = (),
                 fallback: Callable[[], tuple] | None = None):
        self.device, self.tolerance, self.mutated = device, tolerance, tuple(mutated)
        self.known: dict = {}
        self.inputs, self.inputs_from = make_inputs(seed), "fresh random inputs"
        try:
            self.expect(reference)
        except Exception as e:   # the model refuses them (an integer divisor drawn as 0): `fallback`'s values
            if fallback is None:
                raise
            self.inputs = fallback()
            self.inputs_from = (f"the example's values (the model raised {type(e).__name__} on fresh random "
                                f"inputs: {str(e).splitlines()[0] if str(e) else ''})")
            self.expect(reference)

    def expect(self, reference: Callable) -> None:
        """The reference's outcome on `self.inputs`, its routing decisions recorded."""
        self.routing = RecordRouting()
        with torch.no_grad(), self.routing:
            self.expected = self.outcome(reference)

    def outcome(self, fn: Callable):
        """fn's outputs and, where it writes inputs, their values afterwards."""
        if not self.mutated:
            return fn(*self.inputs)
        inputs = fresh_copies(self.inputs, self.mutated)
        return fn(*inputs), [inputs[i] for i in self.mutated]

    def error(self, gm) -> float:
        # a pass that changed nothing leaves the same code over the same weights and kernels: same
        # error, no rerun (the key holds those objects, so no id is reused while it lives)
        key = (gm.code, tuple(fetch_attr(gm, n.target) if n.op == "get_attr" else n.target
                              for n in gm.graph.nodes if n.op in ("get_attr", "call_function")))
        if key not in self.known:
            fn = compile_graph(gm, self.device)
            pin = PinRouting(self.routing.decisions, self.tolerance)
            with torch.no_grad(), pin:
                out = self.outcome(fn)
            self.known[key] = (relative_error(out, self.expected), pin.pinned)
        error, self.last_pinned = self.known[key]
        return error

    def after_pass(self, step, gm, ctx, record):
        record.max_error = self.error(gm)
        record.numerics_ok = record.max_error <= self.tolerance
        if self.last_pinned:
            record.stats["routing_pinned"] = self.last_pinned
        if self.inputs_from != "fresh random inputs":
            record.stats["numerics_checked_on"] = self.inputs_from
        if not record.numerics_ok:
            raise PassRejected(f"numerics changed: relative error {record.max_error:.3g} "
                               f"> tolerance {self.tolerance:g}")


class Statistics:
    """Node count and the cost model's launches / bytes / FLOPs estimates."""

    def after_pass(self, step, gm, ctx, record):
        fill_stats(record, gm)


class Snapshot:
    """Keeps a clone of the graph after each pass that changed it, for drawings
    and diffs (a pass that changed nothing shares the snapshot before it). The
    manager also rolls a failed pass back to the snapshot before it, so with
    this instrument no copy of the graph is taken before each pass."""

    def after_pass(self, step, gm, ctx, record):
        if record.changed:
            record.snapshot = clone(gm)


def fill_stats(record: StepRecord, gm) -> None:
    c = costmodel.graph_cost(gm)
    record.nodes = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    record.launches, record.bytes, record.flops = c.launches, c.bytes, c.flops


# ---------------------------------------------------------------- manager

@dataclass
class PipelineResult:
    gm: torch.fx.GraphModule
    baseline: StepRecord
    steps: list[StepRecord]


class PassManager:
    def __init__(self, pipeline, *, instruments=None, strict: bool = False,
                 progress: Callable[[int, int, str], None] | None = None):
        self.steps: list[Step] = parse(pipeline) if not isinstance(pipeline, list) or \
            (pipeline and not isinstance(pipeline[0], Step)) else pipeline
        self.instruments = instruments if instruments is not None else [VerifyGraph(), Statistics(), Snapshot()]
        self.strict, self.progress = strict, progress
        self.snapshots = any(isinstance(i, Snapshot) for i in self.instruments)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PipelineResult:
        """The pipeline over a copy of `gm` (the caller's graph is never changed)."""
        baseline = StepRecord("baseline", snapshot=clone(gm))
        if self.snapshots:
            gm = clone(gm)          # the passes' working copy; every rollback restores a snapshot
        fill_stats(baseline, gm)
        for inst in self.instruments:
            if isinstance(inst, CheckNumerics):
                baseline.max_error = inst.error(gm)
                baseline.numerics_ok = baseline.max_error <= inst.tolerance
        records: list[StepRecord] = []
        for i, step in enumerate(self.steps):
            try:
                if self.progress:
                    self.progress(i, len(self.steps), step.name)
                gm, rec = self.run_one(step, gm, ctx, records[-1] if records else baseline)
            except KeyboardInterrupt:
                raise PipelineInterrupted((baseline, records)) from None
            records.append(rec)
            if rec.status != "ok" and self.strict:
                rec.status = "failed"
                raise PipelineFailed(f"pass {step.name!r} failed: {rec.error}", (baseline, records))
        if self.progress:
            self.progress(len(self.steps), len(self.steps), "done")
        return PipelineResult(gm, baseline, records)

    def run_one(self, step: Step, gm, ctx: PassContext, prev: StepRecord):
        rec = StepRecord(step.name, dict(step.options))
        # the graph before the pass, for a rollback: the last snapshot (the pass then works on gm
        # itself), or a copy taken now where no snapshots are kept
        work = gm if self.snapshots else clone(gm)
        step_ctx = PassContext(**{**ctx.__dict__, "options": dict(step.options)})
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                res = step.pass_(work, step_ctx)      # the pass, then its end: lint, recompile, meta (api.finish)
            rec.pass_seconds = time.perf_counter() - t0
            new = res.gm
            rec.changed = bool(res.changed)
            rec.stats = dict(res.stats)
            for inst in self.instruments:
                inst.after_pass(step, new, step_ctx, rec)
            if self.snapshots and rec.snapshot is None:
                rec.snapshot = prev.snapshot        # unchanged: the graph the snapshot before shows
            return new, rec
        except Exception as e:  # any failure of a pass or instrument: roll back
            rec.pass_seconds = rec.pass_seconds or time.perf_counter() - t0
            rec.status, rec.changed = "rolled_back", False
            rec.error = f"{type(e).__name__}: {e}"
            rec.stats = {**rec.stats, "traceback": traceback.format_exc(limit=6)}   # keep what the pass counted
            before = clone(prev.snapshot) if self.snapshots else gm
            fill_stats(rec, before)
            rec.max_error, rec.numerics_ok, rec.snapshot = prev.max_error, prev.numerics_ok, prev.snapshot
            return before, rec
