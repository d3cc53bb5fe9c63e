"""Schedule: a kernel description -> one loop plan, which every printer renders.

Describe (`runtime/kernel`: what the kernel computes) -> schedule (here: in
which loop each value is computed, kept and stored) -> print (`cpp.py`,
`triton.py`: the syntax of each statement). Every kernel runs as

    for each outer point m (a row, in parallel):
        the outer index, each load's and output's row offset; row values
        for each reduction phase: a loop over the inner index r that
            computes the elementwise values it needs and accumulates;
            then the reductions' results and the row values they make computable
        a last loop over r that computes and stores the elementwise outputs
        the row outputs

A *phase* is how many reduction loops must run before a value (layer norm:
mean, then variance, then the normalized store: two reduction loops and the
store loop). *Scratch* is a per-row array of the inner size: an elementwise
value an earlier loop computed and a later one needs again is kept there
instead of recomputed, where the printer can hold a row (`scratch_rows`: the
C++ printer keeps rows up to 8192 elements; Triton walks r in blocks and
recomputes, 0). The plan is computed once per kernel and scratch policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LEAF = ("load", "const", "iota")
# the statements every printer writes alike: statement -> (C++, Triton)
STATEMENTS = {kind: (cpp, triton) for kind, cpp, triton in [
    ("index", "const int64_t i{d} = ({flat} / {div}) % {size};", "i{d} = ({flat} // {div}) % {size}"),
    ("index1", "const int64_t i{d} = {flat};", "i{d} = {flat}"),
    ("offset", "const int64_t {name} = {terms};", "{name} = {terms}"),
    ("zero", "0", "0 * m"),
    ("value", "const {type} v{id} = {expr};", "v{id} = {expr}"),
    ("clamp", "pl_clampi({} - {}, {})", "tl.minimum(tl.maximum({} - {}, 0), {})"),   # a cat input's index
    ("sum", "acc{id} += v{x};", "acc{id} = acc{id} + tl.where(emask, v{x}.to({acc}), 0)"),
    ("max", "acc{id} = acc{id} > v{x} ? acc{id} : v{x};",
            "acc{id} = tl.where(emask, tl.maximum(acc{id}, v{x}.to({acc}), propagate_nan=tl.PropagateNan.ALL), acc{id})"),
    ("min", "acc{id} = acc{id} < v{x} ? acc{id} : v{x};",
            "acc{id} = tl.where(emask, tl.minimum(acc{id}, v{x}.to({acc}), propagate_nan=tl.PropagateNan.ALL), acc{id})"),
    # a float max/min is NaN when any element is (ATen's amax): a flag beside the accumulator
    ("nan_seen", "nan{id} |= v{x} != v{x};", None),
    ("nan_reduced", "const float v{id} = nan{id} ? NAN : (float)acc{id};",
                    'v{id} = tl.where(tl.sum((acc{id} != acc{id}).to(tl.int32), 1)[:, None] > 0, float("nan"), '
                    'tl.{op}(acc{id}, 1)[:, None])'),
    ("reduced", "const {type} v{id} = ({type})acc{id};", "v{id} = tl.{op}(acc{id}, 1)[:, None]{nonzero}"),
    ("store", "out{j}[{off}] = {val};", "tl.store(out{j} + {off}, {val}, mask=emask)"),
    ("row_store", "out{j}[{off}] = {val};", "tl.store(out{j} + {off}, {val}, mask=mmask)"),
]}
REDUCTIONS = ("sum", "max", "min")
LAST = float("inf")


@dataclass
class Loop:
    """One loop over the inner index r."""
    reductions: list            # Values accumulated here (none: the store loop)
    body: list                  # elementwise Values computed per r, in order
    reuse: list                 # value ids read back from scratch (an earlier loop kept them)
    keep: list                  # value ids this loop keeps in scratch for a later one
    stores: list                # (output index, value id): elementwise outputs stored here
    rows_after: list            # row Values computable once this loop's reductions are done


@dataclass
class Plan:
    kernel: object
    need: set                   # ids of the values the outputs depend on
    outer: list                 # (dim, divisor, size): index[dim] = (m // divisor) % size
    inner: list                 # the same over r (one inner dim: index = r)
    loads: list                 # needed load and gather Values: each gets a row offset `o{id}`
    rows_before: list           # row Values computed before any loop
    loops: list
    row_stores: list            # (output index, value id): stored once per row


def terms(astrides, dims, shifts=()) -> list[tuple]:
    """(dim, stride, shift) for each of `dims` a buffer steps along; shift is
    (offset, size) for an input of a concatenation (its index is shifted and
    clamped), else None."""
    shift = {d: (off, size) for d, off, size in shifts}
    return [(d, astrides[d], shift.get(d)) for d in dims if astrides[d]]


def term(t, clamp: str) -> str:
    """The source of one (dim, stride, shift) term; a shifted index is clamped
    into the input's range with the printer's `clamp` format (index, offset, last)."""
    d, stride, shift = t
    if shift:
        return f"{clamp.format(f'i{d}', shift[0], shift[1] - 1)} * {stride}"
    return f"i{d} * {stride}"


def gather_row(v, clamp: str) -> str:
    """The source of a gather's row term: its index value (clamped into a concatenation
    part's rows with the printer's `clamp` format, less the part's first row) times the
    table's row stride."""
    _, _, first, rows, stride = v.params
    row = clamp.format(f"v{v.args[0]}", first, rows - 1) if rows else f"v{v.args[0]}"
    return f"{row} * {stride}"


