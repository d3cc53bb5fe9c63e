"""Scale-out simulator: the step time of a captured distributed graph at W ranks.

A rank's graph is replayed on two streams: a compute stream that runs the
nodes in program order at roofline speed (GEMM FLOPs at the device's matmul
rate, every other byte at its memory bandwidth, plus a per-op dispatch cost),
and a communication stream (`CommStream`) that runs the collectives as the
process group does: in issue order on two worker threads, their bytes
serialized on the rank's uplink, their latency (counted as gloo's schedules
pay it, `collective_parts`) delaying but not occupying the link, so chunks in
flight share one latency. A `wait_tensor` blocks the compute stream until its
collective is done; the blocked time is the exposed communication.

On CPU ranks two things the roofline alone misses are measured on the run's
own link and graph and modelled (`passes.overlap.run_profile`): compute runs
slower while collectives are in flight (`comm_compute_slowdown`: gloo's worker
threads, the TCP stack and the delay line share the cores), and a GEMM's rate
falls with its rows (`rows_efficiency`: a chunk of a GEMM re-reads the whole
weight for a k-th of the rows); `collective_overhead_s` is then the time one
collective holds its worker beyond the link's latencies, fitted to a burst of
collectives issued at once while the rank computes. All ranks
are assumed to run the same program in lock step (no skew, no stragglers), so
one rank's timeline is the step.

Every number here is an estimate. Device profiles are this machine's measured
rates (`passlab.runtime.profiles`) or datasheet numbers (labelled so); links
come from the one table in `passlab.runtime.distributed.link` (a run's record
names the link exactly as it was emulated). The overlap passes use the same
model to choose a schedule; `overlap_metrics` reads the events this simulator
emits the same way it reads a measured timeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx

from . import costmodel
from .opclass import OpClass, op_class
from .distributed.link import LINKS, Link, get_link, parse_rate, parse_time  # noqa: F401 (re-exported)
from .overlap_metrics import overlap_metrics


# ---------------------------------------------------------------- devices

DATASHEET = "datasheet (dense, no sparsity), not measured"
DEVICES = {
    # bytes/s of HBM; matmul FLOP/s per dtype (float32 on CUDA cores, TF32 not assumed)
    "h100": {"device": "h100", "copy_bytes_per_s": 3.35e12, "source": f"H100 SXM5 {DATASHEET}",
             "matmul_flops_per_s": {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12},
             "op_overhead_s": 5e-6, "collective_overhead_s": 10e-6},
    "h200": {"device": "h200", "copy_bytes_per_s": 4.8e12, "source": f"H200 SXM {DATASHEET}",
             "matmul_flops_per_s": {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12},
             "op_overhead_s": 5e-6, "collective_overhead_s": 10e-6},
    "a100": {"device": "a100", "copy_bytes_per_s": 2.039e12, "source": f"A100 SXM4 80GB {DATASHEET}",
             "matmul_flops_per_s": {"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12},
             "op_overhead_s": 5e-6, "collective_overhead_s": 10e-6},
}

# eager cost of one aten op from a GraphModule on CPU with ranks sharing the cores
# (~2 us alone; ~15 us fitted to measured tiny-preset runs at W=2 on the
# 2-core development VM) and gloo's fixed cost per collective (enqueue, tag
# exchange, thread hand-off)
CPU_OP_OVERHEAD_S = 15e-6
CPU_COLLECTIVE_OVERHEAD_S = 60e-6


NOMINAL_CPU = {"device": "cpu", "copy_bytes_per_s": 10e9, "matmul_flops_per_s": {"float32": 50e9},
               "source": "nominal CPU (no measured profile cached on this machine)"}


def cached_cpu_profile() -> dict | None:
    """A profile already measured on this machine (any thread count), without measuring."""
    import glob
    import json
    import os
    from .profiles import cache_dir, machine_key
    exact = os.path.join(cache_dir(), f"profile-{machine_key('cpu')}.json")
    for path in [exact] + sorted(glob.glob(os.path.join(cache_dir(), "profile-*.json")), key=os.path.getmtime)[::-1]:
        try:
            with open(path) as f:
                prof = json.load(f)
        except (OSError, ValueError):
            continue
        if prof.get("device") == "cpu" and prof.get("copy_bytes_per_s") and prof.get("matmul_flops_per_s"):
            return prof
    return None


def quick_cpu_profile(threads: int = 1, budget_s: float = 0.3, dtypes=("float32",)) -> dict:
    """This machine's rates right now at `threads` threads, under whatever else
    runs on it (a 512x512 matmul per dtype and a 16 MB copy, `budget_s` each):
    for predicting a run about to start on a shared machine."""
    import os
    import time
    from .profiles import QUICK, copy_bytes, matmul_flops
    quick = {"threads": threads, "budget_s": budget_s, **QUICK}
    rates = {dt: matmul_flops(dt, **quick) for dt in dict.fromkeys(str(d).replace("torch.", "") for d in dtypes)}
    return {"device": "cpu", "copy_bytes_per_s": copy_bytes(**quick),
            "matmul_flops_per_s": rates, "threads": threads, "cores": os.cpu_count(),
            "source": f"measured now at {threads} thread(s) ({time.strftime('%H:%M:%S')} UTC)"}


def with_overheads(profile: dict) -> dict:
    """The fixed per-op and per-collective costs this machine's profiles lack."""
    cpu = str(profile.get("device", "cpu")).startswith("cpu")
    return {"op_overhead_s": CPU_OP_OVERHEAD_S if cpu else 5e-6,
            "collective_overhead_s": CPU_COLLECTIVE_OVERHEAD_S if cpu else 10e-6, **profile}


