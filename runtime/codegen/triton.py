"""Triton printer: a kernel description -> one `@triton.jit` kernel.

Each program takes a tile of XBLOCK outer indices (rows) and walks the inner
dims in masked blocks of RBLOCK lanes, once per reduction phase (accumulating
in fp32 lanes, combined with tl.sum/tl.max at the end) and once more to store
the elementwise outputs; row values are [XBLOCK, 1] columns. Small inner dims
get many rows per program. Runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch

from . import CAST, EXPR, kernel_symbol

HEADER = "# passlab generated Triton kernels\nimport triton\nimport triton.language as tl\n\n"
TL = {"f": "tl.float32", "i": "tl.int64", "b": "tl.int1"}
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


def symbol(fk) -> str:
    return kernel_symbol(body, fk)


def render(fk) -> str:
    return body(fk, symbol(fk))


def term(v, d) -> str:
    """Index term of load `v` along anchor dim d; inputs of a cat read a shifted, clamped index."""
    for sd, off, size in v.args[2]:
        if sd == d:
            return f"tl.minimum(tl.maximum(i{d} - {off}, 0), {size - 1}) * {v.args[1][d]}"
    return f"i{d} * {v.args[1][d]}"


def expr(k, v, vals) -> str:
    if v.op == "const":
        return const(v.args[0], v.type)
    if v.op == "load":
        astr = v.args[1]
        off = " + ".join([f"o{v.id}"] + [term(v, d) for d in k.inner if astr[d]]) if v.elem else f"o{v.id}"
        mask = ", mask=emask, other=0" if v.elem else ", mask=mmask, other=0"
        return CAST[v.type][1].format(f"tl.load(in{v.args[0]} + {off}{mask})")
    if v.op == "iota":
        d, start, step = v.args
        return CAST[v.type][1].format(f"({start} + {step} * i{d})")
    if v.op == "cast":
        return CAST[v.type][1].format(f"v{v.args[0]}")
    if v.op == "where":
        args = [f"v{v.args[0]}"] + [CAST[v.type][1].format(f"v{a}") if vals[a].type != v.type else f"v{a}"
                                    for a in v.args[1:]]
        return EXPR["where"][1].format(*args)
    logical = v.op in ("eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "div")
    args = [f"v{a}" if logical or vals[a].type == v.type else CAST[v.type][1].format(f"v{a}") for a in v.args]
    return EXPR[v.op][1].format(*args)


def body(fk, name: str) -> str:
    k = fk.kernel
    vals = {v.id: v for v in k.values}
    need = k.needed()
    R = k.r_size
    ins = [f"in{i}" for i in range(len(k.inputs))] + [f"out{j}" for j in range(len(k.outputs))]
    lines = [f"# {fk.name}: {', '.join(fk.ops)}",
             f"# iteration space {k.sizes}, inner dims {k.inner}; bytes in+out {k.bytes_moved():,}",
             "@triton.jit", f"def {name}({', '.join(ins + ['XBLOCK: tl.constexpr', 'RBLOCK: tl.constexpr'])}):",
             "    m = (tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK))[:, None]",
             f"    mmask = m < {k.m_size}"]
    b_ = []
    for d, div, size in k.index_terms(k.outer):
        b_.append(f"i{d} = (m // {div}) % {size}")
    for v in k.values:
        if v.id in need and v.op == "load":
            terms = [term(v, d) for d in k.outer if v.args[1][d]]
            b_.append(f"o{v.id} = {' + '.join(terms) or '0 * m'}")
    for j, buf in enumerate(k.outputs):
        terms = [f"i{d} * {buf.astrides[d]}" for d in k.outer if buf.astrides[d]]
        b_.append(f"q{j} = {' + '.join(terms) or '0 * m'}")
    emitted = set()

    def row_values(upto):
        for v in k.values:
            if v.id in need and not v.elem and v.id not in emitted and v.phase <= upto and \
                    v.op not in ("sum", "max", "min"):
                b_.append(f"v{v.id} = {expr(k, v, vals)}")
                emitted.add(v.id)

    def loop_head():
        out = ["for r0 in range(0, %d, RBLOCK):" % R, "    r = (r0 + tl.arange(0, RBLOCK))[None, :]",
               "    emask = mmask & (r < %d)" % R]
        if len(k.inner) == 1:
            out.append(f"    i{k.inner[0]} = r")
        else:
            out += [f"    i{d} = (r // {div}) % {size}" for d, div, size in k.index_terms(k.inner)]
        return out

    row_values(0)
    phases = sorted({v.phase for v in k.values if v.id in need and v.op in ("sum", "max", "min")})
    for ph in phases:
        reds = [v for v in k.values if v.id in need and v.phase == ph and v.op in ("sum", "max", "min")]
        for v in reds:
            acc_t = {"f": "tl.float32", "i": "tl.int64", "b": "tl.int32"}[v.type]
            init = {"sum": "0", "max": 'float("-inf")' if v.type == "f" else "-(2**62)",
                    "min": 'float("inf")' if v.type == "f" else "2**62"}[v.op]
            if v.type == "b":
                init = {"max": "0", "min": "1", "sum": "0"}[v.op]
            b_.append(f"acc{v.id} = tl.full([XBLOCK, RBLOCK], {init}, {acc_t})")
        b_ += loop_head()
        for v in k.elem_closure([r.args[0] for r in reds]):
            b_.append(f"    v{v.id} = {expr(k, v, vals)}")
        for v in reds:
            acc_t = {"f": "tl.float32", "i": "tl.int64", "b": "tl.int32"}[v.type]
            a = f"v{v.args[0]}.to({acc_t})"
            if v.op == "sum":
                b_.append(f"    acc{v.id} = acc{v.id} + tl.where(emask, {a}, 0)")
            else:
                fn, pad = ("tl.maximum", f"acc{v.id}") if v.op == "max" else ("tl.minimum", f"acc{v.id}")
                b_.append(f"    acc{v.id} = tl.where(emask, {fn}(acc{v.id}, {a}), {pad})")
        for v in reds:
            comb = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min"}[v.op]
            res = f"{comb}(acc{v.id}, 1)[:, None]"
            b_.append(f"v{v.id} = {res}" if v.type != "b" else f"v{v.id} = {res} != 0")
            emitted.add(v.id)
        row_values(ph)
    row_values(10 ** 9)
    elem_stores = [(j, vid) for j, vid in k.stores if any(k.outputs[j].astrides[d] for d in k.inner)]
    row_stores = [(j, vid) for j, vid in k.stores if (j, vid) not in elem_stores]
    if elem_stores:
        b_ += loop_head()
        for v in k.elem_closure([vid for _, vid in elem_stores]):
            b_.append(f"    v{v.id} = {expr(k, v, vals)}")
        for j, vid in elem_stores:
            buf = k.outputs[j]
            off = " + ".join([f"q{j}"] + [f"i{d} * {buf.astrides[d]}" for d in k.inner if buf.astrides[d]])
            val = f"v{vid}" if vals[vid].elem else f"tl.broadcast_to(v{vid}, [XBLOCK, RBLOCK])"
            b_.append(f"    tl.store(out{j} + {off}, {val}{store_cast(buf)}, mask=emask)")
    for j, vid in row_stores:
        b_.append(f"tl.store(out{j} + q{j}, tl.broadcast_to(v{vid}, [XBLOCK, 1]){store_cast(k.outputs[j])}, "
                  "mask=mmask)")
    lines += ["    " + s for s in b_]
    return "\n".join(lines) + "\n"


def store_cast(buf) -> str:
    if buf.dtype == torch.bool:
        return ".to(tl.int1)"
    names = {torch.float32: "tl.float32", torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16",
             torch.int64: "tl.int64", torch.int32: "tl.int32"}
    return f".to({names[buf.dtype]})" if buf.dtype in names else ""
