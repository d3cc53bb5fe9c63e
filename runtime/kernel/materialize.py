"""Steps 2 and 3 of lowering: pick the anchor (the iteration space) from the
reductions or the outputs, then materialize each primitive for the anchor dims
it maps onto, walking down from the outputs, into the `Kernel` description;
`simplify` drops size-1 dims and merges dims every buffer walks contiguously.
A value that cannot be mapped consistently raises `LoweringError`; the fusion
pass uses that as its legality test.
"""
from __future__ import annotations

import torch
import torch.fx

from .ir import REDUCE_INIT, TYPE_OF, Buffer, Kernel, LoweringError, Value, overlaps
from .primitives import DECOMP, ROUND_EACH_OP, P, Builder, bshape, narrow, round_each_op


# ---------------------------------------------------------------- step 2-3: anchor and materialization

def refuse(gm: torch.fx.GraphModule) -> None:
    """Input classes no kernel is generated for (`LoweringError` with the
    class as its reason; the group runs in ATen, counted as a fallback):
    a tensor with no elements anywhere in the group (any dim 0: nothing to
    compute, and reductions over an empty dim have eager's own rules)."""
    for n in gm.graph.nodes:      # (a tuple's parts count where a getitem takes them: batch norm's unused stats are empty)
        v = n.meta.get("val")
        if n.op != "output" and isinstance(v, torch.Tensor) and v.numel() == 0:
            raise LoweringError(f"{n.name} has no elements (shape {list(v.shape)}): no kernel for empty "
                                f"tensors, ATen runs it", reason="empty_tensor")


def lower(gm: torch.fx.GraphModule) -> Kernel:
    """Lower a fused subgraph (placeholders = kernel inputs) into a Kernel."""
    refuse(gm)
    b = Builder()
    env, placeholders = {}, []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            placeholders.append(n)
            env[n] = b.load(n)
        elif n.op == "call_function":
            fn = DECOMP.get(n.target)
            if fn is None:
                raise LoweringError(f"{n.target} has no kernel lowering")
            args = torch.fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
            kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", "layout", "device", "pin_memory",
                                                                    "memory_format", "non_blocking")}
            env[n] = fn(b, n, *args, **kwargs)
            if isinstance(n.meta.get("val"), torch.Tensor):
                env[n] = narrow(env[n], n.meta["val"].dtype)
                if n.meta.get(ROUND_EACH_OP):
                    env[n] = round_each_op(env[n], n.meta["val"].dtype)
            if isinstance(env[n], P) and isinstance(n.meta.get("val"), torch.Tensor) \
                    and tuple(n.meta["val"].shape) != env[n].shape:
                raise LoweringError(f"{n.name}: lowered shape {env[n].shape} != {tuple(n.meta['val'].shape)}")
        elif n.op == "output":
            outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
            roots = [(env[o], o.meta["val"]) for o in outs]
        else:
            raise LoweringError(f"unexpected {n.op} node in a fused subgraph")
    for _, v in roots:
        if not isinstance(v, torch.Tensor) or v.dtype not in TYPE_OF:
            raise LoweringError("kernel outputs must be bool, integer or fp32/bf16/fp16 tensors")
    return Materializer(placeholders, roots).run()


def dag(roots):
    seen, order = set(), []

    def visit(p):
        if not isinstance(p, P) or id(p) in seen:
            return
        seen.add(id(p))
        for a in p.args:
            visit(a)
        order.append(p)
    for r in roots:
        visit(r)
    return order


