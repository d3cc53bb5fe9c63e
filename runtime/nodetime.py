"""Measured time per node: the executor instrumented, node by node.

`measure_nodes(gm, input_sets)` runs the graph through an instrumented
executor that times every `call_function` node on its own (`perf_counter_ns`
around the call on CPU; a pair of CUDA events around it on GPU, read after the
step), and, in the same interleaved run (`timing.measure_many`, paired
rounds), the graph as the executor normally runs it (`bind`: one generated
function). Every node's time is the median of its samples with a 95% CI; the
step is the plain run's median. `coverage` = sum of node medians / step: how
much of the measured step the per-node times account for (the rest is the
executor's own Python between nodes, and the interpreter's overhead in the
instrumented run).

Why not the torch profiler: it sees ATen ops, not fx nodes (a fused kernel is
one opaque Python call, a view is three ATen events), its per-event overhead
on CPU is several microseconds, and mapping events back to nodes guesses. The
instrumented executor times exactly the nodes of the graph, with ~0.1 us of
timer per node on CPU.

Each node also gets its bytes and FLOPs from the cost model, the achieved
bandwidth or FLOP rate, and that rate as a share of this machine's measured
roofline (`runtime/profiles.py`: copy bandwidth, matmul FLOP/s per dtype).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.fx

from . import costmodel, timing
from .executor import compile_graph, fetch_attr
from .opclass import OpClass, op_class, op_name


@dataclass
class NodeTime:
    name: str
    op: str
    median_s: float
    ci_low_s: float
    ci_high_s: float
    bytes: int = 0
    flops: int = 0
    kernel: bool = False           # a fused (generated) kernel
    bound: str = "memory"          # which roofline applies: "memory" (bytes) or "compute" (FLOPs)
    achieved_per_s: float | None = None     # bytes/s (memory) or FLOP/s (compute)
    percent_of_roofline: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class NodeTimes:
    """Per-node medians (graph order) and the plain step they belong to."""
    nodes: dict[str, NodeTime]
    step: timing.Timing
    instrumented: timing.Timing
    method: str
    device: str = "cpu"
    roofline: dict = field(default_factory=dict)   # the profile's rates used

    @property
    def node_sum_s(self) -> float:
        return sum(t.median_s for t in self.nodes.values())

    @property
    def coverage(self) -> float:
        """Sum of node medians over the measured (uninstrumented) step."""
        return self.node_sum_s / self.step.median_s if self.step.median_s else float("nan")

    def share(self, name: str) -> float:
        return self.nodes[name].median_s / self.step.median_s if self.step.median_s else 0.0

    def slowest(self, k: int = 10) -> list[NodeTime]:
        return sorted(self.nodes.values(), key=lambda t: -t.median_s)[:k]

    def seconds(self) -> dict[str, float]:
        return {k: t.median_s for k, t in self.nodes.items()}

    def as_dict(self) -> dict:
        return {"method": self.method, "device": self.device, "step": self.step.as_dict(),
                "instrumented_step": self.instrumented.as_dict(), "node_sum_s": self.node_sum_s,
                "coverage": self.coverage, "roofline": self.roofline,
                "nodes": {k: t.as_dict() for k, t in self.nodes.items()}}


def op_label(node: torch.fx.Node) -> str:
    t = node.target
    if getattr(t, "is_fused_kernel", False):
        return f"kernel {t.name}"
    return op_name(t)


class Instrumented:
    """Runs `gm` node by node (weights and kernels as the executor has them),
    timing each call; one row of per-node seconds per call in `rows`."""

    def __init__(self, gm: torch.fx.GraphModule, device: str = "cpu"):
        self.device = device
        self.cuda = str(device).startswith("cuda")
        nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.consts = {n: fetch_attr(gm, n.target) for n in nodes if n.op == "get_attr"}
        self.calls = [n for n in nodes if n.op == "call_function"]
        self.output = gm.graph.output_node()
        last: dict = {}
        for i, n in enumerate(self.calls):
            for a in n.all_input_nodes:
                last[a] = i
        self.free_after = [[a for a in n.all_input_nodes if last.get(a) == i and a.op == "call_function"]
                           for i, n in enumerate(self.calls)]
        for a in self.output.all_input_nodes:   # outputs live to the end
            for lst in self.free_after:
                if a in lst:
                    lst.remove(a)
        self.rows: list[list[float]] = []

    def __call__(self, *inputs):
        env = dict(self.consts)
        env.update(zip(self.placeholders, inputs))
        row = [0.0] * len(self.calls)
        events = []
        clock = time.perf_counter_ns
        load = env.__getitem__
        for i, n in enumerate(self.calls):
            args = torch.fx.node.map_arg(n.args, load)
            kwargs = torch.fx.node.map_arg(n.kwargs, load)
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                env[n] = n.target(*args, **kwargs)
                e.record()
                events.append((s, e))
            else:
                t0 = clock()
                env[n] = n.target(*args, **kwargs)
                row[i] = (clock() - t0) * 1e-9
            for a in self.free_after[i]:
                env.pop(a, None)
        if self.cuda:
            torch.cuda.synchronize()
            row = [s.elapsed_time(e) * 1e-3 for s, e in events]
        self.rows.append(row)
        return torch.fx.node.map_arg(self.output.args[0], load)


def roofline_of(node: torch.fx.Node, seconds: float, profile: dict | None, dtype_name: str) -> tuple:
    """(bound, achieved rate, % of the measured roofline) for one node's time."""
    c = costmodel.node_cost(node)
    gemm = node.op == "call_function" and op_class(node) == OpClass.GEMM
    if gemm or getattr(node.target, "is_gemm_template", False):
        achieved = c.flops / seconds if seconds > 0 and c.flops else None
        peak = (profile or {}).get("matmul_flops_per_s", {})
        peak = peak.get(dtype_name) or peak.get("float32")
        return "compute", achieved, (100 * achieved / peak if achieved and peak else None)
    achieved = c.bytes / seconds if seconds > 0 and c.bytes else None
    peak = (profile or {}).get("copy_bytes_per_s")
    return "memory", achieved, (100 * achieved / peak if achieved and peak else None)


