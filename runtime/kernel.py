"""The kernel description and `FusedKernel`, the target of a fused node.

A fused group (an FX subgraph of pointwise and reduction ops) is lowered to ONE
description that both printers (C++ for CPU, Triton for GPU) read:

- an iteration space: the *anchor* sizes, split into outer dims (one loop
  iteration `m` per point, run in parallel) and inner dims `R` (the reduced
  dims of a reduction kernel, the innermost dim of a pointwise kernel, looped
  over by `r`);
- buffers: every input and output is addressed by one stride per anchor dim
  (stride 0 where it broadcasts), so views, expands and permutes of kernel
  inputs cost nothing and strided inputs are read in place;
- values: an SSA list of primitive ops, each *row*-level (constant over `r`:
  reduction results, broadcast loads) or *elem*-level. Composites
  (`_softmax`, `native_layer_norm`, `gelu`, `var`, ...) are decomposed into
  primitives here, reductions accumulate in fp32 (int64 for integers), and
  every value is computed in fp32 whatever the storage dtype.

Lowering runs in three steps: build a DAG of primitives with PyTorch shapes
(broadcasting semantics), pick the anchor from the reductions (or from the
outputs), then materialize each value for the anchor dims it maps onto,
walking down from the outputs. A value that cannot be mapped consistently
raises `LoweringError`; the fusion pass uses that as its legality test.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from .costmodel import Cost, nbytes, tensors

aten = torch.ops.aten


class LoweringError(ValueError):
    """The group cannot be expressed as one kernel."""


TYPE_OF = {torch.float32: "f", torch.bfloat16: "f", torch.float16: "f", torch.bool: "b",
           torch.int64: "i", torch.int32: "i", torch.uint8: "i", torch.int8: "i", torch.int16: "i"}
COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
LOGICAL = {"and", "or", "not"}
REDUCE_INIT = {"sum": 0, "max": "-inf", "min": "inf"}


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


def _var(b, x, dims, correction=1, keepdim=False):
    dims = _dims(x, dims)
    n = _numel(x, dims)
    xc = b.ew("sub", x, _mean(b, x, dims, True))
    return b.ew("mul", b.reduce("sum", b.ew("mul", xc, xc), dims, keepdim), 1.0 / max(1, n - correction))


def _softmax(b, x, dim, _half=False, log=False):
    x = b.cast(x, "f")
    shifted = b.ew("sub", x, b.reduce("max", x, (dim,), True))
    e = b.ew("exp", shifted)
    s = b.reduce("sum", e, (dim,), True)
    return b.ew("sub", shifted, b.ew("log", s)) if log else b.ew("div", e, s)


def _layer_norm(b, x, shape, w, bias, eps):
    dims = tuple(range(len(x.shape) - len(shape), len(x.shape)))
    mean = _mean(b, x, dims, True)
    xc = b.ew("sub", x, mean)
    var = _mean(b, b.ew("mul", xc, xc), dims, True)
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
    q = b.ew("div", x, y)
    if rounding_mode is None:
        return q
    q = b.ew("floor" if rounding_mode == "floor" else "trunc", q)
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


def can_lower(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in DECOMP


# ---------------------------------------------------------------- the description

@dataclass
class Buffer:
    """A kernel input or output: storage dtype and one stride per anchor dim."""
    name: str
    dtype: torch.dtype
    shape: tuple
    strides: tuple              # the tensor's own strides (checked at call time for inputs)
    astrides: tuple = ()        # stride per anchor dim (0: broadcast)


@dataclass
class Value:
    id: int
    op: str                     # a primitive, "load", "const", "iota", "cast" or a reduction
    args: tuple                 # value ids, or for load/const/iota their parameters
    type: str                   # "f" float32, "i" int64, "b" bool
    elem: bool                  # varies over the inner dims
    phase: int = 0              # how many reduction loops must run before it


@dataclass
class Kernel:
    """One loop nest: `for m in outer: [reduction loops over r]; final loop over r`."""
    sizes: list                 # anchor dim sizes
    inner: list                 # anchor dims looped over by r (reduced dims, or the innermost dim)
    inputs: list
    outputs: list               # Buffers
    values: list
    stores: list                # (output index, value id)
    reductions: bool = False

    @property
    def outer(self):
        return [d for d in range(len(self.sizes)) if d not in self.inner]

    @property
    def m_size(self):
        return math.prod(self.sizes[d] for d in self.outer)

    @property
    def r_size(self):
        return math.prod(self.sizes[d] for d in self.inner)

    def index_terms(self, dims):
        """[(dim, divisor, size)] so that index[dim] = (flat // divisor) % size over `dims`."""
        out, div = [], 1
        for d in reversed(dims):
            out.append((d, div, self.sizes[d]))
            div *= self.sizes[d]
        return list(reversed(out))

    def needed(self):
        need, vals = set(), {v.id: v for v in self.values}
        stack = [vid for _, vid in self.stores]
        while stack:
            i = stack.pop()
            if i in need:
                continue
            need.add(i)
            v = vals[i]
            if v.op not in ("load", "const", "iota"):
                stack.extend(a for a in v.args if isinstance(a, int) and not isinstance(a, bool))
        return need

    def elem_closure(self, roots, stop=frozenset()):
        """Elem-level values a loop body must compute for `roots`, in order
        (values in `stop` are already at hand: kept by an earlier loop)."""
        vals = {v.id: v for v in self.values}
        seen, stack = set(), list(roots)
        while stack:
            i = stack.pop()
            v = vals[i]
            if i in seen or not v.elem or i in stop:
                continue
            seen.add(i)
            if v.op not in ("load", "const", "iota") and v.op not in REDUCE_INIT:
                stack.extend(v.args)
        return [v for v in self.values if v.id in seen]

    def bytes_moved(self):
        return sum(math.prod(b.shape) * b.dtype.itemsize for b in self.inputs + self.outputs)


# ---------------------------------------------------------------- step 2-3: anchor and materialization

def lower(gm: torch.fx.GraphModule) -> Kernel:
    """Lower a fused subgraph (placeholders = kernel inputs) into a Kernel."""
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
        if p.op in ("load", "const", "iota", "reshape", "cat"):
            return None
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

    def value(self, op, args, type_, elem, phase=0):
        key = (op, args, type_)
        if key in self.memo:
            return self.memo[key]
        v = Value(len(self.values), op, args, type_, elem, phase)
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
        v = node.meta["val"]
        idx = self.placeholders.index(node)
        astr = [0] * len(self.sizes)
        for i, d in enumerate(amap):
            if d is not None:
                astr[d] = v.stride()[i]
        elem = any(astr[d] for d in self.inner)
        shifts = tuple((d, off, size) for d, (off, size) in sorted(self.shift.items()) if astr[d])
        return self.value("load", (idx, tuple(astr), shifts), p.type, elem)

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
    loads = [v for v in k.values if v.op == "load"]
    lstr = [remap_astr(v.args[1]) for v in loads]
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
        v.args = (v.args[0], tuple(s), tuple((labels.index(keep.index(d)), o, n) for d, o, n in v.args[2]))
    for v in k.values:
        if v.op == "iota":
            v.args = (labels.index(keep.index(v.args[0])),) + tuple(v.args[1:])
    return k


# ---------------------------------------------------------------- the fused-node target

def op_names(gm: torch.fx.GraphModule) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is not operator.getitem:
            name = getattr(n.target, "__name__", str(n.target))
            out.append(name.replace(".default", ""))
    return out


@dataclass(eq=False)
class FusedKernel:
    """The target of a fused node: the subgraph it replaced, its description and
    generated sources; calling it runs the compiled kernel (or, on fake
    tensors, the subgraph)."""
    name: str
    subgraph: torch.fx.GraphModule
    kernel: Kernel = None
    is_fused_kernel: bool = True
    ops: list = field(default_factory=list)
    _compiled: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kernel is None:
            self.kernel = lower(self.subgraph)
        self.ops = op_names(self.subgraph)
        self.__name__ = self.name
        self._sources = {}

    @property
    def n_outputs(self):
        return len(self.kernel.outputs)

    @property
    def multi_output(self):
        return isinstance(self.subgraph.graph.output_node().args[0], (tuple, list))

    def source(self, device: str = "cpu") -> str:
        dev = "cuda" if str(device).startswith("cuda") else "cpu"
        if dev not in self._sources:
            from . import codegen
            self._sources[dev] = codegen.printer(dev).render(self)
        return self._sources[dev]

    def describe(self) -> str:
        k = self.kernel
        io = ", ".join(f"{b.name}{list(b.shape)}:{str(b.dtype).replace('torch.', '')}" for b in k.inputs)
        oo = ", ".join(f"{list(b.shape)}:{str(b.dtype).replace('torch.', '')}" for b in k.outputs)
        kind = "reduction" if k.reductions else "pointwise"
        head = (f"== {self.name}: {kind} kernel, {len(self.ops)} ops ({', '.join(self.ops)})\n"
                f"   iteration space {k.sizes}, inner dims {k.inner} (outer {k.m_size} x inner {k.r_size})\n"
                f"   inputs {io}\n   outputs {oo}\n   bytes in+out {k.bytes_moved():,}")
        return head + "\n" + self.source("cpu")

    def cost(self, node) -> Cost:
        out = tensors(node.meta.get("val"))
        flops = sum(1 for v in self.kernel.values if v.op not in ("load", "const")) * self.kernel.m_size * \
            max(1, self.kernel.r_size)
        moved = nbytes(out) + sum(nbytes(a.meta.get("val")) for a in node.all_input_nodes)
        return Cost(flops, moved, 1)

    def __call__(self, *inputs):
        run = self._compiled.get(inputs[0].device.type) if inputs else None
        if run is not None and not _is_fake(inputs):
            return run(*inputs)
        if _is_fake(inputs) or not inputs:
            return self.subgraph(*inputs)
        from . import codegen
        dev = inputs[0].device.type
        codegen.build([self], dev)
        return self._compiled[dev](*inputs)

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_compiled"] = {}
        return d

    def __repr__(self):
        return f"FusedKernel({self.name}: {', '.join(self.ops)})"


def _is_fake(inputs):
    from torch._subclasses.fake_tensor import FakeTensor
    return any(isinstance(x, FakeTensor) or (isinstance(x, torch.Tensor) and x.device.type == "meta")
               for x in inputs)
