"""`passlab explain MODEL`: why something was not fused, and what that costs.

Every pass that declined a candidate records where (`Counters.skip(reason,
nodes=...)`: the `declined` list in its stats, beside the `skipped{reason}`
counts). For each decline this lists the nodes, the reason and the cost
model's estimated saving (bytes no longer written and read back, launches,
and that traffic's time at this machine's measured copy bandwidth).

With `--measure` it force-applies each fuse decline where it is legal (the
declined nodes, or the kernels now holding them, made into ONE kernel with
`fuse_nodes`, on the pass's own output graph) and times the graph with and
without it in one interleaved run (`runtime.timing.measure_many`, paired
rounds): the measured difference with its 95% CI (paired bootstrap). A
decline that measures as a loss of more than 2% (forcing it is > 2% faster,
CI above 1) is flagged as a candidate for the pass author. Pattern-pass
declines are listed (their condition did not hold: nothing to force).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import torch

from passlab.graphs import clone
from passlab.passes.fuse import FusionError, fuse_nodes, is_kernel
from passlab.runtime import costmodel, timing
from passlab.runtime.executor import compile_graph
from passlab.runtime.opclass import op_name

from .nodetime import SEEDS, run_graphs, step_key
from .table import human_bytes, render

LOSS_FLAG = 1.02       # forcing the fusion is this much faster: the decline costs > 2%
FORCEABLE = {"fuse"}
SHOW_MAX = 40          # rows printed (--json has every decline)   # passes whose declines are node sets `fuse_nodes` can make into one kernel


@dataclass
class Decline:
    step: int
    pass_name: str
    reason: str
    nodes: list[str]
    ops: list[str] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)   # the nodes holding them in the pass's output
    est_bytes_saved: int | None = None
    est_launches_saved: int | None = None
    est_seconds_saved: float | None = None
    legal: bool | None = None
    why_not: str = ""
    speedup: float | None = None          # without / with the forced fusion (> 1: forcing is faster)
    speedup_ci: list = field(default_factory=list)
    max_error: float | None = None
    flagged: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def holders_of(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Original node name -> the node of `gm` holding it (itself, or the kernel it was fused into)."""
    out = {}
    for n in gm.graph.nodes:
        out.setdefault(n.name, n)
        if is_kernel(n):
            for o in list(n.meta.get("fused_from") or []) + \
                    [m.name for m in n.target.subgraph.graph.nodes if m.op == "call_function"]:
                out[o] = n
    return out


def estimate(nodes: list[torch.fx.Node], profile: dict | None) -> tuple[int, int, float | None]:
    """(bytes saved, launches saved, seconds at copy bandwidth) if `nodes` were one kernel."""
    members = set(nodes)
    before = sum(costmodel.node_cost(n).bytes for n in nodes)
    launches = sum(costmodel.node_cost(n).launches for n in nodes)
    ins = {a for n in nodes for a in n.all_input_nodes if a not in members}
    outs = {n for n in nodes if any(u not in members for u in n.users)}
    after = sum(costmodel.nbytes(a.meta.get("val")) for a in ins | outs)
    saved = before - after
    bw = (profile or {}).get("copy_bytes_per_s")
    return saved, max(0, launches - 1), (saved / bw if bw else None)


def declines(result, profile: dict | None = None) -> list[Decline]:
    """Every recorded decline of the pipeline, resolved on the pass's output graph."""
    graphs = run_graphs(result)
    out, seen = [], set()
    for i, rec in enumerate(result.steps):
        recorded = rec.stats.get("declined") or []
        if not recorded:
            continue
        before = graphs[step_key(result, i - 1)]
        after = graphs[step_key(result, i)]
        by_name = {n.name: n for n in before.graph.nodes}
        hold = holders_of(after)
        for d in recorded:
            names = [x for x in d["nodes"] if x in by_name]
            holders = list(dict.fromkeys(hold[x] for x in names if x in hold))
            hs = [h.name for h in holders]
            key = (rec.name, d["reason"], frozenset(hs))
            if not names or key in seen or (len(holders) == 1 and is_kernel(holders[0])):
                continue            # gone, listed, or fused together in the end (another grouping took them)
            seen.add(key)
            dc = Decline(i, rec.name, d["reason"], names, [op_name(by_name[x].target) for x in names], hs)
            held = [n for n in after.graph.nodes if n.name in set(hs)]
            if rec.name in FORCEABLE and held:
                dc.est_bytes_saved, dc.est_launches_saved, dc.est_seconds_saved = estimate(held, profile)
            out.append(dc)
    return out


def forced(result, dc: Decline) -> torch.fx.GraphModule:
    """The pass's output graph with the decline's nodes made into one kernel (FusionError where illegal)."""
    after = run_graphs(result)[step_key(result, dc.step)]
    gm = clone(after)
    nodes = [n for n in gm.graph.nodes if n.name in set(dc.holders)]
    if len(nodes) < 2 and not any(n.op == "call_function" and not is_kernel(n) for n in nodes):
        raise FusionError("already_one_kernel")
    fuse_nodes(gm, nodes, label="forced", max_nodes=10 ** 6)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    from passlab.passes.meta import propagate
    propagate(gm)
    return gm


