"""`layout`: give every tensor a memory layout and propagate it, so that data
is reordered as rarely as possible.

Values of aten ops do not depend on strides, but their cost does: a oneDNN or
cuDNN convolution fed NCHW reorders its input to a blocked/NHWC layout and its
output back on every call (ONEDNN_VERBOSE shows both reorders), a GEMM fed an
operand whose matrix is neither row- nor column-major copies it first, and a
view of data in the wrong order needs an explicit copy. The pass

1. cancels inverse permute pairs (also around one unary pointwise op) and
   composes permute chains;
2. runs conv nets channels-last: one conversion where NCHW data enters, conv
   weights re-laid out once at compile time (new buffers; parameters are
   shared with other graphs and never touched), NHWC carried through
   batchnorm, pointwise ops, pooling and residual adds, and a conversion back
   only where a consumer needs the old layout (a view that is impossible on
   NHWC strides, `as_strided`, a graph output); fused kernels are lowered
   again for the strides they now get;
3. removes layout-changing copies whose consumers take the strided input as
   it is (views stay views, and no kernel starts reordering internally);
4. optionally pre-transposes GEMM weights (`addmm(b, x, permute(W))` reads a
   contiguous W^T made once).

A copy is kept only when taking it out fails one of those checks, which is
the proof that it is needed. `count_conversions` is the measure, before and
after; it counts explicit copies and the reorders kernels do internally.
"""
from __future__ import annotations

import itertools

from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from passlab.graphs import clone, fetch_attr
from passlab.runtime.costmodel import nbytes
from passlab.runtime.opclass import OpClass, op_class

from .api import PassResult
from .meta import fake_mode_of, propagate
from .vocabulary import STRICT_VIEWS, VIEW_OPS, erase_dead, new_constant
from .registry import register_pass

aten = torch.ops.aten

COPIES = {aten.clone.default, aten._to_copy.default, aten.copy.default}
if hasattr(aten, "as_strided_copy"):
    COPIES.add(aten.as_strided_copy.default)
VIEWS = STRICT_VIEWS               # views that need viewable strides (reshape copies when it must)
PERMUTES = {op for op in VIEW_OPS if op.overloadpacket in (aten.permute, aten.transpose, aten.t)}
GEMM_OPERANDS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2),
                 aten.bmm.default: (0, 1), aten.baddbmm.default: (1, 2)}
STORAGE_READERS = {aten.as_strided.default}   # their meaning depends on the input's strides
CONV = aten.convolution.default


class LayoutError(RuntimeError):
    """A relayout would change what a stride-sensitive consumer reads."""


# ---------------------------------------------------------------- layout facts

def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides wherever they matter (dims of size > 1)."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def blas_ready(t: torch.Tensor) -> bool:
    """The matrix part (last two dims) is row- or column-major, so a GEMM reads it in place."""
    (m, n), (sm, sn) = t.shape[-2:], t.stride()[-2:]
    row = (sn == 1 or n == 1) and (sm >= max(1, n) or m == 1)
    col = (sm == 1 or m == 1) and (sn >= max(1, m) or n == 1)
    return row or col


def channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def prefers_channels_last(device: str, dtype: torch.dtype) -> bool:
    """Where the convolution library's fast kernels are NHWC: oneDNN on CPU;
    cuDNN's tensor-core kernels (half precision) on GPU."""
    if str(device).startswith("cuda"):
        return dtype in (torch.float16, torch.bfloat16)
    return torch.backends.mkldnn.is_available()


def tensor_val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


# ---------------------------------------------------------------- the measure

@dataclass
class Conversions:
    """Layout conversions of a graph: explicit copies that change strides, and
    reorders kernels perform internally because an operand is in the wrong layout."""
    explicit: int = 0
    implicit: int = 0
    explicit_bytes: int = 0
    implicit_bytes: int = 0
    sites: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.explicit + self.implicit

    @property
    def bytes(self) -> int:
        return self.explicit_bytes + self.implicit_bytes


