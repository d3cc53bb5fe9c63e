"""Measured time per node, for the tools: which graphs of a run to time, and
the text tables (per node, slowest nodes with their share of the step).

The measurement itself is `passlab.runtime.nodetime` (the executor
instrumented node by node, timed interleaved with the plain step).
"""
from __future__ import annotations

import torch

from passlab.runtime.nodetime import NodeTimes, measure_nodes

from .table import human_bytes, render

SEEDS = (11, 12, 13)


def time_graphs(sample, graphs: dict, *, device: str = "cpu", budget_s: float = 0.5,
                profile: dict | None = None) -> dict[str, NodeTimes]:
    """Node times of each graph (a graph listed twice is timed once), on the sample's fresh inputs."""
    inputs = [sample.make_inputs(s) for s in SEEDS]
    out, seen = {}, {}
    for key, gm in graphs.items():
        sig = id(gm)
        if sig not in seen:
            seen[sig] = measure_nodes(gm, inputs, device=device, budget_s=budget_s, writes=sample.writes,
                                      profile=profile)
        out[key] = seen[sig]
    return out


def run_graphs(result) -> dict[str, torch.fx.GraphModule]:
    """The captured graph and the graph after every pass that changed it."""
    graphs = {"baseline": result.baseline.snapshot}
    for i, rec in enumerate(result.steps):
        if rec.changed and rec.status == "ok" and rec.snapshot is not None:
            graphs[f"step{i}"] = rec.snapshot
    return graphs


def step_key(result, i: int) -> str:
    """The key of the graph in force after step i (a step that changed nothing keeps its predecessor's)."""
    for j in range(i, -1, -1):
        rec = result.steps[j]
        if rec.changed and rec.status == "ok" and rec.snapshot is not None:
            return f"step{j}"
    return "baseline"


def heat_of(times) -> tuple[dict[str, float], float | None]:
    """(seconds by node name, the step's seconds) of a `NodeTimes`, of its
    `as_dict()` (a run record's `node_times`), or ({}, None) for None."""
    if times is None:
        return {}, None
    if isinstance(times, NodeTimes):
        return times.seconds(), times.step.median_s
    return {k: v["median_s"] for k, v in times["nodes"].items()}, times["step"]["median_s"]


def us(s: float | None) -> str:
    return "-" if s is None else (f"{s * 1e6:,.0f}" if s >= 1e-4 else f"{s * 1e6:.1f}")


def rate_text(t) -> str:
    if t.achieved_per_s is None:
        return "-"
    unit = "GB/s" if t.bound == "memory" else "GFLOP/s"
    pct = f" ({t.percent_of_roofline:.0f}% of roofline)" if t.percent_of_roofline is not None else ""
    return f"{t.achieved_per_s / 1e9:,.1f} {unit}{pct}"


def accuracy_text(nt: NodeTimes) -> str:
    return (f"step {us(nt.step.median_s)} us (plain run, median of {nt.step.n}); node times sum to "
            f"{us(nt.node_sum_s)} us = {100 * nt.coverage:.0f}% of the step; {nt.method}")


def rows(nt: NodeTimes, k: int | None = None, *, kernels_only: bool = False) -> list[list[str]]:
    items = nt.slowest(len(nt.nodes)) if k is None else nt.slowest(k)
    if kernels_only:
        items = [t for t in items if t.kernel]
    return [[t.name, t.op, us(t.median_s), f"{us(t.ci_low_s)}-{us(t.ci_high_s)}", f"{100 * nt.share(t.name):.1f}%",
             human_bytes(t.bytes), rate_text(t)] for t in items]


HEADER = ["node", "op", "us", "95% CI", "share", "bytes", "achieved (roofline)"]


def text(nt: NodeTimes, title: str, k: int = 15) -> str:
    """The slowest nodes with their share of the step, then every fused kernel's rate."""
    out = [f"{title}: {accuracy_text(nt)}", render(HEADER, rows(nt, k))]
    ks = rows(nt, kernels_only=True)
    if ks:
        out += ["fused kernels against this machine's measured roofline:", render(HEADER, ks)]
    return "\n".join(out)
