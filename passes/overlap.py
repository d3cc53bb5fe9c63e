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
import os

import torch
import torch.fx

from passlab.runtime import simulator
from passlab.runtime.opclass import OpClass, op_class
from passlab.runtime.simulator import Estimator, collective_kind

from .api import PassResult
from .registry import register_pass


def estimator(ctx, link: str, device: str, world: int, gm=None) -> Estimator:
    """World, link and device from the options, else the run's context. A
    launched run fills `link` with the link exactly as it emulates it (latency
    0 where none is applied); without one, plain loopback. In a launched run
    every rank takes rank 0's device profile: ranks that chose different
    schedules from their own measurements would deadlock. A context that
    carries a `device_profile` (the simulator's) decides with that one."""
    w = world or max(ctx.world_size, 2)
    dev = device or ("cpu" if ctx.device.startswith("cpu") else ctx.device)
    lk = simulator.get_link(link or "loopback")
    return Estimator(ctx.device_profile or run_profile(dev, ctx.dtype, lk, gm), lk, w)


_RUN_PROFILE: dict = {}


def run_profile(device: str, dtype, link, gm=None) -> dict:
    """The device profile the overlap passes estimate with. In a launched CPU
    run: this machine measured now by rank 0 at its thread count (the matmul
    rate and its fall with rows fitted on `gm`'s largest GEMM, `gemm_profile`),
    the share of one of the ranks on this host, and the collectives' costs on
    this link (`collective_costs`), broadcast so every rank has the same
    numbers; measured once per process, link and largest GEMM. Elsewhere
    `simulator.device_profile`."""
    import torch.distributed as dist
    from passlab.runtime.distributed.measure import multi_rank
    if not (device == "cpu" and multi_rank()):
        return simulator.device_profile(device)
    top = largest_gemm(gm) if gm is not None else None
    key = (device, str(dtype), link.bytes_per_s, link.latency_s, gemm_key(top))
    if key not in _RUN_PROFILE:
        costs = collective_costs(link, gemm_operands(top)[1] if top is not None else None, dtype)
        box = [None]
        if dist.get_rank() == 0:
            here = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
            prof = simulator.quick_cpu_profile(torch.get_num_threads(), dtypes=("float32", dtype))
            prof.update(costs)
            prof["source"] += (f"; one collective holds its worker {costs['collective_overhead_s'] * 1e6:.0f} us "
                               f"beyond its latencies, compute x{costs['comm_compute_slowdown']:.2f} while "
                               "collectives are in flight (measured now on this link)")
            if top is not None:
                prof.update(gemm_profile(top, prof))
            box = [simulator.share(simulator.with_overheads(prof), here)]
        dist.broadcast_object_list(box, src=0)
        _RUN_PROFILE[key] = box[0]
    return _RUN_PROFILE[key]


def collective_costs(link, operands=None, dtype=torch.float32, burst: int = 8, rounds: int = 3) -> dict:
    """On every rank (the calls are collective; rank 0's numbers are kept):
    `burst` one-element all_to_alls issued at once while this rank computes
    (the graph's largest GEMM at a sixteenth of its rows, `operands` =
    (target, args), as a chunked graph computes beside its collectives; a
    small GEMM of `dtype` without one). gloo runs them two at a time, each
    paying its latencies (measured through the delay line: pairs complete one
    hop apart), so the burst takes burst/2 x (hop + the time a collective holds
    its worker beyond the link): `collective_overhead_s`. The GEMMs done
    meanwhile, against the same GEMMs alone, give `comm_compute_slowdown`."""
    import torch.distributed as dist
    from passlab.runtime import timing
    w = dist.get_world_size()
    x, outs = torch.zeros(w), [torch.empty(w) for _ in range(burst)]
    if operands is None:
        operands = (torch.mm, (torch.randn(128, 256).to(dtype), torch.randn(256, 512).to(dtype)))
    fn, args = operands
    done = [0]

    def issue_and_compute():
        works = [dist.all_to_all_single(o, x, async_op=True) for o in outs]
        while not all(wk.is_completed() for wk in works):
            fn(*args)
            done[0] += 1
        for wk in works:
            wk.wait()
    times = timing.measure_lockstep({"burst": issue_and_compute}, [()], rounds=rounds, before=dist.barrier)
    alone = timing.measure_many({"gemm": lambda: fn(*args)}, [()], budget_s=0.2, min_reps=3, warmup=1)["gemm"]
    # the last GEMM of a burst outlasts it: count the time to its end, not the burst's
    busy = sum(times["burst"].samples_s)
    during = max(busy / done[0], alone.median_s) if done[0] else alone.median_s
    lat, _ = simulator.collective_parts("all_to_all", 4 * w, w, link)
    slots = 2
    hold = max(0.0, times["burst"].median_s / max(1.0, burst / slots) - lat)
    return {"collective_overhead_s": hold, "comm_compute_slowdown": during / alone.median_s,
            "collective_burst": {"collectives": burst, "median_s": times["burst"].median_s,
                                 "gemm_alone_s": alone.median_s, "gemm_during_s": during}}