def share(profile: dict, ranks_here: int) -> dict:
    """The profile of one of `ranks_here` ranks that share this machine's cores."""
    threads, cores = profile.get("threads", 1), profile.get("cores") or 1
    f = min(1.0, cores / max(1, ranks_here * threads))
    if f >= 1.0:
        return profile
    out = dict(profile, copy_bytes_per_s=profile["copy_bytes_per_s"] * f,
               matmul_flops_per_s={k: v * f for k, v in profile["matmul_flops_per_s"].items()},
               op_overhead_s=profile.get("op_overhead_s", CPU_OP_OVERHEAD_S) / f)
    out["source"] = profile.get("source", "") + f"; {ranks_here} ranks on {cores} cores: x{f:.2f} each"
    return out


def device_profile(name: str = "cpu", measure: bool = False) -> dict:
    """'cpu' (this machine: its cached measured profile; measured now only if
    `measure`, else a nominal one), 'cpu-now' (measured now at one thread) or
    a named datasheet device."""
    if name in DEVICES:
        return dict(DEVICES[name])
    if name == "cpu-now":
        return with_overheads(quick_cpu_profile())
    if name.startswith("cpu") or name.startswith("cuda"):
        prof = cached_cpu_profile() if name.startswith("cpu") else None
        if prof is None and (measure or name.startswith("cuda")):
            from .profiles import get_profile
            prof = get_profile(name)
        prof = dict(prof or NOMINAL_CPU)
        prof.setdefault("source", f"measured on this machine ({prof.get('measured_at', '?')})")
        return with_overheads(dict(prof, device=prof.get("device", name)))
    raise ValueError(f"unknown device {name!r} (known: cpu, {', '.join(sorted(DEVICES))})")


# ---------------------------------------------------------------- per-node times

COLLECTIVE_KINDS = {"all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce",
                    "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
                    "all_to_all_single": "all_to_all", "broadcast": "broadcast"}


def collective_kind(node: torch.fx.Node) -> str | None:
    """'all_reduce', 'all_gather', 'reduce_scatter', 'all_to_all', 'broadcast', 'wait' or None."""
    if node.op != "call_function" or op_class(node) != OpClass.COLLECTIVE:
        return None
    name = node.target.overloadpacket.__name__ if hasattr(node.target, "overloadpacket") else str(node.target)
    return "wait" if name == "wait_tensor" else COLLECTIVE_KINDS.get(name, "all_reduce")


def collective_bytes(node: torch.fx.Node, kind: str) -> int:
    """The size the formulas take: the full (gathered / unscattered) buffer."""
    ins = costmodel.nbytes(node.args[0].meta.get("val")) if node.args and isinstance(node.args[0], torch.fx.Node) else 0
    out = costmodel.nbytes(node.meta.get("val"))
    return max(ins, out) if kind in ("all_gather", "reduce_scatter") else ins or out


