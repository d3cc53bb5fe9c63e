"""Per-pass graph diff: what each pass removed, added and replaced, with the
nodes' measured time before and after.

The node matching is `draw.diff` (by node name, and a fused kernel's
`fused_from` / subgraph): a *replaced* entry is a new node standing for old
ones (a fused kernel and the ops it fused); *removed* and *added* are the rest.
With node times (`tools.nodetime.time_graphs`) every entry carries its time:
removed nodes their time in the graph before, added ones in the graph after,
a replacement the sum of what it replaced against its own.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import draw
from .nodetime import heat_of, run_graphs, step_key, us
from .table import render


@dataclass
class Entry:
    kind: str                   # removed | added | replaced
    name: str                   # the node (after, for added and replaced; before, for removed)
    op: str
    replaces: list[str] = field(default_factory=list)
    before_s: float | None = None
    after_s: float | None = None


@dataclass
class PassDiff:
    step: int
    name: str
    entries: list[Entry]
    kept: int
    before_step_s: float | None = None
    after_step_s: float | None = None

    def of(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def total(self, attr: str) -> float | None:
        vals = [getattr(e, attr) for e in self.entries if getattr(e, attr) is not None]
        return sum(vals) if vals else None

    def as_dict(self) -> dict:
        return {"step": self.step, "pass": self.name, "kept": self.kept, "before_step_s": self.before_step_s,
                "after_step_s": self.after_step_s, "removed": [asdict(e) for e in self.of("removed")],
                "added": [asdict(e) for e in self.of("added")], "replaced": [asdict(e) for e in self.of("replaced")]}


def ops_of(gm) -> dict[str, str]:
    """Each node's op by name (placeholders, get_attrs and the output by their kind)."""
    return {n.name: n.op if n.op in ("placeholder", "get_attr", "output") else draw.op_name(n.target)
            for n in gm.graph.nodes}


def pass_diff(before, after, *, step: int = 0, name: str = "", times_before=None, times_after=None) -> PassDiff:
    """The diff of one pass; `times_*`: node times of each graph (`NodeTimes`, or
    its `as_dict()` from a run record), or None."""
    d = draw.diff(before, after)
    tb, step_b = heat_of(times_before)
    ta, step_a = heat_of(times_after)

    def summed(names):
        vals = [tb[n] for n in names if n in tb]
        return sum(vals) if vals else None

    ob, oa = ops_of(before), ops_of(after)
    entries = [Entry("removed", n, ob.get(n, "?"), before_s=tb.get(n)) for n in d.removed
               if ob.get(n) not in ("get_attr", "placeholder")]
    entries += [Entry("added", n, oa.get(n, "?"), after_s=ta.get(n)) for n in d.added
                if oa.get(n) not in ("get_attr", "placeholder")]
    entries += [Entry("replaced", n, oa.get(n, "?"), list(olds), summed(olds), ta.get(n)) for n, olds in d.fused.items()]
    return PassDiff(step, name, entries, len(d.kept), step_b, step_a)


def run_diffs(result, times: dict | None = None) -> list[PassDiff]:
    """The diff of every pass of a pipeline result that changed the graph;
    `times`: node times by graph key (`nodetime.run_graphs` keys)."""
    times = times or {}
    out, prev_key = [], "baseline"
    graphs = run_graphs(result)
    for i, rec in enumerate(result.steps):
        key = step_key(result, i)
        if key != prev_key:
            out.append(pass_diff(graphs[prev_key], graphs[key], step=i, name=rec.name,
                                 times_before=times.get(prev_key), times_after=times.get(key)))
        prev_key = key
    return out


def find_step(result, name: str) -> int:
    """The index of pass `name` in the pipeline (`name#k`: its k-th run, from 1)."""
    base, _, nth = name.partition("#")
    hits = [i for i, r in enumerate(result.steps) if r.name == base]
    k = int(nth) if nth.isdigit() else 1
    if not hits or k > len(hits):
        names = ", ".join(r.name for r in result.steps)
        raise ValueError(f"--diff {name}: pass {base!r} is not in the pipeline ({names}); "
                         f"name one of them, or add it with --after")
    return hits[k - 1]


def text(pd: PassDiff) -> str:
    head = (f"pass {pd.name} (step {pd.step}): {len(pd.of('removed'))} removed, {len(pd.of('added'))} added, "
            f"{len(pd.of('replaced'))} replaced, {pd.kept} kept")
    if pd.before_step_s is not None:
        head += f"; measured step {us(pd.before_step_s)} -> {us(pd.after_step_s)} us"
    if not pd.entries:
        return head + "\n(the pass changed no node)"
    rows = [[e.kind, e.name, e.op, ", ".join(e.replaces[:6]) + (" ..." if len(e.replaces) > 6 else ""),
             us(e.before_s), us(e.after_s)] for e in pd.entries]
    rows.append(["total", "", "", "", us(pd.total("before_s")), us(pd.total("after_s"))])
    return head + "\n" + render(["change", "node", "op", "replaces", "before us", "after us"], rows)