def largest_gemm(gm):
    gemms = [n for n in gm.graph.nodes if n.op == "call_function" and op_class(n) == OpClass.GEMM
             and simulator.gemm_rows(n)]
    from passlab.runtime import costmodel
    return max(gemms, key=lambda n: costmodel.node_cost(n).flops, default=None)


def gemm_key(node):
    if node is None:
        return None
    return (str(node.target), tuple(tuple(a.meta["val"].shape) for a in node.all_input_nodes
                                    if isinstance(a.meta.get("val"), torch.Tensor)))


def gemm_operands(node, split: int = 16):
    """Random operands of GEMM `node` at its own shapes and at a `split`-th of its
    rows: ((target, args), (target, fewer-row args), rows, fewer rows)."""
    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args]
    ins = [torch.randn(v.shape).to(v.dtype) if isinstance(v, torch.Tensor) else v for v in vals]
    lhs = 1 if node.target == aten.addmm.default else 0
    rows = ins[lhs].shape[-2]
    few = max(1, rows // split)
    small = list(ins)
    small[lhs] = ins[lhs].narrow(ins[lhs].dim() - 2, 0, few).contiguous()
    if node.target == aten.addmm.default and ins[0].dim() == 2 and ins[0].shape[0] == rows:
        small[0] = ins[0][:few].contiguous()
    return (node.target, ins), (node.target, small), rows, few


def gemm_profile(node, prof: dict) -> dict:
    """The matmul rate of the graph's largest GEMM at its own shapes and at a
    sixteenth of its rows, fitted to rate(rows) = peak x rows / (rows + half):
    {'matmul_flops_per_s': {dtype: peak}, 'gemm_rows_half': half}. A chunk re-reads the
    whole weight for fewer rows; a 512x512 product (the quick profile) says nothing of that."""
    from passlab.runtime import costmodel, timing
    (fn, ins), (_, small), rows, few = gemm_operands(node)
    flops = costmodel.node_cost(node).flops
    t = timing.measure_many({"all": lambda: fn(*ins), "few": lambda: fn(*small)}, [()],
                            budget_s=0.3, min_reps=3, warmup=1)
    r_all, r_few = flops / t["all"].median_s, flops * few / rows / t["few"].median_s
    ratio = r_all / r_few
    half = rows * (ratio - 1) / (rows / few - ratio) if ratio > 1 and rows / few > ratio else 0.0
    dtype = str(node.meta["val"].dtype).replace("torch.", "")
    peak = r_all * (rows + half) / rows
    return {"matmul_flops_per_s": {**prof["matmul_flops_per_s"], dtype: peak}, "gemm_rows_half": half,
            "source": prof["source"] + f"; matmul rate fitted on the graph's largest GEMM ({node.name}: "
                      f"{r_all / 1e9:.0f} GFLOP/s at {rows} rows, {r_few / 1e9:.0f} at {few})"}


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
    t = 0.0
    stream = simulator.CommStream(est)
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
            finish[n] = stream.issue(n, t)[1]
        else:
            done = [w for w in ready_waits if finish[w.args[0]] <= t]
            if done:
                n = min(done, key=pos.get)
                ready_waits.remove(n)
            elif ready_compute:
                n = heapq.heappop(ready_compute)[2]
                t += est.compute_at(n, t, stream)
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


@register_pass("overlap_reorder", keeps_meta=True)
def overlap_reorder(gm: torch.fx.GraphModule, ctx, *, link: str = "", device: str = "", world: int = 0) -> PassResult:
    """Issue each collective as early as its inputs allow and wait as late as its users allow."""
    if not collectives(gm.graph.nodes):
        return PassResult(gm, False, {"collectives": 0})
    est = estimator(ctx, link, device, world, gm)
    before = replay(gm, est)
    moved = apply_order(gm.graph, schedule(gm.graph, est))
    after = replay(gm, est)
    return PassResult(gm, moved > 0, {
        "collectives": len(collectives(gm.graph.nodes)), "moved": moved,
        "estimate": {"world": est.world, "link": est.link.name, "profile": est.profile.get("source"),
                     "exposed_comm_us_before": round(before.exposed_comm_s * 1e6, 2),
                     "exposed_comm_us_after": round(after.exposed_comm_s * 1e6, 2),
                     "step_us_before": round(before.step_s * 1e6, 2),
                     "step_us_after": round(after.step_s * 1e6, 2)}})


# ---------------------------------------------------------------- chunking
#
# A chunk layout says how a tensor splits into k independent pieces: each dim
# is a group of factors (size, is_chunk) whose product is the dim's size, and
# exactly one factor, somewhere, is the chunk axis. Chunk j of the tensor keeps
# the indices of the chunk axis in [j*c/k, (j+1)*c/k). A rule per op says
# whether the op computes chunk j of its output from chunk j of its inputs
# alone, and with which output layout; rows of a GEMM, elements of a pointwise
# op, blocks of a collective are such axes, a GEMM's contraction is not.

aten = torch.ops.aten
c10d = getattr(torch.ops, "_c10d_functional", None)


def dims_of(shape, chunk_dim: int, inner: int):
    """Layout of `shape` with chunk axis the inner `inner` of dim `chunk_dim`."""
    out = []
    for d, s in enumerate(shape):
        if d != chunk_dim:
            out.append(((int(s), False),))
        else:
            outer = int(s) // inner
            out.append(((outer, False), (inner, True)) if outer > 1 else ((inner, True),))
    return tuple(out)


def flat(layout):
    return [f for dim in layout for f in dim]


def chunk_size(layout) -> int:
    return next(s for s, ch in flat(layout) if ch)


def chunked_shape(layout, c: int) -> list[int]:
    return [int(torch.Size([c if ch else s for s, ch in dim]).numel()) for dim in layout]


def full_shape(layout) -> list[int]:
    return [int(torch.Size([s for s, _ in dim]).numel()) for dim in layout]


def chunk_dim(layout) -> int:
    return next(d for d, dim in enumerate(layout) if any(ch for _, ch in dim))


def regroup(layout, shape):
    """The layout of a reshape of `layout` to `shape`, or None where the
    reshape would cut the chunk axis."""
    fs = [f for f in flat(layout) if f[0] != 1 or f[1]]
    out, i = [], 0
    for s in shape:
        group, need = [], int(s)
        while need > 1:
            if i >= len(fs):
                return None
            size, ch = fs[i]
            if need % size == 0:
                group.append(fs[i])
                need //= size
                i += 1
            elif not ch and size % need == 0:
                group.append((need, False))
                fs[i] = (size // need, False)
                need = 1
            else:
                return None
        out.append(tuple(group))
    return tuple(out) if i == len(fs) else None


def split_leading(layout, w: int):
    """Dim 0 of `layout` as (the factors of the w per-rank blocks, the factors
    within a block), or None where the chunk axis would cross blocks."""
    if w == 1:
        return (), layout[0]
    parts = regroup((layout[0],), [w, full_shape((layout[0],))[0] // w])
    if parts is None or any(ch for _, ch in parts[0]):
        return None
    return parts


def shape_of(node) -> list[int] | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return list(v.shape) if isinstance(v, torch.Tensor) else None


class Chunking:
    """The region of nodes that can run as k chunks from a seed tensor, with
    each node's layout; `entries` are outside tensors to slice, with their layout."""

    def __init__(self, graph: torch.fx.Graph, seed: torch.fx.Node, layout):
        self.seed = seed
        self.layout = {seed: layout}
        self.region: list[torch.fx.Node] = []
        self.entries: dict = {seed: layout}
        self.pending_entries: dict = {}
        started = False
        for n in graph.nodes:
            if n is seed:
                started = True
                continue
            if not started or n.op != "call_function" or not any(a in self.layout for a in n.all_input_nodes):
                continue
            self.pending_entries = {}
            out = self.rule(n)
            if out is not None:
                self.layout[n] = out
                self.region.append(n)
                self.entries.update(self.pending_entries)
        self.prune()

    def prune(self):
        """A collective's wait must run in the same chunk: drop collectives
        whose wait stayed outside, and what follows them."""
        inside = set(self.region)
        bad = {n for n in self.region if collective_kind(n) not in (None, "wait") and any(u not in inside for u in n.users)}
        if not bad:
            return
        for n in self.region:
            if any(a in bad for a in n.all_input_nodes):
                bad.add(n)
        self.region = [n for n in self.region if n not in bad]
        for n in bad:
            del self.layout[n]

    # -- the rules

    def inside(self, a):
        return isinstance(a, torch.fx.Node) and a in self.layout

    def outside_ok(self, a, layout) -> bool:
        """An outside tensor next to a chunked one: broadcast along the chunk
        axis (nothing to slice) or the same shape (sliced like it)."""
        shape = shape_of(a)
        if shape is None:
            return not isinstance(a, torch.fx.Node)
        full = full_shape(layout)
        d = chunk_dim(layout) - (len(full) - len(shape))
        if d < 0 or shape[d] == 1:
            return True
        if shape == full:
            self.pending_entries[a] = layout
            return True
        return False

    def rule(self, n):
        if n.is_impure() and n.target is not aten._assert_tensor_metadata.default and collective_kind(n) is None:
            return None
        for key in (n.target, getattr(n.target, "overloadpacket", None)):
            fn = RULES.get(key)
            if fn is not None:
                return fn(self, n)
        if op_class(n) == OpClass.POINTWISE:
            return self.pointwise(n)
        return None

    def pointwise(self, n):
        ins = [a for a in n.all_input_nodes if a in self.layout]
        lay = self.layout[ins[0]]
        if any(self.layout[a] != lay for a in ins) or shape_of(n) != full_shape(lay):
            return None
        for a in list(n.args) + list(n.kwargs.values()):
            if isinstance(a, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in a):
                return None
            if isinstance(a, torch.fx.Node) and a not in self.layout and not self.outside_ok(a, lay):
                return None
        return lay

    def view(self, n):
        if n.args[0] not in self.layout:
            return None
        return regroup(self.layout[n.args[0]], shape_of(n))

    def permute(self, n):
        lay = self.layout.get(n.args[0])
        rank = len(lay)
        if n.target == aten.t.default:
            perm = [1, 0] if rank == 2 else [0]
        elif n.target == aten.transpose.int:
            perm = list(range(rank))
            a, b = n.args[1] % rank, n.args[2] % rank
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = [p % rank for p in n.args[1]]
        return tuple(lay[p] for p in perm)

    def gemm(self, n):
        """mm/bmm/addmm: chunk axis in the rows of the left operand or the
        columns of the right one; the other operand whole."""
        bias, a, b = (n.args[0], n.args[1], n.args[2]) if n.target == aten.addmm.default else (None, *n.args[:2])
        if self.inside(a) == self.inside(b):
            return None
        rank = len(shape_of(n))
        if self.inside(a):
            la = self.layout[a]
            if chunk_dim(la) != rank - 2:
                return None
            out = la[:-1] + (((shape_of(b)[-1], False),),)
        else:
            lb = self.layout[b]
            if chunk_dim(lb) != rank - 1:
                return None
            out = ((((shape_of(a)[0], False),),) if rank == 2 else None)
            if out is None:
                return None
            out = out + (lb[-1],)
        if bias is not None and (self.inside(bias) or not self.outside_ok(bias, out)):
            return None
        return out

    def same(self, n):
        return self.layout.get(n.args[0])

    def wait(self, n):
        return self.layout[n.args[0]] if n.args[0] in self.region else None

    def no_output(self, n):
        return () if n.args[1] is None and n.args[2] is None else None

    def all_to_all(self, n):
        sizes = n.args[1]
        lay = self.layout.get(n.args[0])
        if lay is None or not isinstance(sizes, (list, tuple)) or len(set(sizes)) > 1 or list(sizes) != list(n.args[2]):
            return None
        parts = split_leading(lay, len(sizes))
        return None if parts is None else (parts[0] + parts[1],) + lay[1:]

    def all_gather(self, n):
        lay = self.layout.get(n.args[0])
        return None if lay is None else (((int(n.args[1]), False),) + lay[0],) + lay[1:]

    def reduce_scatter(self, n):
        lay = self.layout.get(n.args[0])
        parts = split_leading(lay, int(n.args[2])) if lay is not None else None
        return None if parts is None else (parts[1],) + lay[1:]


RULES = {aten.view.default: Chunking.view, aten._unsafe_view.default: Chunking.view,
         aten.reshape.default: Chunking.view, aten.unsqueeze.default: Chunking.view,
         aten.squeeze.dim: Chunking.view, aten.squeeze.dims: Chunking.view,
         aten.permute.default: Chunking.permute, aten.transpose.int: Chunking.permute,
         aten.t.default: Chunking.permute,
         aten.mm.default: Chunking.gemm, aten.bmm.default: Chunking.gemm, aten.addmm.default: Chunking.gemm,
         aten._assert_tensor_metadata.default: Chunking.no_output}
if c10d is not None:
    RULES.update({c10d.wait_tensor.default: Chunking.wait, c10d.all_reduce.default: Chunking.same,
                  c10d.all_to_all_single.default: Chunking.all_to_all,
                  c10d.all_gather_into_tensor.default: Chunking.all_gather,
                  c10d.reduce_scatter_tensor.default: Chunking.reduce_scatter})


def rewrite(gm: torch.fx.GraphModule, ch: Chunking, k: int, estimate_only: bool = False) -> torch.fx.GraphModule:
    """A new graph in which every region node runs k times, once per chunk;
    entries are sliced before their first use, region values read outside are
    concatenated back before theirs. `estimate_only`: the untouched nodes keep
    their metadata (same shapes; strides may differ), for a candidate's cost."""
    step = chunk_size(ch.layout[ch.seed]) // k
    graph = torch.fx.Graph()
    env: dict = {}
    copies: dict = {}
    sliced: dict = {}

    def axis(layout):
        return next(i for i, (_, c) in enumerate(flat(layout)) if c)

    def full(a):
        if a not in env:                                   # a region value read outside: concatenate
            lay = ch.layout[a]
            sizes, ax = [s for s, _ in flat(lay)], axis(lay)
            parts = [graph.call_function(aten.view.default, (copies[a][j], sizes[:ax] + [step] + sizes[ax + 1:]))
                     for j in range(k)]
            cat = graph.call_function(aten.cat.default, (parts, ax))
            env[a] = graph.call_function(aten.view.default, (cat, full_shape(lay)))
        return env[a]

    def piece(a, j):
        if a in copies:
            return copies[a][j]
        if a not in sliced:                                # an entry: slice it once, k pieces
            lay = ch.entries[a]
            sizes, ax = [s for s, _ in flat(lay)], axis(lay)
            v = graph.call_function(aten.view.default, (full(a), sizes))
            sliced[a] = []
            for i in range(k):
                s = graph.call_function(aten.slice.Tensor, (v, ax, i * step, (i + 1) * step))
                s = graph.call_function(aten.clone.default, (s,), {"memory_format": torch.contiguous_format})
                sliced[a].append(graph.call_function(aten.view.default, (s, chunked_shape(lay, step))))
        return sliced[a][j]

    region = set(ch.region)
    for n in gm.graph.nodes:
        if n not in region:
            env[n] = graph.node_copy(n, full)
            continue
        copies[n] = []
        for j in range(k):
            args = torch.fx.map_arg(n.args, lambda a: piece(a, j) if a in ch.layout or a in ch.entries else full(a))
            kwargs = torch.fx.map_arg(n.kwargs, lambda a: piece(a, j) if a in ch.layout or a in ch.entries else full(a))
            if RULES.get(n.target) is Chunking.view:
                args = (args[0], chunked_shape(ch.layout[n], step)) + tuple(args[2:])
            elif c10d is not None and n.target == c10d.all_to_all_single.default:
                w = len(n.args[1])
                per = chunked_shape(ch.layout[n], step)[0] // w
                args = (args[0], [per] * w, [per] * w) + tuple(args[3:])
            new = graph.call_function(n.target, args, kwargs)
            new.meta.update({key: v for key, v in n.meta.items() if key != "val"})
            new.meta["overlap_chunk"] = (n.name, j, k)
            copies[n].append(new)
    graph._codegen = gm.graph._codegen
    out = torch.fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    from .meta import propagate
    kept = {env[n] for n in gm.graph.nodes if n not in region and n.op != "placeholder"} if estimate_only else ()
    propagate(out, keep=kept)
    return out


def divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


K_TRIED = (2, 4, 8, 16)


def candidates(gm, coll, est, depth: int = 16) -> list[Chunking]:
    """Chunkings whose region holds `coll`: seeds on the chain of first
    inputs above it, every dim, every inner factor; ranked by the compute
    they put in flight beside the transfer."""
    chain, a = [], coll.args[0]
    while isinstance(a, torch.fx.Node) and len(chain) < depth:
        chain.append(a)
        if a.op != "call_function":
            break
        a = next((x for x in a.args if isinstance(x, torch.fx.Node)), None)
    found, seen = [], set()
    for seed in chain:
        shape = shape_of(seed)
        for d, size in enumerate(shape or []):
            for inner in reversed(divisors(int(size))):
                ch = Chunking(gm.graph, seed, dims_of(shape, d, inner))
                if coll not in ch.layout:
                    continue
                key = (frozenset(ch.region), inner)
                if key in seen:
                    continue
                seen.add(key)
                work = sum(est.compute(n) for n in ch.region)
                found.append((-work, -sum(1 for n in ch.region if n in set(collectives(ch.region))), -inner,
                              len(found), ch))
    return [c[-1] for c in sorted(found, key=lambda c: c[:4])]


def scheduled(gm, est):
    apply_order(gm.graph, schedule(gm.graph, est))
    gm.graph.lint()
    gm.recompile()
    return gm, replay(gm, est)


def search(gm, est, k: int, candidates_per_collective: int):
    """Greedy over the collectives in order: each split with the chunking and k
    (`k`, or the best of K_TRIED where k=0) the estimate ranks best, kept where
    it gains (k=0) or always (a given k). `gm` is scheduled already and left
    as it is. Returns (graph, its simulation, collectives split, k per seed, skipped)."""
    current = replay(gm, est)
    split, ks, skipped = 0, {}, {}
    tried: set = set()                 # (region, k) estimated on the current graph: a later collective's
    for name in [c.name for c in collectives(gm.graph.nodes)]:    # candidates often are the same region
        coll = next((n for n in gm.graph.nodes if n.name == name), None)
        if coll is None or "overlap_chunk" in coll.meta:       # already split with an earlier one
            continue
        best, repeated = None, False
        ks_here = [k] if k else list(K_TRIED)
        for ch in candidates(gm, coll, est)[:candidates_per_collective]:
            size = chunk_size(ch.layout[ch.seed])
            last = None
            which = (ch.seed.name, ch.layout[ch.seed], frozenset(n.name for n in ch.region))
            for kk in ks_here:
                if (which, kk) in tried:
                    repeated = True
                    continue
                if size % kk or kk < 2:
                    continue
                tried.add((which, kk))
                new, sim = scheduled(rewrite(gm, ch, kk, estimate_only=True), est)
                if best is None or sim.step_s < best[1].step_s:
                    best = (new, sim, kk, ch)
                if sim.step_s >= (last if last is not None else current.step_s):
                    break                       # more chunks only add latency and fixed costs from here
                last = sim.step_s
        if best is None:
            why = ("no estimated gain" if repeated else
                   "no chunkable region" if k == 0 else f"no region divisible by k={k}")
            skipped[why] = skipped.get(why, 0) + 1
            continue
        if not k and best[1].step_s >= current.step_s * 0.99:
            skipped["no estimated gain"] = skipped.get("no estimated gain", 0) + 1
            continue
        gm, current = best[0], best[1]
        tried.clear()
        split += sum(1 for n in best[3].region if collective_kind(n) not in (None, "wait"))
        ks[coll.name] = best[2]
    if split:
        from .meta import propagate
        propagate(gm)                  # the chosen graph's metadata exact (candidates kept the old strides)
    return gm, current, split, ks, skipped


def estimate_row(est, before, after) -> dict:
    return {"world": est.world, "link": est.link.name, "profile": est.profile.get("source"),
            "exposed_comm_us_before": round(before.exposed_comm_s * 1e6, 2),
            "exposed_comm_us_after": round(after.exposed_comm_s * 1e6, 2),
            "step_us_before": round(before.step_s * 1e6, 2), "step_us_after": round(after.step_s * 1e6, 2)}


def confirm_choice(plain, found: dict, ctx, keep: int, rounds: int) -> tuple[str, dict]:
    """The measured guard of the chunk factor, on the real link: the `keep`
    candidates the estimate ranks best and "no split" timed for a few steps on
    every rank (paired rounds, each sample the slowest rank's; more rounds,
    up to 3x, while a speedup's CI still holds 1); rank 0 keeps the fastest
    median ("no split" where no split beats it) and broadcasts the choice.
    Returns (choice, record)."""
    from passlab.runtime.distributed.measure import compare_on_every_rank, decide, timing_row
    from passlab.runtime.executor import compile_graph
    ranked = sorted(found, key=lambda name: found[name][1].step_s)[:keep]
    graphs = {"no split": plain, **{name: found[name][0] for name in ranked}}
    fns = {name: compile_graph(g, ctx.device) for name, g in graphs.items()}
    times = compare_on_every_rank(fns, tuple(ctx.example_inputs), "no split", rounds=rounds, device=ctx.device)
    rows = {name: timing_row(t, times["no split"]) for name, t in times.items()}

    def choose():
        return min(times, key=lambda n: times[n].median_s)
    chosen = decide(choose)
    return chosen, {"chosen": chosen, "candidates": rows, "rounds": times["no split"].n,
                    "estimated_step_us": {n: round(found[n][1].step_s * 1e6, 2) for n in ranked},
                    "how": "every rank, paired rounds, slowest rank per round; the fastest median kept (rank 0 "
                           "decides and broadcasts); speedup: over no split, with its paired-bootstrap 95% CI"}


def confirming(ctx, option: str) -> bool:
    """Measure the choice: 'on' always, 'off' never, 'auto' where a real multi-rank process group runs it."""
    if option not in ("auto", "on", "off"):
        raise ValueError(f"overlap_chunk: confirm={option!r}; use auto, on or off")
    from passlab.runtime.distributed.measure import multi_rank
    if option == "on" and not (multi_rank() and ctx.example_inputs):
        raise ValueError("overlap_chunk: confirm=on times the candidates on every rank: it needs a multi-rank "
                         "process group (a launched run, `passlab run --world-size W`) and example inputs; "
                         "use confirm=auto or off here")
    return option != "off" and multi_rank() and bool(ctx.example_inputs)


@register_pass("overlap_chunk", keeps_meta=True)
def overlap_chunk(gm: torch.fx.GraphModule, ctx, *, k: int = 0, link: str = "", device: str = "",
                  world: int = 0, candidates_per_collective: int = 3, confirm: str = "auto",
                  confirm_candidates: int = 2, confirm_rounds: int = 5) -> PassResult:
    """Split collectives and the compute that depends on them into k chunks (k=0: chosen by the cost model, confirmed by measurement on a real multi-rank link) so chunk i's compute hides chunk i+1's transfer."""
    if not collectives(gm.graph.nodes):
        return PassResult(gm, False, {"collectives": 0})
    est = estimator(ctx, link, device, world, gm)
    measure_it = confirming(ctx, confirm)
    before = replay(gm, est)
    given = str(gm.graph)
    plain, plain_sim = scheduled(gm, est)
    best = search(plain, est, k, candidates_per_collective)
    found = {f"estimate's choice k={fmt_ks(best[3])}": best} if best[2] else {}
    if measure_it and not k:
        for kk in K_TRIED:                      # the other factors, each as the estimate would split with it
            alt = search(plain, est, kk, candidates_per_collective)
            if alt[2] and all(str(alt[0].graph) != str(f[0].graph) for f in found.values()):
                found[f"k={kk}"] = alt
    measured = None
    if measure_it and found:
        chosen, measured = confirm_choice(plain, found, ctx, confirm_candidates, confirm_rounds)
        measured["baseline_is_input"] = str(plain.graph) == given    # "no split" is the graph it was given
        gm, current, split, ks, skipped = (plain, plain_sim, 0, {}, dict(best[4])) if chosen == "no split" \
            else found[chosen]
        if chosen == "no split":
            skipped["slower on the link than no split (measured)"] = len(best[3]) or 1
    else:
        gm, current, split, ks, skipped = best if best[2] else (plain, plain_sim, 0, {}, best[4])
    stats = {"collectives": len(collectives(gm.graph.nodes)), "split": split, "k": ks,
             "estimate": estimate_row(est, before, current)}
    fastest = min([plain_sim.step_s] + [f[1].step_s for f in found.values()])
    stats["estimate"]["best_gain_vs_no_split"] = round(plain_sim.step_s / fastest, 4) if fastest > 0 else None
    if measured is not None:
        stats["measured"] = measured
    if skipped:
        stats["skipped"] = skipped
    return PassResult(gm, None, stats)


def fmt_ks(ks: dict) -> str:
    return "/".join(str(v) for v in sorted(set(ks.values()))) or "-"
