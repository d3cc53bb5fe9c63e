"""Step 1 of lowering: a fused FX subgraph -> a DAG of primitives with PyTorch
shapes (broadcasting semantics). Composites (`_softmax`, `native_layer_norm`,
`gelu`, `var`, ...) are decomposed here into primitives; `DECOMP` has one line
per supported aten op.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx

from .ir import COMPARE, LOGICAL, TYPE_OF, LoweringError

aten = torch.ops.aten


# ---------------------------------------------------------------- step 1: a DAG of primitives

@dataclass(eq=False)
class P:
    """A primitive in the shape-level DAG (before the anchor is known)."""
    op: str
    args: tuple
    shape: tuple
    type: str = "f"
    rdims: tuple = ()           # reductions: reduced positions of args[0]
    keepdim: bool = True
    node: object = None         # loads: the placeholder
    perm: tuple = ()            # permute: the input dim behind each output dim
    wrap: bool = False          # gather: a negative index counts from the end (advanced indexing)
                                # gather: rdims = (the table's gathered dim,)


def bshape(*shapes):
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError as e:
        raise LoweringError(f"shapes do not broadcast: {shapes}") from e


class Builder:
    def __init__(self):
        self.loads: dict = {}

    def load(self, node):
        if node not in self.loads:
            v = node.meta.get("val")
            if not isinstance(v, torch.Tensor):
                raise LoweringError(f"input {node.name} is not a tensor")
            if v.dtype not in TYPE_OF:
                raise LoweringError(f"dtype {v.dtype} is not supported in kernels")
            self.loads[node] = P("load", (), tuple(v.shape), TYPE_OF[v.dtype], node=node)
        return self.loads[node]

    def const(self, value, type_=None, shape=()):
        type_ = type_ or ("b" if isinstance(value, bool) else "i" if isinstance(value, int) else "f")
        return P("const", (value,), tuple(shape), type_)

    def ew(self, op, *args, type_=None):
        ps = [a if isinstance(a, P) else self.const(a) for a in args]
        if type_ is None:
            if op in COMPARE or op in LOGICAL:
                type_ = "b"
            elif op == "where":
                type_ = promote(ps[1].type, ps[2].type)
            elif op == "div":
                type_ = "f"
            else:
                type_ = promote(*[p.type for p in ps])
        if op == "add" and type_ == "b":    # bool + bool is bool (or), not 1-bit arithmetic
            op = "or"
        return P(op, tuple(ps), bshape(*[p.shape for p in ps]), type_)

    def reduce(self, op, x, dims, keepdim):
        nd = len(x.shape)
        dims = tuple(sorted({d % nd for d in dims})) if nd else ()
        shape = tuple(1 if i in dims else s for i, s in enumerate(x.shape)) if keepdim else \
            tuple(s for i, s in enumerate(x.shape) if i not in dims)
        type_ = "b" if x.type == "b" and op in ("max", "min") else ("f" if x.type == "f" else "i")
        return P(op, (x,), shape, type_, rdims=dims, keepdim=keepdim)

    def cast(self, x, type_):
        if not isinstance(x, P):
            return self.const(x, type_)
        return x if x.type == type_ else P("cast", (x,), x.shape, type_)


def promote(*types):
    return "f" if "f" in types else "i" if "i" in types else "b"


def _dims(x, dims):
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(len(x.shape)))
    return tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)


def _numel(x, dims):
    return math.prod(x.shape[d] for d in dims) if x.shape else 1


def _mean(b, x, dims, keepdim=False):
    dims = _dims(x, dims)
    return b.ew("mul", b.reduce("sum", x, dims, keepdim), 1.0 / max(1, _numel(x, dims)))


def _moments(b, x, dims, keepdim):
    """(mean, sum of squared deviations) by the corrected two-pass algorithm:
    the second pass also sums the deviations from the first mean and corrects
    both with it (no extra loop), so a constant row (padding, an expanded
    input) has its mean exactly and a variance of exactly 0, as eager's."""
    n = max(1, _numel(x, dims))
    mean0 = _mean(b, x, dims, True)
    xc = b.ew("sub", x, mean0)

    def shift(kd):   # how far the first mean is off
        return b.ew("mul", b.reduce("sum", xc, dims, kd), 1.0 / n)
    dm = shift(keepdim)
    sq = b.reduce("sum", b.ew("mul", xc, xc), dims, keepdim)
    ss = b.ew("maximum", b.ew("sub", sq, b.ew("mul", b.ew("mul", dm, dm), float(n))), 0.0)
    ss = b.ew("where", b.ew("eq", sq, math.inf), math.inf, ss)   # overflowed: inf, as eager (not inf - inf)
    return b.ew("add", mean0, dm if keepdim else shift(True)), ss