class Materializer:
    def __init__(self, placeholders, roots):
        self.placeholders, self.roots = placeholders, roots
        self.values, self.memo = [], {}
        self.shift: dict = {}        # anchor dim -> (offset, size) while emitting one input of a cat
        nodes = dag([r for r, _ in roots])
        reds = [p for p in nodes if p.op in REDUCE_INIT]
        if reds:
            shapes = {p.args[0].shape for p in reds}
            if len(shapes) > 1:
                raise LoweringError(f"reductions over different shapes {sorted(shapes)}")
            self.sizes = list(shapes.pop())
            rsets = {tuple(d for d in p.rdims if self.sizes[d] > 1) for p in reds}
            if len(rsets) > 1:
                raise LoweringError("reductions over different dims")
            self.inner = list(rsets.pop())
        else:
            self.sizes = list(bshape(*[r.shape for r, _ in roots]))
            big = [d for d, s in enumerate(self.sizes) if s > 1]
            self.inner = big[-1:]
            out = roots[0][1]
            if big and isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(self.sizes):
                # loop innermost over the output's densest dim: channels-last stays vectorized
                self.inner = [min(big, key=lambda d: (out.stride()[d], -d))]
        self.natural = {}
        for p in nodes:
            self.natural[id(p)] = self.natural_map(p)

    def natural_map(self, p):
        """The anchor map a value has by construction, or None while it floats."""
        if p.op in REDUCE_INIT:
            a = p.args[0]
            amap = self.natural.get(id(a)) or tuple(range(len(self.sizes)))
            if p.keepdim:
                return tuple(None if i in p.rdims else d for i, d in enumerate(amap))
            return tuple(d for i, d in enumerate(amap) if i not in p.rdims)
        if p.op in ("load", "const", "iota", "reshape", "cat", "gather"):
            return None
        if p.op == "permute":
            m = self.natural.get(id(p.args[0]))
            return None if m is None else tuple(m[d] for d in p.perm)
        known = [(a, self.natural.get(id(a))) for a in p.args if isinstance(a, P)]
        out = [None] * len(p.shape)
        found = False
        for a, m in known:
            if m is None:
                continue
            found = True
            off = len(p.shape) - len(m)
            for i, d in enumerate(m):
                if d is not None:
                    if out[off + i] not in (None, d):
                        raise LoweringError("operands map onto different dims of the iteration space")
                    out[off + i] = d
        if not found:
            return None
        off = len(self.sizes) - len(p.shape)
        for i, s in enumerate(p.shape):
            if out[i] is None and s > 1:
                if off + i < 0 or self.sizes[off + i] != s or off + i in out:
                    raise LoweringError(f"shape {p.shape} does not fit the iteration space {tuple(self.sizes)}")
                out[i] = off + i
        return tuple(out)

    def aligned(self, shape):
        off = len(self.sizes) - len(shape)
        out = []
        for i, s in enumerate(shape):
            if s == 1:
                out.append(None)
            elif off + i >= 0 and self.sizes[off + i] == s:
                out.append(off + i)
            else:
                raise LoweringError(f"shape {shape} does not fit the iteration space {tuple(self.sizes)}")
        return tuple(out)

    def run(self) -> Kernel:
        stores, outputs = [], []
        for k, (p, val) in enumerate(self.roots):
            amap = self.natural.get(id(p)) or self.aligned(p.shape)
            amap = tuple(None if s == 1 else d for s, d in zip(p.shape, amap))
            vid = self.emit(p, amap)
            covered = {d for d in amap if d is not None}
            need = {d for d, s in enumerate(self.sizes) if s > 1 and (self.values[vid].elem or d not in self.inner)}
            if not need <= covered:
                raise LoweringError("an output does not cover the iteration space")
            astr = [0] * len(self.sizes)
            for i, d in enumerate(amap):
                if d is not None:
                    astr[d] = val.stride()[i]
            if overlaps(val.shape, val.stride()):
                raise LoweringError(f"output {k} has overlapping strides {val.stride()}", reason="overlapping_output")
            outputs.append(Buffer(f"out{k}", val.dtype, tuple(val.shape), tuple(val.stride()), tuple(astr)))
            stores.append((k, vid))
        inputs = []   # every placeholder, loaded or not (one read only for its shape): call order = pointer order
        for node in self.placeholders:
            v = node.meta.get("val")
            if not isinstance(v, torch.Tensor):
                raise LoweringError(f"input {node.name} is not a tensor")
            inputs.append(Buffer(node.name, v.dtype, tuple(v.shape), tuple(v.stride())))
        k = Kernel(list(self.sizes), list(self.inner), inputs, outputs, self.values, stores,
                   reductions=any(v.op in REDUCE_INIT for v in self.values))
        return simplify(k, self.iota_dims())

    def iota_dims(self):
        """Dims whose index a value reads directly: they must survive simplification as they are."""
        return {v.args[0] for v in self.values if v.op == "iota"} | \
            {d for v in self.values if v.op == "load" for d, _, _ in v.args[2]}

    def value(self, op, args, type_, elem, phase=0, params=()):
        key = (op, args, type_, params)
        if key in self.memo:
            return self.memo[key]
        v = Value(len(self.values), op, args, type_, elem, phase, params)
        self.values.append(v)
        self.memo[key] = v.id
        return v.id

    def emit(self, p: P, amap: tuple) -> int:
        for s, d in zip(p.shape, amap):
            want = self.shift[d][1] if d in self.shift else self.sizes[d] if d is not None else 1
            if (d is None and s != 1) or (d is not None and want != s):
                raise LoweringError(f"a value of shape {p.shape} does not fit the iteration space {tuple(self.sizes)}")
        key = (id(p), amap, tuple(sorted(self.shift.items())))
        if key in self.memo:
            return self.memo[key]
        vid = self._emit(p, amap)
        self.memo[key] = vid
        return vid

    def _emit(self, p, amap):
        if p.op == "const":
            return self.value("const", (p.args[0],), p.type, False)
        if p.op == "load":
            return self.load(p, amap)
        if p.op == "iota":
            d = amap[0] if amap else None
            if d is None:
                return self.value("const", (p.args[0],), p.type, False)
            start = p.args[0] - p.args[1] * self.shift[d][0] if d in self.shift else p.args[0]
            return self.value("iota", (d, start, p.args[1]), p.type, d in self.inner)
        if p.op == "cat":
            return self.cat(p, amap)
        if p.op == "gather":
            return self.gather(p, amap)
        if p.op == "permute":   # output dim i is input dim perm[i]
            amap_x = [None] * len(p.perm)
            for i, d in enumerate(p.perm):
                amap_x[d] = amap[i]
            return self.emit(p.args[0], tuple(amap_x))
        if p.op == "reshape":   # (C,) seen as (C, 1, 1): trailing size-1 dims added
            return self.emit(p.args[0], amap[:len(p.args[0].shape)])
        if p.op in REDUCE_INIT:
            if self.shift:
                raise LoweringError("a reduction inside a concatenated value")
            a = p.args[0]
            amap_a = list(self.natural.get(id(a)) or range(len(self.sizes)))
            it = iter(amap)
            for i in range(len(a.shape)):
                if i in p.rdims:
                    if not p.keepdim:
                        continue
                    next(it)
                else:
                    d = next(it)
                    if d is not None and amap_a[i] is not None and amap_a[i] != d:
                        raise LoweringError("reduction input and output map onto different dims")
            amap_a = tuple(None if a.shape[i] == 1 else d for i, d in enumerate(amap_a))
            aid = self.emit(a, amap_a)
            if {amap_a[i] for i in p.rdims if a.shape[i] > 1} != set(self.inner):
                raise LoweringError("reduction dims are not the kernel's inner dims")
            arg = self.values[aid]
            phase = arg.phase + 1
            return self.value(p.op, (aid,), p.type, False, phase)
        ids = []
        for a in p.args:
            off = len(p.shape) - len(a.shape)
            ids.append(self.emit(a, tuple(None if s == 1 else amap[off + i] for i, s in enumerate(a.shape))))
        args = tuple(ids)
        vs = [self.values[i] for i in args]
        return self.value(p.op, args, p.type, any(v.elem for v in vs), max(v.phase for v in vs))

    def load(self, p, amap):
        node = p.node
        idx = self.placeholders.index(node)
        astr = self.astrides(node, amap)
        elem = any(astr[d] for d in self.inner)
        shifts = tuple((d, off, size) for d, (off, size) in sorted(self.shift.items()) if astr[d])
        return self.value("load", (idx, tuple(astr), shifts), p.type, elem)

    def astrides(self, node, amap):
        """A kernel input's stride per anchor dim, read with its dims at `amap`."""
        astr = [0] * len(self.sizes)
        for i, d in enumerate(amap):
            if d is not None:
                astr[d] = node.meta["val"].stride()[i]
        return astr

    def gather(self, p, amap):
        """Rows picked by an index: the index (checked against the table's rows) addresses
        the table's gathered dim (`gathered`)."""
        table, index = p.args
        dim, k = p.rdims[0], len(index.shape)
        if self.shift:
            raise LoweringError("a gather inside a concatenated value")
        ix = self.emit(index, tuple(None if s == 1 else d for s, d in zip(index.shape, amap[dim:dim + k])))
        at = self.values[ix]
        ix = self.value("gix", (ix,), "i", at.elem, at.phase, params=(table.shape[dim], p.wrap))
        return self.gathered(table, ix, amap[:dim] + (None,) + amap[dim + k:], dim, 0, True)

    def gathered(self, t, ix, tmap, dim, first, whole):
        """Table `t` (rows `first`... of the whole table) read at row `ix`: a kernel input is
        read there (clamped into its rows unless it is the `whole` table, whose index is
        checked), a constant is itself, a cast or rounding applies to the rows read, and a
        concatenation along `dim` selects the part owning the row."""
        at = self.values[ix]
        if t.op in ("cast", "round_bf16", "round_f16"):
            x = self.values[self.gathered(t.args[0], ix, tmap, dim, first, whole)]
            return self.value(t.op, (x.id,), t.type, x.elem, x.phase)
        if t.op == "const":
            return self.value("const", (t.args[0],), t.type, False)
        if t.op == "load":
            astr = self.astrides(t.node, tmap)
            params = (self.placeholders.index(t.node), tuple(astr), first, 0 if whole else t.shape[dim],
                      t.node.meta["val"].stride()[dim])
            return self.value("gather", (ix,), t.type, at.elem or any(astr[d] for d in self.inner), at.phase,
                              params=params)
        if t.op != "cat" or t.rdims[0] != dim:
            raise LoweringError("a gather reads a kernel input, a constant or a concatenation of them")
        vid, end = None, first + t.shape[dim]
        for part in reversed(t.args):
            end -= part.shape[dim]
            pid = self.gathered(part, ix, tmap, dim, end, False)
            if vid is None:
                vid = pid
                continue
            cond = self.value("lt", (ix, self.value("const", (end + part.shape[dim],), "i", False)), "b",
                              at.elem, at.phase)
            vs = [self.values[i] for i in (cond, pid, vid)]
            vid = self.value("where", (cond, pid, vid), t.type, any(v.elem for v in vs), max(v.phase for v in vs))
        return vid

    def cat(self, p, amap):
        d = amap[p.rdims[0]]
        if d is None or d in self.shift:
            raise LoweringError("cat along a broadcast or already concatenated dim")
        parts, off = [], 0
        for a in p.args:
            size = a.shape[p.rdims[0]]
            self.shift[d] = (off, size)
            try:
                parts.append((off + size, self.emit(a, amap)))
            finally:
                del self.shift[d]
            off += size
        idx = self.value("iota", (d, 0, 1), "i", d in self.inner)
        vid = parts[-1][1]
        for end, pid in reversed(parts[:-1]):
            cond = self.value("lt", (idx, self.value("const", (end,), "i", False)), "b", d in self.inner)
            vs = [self.values[i] for i in (cond, pid, vid)]
            vid = self.value("where", (cond, pid, vid), p.type, any(v.elem for v in vs), max(v.phase for v in vs))
        return vid