def collective_parts(kind: str, nbytes: int, world: int, link: Link) -> tuple[float, float]:
    """(latency seconds, seconds on the rank's uplink) of one collective over W
    ranks, as gloo runs them. Every hop of a schedule costs two one-way
    latencies, a receive-ready notice and then the data (measured through the
    delay line at W=2 and 4, bf16, 2 KB..2 MB: 2, 4(W-1), 2(W-1) latencies):
    all_to_all          1 hop (all peers at once),    (W-1)/W * bytes on the wire
    ring all_reduce     2(W-1) hops,                   2(W-1)/W * bytes
    all_gather, reduce_scatter (ring) (W-1) hops,      (W-1)/W * bytes (the full buffer)
    broadcast           ceil(log2 W) hops,             bytes (pipelined tree)"""
    if world <= 1:
        return 0.0, 0.0
    w, bw, hop = world, link.bytes_per_s, 2 * link.latency_s
    if kind == "all_reduce":
        return 2 * (w - 1) * hop, 2 * (w - 1) / w * nbytes / bw
    if kind in ("all_gather", "reduce_scatter"):
        return (w - 1) * hop, (w - 1) / w * nbytes / bw
    if kind == "all_to_all":
        return hop, (w - 1) / w * nbytes / bw
    if kind == "broadcast":
        return math.ceil(math.log2(w)) * hop, nbytes / bw
    raise ValueError(f"no formula for collective {kind!r}")


def pair_serialized(earlier: int) -> float:
    """The wire-time factor of a W=2 all_to_all after `earlier` others in the step.

    Measured on the delay line (2 ranks, gloo, an all_to_all issued by one rank
    `skew` after the other; the late rank's time): with skew under about one
    one-way latency both directions move at once (fp32 link, 5.2 MB: 543 ms);
    past it they move one after the other (1,000 ms; bf16 link, 2.9 MB: 79 ->
    137 ms). The ranks start a step together (a barrier), so the first exchange
    is parallel, but it ends one wire time later on one rank than the other:
    that rank then issues every later exchange late, and each one is serial.
    At W > 2 a rank's other peers keep its uplink busy meanwhile: not modelled
    as serial."""
    return 1.0 if earlier == 0 else 2.0


def collective_time(kind: str, nbytes: int, world: int, link: Link, overhead_s: float = 0.0) -> float:
    """The time of one collective alone on the link: its latencies, its wire
    time and a fixed `overhead_s` (`collective_parts`)."""
    if world <= 1:
        return 0.0
    lat, wire = collective_parts(kind, nbytes, world, link)
    return lat + wire + overhead_s


class CommStream:
    """The collectives in flight on one rank, as the process group runs them:
    `slots` worker threads (gloo's default: 2) each run one collective at a
    time, in issue order; the wire time of the collectives in flight is
    serialized on the rank's uplink; latency delays a collective (half before
    its bytes move, half after) without occupying the link. So chunks in flight
    pay one latency together, not one each. At W=2 an all_to_all after the
    first of the step moves its two directions one after the other
    (`pair_serialized`)."""

    def __init__(self, est: "Estimator", slots: int = 2):
        self.est, self.free = est, [0.0] * max(1, slots)
        self.link_free = 0.0
        self.last_end = 0.0
        self.spans: list[tuple[float, float]] = []
        self.exchanges = 0

    def in_flight(self, t: float) -> bool:
        """Whether a collective is in flight at time `t`."""
        return any(a <= t < b for a, b in self.spans)

    def issue(self, node, t: float) -> tuple[float, float]:
        """(start, end) of collective `node` issued at time `t`."""
        lat, wire = self.est.comm_parts(node)
        if isinstance(node, torch.fx.Node) and collective_kind(node) == "all_to_all" and self.est.world == 2:
            wire *= pair_serialized(self.exchanges)
            self.exchanges += 1
        slot = min(range(len(self.free)), key=self.free.__getitem__)
        start = max(t, self.free[slot])
        if lat == wire == 0.0:
            return start, start
        on_wire = max(start + lat / 2, self.link_free)
        self.link_free = on_wire + wire
        end = self.link_free + lat / 2
        self.free[slot] = end
        self.last_end = max(self.last_end, end)
        self.spans = [sp for sp in self.spans if sp[1] > t] + [(start, end)]
        return start, end


def matmul_rate(profile: dict, dtype) -> float:
    rates = profile["matmul_flops_per_s"]
    return rates.get(str(dtype).replace("torch.", "")) or rates["float32"]


def gemm_rows(node: torch.fx.Node) -> int | None:
    """The rows of a GEMM's left operand (per batch): what chunking divides."""
    out = costmodel.tensors(node.meta.get("val"))
    return int(out[0].shape[-2]) if out and out[0].dim() >= 2 else None


def rows_efficiency(rows: int | None, profile: dict) -> float:
    """The share of the matmul rate a GEMM of `rows` rows gets: rows / (rows +
    gemm_rows_half), fitted on the graph's own largest GEMM at its rows and a
    sixteenth of them (a chunked GEMM re-reads its whole weight for fewer rows)."""
    half = profile.get("gemm_rows_half") or 0.0
    return 1.0 if not rows or half <= 0 else rows / (rows + half)