def schedule(k, scratch_rows: int = 0) -> Plan:
    """The loop plan of kernel `k` (cached on it per scratch policy)."""
    plans = k.__dict__.setdefault("_plans", {})
    if scratch_rows not in plans:
        plans[scratch_rows] = _schedule(k, scratch_rows)
    return plans[scratch_rows]


def _schedule(k, scratch_rows: int) -> Plan:
    vals = {v.id: v for v in k.values}
    need = k.needed()
    done: set = set()

    def rows(upto):
        """Row values not yet computed whose reductions have all run by phase `upto`."""
        out = [v for v in k.values if v.id in need and not v.elem and v.id not in done and v.phase <= upto
               and v.op not in REDUCTIONS]
        done.update(v.id for v in out)
        return out

    phases = sorted({v.phase for v in k.values if v.id in need and v.op in REDUCTIONS})
    reductions = [[v for v in k.values if v.id in need and v.phase == ph and v.op in REDUCTIONS] for ph in phases]
    elem_stores = [(j, vid) for j, vid in k.stores if any(k.outputs[j].astrides[d] for d in k.inner)]
    row_stores = [s for s in k.stores if s not in elem_stores]
    roots = [[r.args[0] for r in reds] for reds in reductions]       # what each loop must compute
    roots += [[vid for _, vid in elem_stores]] if elem_stores else []
    rows_before = rows(0) + (rows(LAST) if not reductions else [])
    loops, kept = [], set()
    for li, loop_roots in enumerate(roots):
        body = k.elem_closure(loop_roots, stop=kept)
        mine = {v.id for v in body}
        later = set()
        if k.r_size <= scratch_rows:
            for nxt in roots[li + 1:]:
                for w in k.elem_closure(nxt, stop=kept | mine):
                    if w.op not in LEAF:
                        later |= {a for a in w.args if a in mine}
                later |= {r for r in nxt if r in mine}
        # constants and fp32 loads are as cheap to recompute as to keep
        later = {i for i in later if not (vals[i].op == "const" or
                                          (vals[i].op == "load" and k.inputs[vals[i].args[0]].dtype == torch.float32))}
        used = {a for w in body if w.op not in LEAF for a in w.args} | set(loop_roots)
        reds = reductions[li] if li < len(reductions) else []
        done.update(v.id for v in reds)
        after = rows(phases[li]) + (rows(LAST) if li == len(reductions) - 1 else []) if reds else []
        loops.append(Loop(reds, body, sorted(kept & used), sorted(later),
                          elem_stores if li == len(reductions) else [], after))
        kept |= later
    inner = [(k.inner[0], None, None)] if len(k.inner) == 1 else k.index_terms(k.inner)
    return Plan(k, need, k.index_terms(k.outer), inner,
                [v for v in k.values if v.id in need and v.op in ("load", "gather")],
                rows_before, loops, row_stores)