def _var(b, x, dims, correction=1, keepdim=False):
    dims = _dims(x, dims)
    n = _numel(x, dims)
    _, ss = _moments(b, x, dims, keepdim)
    if n - correction <= 0:     # no degrees of freedom: ATen divides by 0 (NaN, or inf)
        return b.ew("div", ss, 0.0)
    return b.ew("mul", ss, 1.0 / (n - correction))


def _softmax(b, x, dim, _half=False, log=False):
    x = b.cast(x, "f")
    shifted = b.ew("sub", x, b.reduce("max", x, (dim,), True))
    e = b.ew("exp", shifted)
    s = b.reduce("sum", e, (dim,), True)
    return b.ew("sub", shifted, b.ew("log", s)) if log else b.ew("div", e, s)


def _layer_norm(b, x, shape, w, bias, eps):
    dims = tuple(range(len(x.shape) - len(shape), len(x.shape)))
    mean, ss = _moments(b, x, dims, True)
    xc = b.ew("sub", x, mean)
    var = b.ew("mul", ss, 1.0 / max(1, _numel(x, dims)))
    rstd = b.ew("rsqrt", b.ew("add", var, eps))
    out = b.ew("mul", xc, rstd)
    if w is not None:
        out = b.ew("mul", out, w)
    if bias is not None:
        out = b.ew("add", out, bias)
    return (out, mean, rstd)


def _batch_norm_inference(b, x, w, bias, rmean, rvar, momentum, eps):
    def chan(p):  # (C,) parameters broadcast along dim 1 of (N, C, ...)
        return P("reshape", (p,), (p.shape[0],) + (1,) * (len(x.shape) - 2), p.type) if p is not None else None
    out = b.ew("mul", b.ew("sub", x, chan(rmean)), b.ew("rsqrt", b.ew("add", chan(rvar), eps)))
    if w is not None:
        out = b.ew("mul", out, chan(w))
    if bias is not None:
        out = b.ew("add", out, chan(bias))
    return (out, None, None)


def _gelu(b, x, approximate="none"):
    if approximate == "tanh":
        inner = b.ew("mul", b.ew("add", x, b.ew("mul", b.ew("mul", b.ew("mul", x, x), x), 0.044715)),
                     math.sqrt(2.0 / math.pi))
        return b.ew("mul", b.ew("mul", x, 0.5), b.ew("add", b.ew("tanh", inner), 1.0))
    return b.ew("mul", b.ew("mul", x, 0.5), b.ew("add", b.ew("erf", b.ew("mul", x, 1 / math.sqrt(2.0))), 1.0))


def _pow(b, x, e):
    table = {1: lambda: x, 2: lambda: b.ew("mul", x, x), 3: lambda: b.ew("mul", b.ew("mul", x, x), x),
             0.5: lambda: b.ew("sqrt", x), -0.5: lambda: b.ew("rsqrt", x), -1: lambda: b.ew("recip", x),
             -2: lambda: b.ew("recip", b.ew("mul", x, x))}
    if e not in table:
        raise LoweringError(f"pow with exponent {e} is not supported")
    return table[e]()


