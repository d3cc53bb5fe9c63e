"""C++ printer: a kernel description -> one OpenMP loop nest.

`#pragma omp parallel for` over the flattened outer index m; per reduction
phase an `omp simd` loop over r accumulating in fp32 (int64 for integers);
then a final simd loop that recomputes the elementwise values and stores the
outputs. Math is float; bf16 is loaded/stored as uint16_t with bit shifts
(round to nearest even); exp/log/erf/tanh are inline polynomials gcc can
vectorize (no -ffast-math: masks rely on -inf).
"""
from __future__ import annotations

import math

import torch

from . import CAST, EXPR, kernel_symbol

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
         "-std=c++17", "-w"]
PARALLEL_MIN_WORK = 1 << 15
SCRATCH_MAX = 1 << 13
SCRATCH_T = {"f": "float", "i": "int64_t", "b": "float"}
LEAF = ("load", "const", "iota")
STORAGE = {torch.float32: "float", torch.bfloat16: "uint16_t", torch.float16: "_Float16", torch.bool: "bool",
           torch.int64: "int64_t", torch.int32: "int32_t", torch.int16: "int16_t", torch.int8: "int8_t",
           torch.uint8: "uint8_t"}
CTYPE = {"f": "float", "i": "int64_t", "b": "bool"}

HEADER = r"""// passlab generated kernels
#include <stdint.h>
#include <string.h>
#include <math.h>
static inline float pl_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t pl_to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : r;
}
static inline float pl_max(float a, float b) { return a > b ? a : b; }
static inline float pl_min(float a, float b) { return a < b ? a : b; }
static inline int64_t pl_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t pl_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t pl_clampi(int64_t i, int64_t hi) { return i < 0 ? 0 : (i > hi ? hi : i); }
static inline float pl_abs(float a) { return a < 0.0f ? -a : a; }
static inline int64_t pl_abs(int64_t a) { return a < 0 ? -a : a; }
static inline float pl_exp(float x) {  // Cephes expf
  float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float fx = floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f; y = y * r + 8.3334519073E-3f; y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f; y = y * r + 5.0000001201E-1f;
  y = y * r * r + r + 1.0f;
  int32_t n = (int32_t)fx; uint32_t b = (uint32_t)(n + 127) << 23; float p; memcpy(&p, &b, 4);
  float res = y * p;
  res = x > 88.0f ? INFINITY : res;
  return x < -87.0f ? 0.0f : res;
}
static inline float pl_log(float x) {  // Cephes logf
  uint32_t u; memcpy(&u, &x, 4);
  int32_t e = (int32_t)((u >> 23) & 0xffu) - 126;
  uint32_t mb = (u & 0x807fffffu) | 0x3f000000u; float m; memcpy(&m, &mb, 4);
  bool small = m < 0.707106781186547524f;
  float ef = (float)e - (small ? 1.0f : 0.0f);
  m = small ? (m + m - 1.0f) : (m - 1.0f);
  float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f; y = y * m + 1.1676998740E-1f; y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f; y = y * m - 1.6668057665E-1f; y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f; y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y += ef * -2.12194440e-4f;
  y += -0.5f * z;
  float res = m + y + ef * 0.693359375f;
  res = x == INFINITY ? INFINITY : res;
  res = x == 0.0f ? -INFINITY : res;
  return x < 0.0f ? NAN : res;
}
static inline float pl_erf(float x) {  // rational approximation (Eigen's fast erf), |error| < 4e-7, no exp
  float xc = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  float x2 = xc * xc;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f; p = p * x2 - 5.69250639462346e-05f; p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f; p = p * x2 - 1.60960333262415e-02f; p = p * xc;
  float q = x2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f; q = q * x2 - 7.37332916720468e-03f; q = q * x2 - 1.42647390514189e-02f;
  return p / q;
}
static inline float pl_sigmoid(float x) { return 1.0f / (1.0f + pl_exp(-x)); }
static inline float pl_tanh(float x) { return 1.0f - 2.0f / (pl_exp(2.0f * x) + 1.0f); }

"""


def const(value, type_) -> str:
    if type_ == "b":
        return "true" if value else "false"
    if type_ == "i":
        return f"(int64_t){int(value)}"
    v = float(value)
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return f"{v!r}f"


def symbol(fk) -> str:
    return kernel_symbol(body, fk)


def render(fk) -> str:
    return body(fk, symbol(fk))


def term(v, d) -> str:
    """Index term of load `v` along anchor dim d; inputs of a cat read a shifted, clamped index."""
    for sd, off, size in v.args[2]:
        if sd == d:
            return f"pl_clampi(i{d} - {off}, {size - 1}) * {v.args[1][d]}"
    return f"i{d} * {v.args[1][d]}"