def simplify(k: Kernel, pinned: set) -> Kernel:
    """Drop size-1 dims, merge adjacent dims that every buffer walks contiguously,
    and split a long single inner dim of a pointwise kernel so the outer loop
    has enough iterations to run in parallel."""
    keep = [d for d, s in enumerate(k.sizes) if s > 1 or d in pinned]

    def remap_astr(astr):
        return [astr[d] for d in keep]
    k.inner = [keep.index(d) for d in k.inner if d in keep]
    k.sizes = [k.sizes[d] for d in keep]
    astrs = [remap_astr(b.astrides) for b in k.outputs]
    loads = [v for v in k.values if v.op in ("load", "gather")]
    lstr = [remap_astr(v.address[0]) for v in loads]
    pin = {keep.index(d) for d in pinned if d in keep}
    labels = list(range(len(k.sizes)))     # post-keep dim -> where it is now (pinned dims never merge)
    d = len(k.sizes) - 2
    while d >= 0:
        same_side = (d in k.inner) == (d + 1 in k.inner)
        ok = same_side and d not in pin and d + 1 not in pin and all(
            s[d] == s[d + 1] * k.sizes[d + 1] for s in astrs + lstr)
        if ok:
            k.sizes[d:d + 2] = [k.sizes[d] * k.sizes[d + 1]]
            labels[d:d + 2] = [labels[d]]
            for s in astrs + lstr:
                s[d:d + 2] = [s[d + 1]]
            k.inner = [i if i <= d else i - 1 for i in k.inner if i != d + 1] if d + 1 in k.inner else \
                [i if i <= d else i - 1 for i in k.inner]
        d -= 1
    if not k.reductions and len(k.inner) == 1 and k.m_size < 64 and not pin:
        d = k.inner[0]
        n = k.sizes[d]
        for chunk in (4096, 2048, 1024, 512):
            if n % chunk == 0 and n // chunk >= 2:
                k.sizes[d:d + 1] = [n // chunk, chunk]
                for s in astrs + lstr:
                    s[d:d + 1] = [s[d] * chunk, s[d]]
                k.inner = [d + 1]
                break
    if not k.sizes:   # a scalar kernel: one point
        k.sizes, astrs, lstr = [1], [[0] for _ in astrs], [[0] for _ in lstr]
    for b, s in zip(k.outputs, astrs):
        b.astrides = tuple(s)
    for v, s in zip(loads, lstr):
        if v.op == "gather":
            v.params = (v.params[0], tuple(s)) + v.params[2:]
        else:
            v.args = (v.args[0], tuple(s), tuple((labels.index(keep.index(d)), o, n) for d, o, n in v.args[2]))
    for v in k.values:
        if v.op == "iota":
            v.args = (labels.index(keep.index(v.args[0])),) + tuple(v.args[1:])
    return k