def _full(b, node, value):
    v = node.meta["val"]
    return b.const(value, TYPE_OF.get(v.dtype, "f"), v.shape)


def _to(b, node, x, *a, **k):
    dt = node.meta["val"].dtype
    if dt not in TYPE_OF:
        raise LoweringError(f"cast to {dt} is not supported")
    t = TYPE_OF[dt]
    if t == "b" and isinstance(x, P) and x.type != "b":
        return b.ew("ne", x, 0)
    return b.cast(x, t)


def _binary(op, flip=False):
    def f(b, node, x, y, alpha=None, **kw):
        alpha = kw.get("alpha", alpha)
        if alpha is not None and alpha != 1:
            y = b.ew("mul", y, alpha)
        return b.ew(op, y, x) if flip else b.ew(op, x, y)
    return f


def _unary(op):
    return lambda b, node, x, *a, **k: b.ew(op, x)


def _bool_only(op):
    def f(b, node, *xs):
        if any(isinstance(x, P) and x.type != "b" for x in xs):
            raise LoweringError(f"{op} on non-bool tensors is not supported")
        return b.ew(op, *xs)
    return f


def _div_mode(b, node, x, y, rounding_mode=None):
    """True division; or integer division as ATen computes it: integers in integer arithmetic
    (float32 would round operands past 2^24; a zero divisor flags the call, and the runner
    raises ZeroDivisionError as eager does), floats floored by ATen's fmod algorithm
    (floor(1 / 0.1) is 10, eager's 1 // 0.1 is 9)."""
    if rounding_mode is None:
        return b.ew("div", x, y)
    if all(a.type != "f" if isinstance(a, P) else isinstance(a, int) for a in (x, y)):
        return b.ew("idiv_floor" if rounding_mode == "floor" else "idiv_trunc", b.cast(x, "i"), b.cast(y, "i"))
    q = b.ew("fdiv_floor", b.cast(x, "f"), b.cast(y, "f")) if rounding_mode == "floor" else \
        b.ew("trunc", b.ew("div", x, y))
    return b.cast(q, TYPE_OF[node.meta["val"].dtype])


def _iota(b, node, start, end=None, step=1, **kw):
    v = node.meta["val"]
    if end is None:
        start, end = 0, start
    return P("iota", (start, step), tuple(v.shape), TYPE_OF.get(v.dtype, "f"))


