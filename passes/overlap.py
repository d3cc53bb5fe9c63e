"""Communication/computation overlap: `overlap_reorder` and `overlap_chunk`.

Functional collectives split a collective into an issue node (`all_reduce`,
`all_to_all_single`, ...) and a `wait_tensor`; between the two the transfer
runs in the process group's background thread. `overlap_reorder` list-schedules
the graph so that each collective is issued as soon as its inputs exist and
waited for as late as its users allow, with independent compute in between.
`overlap_chunk` makes such compute exist where a layer has none (an MoE
layer's dispatch -> experts -> combine is one chain): it splits the collective
and the computation that depends on it into k chunks, so chunk i's compute
hides chunk i+1's transfer.

Both keep every data dependency and the relative order of all collectives
(every rank must issue them in the same order; every rank runs the same
deterministic schedule on the same shapes). Their choices and their
before/after numbers come from `passlab.runtime.simulator` (cost-model
durations on a device profile and a link preset): estimates, labelled so.
"""
from __future__ import annotations

import heapq

import torch
import torch.fx

from passlab.runtime import simulator
from passlab.runtime.simulator import Estimator, collective_kind

from .api import PassResult
from .registry import register_pass


def estimator(ctx, link: str, device: str, world: int) -> Estimator:
    """World, link and device from the options, else the run's context."""
    w = world or max(ctx.world_size, 2)
    link = link or ctx.options.get("link") or "loopback"
    dev = device or ("cpu" if ctx.device.startswith("cpu") else ctx.device)
    return Estimator(simulator.device_profile(dev), simulator.get_link(link), w)


# ---------------------------------------------------------------- list scheduling

def collectives(nodes) -> list[torch.fx.Node]:
    return [n for n in nodes if collective_kind(n) not in (None, "wait")]


def schedule(graph: torch.fx.Graph, est: Estimator) -> list[torch.fx.Node]:
    """A program order for `graph`: simulate the compute and comm streams and
    at each step pick, among the nodes whose inputs are ready,
    1. the next collective in the original collective order (issue early),
    2. a wait whose transfer is already done (it costs nothing),
    3. compute, preferring what the earliest pending collective needs,
    4. only then the wait that finishes first (wait late).
    Side-effecting nodes (asserts) keep their relative order too."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    fixed_head = [n for n in nodes if n.op in ("placeholder", "get_attr")]
    body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    colls = collectives(body)
    deps = {n: {a for a in n.all_input_nodes if a.op not in ("placeholder", "get_attr")} for n in body}
    for prev, nxt in zip(colls, colls[1:]):
        deps[nxt].add(prev)
    effects = [n for n in body if n.is_impure() and collective_kind(n) is None]
    for prev, nxt in zip(effects, effects[1:]):
        deps[nxt].add(prev)
    users: dict = {n: [] for n in body}
    for n, ds in deps.items():
        for d in ds:
            users[d].append(n)
    # the earliest collective each node feeds (its urgency)
    feeds = {n: len(colls) for n in body}
    cindex = {c: i for i, c in enumerate(colls)}
    for n in reversed(body):
        if n in cindex:
            feeds[n] = cindex[n]
        for u in users[n]:
            if feeds[u] < feeds[n] and collective_kind(u) != "wait":
                feeds[n] = feeds[u]
    missing = {n: len(ds) for n, ds in deps.items()}
    ready_compute: list = []
    ready_waits: list[torch.fx.Node] = []
    ready_colls: set = set()
    t = comm_free = 0.0
    finish: dict = {}
    order: list[torch.fx.Node] = []

    def release(n):
        if collective_kind(n) == "wait":
            ready_waits.append(n)
        elif n in cindex:
            ready_colls.add(n)
        else:
            heapq.heappush(ready_compute, (feeds[n], pos[n], n))

    for n in body:
        if not missing[n]:
            release(n)
    next_coll = 0
    while len(order) < len(body):
        if next_coll < len(colls) and colls[next_coll] in ready_colls:
            n = colls[next_coll]
            next_coll += 1
            start = max(t, comm_free)
            comm_free = finish[n] = start + est.comm(n)
        else:
            done = [w for w in ready_waits if finish[w.args[0]] <= t]
            if done:
                n = min(done, key=pos.get)
                ready_waits.remove(n)
            elif ready_compute:
                n = heapq.heappop(ready_compute)[2]
                t += est.compute(n)
            elif ready_waits:
                n = min(ready_waits, key=lambda w: (finish[w.args[0]], pos[w]))
                ready_waits.remove(n)
                t = max(t, finish[n.args[0]])
            else:
                raise RuntimeError("overlap scheduling found a dependency cycle")
        order.append(n)
        for u in users[n]:
            missing[u] -= 1
            if not missing[u]:
                release(u)
    return fixed_head + order + [graph.output_node()]


def apply_order(graph: torch.fx.Graph, order: list[torch.fx.Node]) -> int:
    """Move nodes into `order`; returns how many collectives and waits changed
    their place among the other call nodes."""
    calls_before = [n for n in graph.nodes if n.op == "call_function"]
    prev = None
    for n in order:
        if prev is not None and prev.next is not n:
            prev.append(n)
        prev = n
    calls_after = [n for n in graph.nodes if n.op == "call_function"]
    before = {n: i for i, n in enumerate(calls_before)}
    return sum(1 for i, n in enumerate(calls_after) if collective_kind(n) is not None and before[n] != i)


def replay(gm, est) -> simulator.Simulation:
    return simulator.replay(list(gm.graph.nodes), est)


@register_pass("overlap_reorder")
def overlap_reorder(gm: torch.fx.GraphModule, ctx, *, link: str = "", device: str = "", world: int = 0) -> PassResult:
    """Issue each collective as early as its inputs allow and wait as late as its users allow."""
    est = estimator(ctx, link, device, world)
    if not collectives(gm.graph.nodes):
        return PassResult(gm, False, {"collectives": 0})
    before = replay(gm, est)
    moved = apply_order(gm.graph, schedule(gm.graph, est))
    gm.graph.lint()
    gm.recompile()
    after = replay(gm, est)
    return PassResult(gm, moved > 0, {
        "collectives": len(collectives(gm.graph.nodes)), "moved": moved,
        "estimate": {"world": est.world, "link": est.link.name,
                     "exposed_comm_us_before": round(before.exposed_comm_s * 1e6, 2),
                     "exposed_comm_us_after": round(after.exposed_comm_s * 1e6, 2),
                     "step_us_before": round(before.step_s * 1e6, 2),
                     "step_us_after": round(after.step_s * 1e6, 2)}})