class Printer:
    """The statements of a plan, one method each; a printer fills in their syntax.

    `render()` walks the plan: the row prologue, then for each loop its
    declarations, head, body (inner index, values read back, values computed,
    values kept, accumulations, stores) and end, then the reductions' results
    and the row values after it; last the row stores."""
    INDENT = "    "           # a statement in the per-row body
    LOOP_INDENT = "    "      # a statement in a loop over r, relative to the row body
    scratch_rows = 0
    column = 1                # which column of STATEMENTS
    types: dict = {}          # value type -> the printer's type name
    acc_types: dict = {}      # value type -> the printer's accumulator type, where it casts to it

    def __init__(self, fk, name: str):
        self.fk, self.name, self.k = fk, name, fk.kernel
        self.vals = {v.id: v for v in self.k.values}
        self.plan = schedule(self.k, self.scratch_rows)

    def render(self) -> str:
        p, k = self.plan, self.k
        rows = [self.index(d, div, size, "m") for d, div, size in p.outer]
        rows += [self.offset(f"o{v.id}", terms(v.address[0], k.outer, v.address[1])) for v in p.loads]
        rows += [self.offset(f"q{j}", terms(b.astrides, k.outer)) for j, b in enumerate(k.outputs)]
        rows += [self.value(v) for v in p.rows_before] + self.before_loops()
        for loop in p.loops:
            inner = [self.index(d, div, size, "r") for d, div, size in p.inner]
            inner += [self.reuse(vid) for vid in loop.reuse] + [self.value(v) for v in loop.body]
            inner += [self.keep(vid) for vid in loop.keep] + [self.accumulate(v) for v in loop.reductions]
            inner += [self.store(j, vid, terms(k.outputs[j].astrides, k.inner)) for j, vid in loop.stores]
            rows += self.declare(loop) + self.loop_nest(loop, inner) + [self.reduced(v) for v in loop.reductions]
            rows += [self.value(v) for v in loop.rows_after]
        rows += [self.row_store(j, vid) for j, vid in p.row_stores]
        return "\n".join(self.begin() + [self.INDENT + s for s in rows] + self.end())

    def loop_nest(self, loop, inner: list) -> list:
        """The loop over r around its statements (a printer may emit it in several ranges)."""
        return self.loop_head(loop) + [self.LOOP_INDENT + s for s in inner] + self.loop_end()

    def stmt(self, kind: str, **kw) -> str:
        return STATEMENTS[kind][self.column].format(**kw)

    def term(self, t) -> str:
        return term(t, STATEMENTS["clamp"][self.column])

    def index(self, d, div, size, flat) -> str:
        return self.stmt("index1" if div is None else "index", d=d, div=div, size=size, flat=flat)

    def offset(self, name, ts) -> str:
        return self.stmt("offset", name=name, terms=" + ".join(map(self.term, ts)) or self.stmt("zero"))

    def value(self, v) -> str:
        return self.stmt("value", type=self.types.get(v.type), id=v.id, expr=self.expr(v))

    def accumulate(self, v) -> str:
        return self.stmt(v.op, id=v.id, x=v.args[0], acc=self.acc_types.get(v.type))

    def reduced(self, v) -> str:
        if v.type == "f" and v.op in ("max", "min"):
            return self.stmt("nan_reduced", id=v.id, op=v.op)
        return self.stmt("reduced", type=self.types.get(v.type), id=v.id, op=v.op,
                         nonzero=" != 0" if v.type == "b" else "")

    def store(self, j, vid, ts) -> str:
        return self.stmt("store", j=j, off=" + ".join([f"q{j}"] + [self.term(t) for t in ts]),
                         val=self.stored(j, vid, True))

    def row_store(self, j, vid) -> str:
        return self.stmt("row_store", j=j, off=f"q{j}", val=self.stored(j, vid, False))

    def comment(self, mark: str) -> list[str]:
        k = self.k
        return [f"{mark} {self.fk.name}: {', '.join(self.fk.ops)}",
                f"{mark} iteration space {k.sizes}, inner dims {k.inner}; bytes in+out {k.bytes_moved():,}"]

    def before_loops(self) -> list[str]:
        return []

    def loop_end(self) -> list[str]:
        return []