# aten op -> fn(builder, node, *args, **kwargs) -> P | tuple. One line per op.
DECOMP = {
    aten.add.Tensor: _binary("add"), aten.add.Scalar: _binary("add"),
    aten.sub.Tensor: _binary("sub"), aten.sub.Scalar: _binary("sub"), aten.rsub.Scalar: _binary("sub", True),
    aten.mul.Tensor: _binary("mul"), aten.mul.Scalar: _binary("mul"),
    aten.div.Tensor: _binary("div"), aten.div.Scalar: _binary("div"), aten.div.Tensor_mode: _div_mode,
    aten.maximum.default: _binary("maximum"), aten.minimum.default: _binary("minimum"),
    aten.eq.Tensor: _binary("eq"), aten.eq.Scalar: _binary("eq"), aten.ne.Tensor: _binary("ne"),
    aten.ne.Scalar: _binary("ne"), aten.lt.Tensor: _binary("lt"), aten.lt.Scalar: _binary("lt"),
    aten.le.Tensor: _binary("le"), aten.le.Scalar: _binary("le"), aten.gt.Tensor: _binary("gt"),
    aten.gt.Scalar: _binary("gt"), aten.ge.Tensor: _binary("ge"), aten.ge.Scalar: _binary("ge"),
    aten.neg.default: _unary("neg"), aten.exp.default: _unary("exp"), aten.log.default: _unary("log"),
    aten.sqrt.default: _unary("sqrt"), aten.rsqrt.default: _unary("rsqrt"), aten.abs.default: _unary("abs"),
    aten.tanh.default: _unary("tanh"), aten.sigmoid.default: _unary("sigmoid"), aten.erf.default: _unary("erf"),
    aten.reciprocal.default: _unary("recip"), aten.sin.default: _unary("sin"), aten.cos.default: _unary("cos"),
    aten.floor.default: _unary("floor"), aten.ceil.default: _unary("ceil"),
    aten.relu.default: lambda b, n, x: b.ew("maximum", x, 0.0),
    aten.silu.default: lambda b, n, x: b.ew("mul", x, b.ew("sigmoid", x)),
    aten.gelu.default: lambda b, n, x, approximate="none": _gelu(b, x, approximate),
    aten.pow.Tensor_Scalar: lambda b, n, x, e: _pow(b, x, e),
    aten.clamp.default: lambda b, n, x, lo=None, hi=None: _clamp(b, x, lo, hi),
    aten.clamp_min.default: lambda b, n, x, lo: b.ew("maximum", x, lo),
    aten.clamp_max.default: lambda b, n, x, hi: b.ew("minimum", x, hi),
    aten.hardtanh.default: lambda b, n, x, lo=-1.0, hi=1.0: _clamp(b, x, lo, hi),
    aten.leaky_relu.default: lambda b, n, x, s=0.01: b.ew("where", b.ew("gt", x, 0.0), x, b.ew("mul", x, s)),
    aten.where.self: lambda b, n, c, x, y: b.ew("where", c, x, y, type_=TYPE_OF[n.meta["val"].dtype]),
    aten.masked_fill.Scalar: lambda b, n, x, m, v: b.ew("where", m, v, x, type_=x.type),
    aten.masked_fill.Tensor: lambda b, n, x, m, v: b.ew("where", m, v, x, type_=x.type),
    aten.logical_not.default: lambda b, n, x: b.ew("not", x if x.type == "b" else b.ew("ne", x, 0)),
    aten.bitwise_not.default: _bool_only("not"),
    aten.logical_and.default: _bool_only("and"), aten.bitwise_and.Tensor: _bool_only("and"),
    aten.logical_or.default: _bool_only("or"), aten.bitwise_or.Tensor: _bool_only("or"),
    aten._to_copy.default: _to, aten.clone.default: _to,
    aten.scalar_tensor.default: lambda b, n, v, **k: _full(b, n, v),
    aten.full.default: lambda b, n, size, v, **k: _full(b, n, v),
    aten.full_like.default: lambda b, n, x, v, **k: _full(b, n, v),
    aten.zeros_like.default: lambda b, n, x, **k: _full(b, n, 0),
    aten.ones_like.default: lambda b, n, x, **k: _full(b, n, 1),
    aten.arange.start_step: _iota, aten.arange.start: _iota, aten.arange.default: _iota,
    aten._softmax.default: lambda b, n, x, dim, half: _softmax(b, x, dim),
    aten._log_softmax.default: lambda b, n, x, dim, half: _softmax(b, x, dim, log=True),
    aten.native_layer_norm.default: lambda b, n, x, s, w, bias, eps: _layer_norm(b, x, s, w, bias, eps),
    aten._native_batch_norm_legit_no_training.default:
        lambda b, n, x, w, bias, rm, rv, mom, eps: _batch_norm_inference(b, x, w, bias, rm, rv, mom, eps),
    aten.native_batch_norm.default: lambda b, n, x, w, bias, rm, rv, training, mom, eps:
        _batch_norm_inference(b, x, w, bias, rm, rv, mom, eps) if not training else _no(n),
    aten.sum.dim_IntList: lambda b, n, x, dims=None, keepdim=False, **k: b.reduce("sum", x, _dims(x, dims), keepdim),
    aten.sum.default: lambda b, n, x, **k: b.reduce("sum", x, _dims(x, None), False),
    aten.mean.dim: lambda b, n, x, dims=None, keepdim=False, **k: _mean(b, b.cast(x, "f"), dims, keepdim),
    aten.mean.default: lambda b, n, x, **k: _mean(b, b.cast(x, "f"), None),
    aten.amax.default: lambda b, n, x, dims=(), keepdim=False: b.reduce("max", x, _dims(x, dims), keepdim),
    aten.amin.default: lambda b, n, x, dims=(), keepdim=False: b.reduce("min", x, _dims(x, dims), keepdim),
    aten.any.dims: lambda b, n, x, dims=None, keepdim=False: b.reduce("max", _truth(b, x), _dims(x, dims), keepdim),
    aten.any.dim: lambda b, n, x, dim, keepdim=False: b.reduce("max", _truth(b, x), (dim,), keepdim),
    aten.any.default: lambda b, n, x: b.reduce("max", _truth(b, x), _dims(x, None), False),
    aten.all.default: lambda b, n, x: b.reduce("min", _truth(b, x), _dims(x, None), False),
    aten.all.dim: lambda b, n, x, dim, keepdim=False: b.reduce("min", _truth(b, x), (dim,), keepdim),
    aten.var.correction: lambda b, n, x, dims=None, correction=1, keepdim=False:
        _var(b, b.cast(x, "f"), dims, 1 if correction is None else correction, keepdim),
    aten.cat.default: lambda b, n, xs, dim=0: _cat(b, n, xs, dim),
    aten.permute.default: lambda b, n, x, dims: _permute(x, dims),
    aten.index_select.default: lambda b, n, x, dim, idx: _gather(x, dim, idx, one_d=True),
    aten.embedding.default: lambda b, n, w, idx, *a, **k: _gather(w, 0, idx),
    aten.index.Tensor: lambda b, n, x, indices: _gather(x, 0, *_one_index(indices), wrap=True),
    aten.transpose.int: lambda b, n, x, d0, d1: _transpose(x, d0, d1),
    operator.getitem: lambda b, n, x, i: _getitem(x, i),
}