def count_conversions(gm: torch.fx.GraphModule, device: str = "cpu") -> Conversions:
    """Count layout conversions, with the bytes they read and write.

    Explicit: clone/_to_copy/copy/as_strided_copy whose output strides differ
    from its input's (this covers permute+clone and expand+clone pairs).
    Implicit: where the convolution library prefers NHWC, each non-channels-last
    input or output of a 4-D convolution (reordered: 1 each), and a GEMM
    operand that is not BLAS-ready (copied: 1).
    """
    c = Conversions()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not n.users:     # dead code moves nothing
            continue
        out = tensor_val(n)
        src = tensor_val(n.args[0]) if n.args else None
        if n.target in COPIES and out is not None and src is not None:
            if n.target is aten.copy.default:
                src = tensor_val(n.args[1]) if len(n.args) > 1 else None
            if src is not None and src.shape == out.shape and not same_layout(src, out):
                c.explicit += 1
                c.explicit_bytes += nbytes(src) + nbytes(out)
                c.sites.append(n.name)
        elif n.target is CONV and src is not None and out is not None and src.dim() == 4:
            if prefers_channels_last(device, src.dtype):
                wrong = [t for t in (src, out) if not channels_last(t)]
                c.implicit += len(wrong)
                c.implicit_bytes += sum(2 * nbytes(t) for t in wrong)
                if wrong:
                    c.sites.append(n.name)
        elif n.target in GEMM_OPERANDS:
            for i in GEMM_OPERANDS[n.target]:
                v = tensor_val(n.args[i]) if i < len(n.args) else None
                if v is not None and not blas_ready(v):
                    c.implicit += 1
                    c.implicit_bytes += 2 * nbytes(v)
                    c.sites.append(f"{n.name}.arg{i}")
    return c


# ---------------------------------------------------------------- propagation with repairs

class Settle(FakeTensorProp):
    """Fake-tensor propagation that keeps the graph valid under new layouts.

    Where a node needs its input in the layout the captured graph had, and the
    input's layout has changed, it inserts a conversion back (repair=True) or
    raises LayoutError (repair=False, used to test whether a copy can go).
    """

    def __init__(self, gm, original: dict, *, repair: bool, contiguous_outputs: bool, settled=frozenset()):
        super().__init__(gm, fake_mode_of(gm))
        self.original, self.repair, self.contiguous_outputs = original, repair, contiguous_outputs
        self.settled = settled           # nodes whose values and checks cannot have changed: taken as they are
        self.inserted: list[torch.fx.Node] = []
        self.relowered = 0

    def run_node(self, n):
        if n in self.settled and "val" in n.meta:
            return n.meta["val"]
        if n.op == "call_function":
            if n.target in VIEWS:
                v = self.env[n.args[0]]
                if not viewable(v, n.args[1]):
                    self.restore(n, n.args[0], torch.contiguous_format, "view_needs_copy")
            elif getattr(n.target, "is_fused_kernel", False):
                if not (self.repair and self.relower(n)):
                    for a in n.all_input_nodes:
                        self.keep_original(n, a)
            elif n.target in STORAGE_READERS:
                for a in n.all_input_nodes:
                    self.keep_original(n, a)
        elif n.op == "output" and self.contiguous_outputs:
            for a in n.all_input_nodes:
                self.keep_original(n, a)
        return super().run_node(n)

    def relower(self, n) -> bool:
        """A fused kernel bakes its buffers' strides in: lower it again for the
        strides its inputs have now, so that it reads and writes the new layout
        instead of forcing a conversion back. False if it cannot be lowered."""
        vals = [self.env[a] for a in n.args]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            return False
        if all(self.original.get(a) is None or same_layout_as(v, self.original[a]) for a, v in zip(n.args, vals)):
            return True
        k = n.target
        sub = clone(k.subgraph)
        for ph, v in zip([p for p in sub.graph.nodes if p.op == "placeholder"], vals):
            ph.meta["val"] = v
        try:
            propagate(sub)
            n.target = type(k)(k.name, sub)
        except Exception:  # LoweringError or a shape the printer refuses: keep the old layout instead
            return False
        self.relowered += 1
        return True

    def keep_original(self, user, arg):
        v, was = self.env.get(arg), self.original.get(arg)
        if not isinstance(v, torch.Tensor) or was is None or same_layout_as(v, was):
            return
        probe = torch.empty_strided(was[0], was[1], device="meta")
        why = "output_layout" if user.op == "output" else "consumer_needs_strides"
        if probe.is_contiguous():
            self.restore(user, arg, torch.contiguous_format, why)
        elif probe.dim() == 4 and probe.is_contiguous(memory_format=torch.channels_last):
            self.restore(user, arg, torch.channels_last, why)
        else:
            raise LayoutError(f"{user.name} needs {arg.name} in its original strides {was[1]}", why)

    def restore(self, user, arg, fmt, why):
        if not self.repair:
            raise LayoutError(f"{user.name} cannot take {arg.name} with strides {self.env[arg].stride()}", why)
        g = user.graph
        with g.inserting_before(user):
            c = g.call_function(aten.clone.default, (arg,), {"memory_format": fmt})
        user.replace_input_with(arg, c)
        self.env[c] = self.env[arg].clone(memory_format=fmt)
        c.meta["val"] = self.env[c]
        self.inserted.append(c)

    def settle(self):
        inputs = [n.meta["val"] for n in self.module.graph.nodes if n.op == "placeholder"]
        mode = self._mode
        old, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True
        try:
            self.propagate_dont_convert_inputs(*inputs)
        finally:
            mode.allow_non_fake_inputs = old
        return self.inserted