def measure(sample, result, items: list[Decline], *, device: str = "cpu", budget_s: float = 0.5,
            say=lambda m: None) -> None:
    """Force every legal decline and time it against the pass's output, interleaved."""
    from passlab.passes.manager import relative_error
    inputs = [sample.make_inputs(s) for s in SEEDS]
    for dc in items:
        if dc.pass_name not in FORCEABLE:
            dc.legal, dc.why_not = False, "a pattern condition did not hold (nothing to force)"
            continue
        try:
            gm = forced(result, dc)
        except FusionError as e:
            dc.legal, dc.why_not = False, str(e)
            continue
        except Exception as e:        # lowering or propagation refused the group: not legal here
            dc.legal, dc.why_not = False, f"{type(e).__name__}: {e}"
            continue
        dc.legal = True
        base = run_graphs(result)[step_key(result, dc.step)]
        with_fn, without_fn = compile_graph(gm, device), compile_graph(base, device)
        with torch.no_grad():
            dc.max_error = relative_error(with_fn(*inputs[0]), without_fn(*inputs[0]))
        say(f"timing {dc.pass_name} {dc.reason} ({len(dc.holders)} nodes) forced vs declined")
        t = timing.measure_many({"declined": without_fn, "forced": with_fn}, inputs, device=device,
                                budget_s=budget_s, writes=sample.writes)
        s, lo, hi = timing.speedup(t["forced"], t["declined"])
        dc.speedup, dc.speedup_ci = s, [lo, hi]
        dc.flagged = s > LOSS_FLAG and lo > 1.0


def text(items: list[Decline]) -> str:
    if not items:
        return "no pass declined a candidate (no `declined` in any pass's stats)"
    rows = []
    shown = sorted(items, key=lambda d: (d.step, -(d.est_bytes_saved or 0)))[:SHOW_MAX]
    for d in shown:
        nodes = ", ".join(d.nodes[:5]) + (f" (+{len(d.nodes) - 5})" if len(d.nodes) > 5 else "")
        est = "-" if d.est_bytes_saved is None else \
            f"{human_bytes(d.est_bytes_saved)}, {d.est_launches_saved} launches" + \
            (f", {d.est_seconds_saved * 1e6:.1f} us" if d.est_seconds_saved is not None else "")
        if d.speedup is not None:
            meas = f"{100 * (d.speedup - 1):+.1f}% ({100 * (d.speedup_ci[0] - 1):+.1f}..{100 * (d.speedup_ci[1] - 1):+.1f})"
        elif d.legal is False:
            meas = f"not legal: {d.why_not}"
        else:
            meas = "-"
        rows.append([d.pass_name, d.reason, nodes, est, meas, "CANDIDATE" if d.flagged else ""])
    head = ("declined fusions (est. = cost model: bytes no longer written and read back, at the measured copy "
            "bandwidth; measured = forcing it, with vs without, interleaved; + means forcing is faster)")
    more = f"\n({len(items) - SHOW_MAX} more declines in --json)" if len(items) > SHOW_MAX else ""
    return head + "\n" + render(["pass", "reason", "nodes", "est. saving", "measured (95% CI)", "flag"], rows) + more


# ---------------------------------------------------------------- command

def add_command(sub) -> None:
    p = sub.add_parser("explain", help="why not fused: each declined fusion, its reason and its (measured) cost")
    p.add_argument("model")
    p.add_argument("--after", default=None, help="the pipeline (default: the default pipeline)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--measure", action="store_true",
                   help="force each legal decline and time with vs without it, interleaved (CI; > 2%% loss flagged)")
    p.add_argument("--top", type=int, default=10, help="measure the N declines with the largest estimated saving")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per graph (default 0.5 tiny, 2 bench)")
    p.add_argument("--json", default=None, help="write the declines here")


def command(args) -> int:
    from passlab.passes.pipeline import available_default
    from .exits import BadArguments, bad_args_errors, check_device, unwritable
    from .progress import Progress
    from .show import graph_after
    check_device(args.device)
    why = args.json and unwritable(args.json)
    if why:
        raise BadArguments(f"cannot write --json {args.json}: {why}")
    if args.top < 0:
        raise BadArguments(f"--top {args.top}: give a count, 0 or more")
    try:
        sample, _gm, result = graph_after(args.model, args.preset, args.dtype, args.device,
                                          args.after or available_default())
    except bad_args_errors() as e:
        raise BadArguments(e) from e
    from passlab.graphs import stateful
    sample = stateful(sample, result.baseline.snapshot, lift=False)
    profile = None
    try:
        from passlab.runtime.profiles import get_profile
        profile = get_profile(args.device)
    except Exception as e:   # no profile: estimates in bytes and launches only
        print(f"passlab: note: no device profile ({type(e).__name__}: {e}); estimates without time", file=sys.stderr)
    items = declines(result, profile)
    if args.measure:
        ranked = sorted([d for d in items if d.pass_name in FORCEABLE],
                        key=lambda d: -(d.est_bytes_saved or 0))[:args.top]
        budget = args.budget if args.budget is not None else (0.5 if args.preset == "tiny" else 2.0)
        measure(sample, result, ranked, device=args.device, budget_s=budget, say=Progress().message)
    print(text(items))
    flagged = [d for d in items if d.flagged]
    if flagged:
        print(f"\n{len(flagged)} decline(s) measure as a loss of more than {100 * (LOSS_FLAG - 1):.0f}%: "
              "candidates for the pass author", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": sample.name, "preset": sample.preset, "pipeline": args.after or available_default(),
                       "declines": [d.as_dict() for d in items]}, f, indent=1)
        print(f"passlab: wrote {args.json}", file=sys.stderr)
    return 0