def _cat(b, node, xs, dim):
    """Concatenation of computed values: each input is read with its index along
    `dim` shifted (and clamped), and a select picks the input that owns the index."""
    xs = [x for x in xs if isinstance(x, P) and math.prod(x.shape) > 0]
    shape = tuple(node.meta["val"].shape)
    if not xs or any(len(x.shape) != len(shape) for x in xs):
        raise LoweringError("cat of inputs with different ranks")
    type_ = promote(*[x.type for x in xs])
    return P("cat", tuple(b.cast(x, type_) for x in xs), shape, type_, rdims=(dim % len(shape),))


def _permute(x, dims):
    """A permuted view of a computed value: no data moves, the materializer maps its dims
    onto the input's (a permute between two fused ops, e.g. NHWC -> NCHW around a residual add)."""
    if not isinstance(x, P):
        raise LoweringError("permute of a constant")
    nd = len(x.shape)
    perm = tuple(d % nd for d in dims)
    return P("permute", (x,), tuple(x.shape[d] for d in perm), x.type, perm=perm)


def _one_index(indices):
    if len(indices) != 1 or not isinstance(indices[0], P):
        raise LoweringError("advanced indexing other than x[idx] (one index tensor, on dim 0)")
    return indices


def _gather(table, dim, index, one_d=False, wrap=False):
    """Rows of `table` along `dim` picked by an integer `index` (index_select: a 1-D index;
    embedding and x[idx]: any shape, dim 0; x[idx] wraps a negative index): the index's
    dims take the gathered dim's place. The table is a kernel input, a constant, or a
    concatenation of those along `dim` (an MoE's `cat([h, zeros])[src]`: the padding row
    is never written)."""
    if not isinstance(table, P) or not isinstance(index, P) or index.type != "i":
        raise LoweringError("a gather needs a tensor table and an integer index tensor")
    if one_d and len(index.shape) != 1:
        raise LoweringError("index_select with a 0-d index")
    dim %= len(table.shape)
    shape = table.shape[:dim] + index.shape + table.shape[dim + 1:]
    return P("gather", (table, index), shape, table.type, rdims=(dim,), wrap=wrap)