def same_layout_as(v: torch.Tensor, was: tuple) -> bool:
    """`v` has the (shape, strides) recorded in `was`, up to size-1 dims."""
    return tuple(v.shape) == tuple(was[0]) and all(x == y for x, y, s in zip(v.stride(), was[1], v.shape) if s > 1)


def viewable(t: torch.Tensor, size) -> bool:
    try:
        torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").view(size)
        return True
    except (RuntimeError, ValueError):
        return False


def layouts(gm) -> dict:
    return {n: (v.shape, v.stride()) for n in gm.graph.nodes if (v := tensor_val(n)) is not None}


def settle(gm, original, *, repair=True, contiguous_outputs=True, settled=frozenset()) -> tuple[list, int]:
    """Propagate layouts; returns the conversions it inserted and the kernels it lowered again.
    `settled`: nodes of a settled graph upstream of the only change, taken as they are."""
    s = Settle(gm, original, repair=repair, contiguous_outputs=contiguous_outputs, settled=settled)
    inserted = s.settle()
    gm.graph.lint()
    return inserted, s.relowered


# ---------------------------------------------------------------- rewrites

def permutation(node) -> list[int] | None:
    v = tensor_val(node.args[0])
    if v is None:
        return None
    rank = v.dim()
    if node.target is aten.permute.default:
        return [d % rank for d in node.args[1]] if rank else []
    if node.target is aten.t.default:
        return [1, 0] if rank == 2 else list(range(rank))
    d0, d1 = node.args[1] % rank, node.args[2] % rank
    p = list(range(rank))
    p[d0], p[d1] = p[d1], p[d0]
    return p


def cancel_transposes(gm) -> tuple[int, int]:
    """permute(permute(x, p), q) -> x when q undoes p, else one permute; also
    through one unary pointwise op (permute(relu(permute(x)))) -> relu(x)); identity
    permutes vanish. Returns (cancelled, composed)."""
    cancelled = composed = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in PERMUTES or (q := permutation(n)) is None:
            continue
        src, between = n.args[0], None
        if unary_pointwise(src) and len(src.users) == 1 and src.args[0].target in PERMUTES and \
                (inner := tensor_val(src.args[0].args[0])) is not None and inner.is_contiguous():
            src, between = src.args[0], src
        if src.op == "call_function" and src.target in PERMUTES and (p := permutation(src)) is not None:
            q, src = [p[i] for i in q], src.args[0]
        elif q != list(range(len(q))) or between is not None:
            continue
        if q != list(range(len(q))) and between is not None:
            continue
        g = gm.graph
        with g.inserting_before(n):
            if between is not None:
                new = g.call_function(between.target, (src, *between.args[1:]), dict(between.kwargs))
                new.meta.update(between.meta)
            elif q == list(range(len(q))):
                new = src
            else:
                new = g.call_function(aten.permute.default, (src, q))
                new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        if new is src or between is not None:
            cancelled += 1
        else:
            composed += 1
        erase_with_feeders(gm, n)
    return cancelled, composed


def unary_pointwise(node) -> bool:
    """A pointwise op of one tensor (the rest scalars): it commutes with a permute."""
    return (isinstance(node, torch.fx.Node) and op_class(node) is OpClass.POINTWISE and bool(node.args) and
            isinstance(node.args[0], torch.fx.Node) and
            not any(isinstance(a, torch.fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())))


def only_reorders(n) -> bool:
    """Views, permutes, copies and unary pointwise ops: what fed a removed copy and may go with it."""
    return n.op == "call_function" and (n.target in PERMUTES or n.target in VIEWS or n.target in COPIES
                                        or unary_pointwise(n) or n.target is aten.expand.default)