def compute_time(node: torch.fx.Node, profile: dict) -> float:
    """Roofline time of one node plus its dispatch cost; views and getitem cost
    only dispatch; placeholders, weights and the output cost nothing. A GEMM's
    matmul rate falls with its rows (`rows_efficiency`)."""
    if node.op != "call_function":
        return 0.0
    over = profile.get("op_overhead_s", 0.0)
    cls = op_class(node)
    if cls in (OpClass.VIEW, OpClass.BROADCAST):
        return 0.0 if node.target.__name__ == "getitem" else over / 2
    c = costmodel.node_cost(node)
    t = c.bytes / profile["copy_bytes_per_s"]
    if cls in (OpClass.GEMM, OpClass.FUSED):
        out = costmodel.tensors(node.meta.get("val"))
        rate = matmul_rate(profile, out[0].dtype if out else torch.float32)
        if cls == OpClass.GEMM:
            rate *= rows_efficiency(gemm_rows(node), profile)
        t = max(t, c.flops / rate)
    return t + over


# ---------------------------------------------------------------- two-stream replay

@dataclass
class Event:
    """One interval of a timeline, in the Chrome-trace spirit: stream is 'compute' or 'comm'."""
    name: str
    stream: str
    start_s: float
    end_s: float


@dataclass
class Simulation:
    world: int
    step_s: float
    compute_s: float               # busy time of the compute stream
    comm_s: float                  # busy time of the comm stream
    exposed_comm_s: float          # comm time with no compute beside it (overlap_metrics)
    events: list[Event] = field(default_factory=list, repr=False)

    @property
    def overlap_efficiency(self) -> float | None:
        denom = min(self.comm_s, self.compute_s)
        return (self.comm_s - self.exposed_comm_s) / denom if denom > 0 else None

    def as_dict(self) -> dict:
        return {"world": self.world, "step_s": self.step_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
                "exposed_comm_s": self.exposed_comm_s, "overlap_efficiency": self.overlap_efficiency}


class Estimator:
    """Durations of nodes for one (device, link, world): what the schedulers read."""

    def __init__(self, profile: dict, link: Link, world: int):
        self.profile, self.link, self.world = profile, link, world

    def compute(self, node) -> float:
        return compute_time(node, self.profile)

    def compute_at(self, node, t: float, stream: CommStream) -> float:
        """The node's time when it starts at `t`: stretched by the profile's
        `comm_compute_slowdown` while a collective is in flight (gloo's threads,
        the TCP stack and the link share the rank's cores with its compute)."""
        dur = self.compute(node)
        slow = self.profile.get("comm_compute_slowdown") or 1.0
        return dur * slow if dur > 0 and slow != 1.0 and stream.in_flight(t) else dur

    def comm_parts(self, node) -> tuple[float, float]:
        """(latency + fixed overhead, wire seconds) of a collective node; (0, 0) for others."""
        kind = collective_kind(node)
        if kind in (None, "wait") or self.world <= 1:
            return 0.0, 0.0
        lat, wire = collective_parts(kind, collective_bytes(node, kind), self.world, self.link)
        return lat + self.profile.get("collective_overhead_s", 0.0), wire

    def comm(self, node) -> float:
        """The collective's time alone on the link."""
        return sum(self.comm_parts(node))


def replay(nodes, est: Estimator) -> Simulation:
    """Run `nodes` (a program order) on the two streams."""
    t = 0.0
    stream = CommStream(est)
    done: dict[torch.fx.Node, float] = {}
    events: list[Event] = []
    for n in nodes:
        kind = collective_kind(n)
        if kind == "wait":
            coll = n.args[0]
            end = done.get(coll, t)
            t = max(t, end)
            continue
        if kind is not None:
            start, done[n] = stream.issue(n, t)
            if done[n] > start:
                events.append(Event(n.name, "comm", start, done[n]))
            t += est.profile.get("op_overhead_s", 0.0)
            continue
        dur = est.compute_at(n, t, stream)
        if dur > 0:
            events.append(Event(n.name, "compute", t, t + dur))
        t += dur
    m = overlap_metrics(events)
    end = max(t, stream.last_end)
    return Simulation(est.world, end, m["compute_s"] or 0.0, m["comm_s"] or 0.0, m["exposed_comm_s"] or 0.0, events)


def simulate(gm: torch.fx.GraphModule, *, world: int, link="ib-400g", device: "str | dict" = "cpu") -> Simulation:
    profile = device_profile(device) if isinstance(device, str) else device
    return replay(list(gm.graph.nodes), Estimator(profile, get_link(link), world))