def _transpose(x, a, b):
    dims = list(range(len(x.shape)))
    a, b = a % len(dims), b % len(dims)
    dims[a], dims[b] = dims[b], dims[a]
    return _permute(x, dims)


def _no(node):
    raise LoweringError(f"{node.target} with these arguments has no kernel lowering")


def _clamp(b, x, lo, hi):
    if lo is not None:
        x = b.ew("maximum", x, lo)
    if hi is not None:
        x = b.ew("minimum", x, hi)
    return x


def _truth(b, x):
    return x if x.type == "b" else b.ew("ne", x, 0)


def _getitem(x, i):
    if not isinstance(x, tuple) or x[i] is None:
        raise LoweringError("getitem of an output the kernel does not compute")
    return x[i]


# integer dtypes narrower than the kernel's int64 arithmetic: a result that may leave their range
# wraps as eager's does (uint8 neg, int8 add), and a float converts through int32 as ATen's cast does
WRAP = {torch.int32: "wrap_i32", torch.int16: "wrap_i16", torch.int8: "wrap_i8", torch.uint8: "wrap_u8"}
MAY_LEAVE_RANGE = {"add", "sub", "mul", "neg", "abs", "cast"}


def narrow(p, dtype):
    """`p` (the kernel's int64 value of a node of integer `dtype`) as eager holds it in `dtype`."""
    if dtype not in WRAP or not isinstance(p, P) or p.type != "i" or p.op not in MAY_LEAVE_RANGE:
        return p
    if p.op == "cast" and p.args[0].type == "f":
        p = P("f2i32", p.args, p.shape, "i")
        if dtype == torch.int32:
            return p
    return P(WRAP[dtype], (p,), p.shape, "i")


def can_lower(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in DECOMP


# Rounded as eager rounds: a node whose meta carries ROUND_EACH_OP (the fusion pass marks the
# float ops a bf16/fp16 routing decision depends on) has its float result rounded to its own
# storage dtype inside the kernel, so an op ATen computes as "fp32 op, then round" gives eager's
# bits. Only ops whose fp32 result ATen computes the same way are marked (fuse.ROUNDS_AS_EAGER).
ROUND_EACH_OP = "passlab_round_each_op"
ROUND = {torch.bfloat16: "round_bf16", torch.float16: "round_f16"}


def round_each_op(p, dtype):
    """`p` (a node's float value) rounded to `dtype` as eager stores it between ops (not
    where it is a `dtype` value already: rounding it again changes nothing)."""
    if dtype not in ROUND or not isinstance(p, P) or p.type != "f" or held_in(p, dtype):
        return p
    return P(ROUND[dtype], (p,), p.shape, "f")


def held_in(p, dtype) -> bool:
    """Whether every value `p` takes is a `dtype` value: a load or constant of that dtype,
    a bool as 0 / 1, a value rounded to it, or a choice among such values (where, cat,
    gather, permute)."""
    if not isinstance(p, P):
        return False
    if p.op == "load":
        return p.node.meta["val"].dtype in (dtype, torch.bool)
    if p.op == "const":
        v = p.args[0]
        return isinstance(v, (bool, int, float)) and torch.tensor(float(v)).to(dtype).item() == v
    if p.op == "cast":
        return p.args[0].type == "b"
    if p.op == "where":
        return held_in(p.args[1], dtype) and held_in(p.args[2], dtype)
    if p.op == "gather":
        return held_in(p.args[0], dtype)
    if p.op in ("cat", "permute", "reshape"):
        return all(held_in(a, dtype) for a in p.args)
    return p.op == ROUND.get(dtype)