def erase_with_feeders(gm, node) -> None:
    """Erase `node` and the views/copies that only fed it (the vocabulary's erase_dead)."""
    if only_reorders(node):
        erase_dead(gm.graph, [node], upstream=only_reorders)


def to_channels_last(gm, original, contiguous_outputs) -> dict:
    """Run every 4-D convolution on NHWC data; carry NHWC as far as it goes."""
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is CONV
             and (x := tensor_val(n.args[0])) is not None and x.dim() == 4]
    if not convs:
        return {}
    weights, entering = {}, []
    for conv in convs:
        x, w = conv.args[0], conv.args[1]
        with gm.graph.inserting_before(conv):
            c = gm.graph.call_function(aten.clone.default, (x,), {"memory_format": torch.channels_last})
        conv.replace_input_with(x, c)
        entering.append(c)
        if isinstance(w, torch.fx.Node) and w.op == "get_attr":
            if w.target not in weights:
                name = new_constant(gm, f"layout_nhwc_{w.target}", fetch_attr(gm, w.target), persistent=False,
                                    memory_format=torch.channels_last)
                with gm.graph.inserting_after(w):
                    weights[w.target] = gm.graph.get_attr(name)
            conv.replace_input_with(w, weights[w.target])
        elif isinstance(w, torch.fx.Node):
            with gm.graph.inserting_before(conv):
                cw = gm.graph.call_function(aten.clone.default, (w,), {"memory_format": torch.channels_last})
            conv.replace_input_with(w, cw)
    for w in list(gm.graph.nodes):
        if w.op == "get_attr" and not w.users and w.target in weights:
            gm.graph.erase_node(w)
    gm.recompile()
    back, relowered = settle(gm, original, contiguous_outputs=contiguous_outputs)
    redundant = 0
    for c in entering:
        if same_layout(tensor_val(c.args[0]), tensor_val(c)):
            c.replace_all_uses_with(c.args[0])
            gm.graph.erase_node(c)
            redundant += 1
    propagate(gm)
    return {"convs_nhwc": len(convs), "weights_nhwc": len(weights),
            "conversions_in": len(entering) - redundant, "conversions_back": len(back),
            "kernels_relowered": relowered}


def layout_changing_clones(gm):
    """Each `clone` whose output layout differs from its input's, with both values."""
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not aten.clone.default:
            continue
        src, out = tensor_val(n.args[0]), tensor_val(n)
        if src is not None and out is not None and not same_layout(src, out):
            yield n, src, out


def drop_copies(gm, original, contiguous_outputs, device) -> tuple[int, dict]:
    """Remove each layout-changing clone whose consumers take its input as it is:
    every view stays a view, no stride-sensitive consumer sees new strides, and
    no kernel it feeds starts reordering internally (the graph's conversion
    count must drop)."""
    removed, kept = 0, {}
    for n, _, _ in layout_changing_clones(gm):
        total_before = count_conversions(gm, device).total
        saved = {u: (u.args, u.kwargs) for u in n.users}
        vals = {m: m.meta.get("val") for m in gm.graph.nodes}      # a refused trial puts these back
        upstream = set(itertools.takewhile(lambda m: m is not n, gm.graph.nodes))
        n.replace_all_uses_with(n.args[0])
        reason = None
        try:
            settle(gm, original, repair=False, contiguous_outputs=contiguous_outputs, settled=upstream)
            if count_conversions(gm, device).total >= total_before:
                reason = "consumer_would_reorder"
        except LayoutError as e:
            reason = e.args[1] if len(e.args) > 1 else "consumer_needs_strides"
        if reason is None:
            gm.graph.erase_node(n)
            removed += 1
        else:
            for u, (args, kwargs) in saved.items():
                u.args, u.kwargs = args, kwargs
            kept[reason] = kept.get(reason, 0) + 1
            for m, v in vals.items():
                if v is None:
                    m.meta.pop("val", None)
                else:
                    m.meta["val"] = v
    return removed, kept


COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor, aten.maximum.default, aten.minimum.default,
               aten.eq.Tensor, aten.ne.Tensor, aten.logical_and.default, aten.logical_or.default,
               aten.bitwise_and.Tensor, aten.bitwise_or.Tensor}