def byte_loads(k, need) -> set:
    """Elem-level loads of 1-byte data (masks) in a loop that also touches wider data:
    gcc does not vectorize such mixed loops, so each row is first widened into a
    float scratch array by a loop of its own."""
    loads = [v for v in k.values if v.id in need and v.op == "load" and v.elem]
    small = {v.id for v in loads if k.inputs[v.args[0]].dtype.itemsize == 1}
    wide = any(k.inputs[v.args[0]].dtype.itemsize > 1 for v in loads)
    return small if small and wide and k.r_size <= SCRATCH_MAX else set()


def load_expr(k, v, inner_idx: bool, scratch=frozenset()) -> str:
    buf, astr = k.inputs[v.args[0]], v.args[1]
    if v.id in scratch:
        return CAST[v.type][0].format(f"sb{v.id}[r]")
    off = f"o{v.id}"
    if inner_idx:
        terms = [term(v, d) for d in k.inner if astr[d]]
        off = " + ".join([off] + terms)
    raw = f"in{v.args[0]}[{off}]"
    if buf.dtype == torch.bfloat16:
        raw = f"pl_bf16({raw})"
    return CAST[v.type][0].format(raw)


def expr(k, v, vals, scratch=frozenset()) -> str:
    if v.op == "const":
        return const(v.args[0], v.type)
    if v.op == "load":
        return load_expr(k, v, v.elem, scratch)
    if v.op == "iota":
        d, start, step = v.args
        return CAST[v.type][0].format(f"{start} + {step} * i{d}")
    if v.op == "cast":
        return CAST[v.type][0].format(f"v{v.args[0]}")
    args = []
    for a in v.args:
        t = vals[a].type
        want = v.type if v.op not in ("where", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not") else t
        args.append(CAST[want][0].format(f"v{a}") if (t != want and v.op not in ("div",)) else f"v{a}")
    if v.op == "where":
        args = [f"v{v.args[0]}"] + [CAST[v.type][0].format(f"v{a}") if vals[a].type != v.type else f"v{a}"
                                    for a in v.args[1:]]
    return EXPR[v.op][0].format(*args)


def body(fk, name: str) -> str:
    k = fk.kernel
    vals = {v.id: v for v in k.values}
    need = k.needed()
    lines = [f"// {fk.name}: {', '.join(fk.ops)}",
             f"// iteration space {k.sizes}, inner dims {k.inner}; bytes in+out {k.bytes_moved():,}",
             f'extern "C" void {name}(void* const* pl_args) {{']
    for i, b in enumerate(k.inputs):
        lines.append(f"  const {STORAGE[b.dtype]}* __restrict in{i} = (const {STORAGE[b.dtype]}*)pl_args[{i}];")
    for j, b in enumerate(k.outputs):
        lines.append(f"  {STORAGE[b.dtype]}* __restrict out{j} = ({STORAGE[b.dtype]}*)pl_args[{len(k.inputs) + j}];")
    M, R = k.m_size, k.r_size
    if M > 1 and M * R >= PARALLEL_MIN_WORK:
        lines.append("  #pragma omp parallel for schedule(static)")
    lines.append(f"  for (int64_t m = 0; m < {M}; ++m) {{")
    body_ = []
    for d, div, size in k.index_terms(k.outer):
        body_.append(f"const int64_t i{d} = (m / {div}) % {size};")
    for v in k.values:
        if v.id in need and v.op == "load":
            astr = v.args[1]
            terms = [term(v, d) for d in k.outer if astr[d]]
            body_.append(f"const int64_t o{v.id} = {' + '.join(terms) or '0'};")
    for j, b in enumerate(k.outputs):
        terms = [f"i{d} * {b.astrides[d]}" for d in k.outer if b.astrides[d]]
        body_.append(f"const int64_t q{j} = {' + '.join(terms) or '0'};")
    phases = sorted({v.phase for v in k.values if v.id in need and v.op in ("sum", "max", "min")})
    emitted = set()

    def row_values(upto):
        for v in k.values:
            if v.id in need and not v.elem and v.id not in emitted and v.phase <= upto and \
                    v.op not in ("sum", "max", "min"):
                body_.append(f"const {CTYPE[v.type]} v{v.id} = {expr(k, v, vals)};")
                emitted.add(v.id)

    def inner_index():
        if len(k.inner) == 1:
            return [f"const int64_t i{k.inner[0]} = r;"]
        return [f"const int64_t i{d} = (r / {div}) % {size};" for d, div, size in k.index_terms(k.inner)]

    row_values(0)
    scratch = byte_loads(k, need)
    for vid in sorted(scratch):
        v = vals[vid]
        body_.append(f"float sb{vid}[{R}];")
        body_ += ["#pragma omp simd", f"for (int64_t r = 0; r < {R}; ++r) {{"] + ["  " + s for s in inner_index()]
        body_ += [f"  sb{vid}[r] = (float){load_expr(k, v, True)};", "}"]
    elem_stores = [(j, vid) for j, vid in k.stores if any(k.outputs[j].astrides[d] for d in k.inner)]
    row_stores = [(j, vid) for j, vid in k.stores if (j, vid) not in elem_stores]
    loops = [[v for v in k.values if v.id in need and v.phase == ph and v.op in ("sum", "max", "min")]
             for ph in phases]
    roots = [[r.args[0] for r in reds] for reds in loops] + ([[vid for _, vid in elem_stores]] if elem_stores else [])
    kept: set = set()   # elem values an earlier loop left in a per-row scratch array
    if not loops:
        row_values(10 ** 9)
    for li, loop_roots in enumerate(roots):
        reds = loops[li] if li < len(loops) else []
        closure = k.elem_closure(loop_roots, stop=kept)
        mine = {v.id for v in closure}
        later = set()
        if R <= SCRATCH_MAX:
            for nxt in roots[li + 1:]:
                for w in k.elem_closure(nxt, stop=kept | mine):
                    later |= {a for a in w.args if isinstance(a, int) and a in mine and w.op not in LEAF}
                later |= {r for r in nxt if r in mine}
        later -= {vid for vid in later if vals[vid].op == "const" or
                  (vals[vid].op == "load" and k.inputs[vals[vid].args[0]].dtype == torch.float32)}
        for vid in sorted(later):
            body_.append(f"{SCRATCH_T[vals[vid].type]} sv{vid}[{R}];")
        for reds_v in reds:
            v = reds_v
            acc_t = "int" if v.type == "b" else CTYPE[vals[v.args[0]].type if v.type != "f" else "f"]
            init = {"sum": "0", "max": "-INFINITY" if acc_t == "float" else "INT64_MIN",
                    "min": "INFINITY" if acc_t == "float" else "INT64_MAX"}[v.op]
            if v.type == "b":
                init = {"max": "0", "min": "1", "sum": "0"}[v.op]
            body_.append(f"{acc_t} acc{v.id} = {init};")
        clauses = [f"reduction({'+' if v.op == 'sum' else v.op}:acc{v.id})" for v in reds]
        body_.append(f"#pragma omp simd {' '.join(clauses)}".rstrip())
        body_.append(f"for (int64_t r = 0; r < {R}; ++r) {{")
        loop = inner_index()
        used = {a for w in closure if w.op not in LEAF for a in w.args} | set(loop_roots)
        for vid in sorted(kept & used):
            loop.append(f"const {CTYPE[vals[vid].type]} v{vid} = ({CTYPE[vals[vid].type]})sv{vid}[r];")
        for v in closure:
            loop.append(f"const {CTYPE[v.type]} v{v.id} = {expr(k, v, vals, scratch)};")
        for vid in sorted(later):
            loop.append(f"sv{vid}[r] = ({SCRATCH_T[vals[vid].type]})v{vid};")
        for v in reds:
            a_ = f"v{v.args[0]}"
            loop.append(f"acc{v.id} += {a_};" if v.op == "sum" else
                        f"acc{v.id} = acc{v.id} {'>' if v.op == 'max' else '<'} {a_} ? acc{v.id} : {a_};")
        if li == len(loops):
            for j, vid in elem_stores:
                b = k.outputs[j]
                off = " + ".join([f"q{j}"] + [f"i{d} * {b.astrides[d]}" for d in k.inner if b.astrides[d]])
                loop.append(f"out{j}[{off}] = {store(b, vid)};")
        body_ += ["  " + s for s in loop] + ["}"]
        kept |= later
        for v in reds:
            body_.append(f"const {CTYPE[v.type]} v{v.id} = ({CTYPE[v.type]})acc{v.id};")
            emitted.add(v.id)
        if li < len(loops):
            row_values(phases[li])
        if li == len(loops) - 1:
            row_values(10 ** 9)
    for j, vid in row_stores:
        body_.append(f"out{j}[q{j}] = {store(k.outputs[j], vid)};")
    lines += ["    " + s for s in body_]
    lines += ["  }", "}"]
    return "\n".join(lines)


def store(b, vid) -> str:
    if b.dtype == torch.bfloat16:
        return f"pl_to_bf16((float)v{vid})"
    return f"({STORAGE[b.dtype]})v{vid}"
