"""Per-rank timelines of compute and communication, written as Chrome traces.

`TracedRun` runs a graph once node by node (a torch.fx Interpreter) and
records, on this rank's clock:

- compute regions: the runs of ordinary nodes between collective nodes
  (category "compute", lane "compute");
- each collective from its issue to the moment the link finished it
  (category "comm", one lane per collective in flight). The interpreter issues
  the functional collective as the equivalent asynchronous c10d call and
  stamps completion from the Work's future, so a collective that finishes
  while compute runs is seen finishing then, not when it is waited for;
- each wait that blocked compute (category "wait", on the compute lane): the
  exposed communication.

`chrome_trace()` lays the ranks out as processes (pid = rank) with one thread
per lane, a format Perfetto and chrome://tracing open. The categories are the
ones `passlab.runtime.overlap_metrics` reads.
"""
from __future__ import annotations

import json
import threading
import time

import torch
import torch.fx

from ..opclass import op_name

LANES = {"step": 0, "compute": 1}        # comm lanes follow: 2, 3, ...
NS = "_c10d_functional"


def is_collective(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == NS


class Timeline:
    """Events of one rank, in nanoseconds of its monotonic clock."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.step = ""                      # label of the traced run the next events belong to

    def add(self, name: str, cat: str, lane: int, start_ns: int, end_ns: int, **args) -> None:
        with self.lock:
            self.events.append({"name": name, "cat": cat, "lane": lane, "start_ns": start_ns,
                                "end_ns": max(end_ns, start_ns), "step": self.step, "args": args})


class Pending:
    """A collective in flight: its output, its Work, when it was issued and finished."""

    def __init__(self, name, out, work, issued_ns, lane, nbytes, seq):
        self.name, self.out, self.work, self.issued_ns, self.lane = name, out, work, issued_ns, lane
        self.nbytes, self.seq, self.done_ns = nbytes, seq, None
        if work is not None:
            try:
                work.get_future().then(self.finished)
            except (RuntimeError, AttributeError):   # a backend without futures: stamp at the wait
                pass

    def finished(self, fut):
        self.done_ns = time.perf_counter_ns()
        return None


def reduce_op(name: str):
    import torch.distributed as dist
    return {"sum": dist.ReduceOp.SUM, "product": dist.ReduceOp.PRODUCT, "min": dist.ReduceOp.MIN,
            "max": dist.ReduceOp.MAX}.get(str(name).lower())


def issue(name: str, args) -> tuple[torch.Tensor, object] | None:
    """The c10d async call equivalent to a functional collective, or None where there is none."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group
    if name == "all_reduce":
        x, op, group = args
        if reduce_op(op) is None:
            return None
        out = x.clone(memory_format=torch.contiguous_format)
        return out, dist.all_reduce(out, op=reduce_op(op), group=_resolve_process_group(group), async_op=True)
    if name == "all_gather_into_tensor":
        x, size, group = args
        x = x.contiguous()
        out = x.new_empty((x.shape[0] * size, *x.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor   # renamed in 2.12
        return out, gather(out, x, group=_resolve_process_group(group), async_op=True)
    if name == "all_to_all_single":
        x, out_splits, in_splits, group = args
        x = x.contiguous()
        rows = sum(out_splits) if out_splits else x.shape[0]
        out = x.new_empty((rows, *x.shape[1:]))
        return out, dist.all_to_all_single(out, x, out_splits or None, in_splits or None,
                                           group=_resolve_process_group(group), async_op=True)
    return None


class TracedRun(torch.fx.Interpreter):
    """One run of a graph, recording compute regions, collectives and waits into `timeline`."""

    def __init__(self, gm: torch.fx.GraphModule, timeline: Timeline):
        super().__init__(gm, garbage_collect_values=True)
        self.timeline = timeline
        self.pending: dict[torch.fx.Node, Pending] = {}
        self.region: list | None = None       # [start_ns, end_ns, nodes]
        self.busy_lanes: set[int] = set()
        self.issued = 0

    def run(self, *args):
        out = super().run(*args)
        self.close_region()
        return out

    def close_region(self) -> None:
        if self.region is not None:
            a, b, n = self.region
            self.timeline.add("compute", "compute", LANES["compute"], a, b, nodes=n)
            self.region = None

    def run_node(self, n: torch.fx.Node):
        if n.op in ("placeholder", "get_attr", "output"):
            return super().run_node(n)
        if not is_collective(n):
            t0 = time.perf_counter_ns()
            out = super().run_node(n)
            t1 = time.perf_counter_ns()
            if self.region is None:
                self.region = [t0, t1, 0]
            self.region[1], self.region[2] = t1, self.region[2] + 1
            return out
        self.close_region()
        name = op_name(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if name == "wait_tensor":
            return self.wait(n, args[0])
        t0 = time.perf_counter_ns()
        issued = issue(name, args) if not kwargs else None
        lane = self.free_lane()
        if issued is None:    # no c10d equivalent: run the functional op, completion seen at its wait
            out, work = super().run_node(n), None
        else:
            out, work = issued
        self.pending[n] = Pending(name, out, work, t0, lane, out.numel() * out.element_size(), self.issued)
        self.issued += 1
        return out

    def wait(self, node: torch.fx.Node, value):
        src = node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
        p = self.pending.pop(src, None)
        t0 = time.perf_counter_ns()
        if p is None:
            out = torch.ops._c10d_functional.wait_tensor(value)
        elif p.work is not None:
            p.work.wait()
            out = p.out
        else:
            out = torch.ops._c10d_functional.wait_tensor(value)
        t1 = time.perf_counter_ns()
        if t1 - t0 > 1000:
            self.timeline.add(f"wait {p.name if p else 'collective'}", "wait", LANES["compute"], t0, t1)
        if p is not None:
            done = p.done_ns if p.done_ns is not None else t1
            self.timeline.add(p.name, "comm", p.lane, p.issued_ns, min(done, t1), bytes=p.nbytes, seq=p.seq,
                              completion="future" if p.done_ns is not None else "wait")
            self.busy_lanes.discard(p.lane)
        return out

    def free_lane(self) -> int:
        lane = LANES["compute"] + 1
        while lane in self.busy_lanes:
            lane += 1
        self.busy_lanes.add(lane)
        return lane


def traced(gm: torch.fx.GraphModule, inputs, timeline: Timeline, label: str):
    """Run `gm` once under the tracer, framed by a `label` event on the step lane."""
    timeline.step = label
    t0 = time.perf_counter_ns()
    with torch.no_grad():
        out = TracedRun(gm, timeline).run(*inputs)
    timeline.add(label, "step", LANES["step"], t0, time.perf_counter_ns())
    return out


def mark_transfers(per_rank: dict[int, list[dict]], origin_ns: dict[int, int]) -> None:
    """Split each collective into waiting for the other ranks and the transfer.

    A collective cannot move data before its last rank issues it; what a rank
    spends before that is skew (a slower peer), not link time. The k-th
    collective of a traced run is the same collective on every rank, so the
    transfer starts at the latest issue among the ranks (clocks aligned at a
    common barrier). Adds a nested "transfer" event (category "link") inside
    each comm event and `waiting_us` / `transfer_us` to its args.
    """
    comm = {}
    for rank, evs in per_rank.items():
        for e in evs:
            if e["cat"] == "comm" and "seq" in e["args"]:
                comm.setdefault((e["step"], e["args"]["seq"]), []).append((rank, e))
    for (step, seq), group in comm.items():
        if len(group) != len(per_rank):
            continue
        last = max(e["start_ns"] - origin_ns.get(r, 0) for r, e in group)
        for rank, e in group:
            start = min(max(last + origin_ns.get(rank, 0), e["start_ns"]), e["end_ns"])
            e["args"]["waiting_us"] = round((start - e["start_ns"]) / 1e3, 3)
            e["args"]["transfer_us"] = round((e["end_ns"] - start) / 1e3, 3)
            per_rank[rank].append({"name": "transfer", "cat": "link", "lane": e["lane"], "start_ns": start,
                                   "end_ns": e["end_ns"], "step": step, "args": {"bytes": e["args"].get("bytes")}})


def link_seconds(events: list[dict], step: str) -> float:
    """Total transfer time of one traced run (after `mark_transfers`)."""
    return sum(e["end_ns"] - e["start_ns"] for e in events if e["cat"] == "link" and e["step"] == step) / 1e9


def lane_name(lane: int) -> str:
    if lane == LANES["step"]:
        return "step"
    if lane == LANES["compute"]:
        return "compute"
    k = lane - LANES["compute"]
    return "comm" if k == 1 else f"comm {k}"


def chrome_trace(per_rank: dict[int, list[dict]], *, origin_ns: dict[int, int] | None = None,
                 metadata: dict | None = None) -> dict:
    """{"traceEvents": [...]}: pid = rank, tid = lane, ts/dur in microseconds from the
    earliest event (or from each rank's `origin_ns`, its clock at a common barrier)."""
    origin_ns = origin_ns or {}
    starts = [e["start_ns"] - origin_ns.get(r, 0) for r, evs in per_rank.items() for e in evs]
    zero = min(starts) if starts else 0
    out = []
    for rank in sorted(per_rank):
        out.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        lanes = sorted({e["lane"] for e in per_rank[rank]})
        for lane in lanes:
            out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": lane,
                        "args": {"name": lane_name(lane)}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": lane,
                        "args": {"sort_index": lane}})
        for e in sorted(per_rank[rank], key=lambda e: e["start_ns"]):
            ts = (e["start_ns"] - origin_ns.get(rank, 0) - zero) / 1e3
            out.append({"ph": "X", "name": e["name"], "cat": e["cat"], "pid": rank, "tid": e["lane"],
                        "ts": round(ts, 3), "dur": round((e["end_ns"] - e["start_ns"]) / 1e3, 3),
                        "args": e.get("args", {})})
    trace = {"traceEvents": out, "displayTimeUnit": "ms"}
    if metadata:
        trace["otherData"] = metadata
    return trace


def write_chrome_trace(path: str, trace: dict) -> None:
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(trace, f)