def graph_dtype(gm: torch.fx.GraphModule) -> str:
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            return str(v.dtype).replace("torch.", "")
    return "float32"


def measure_nodes(gm: torch.fx.GraphModule, input_sets: list[tuple], *, device: str = "cpu",
                  budget_s: float = 1.0, writes: tuple = (), profile: dict | None = None,
                  target_ci: float = 0.02, min_reps: int = 7, warmup: int = 2) -> NodeTimes:
    """Time every node of `gm` and the plain step, interleaved. `profile`: the
    machine's rates (default: `profiles.get_profile(device)`, measured once)."""
    if profile is None:
        from .profiles import get_profile
        profile = get_profile(device)
    step = compile_graph(gm, device)         # builds the fused kernels the instrumented run calls too
    inst = Instrumented(gm, device)
    t = timing.measure_many({"step": step, "instrumented": inst}, input_sets, device=device, budget_s=budget_s,
                            target_ci=target_ci, min_reps=min_reps, warmup=warmup, writes=writes)
    rows = inst.rows[warmup:] or inst.rows
    dt = graph_dtype(gm)
    nodes = {}
    for i, n in enumerate(inst.calls):
        med, lo, hi = timing.median_ci([r[i] for r in rows])
        c = costmodel.node_cost(n)
        bound, achieved, pct = roofline_of(n, med, profile, dt)
        nodes[n.name] = NodeTime(n.name, op_label(n), med, lo, hi, c.bytes, c.flops,
                                 bool(getattr(n.target, "is_fused_kernel", False)), bound, achieved, pct)
    roof = {"copy_bytes_per_s": profile.get("copy_bytes_per_s"),
            "matmul_flops_per_s": profile.get("matmul_flops_per_s", {}).get(dt),
            "dtype": dt, "measured_at": profile.get("measured_at")}
    method = "cuda events per node" if str(device).startswith("cuda") else "perf_counter_ns per node"
    return NodeTimes(nodes, t["step"], t["instrumented"], f"instrumented executor ({method})", device, roof)
