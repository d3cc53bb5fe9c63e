"""Triton printer: a kernel's loop plan (`plan.py`) -> one `@triton.jit` kernel.

Each program takes a tile of XBLOCK outer indices (rows) and walks the inner
dims in masked blocks of RBLOCK lanes, once per reduction phase (accumulating
in fp32 lanes, combined with tl.sum/tl.max at the end) and once more to store
the elementwise outputs; row values are [XBLOCK, 1] columns. Small inner dims
get many rows per program. Runs on CPU tensors under TRITON_INTERPRET=1.
Row indices are int64; the inner lane index is int32 unless the kernel's
`index_bits` is 64 (an offset or flat index reaches 2^31 elements).
"""
from __future__ import annotations

import math

import torch

from .exprs import CAST, EXPR
from .plan import STATEMENTS, Printer, gather_row, term, terms
from .symbols import naming

CLAMP = STATEMENTS["clamp"][1]

HEADER = "# passlab generated Triton kernels\nimport triton\nimport triton.language as tl\n\n"
MAX_RBLOCK = 1024
MAX_TILE = 2048
MAX_XBLOCK = 64


def pow2(n) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def rblock(k) -> int:
    return min(MAX_RBLOCK, pow2(k.r_size))


def xblock(k) -> int:
    return max(1, min(MAX_XBLOCK, MAX_TILE // rblock(k), pow2(k.m_size)))


def const(value, type_) -> str:
    if type_ == "b":
        return f"tl.full([], {1 if value else 0}, tl.int1)"
    if type_ == "i":
        return f"tl.full([], {int(value)}, tl.int64)"
    v = float(value)
    lit = f'float("{v}")' if math.isnan(v) or math.isinf(v) else repr(v)
    return f"tl.full([], {lit}, tl.float32)"


def expr(k, v, vals) -> str:
    if v.op == "gix":      # clamped into the table: `fuse` forms gathers for C++ kernels only, whose
        n, wrap = v.params  # error flag raises IndexError; here a bad index reads a row in range
        i = f"tl.where(v{v.args[0]} < 0, v{v.args[0]} + {n}, v{v.args[0]})" if wrap else f"v{v.args[0]}"
        return CLAMP.format(i, 0, n - 1)
    if v.op == "gather":
        inner = [term(t, CLAMP) for t in terms(v.params[1], k.inner)] if v.elem else []
        off = " + ".join([f"o{v.id}"] + inner + [gather_row(v, CLAMP)])
        return CAST[v.type][1].format(f"tl.load(in{v.params[0]} + {off}, mask={'emask' if v.elem else 'mmask'}, other=0)")
    if v.op == "const":
        return const(v.args[0], v.type)
    if v.op == "load":
        inner = [term(t, CLAMP) for t in terms(v.args[1], k.inner, v.args[2])] if v.elem else []
        off = " + ".join([f"o{v.id}"] + inner)
        return CAST[v.type][1].format(f"tl.load(in{v.args[0]} + {off}, mask={'emask' if v.elem else 'mmask'}, other=0)")
    if v.op == "iota":
        d, start, step = v.args
        return CAST[v.type][1].format(f"({start} + {step} * i{d})")
    if v.op == "cast":
        return CAST[v.type][1].format(f"v{v.args[0]}")
    if v.op == "where":
        args = [f"v{v.args[0]}"] + [CAST[v.type][1].format(f"v{a}") if vals[a].type != v.type else f"v{a}"
                                    for a in v.args[1:]]
        return EXPR["where"][1].format(*args)
    logical = v.op in ("eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "div", "f2i32")
    args = [f"v{a}" if logical or vals[a].type == v.type else CAST[v.type][1].format(f"v{a}") for a in v.args]
    return EXPR[v.op][1].format(*args)


ACC_T = {"f": "tl.float32", "i": "tl.int64", "b": "tl.int32"}


class Body(Printer):
    """Triton statements: a tile of XBLOCK rows per program; loops over r in
    masked blocks of RBLOCK lanes accumulating [XBLOCK, RBLOCK] tiles, combined
    with tl.sum / tl.max / tl.min after the loop; row values are [XBLOCK, 1]."""
    acc_types = ACC_T

    def begin(self):
        k = self.k
        args = [f"in{i}" for i in range(len(k.inputs))] + [f"out{j}" for j in range(len(k.outputs))]
        return self.comment("#") + [
            "@triton.jit", f"def {self.name}({', '.join(args + ['XBLOCK: tl.constexpr', 'RBLOCK: tl.constexpr'])}):",
            "    m = (tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK))[:, None]",
            f"    mmask = m < {k.m_size}"]

    def end(self):
        return [""]

    def expr(self, v):
        return expr(self.k, v, self.vals)

    def declare(self, loop):
        out = []
        for v in loop.reductions:
            init = {"sum": "0", "max": 'float("-inf")' if v.type == "f" else "-(2**62)",
                    "min": 'float("inf")' if v.type == "f" else "2**62"}[v.op]
            if v.type == "b":
                init = {"max": "0", "min": "1", "sum": "0"}[v.op]
            out.append(f"acc{v.id} = tl.full([XBLOCK, RBLOCK], {init}, {ACC_T[v.type]})")
        return out

    def loop_head(self, loop):
        R = self.k.r_size
        lanes = "(r0 + tl.arange(0, RBLOCK))" + (".to(tl.int64)" if self.k.index_bits == 64 else "")
        return [f"for r0 in range(0, {R}, RBLOCK):", f"    r = {lanes}[None, :]",
                f"    emask = mmask & (r < {R})"]

    def stored(self, j, vid, elem_loop):
        shape = "[XBLOCK, RBLOCK]" if elem_loop else "[XBLOCK, 1]"
        val = f"v{vid}" if elem_loop and self.vals[vid].elem else f"tl.broadcast_to(v{vid}, {shape})"
        return val + store_cast(self.k.outputs[j])


def body(fk, name: str) -> str:
    return Body(fk, name).render()


symbol, render = naming(body)


def store_cast(buf) -> str:
    if buf.dtype == torch.bool:
        return ".to(tl.int1)"
    names = {torch.float32: "tl.float32", torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16",
             torch.int64: "tl.int64", torch.int32: "tl.int32"}
    return f".to({names[buf.dtype]})" if buf.dtype in names else ""
