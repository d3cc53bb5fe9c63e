"""The kernel description (the IR both printers read): `Kernel`, its `Buffer`s
and its SSA list of `Value`s.

- an iteration space: the *anchor* sizes, split into outer dims (one loop
  iteration `m` per point, run in parallel) and inner dims `R` (the reduced
  dims of a reduction kernel, the innermost dim of a pointwise kernel, looped
  over by `r`);
- buffers: every input and output is addressed by one stride per anchor dim
  (stride 0 where it broadcasts), so views, expands and permutes of kernel
  inputs cost nothing and strided inputs are read in place;
- values: an SSA list of primitive ops, each *row*-level (constant over `r`:
  reduction results, broadcast loads) or *elem*-level, every one computed in
  fp32 (int64 for integers, bool) whatever the storage dtype;
- gathers (`index_select`, `embedding`): a "gather" value reads one input at
  a row its index value picks (the index first passes a "gix" value, which
  checks it against the table's rows: out of range, the kernel returns
  non-zero and the runner raises IndexError as eager does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class LoweringError(ValueError):
    """The group cannot be expressed as one kernel. `reason` names the kind of
    refusal (the fusion pass counts its fallbacks by it): "not_one_kernel" for
    groups that do not map onto one loop nest, or the input class a kernel is
    never generated for ("empty_tensor", "overlapping_output", ...)."""

    def __init__(self, msg: str, reason: str = "not_one_kernel"):
        super().__init__(msg)
        self.reason = reason


TYPE_OF = {torch.float32: "f", torch.bfloat16: "f", torch.float16: "f", torch.bool: "b",
           torch.int64: "i", torch.int32: "i", torch.uint8: "i", torch.int8: "i", torch.int16: "i"}
COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
LOGICAL = {"and", "or", "not"}
REDUCE_INIT = {"sum": 0, "max": "-inf", "min": "inf"}

# ---------------------------------------------------------------- the description

def extent(shape, strides) -> int:
    """How many elements a strided view spans from its first element on."""
    return 1 + sum((n - 1) * abs(s) for n, s in zip(shape, strides) if n > 0)


def overlaps(shape, strides) -> bool:
    """Whether two indices of a strided view can address one element
    (an expanded dim: stride 0 along a dim of size > 1, or interleaved strides)."""
    dims = sorted(((abs(s), n) for n, s in zip(shape, strides) if n > 1))
    span = 1
    for s, n in dims:
        if s < span:
            return True
        span = s * n
    return False


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
    # gather: (input, stride per anchor dim, first row, rows to clamp into or 0, row stride);
    # gix: (rows, whether a negative index counts from the end)
    params: tuple = ()

    @property
    def address(self):
        """A load's or a gather's stride per anchor dim, and a load's concatenation shifts."""
        return (self.params[1], ()) if self.op == "gather" else (self.args[1], self.args[2])


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

    @property
    def index_bits(self) -> int:
        """32 when every flat index and element offset of the kernel fits an
        int32, else 64 (a printer whose index arithmetic is 32-bit by default,
        Triton's, widens it then)."""
        span = max([self.m_size * self.r_size] + [extent(b.shape, b.strides) for b in self.inputs + self.outputs])
        return 32 if span < 2 ** 31 else 64

    def bytes_moved(self):
        return sum(math.prod(b.shape) * b.dtype.itemsize for b in self.inputs + self.outputs)