def steer_producers(gm) -> int:
    """Make a producer write the layout its copy converts to, so the copy goes.

    A pointwise op's output takes the layout of its first operand that decides
    it (TensorIterator's rule); when a commutative op's second operand already
    has the layout a following `clone` produces, swapping the operands makes the
    op write that layout and the clone a no-op, which is then removed.
    """
    steered = 0
    for c, src, out in layout_changing_clones(gm):
        p = c.args[0]
        while p.op == "call_function" and p.target is aten.expand.default and len(p.users) == 1 and \
                tensor_val(p.args[0]) is not None and tensor_val(p.args[0]).shape == tensor_val(p).shape:
            p = p.args[0]
        if p.op != "call_function" or p.target not in COMMUTATIVE or len(p.users) != 1 or \
                p.kwargs.get("alpha", 1) != 1 or len(p.args) != 2:
            continue
        a, b = (tensor_val(x) for x in p.args)
        if a is None or b is None or b.shape != out.shape or not same_layout(b, out) or same_layout(a, out):
            continue
        p.args = (p.args[1], p.args[0])
        propagate(gm)
        if same_layout(tensor_val(c.args[0]), tensor_val(c)):
            c.replace_all_uses_with(c.args[0])
            erase_with_feeders(gm, c)
            steered += 1
        else:
            p.args = (p.args[1], p.args[0])
            propagate(gm)
    return steered


def pretranspose_weights(gm) -> int:
    """`mm(x, permute(W, [1, 0]))` with W a get_attr -> a contiguous W^T buffer made once."""
    made = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in PERMUTES:
            continue
        w = n.args[0]
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and permutation(n) == [1, 0]):
            continue
        if not all(u.op == "call_function" and u.target in (aten.mm.default, aten.addmm.default) and
                   u.args[GEMM_OPERANDS[u.target][1]] is n for u in n.users):
            continue
        name = new_constant(gm, f"layout_t_{w.target}", fetch_attr(gm, w.target).t(), persistent=False)
        with gm.graph.inserting_before(n):
            wt = gm.graph.get_attr(name)
        n.replace_all_uses_with(wt)
        gm.graph.erase_node(n)
        if not w.users:
            gm.graph.erase_node(w)
        made += 1
    return made


# ---------------------------------------------------------------- the pass

@register_pass("layout", keeps_meta=True)
def layout(gm: torch.fx.GraphModule, ctx, *, channels_last: bool = True, transposes: bool = True,
           copies: bool = True, pretranspose: bool = False, contiguous_outputs: bool = True) -> PassResult:
    """Choose memory layouts (NHWC for convs, strided GEMM operands) and remove needless conversions."""
    device = ctx.device
    before = count_conversions(gm, device)
    original = layouts(gm)
    stats: dict = {"conversions_before": before.total, "conversion_bytes_before": before.bytes,
                   "explicit_before": before.explicit, "implicit_before": before.implicit}
    if transposes:
        stats["transposes_cancelled"], stats["transposes_composed"] = cancel_transposes(gm)
        gm.recompile()
        settle(gm, original, contiguous_outputs=contiguous_outputs)
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is CONV]
    if channels_last and convs:
        dtype = next((v.dtype for n in convs if (v := tensor_val(n)) is not None), torch.float32)
        if prefers_channels_last(device, dtype):
            trial = clone(gm)
            trial_original = layouts(trial)
            try:
                made = to_channels_last(trial, trial_original, contiguous_outputs)
            except LayoutError:
                made = None
            now = count_conversions(gm, device)
            then = count_conversions(trial, device) if made is not None else now
            if made is None:
                stats["skipped"] = {"channels_last_breaks_a_consumer": len(convs)}
            elif (then.total, then.bytes) < (now.total, now.bytes):
                gm, original = trial, trial_original
                stats.update(made)
            else:
                stats["skipped"] = {"channels_last_no_gain": len(convs)}
        else:
            stats["skipped"] = {"device_prefers_nchw": len(convs)}
    if copies:
        stats["producers_steered"] = steer_producers(gm)
        removed, kept = drop_copies(gm, original, contiguous_outputs, device)
        stats["copies_removed"] = removed
        if kept:
            stats["copies_kept"] = kept
    if pretranspose:
        stats["weights_pretransposed"] = pretranspose_weights(gm)
    propagate(gm)                        # the count below reads the layouts the graph now has
    after = count_conversions(gm, device)
    stats.update({"conversions_after": after.total, "conversion_bytes_after": after.bytes,
                  "explicit_after": after.explicit, "implicit_after": after.implicit,
                  "conversion_sites": after.sites[:16]})
    return PassResult(gm, stats=stats)
