"""One run: load a model, capture it, run a pipeline under the pass manager's
instruments, measure each step, and assemble the run record.

Everything computed before a failure is kept: a strict failure raises
`RunFailed` carrying the partial record, which the CLI still writes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from passlab.graphs import Sample, capture, load, stateful
from passlab.passes import (CheckNumerics, PassContext, PassManager, PipelineFailed, PipelineResult,
                            TOLERANCE, parse)
from passlab.passes.pipeline import available_default, missing_default
from passlab.passes.manager import PipelineInterrupted, Snapshot, Statistics, VerifyGraph

from . import record as records


class RunFailed(RuntimeError):
    def __init__(self, msg, record, run=None):
        super().__init__(msg)
        self.record, self.run = record, run   # run: the snapshots so far, for the report


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: `record` holds what was measured before it (None
    when no pass had run yet), `run` the snapshots so far."""

    def __init__(self, record=None, run=None):
        super().__init__()
        self.record, self.run = record, run


@dataclass
class Run:
    record: dict
    result: PipelineResult
    sample: Sample
    gm: torch.fx.GraphModule


def make_manager(steps, sample: Sample, device: str, *, strict=False, tolerance=None, check_numerics=True,
                 progress=None, snapshots: bool = True) -> PassManager:
    instruments = [VerifyGraph()]
    if check_numerics:
        tol = tolerance if tolerance is not None else TOLERANCE.get(sample.dtype, 1e-4)
        instruments.append(CheckNumerics(sample.reference, sample.make_inputs, device, tol, mutated=sample.writes,
                                         fallback=sample.example_copies))
    instruments += [Statistics(), Snapshot()] if snapshots else [Statistics()]
    return PassManager(steps, instruments=instruments, strict=strict, progress=progress)


def context(sample: Sample, device: str) -> PassContext:
    return PassContext(device=device, dtype=sample.dtype, example_inputs=sample.flat_inputs, sample=sample)


def run(model: str | Sample, *, preset: str = "tiny", pipeline=None, device: str = "cpu", dtype=None,
        strict: bool = False, tolerance: float | None = None, measure: bool = True,
        budget_s: float = 2.0, ablate: bool = False, shapley: bool = False, peers: bool = False,
        progress: Callable[[str], None] | None = None,
        bar: Callable[[int, int, str], None] | None = None, node_times: bool = False) -> Run:
    say = progress or (lambda msg: None)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is available here; use --device cpu")
    missing = missing_default() if pipeline is None else {}
    if pipeline is None:
        pipeline = available_default()
    steps = parse(pipeline)
    sample = model if isinstance(model, Sample) else load(model, preset, dtype=dtype, device=device)
    say(f"capturing {sample.name} ({sample.preset}, {str(sample.dtype).replace('torch.', '')}, {device})")
    t0 = time.perf_counter()
    gm = capture(sample.module, sample.example_inputs, sample.example_kwargs)
    sample = stateful(sample, gm, lift=False)   # inputs the graph writes: checked and timed on copies
    capture_s = time.perf_counter() - t0
    manager = make_manager(steps, sample, device, strict=strict, tolerance=tolerance,
                           progress=lambda i, n, name: say(f"[{i}/{n}] {name}"))
    names = [str(s) for s in steps]
    try:
        result = manager.run(gm, context(sample, device))
        setup_s = time.perf_counter() - t0
    except (PipelineFailed, PipelineInterrupted) as e:
        baseline, recs = e.records
        rec = records.build(model=sample.name, preset=sample.preset, device=device, pipeline=names,
                            baseline=baseline, steps=recs)
        last = recs[-1].snapshot if recs and recs[-1].snapshot is not None else baseline.snapshot
        partial = Run(rec, PipelineResult(last, baseline, recs), sample, last)
        if isinstance(e, PipelineInterrupted):
            rec["interrupted"] = f"during the pipeline, after {len(recs)} of {len(steps)} passes"
            raise RunInterrupted(rec, partial) from None
        raise RunFailed(str(e), rec, partial) from e
    measured, extra = {}, {}
    if measure or ablate or shapley or peers:
        from . import attribution
        try:
            measured, extra = attribution.measure_run(sample, result, steps, device=device, budget_s=budget_s,
                                                      ablate=ablate, shapley=shapley, peers=peers, say=say,
                                                      pipeline=pipeline, bar=bar)
        except KeyboardInterrupt:
            rec = records.build(model=sample.name, preset=sample.preset, device=device, pipeline=names,
                                baseline=result.baseline, steps=result.steps)
            rec["interrupted"] = "during measurement: every pass ran, no timings"
            raise RunInterrupted(rec, Run(rec, result, sample, result.gm)) from None
    rec = records.build(model=sample.name, preset=sample.preset, device=device, pipeline=names,
                        baseline=result.baseline, steps=result.steps, measured=measured, extra=extra,
                        capture_seconds=capture_s, setup_seconds=setup_s)
    rec["pipeline_text"] = pipeline
    rec["dtype"] = str(sample.dtype).replace("torch.", "")
    rec["description"] = sample.description
    rec["missing_default_passes"] = missing          # default passes whose module failed to import
    if node_times:             # measured time per node of every graph, and each pass's diff with them
        from . import nodetime, passdiff
        say("timing every node of the captured graph and of each pass's graph")
        times = nodetime.time_graphs(sample, nodetime.run_graphs(result), device=device, budget_s=min(budget_s, 1.0))
        rec["node_times"] = {k: t.as_dict() for k, t in times.items()}
        rec["pass_diffs"] = [d.as_dict() for d in passdiff.run_diffs(result, times)]
    rec["aten_fallbacks"] = {n.name: n.target.fallback(n) for n in result.gm.graph.nodes   # what runs ATen instead
                             if n.op == "call_function" and hasattr(n.target, "fallback") and n.target.fallback(n)}
    return Run(rec, result, sample, result.gm)
