"""C++ printer: a kernel's loop plan (`plan.py`) -> one OpenMP loop nest.

`#pragma omp parallel for` over the flattened outer index m; per reduction
phase an `omp simd` loop over r accumulating in fp32 (int64 for integers);
then a final simd loop that computes the elementwise values and stores the
outputs. Elementwise values a later loop needs again are kept in per-row
scratch arrays (rows up to 8192 elements); 1-byte masks read next to wider
data are widened into a float row first, so gcc vectorizes the loops. Math
is float; bf16 is loaded/stored as uint16_t with bit shifts (round to nearest
even); exp/log/erf/tanh are inline polynomials gcc can vectorize (no
-ffast-math: masks rely on -inf).
"""
from __future__ import annotations

import math

import torch

from .exprs import CAST, EXPR
from .plan import STATEMENTS, Printer, gather_row, term, terms
from .symbols import naming

CLAMP = STATEMENTS["clamp"][0]

# -ffp-contract=off: no fused multiply-adds behind the source's back (x*y - x*y must be 0, as in eager:
# the variance of a constant row)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
         "-shared", "-fPIC", "-std=c++17", "-w"]
PARALLEL_MIN_WORK = 1 << 15
SCRATCH_MAX = 1 << 13
LONG_ROW = 1 << 12          # float sums over longer rows accumulate in double
SCRATCH_T = {"f": "float", "i": "int64_t", "b": "float"}
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
// as ATen's maximum/minimum: NaN wins, and of two equal values (-0.0, 0.0) the first
static inline float pl_max(float a, float b) { return (a < b || b != b) ? b : a; }
static inline float pl_min(float a, float b) { return (b < a || b != b) ? b : a; }
static inline int64_t pl_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t pl_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline bool pl_max(bool a, bool b) { return a || b; }
static inline bool pl_min(bool a, bool b) { return a && b; }
static inline int64_t pl_clampi(int64_t i, int64_t hi) { return i < 0 ? 0 : (i > hi ? hi : i); }
// a gather's row index: outside [0, n) it flags the call (the runner raises IndexError, as eager
// does) and reads row 0 instead
static inline int64_t pl_gix(int64_t i, int64_t n, int* bad) {
  if ((uint64_t)i >= (uint64_t)n) { __atomic_store_n(bad, 1, __ATOMIC_RELAXED); return 0; }
  return i;
}
// integer division as ATen's (truncated, or floored); a zero divisor flags the call (2: the runner
// raises ZeroDivisionError), and INT64_MIN / -1 wraps instead of trapping
static inline int64_t pl_idiv(int64_t a, int64_t b, bool floored, int* bad) {
  if (b == 0) { __atomic_store_n(bad, 2, __ATOMIC_RELAXED); return 0; }
  if (b == -1) return (int64_t)(0 - (uint64_t)a);
  int64_t q = a / b;
  return (floored && a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
// float floor division as ATen's vectorized div_floor_floating_vec (fmod based)
static inline float pl_fdiv_floor(float a, float b) {
  float basic = a / b;
  float mod = fmodf(a, b);
  float fl = (fabsf(basic) == INFINITY && fabsf(a) != INFINITY) ? a : a - mod;
  float div = fl / b;
  if (mod != 0.0f && ((b < 0.0f) != (mod < 0.0f))) div -= 1.0f;
  float q = floorf(div);
  q = div - q > 0.5f ? q + 1.0f : q;
  q = div == 0.0f ? copysignf(0.0f, basic) : q;
  return b == 0.0f ? basic : q;
}
static inline float pl_abs(float a) { return fabsf(a); }
static inline int64_t pl_abs(int64_t a) { return a < 0 ? -a : a; }
// exp: Cody-Waite reduction, Sleef's degree-6 expf polynomial with explicit fmaf, 2^n applied in two
// halves so that overflow to inf comes out of the arithmetic itself; within 1 ulp of exp wherever
// exp(x) >= FLT_MIN, exact at 0, +-inf and NaN. Below ln(FLT_MIN) (-87.34) the result is flushed to 0,
// as GPU exp (ex2.approx.ftz) and -ffast-math flush it: the lane computes exp(0) and selects 0. A
// masked score (-inf, -1e4, Swin's -100) would otherwise underflow through the denormal range, which
// costs a microcode assist per lane (causal softmax [32, 256, 256] bf16 on Zen 4: 792 -> 449 us with
// a -1e4 mask, 934 -> 455 us with -100; the bf16 results are unchanged). gcc vectorizes it in
// `omp simd` loops (glibc's libmvec `expf` measured 2x slower).
static inline float pl_exp(float x) {
  float xc = x < -87.33654f ? 0.0f : (x > 89.0f ? 89.0f : x);
  float n = rintf(xc * 1.44269504088896341f);
  float r = fmaf(n, -0.693145751953125f, xc);
  r = fmaf(n, -1.428606765330187045e-06f, r);
  float u = 0.000198527617612853646278381f;
  u = fmaf(u, r, 0.00139304355252534151077271f);
  u = fmaf(u, r, 0.00833336077630519866943359f);
  u = fmaf(u, r, 0.0416664853692054748535156f);
  u = fmaf(u, r, 0.166666671633720397949219f);
  u = fmaf(u, r, 0.5f);
  u = fmaf(r * r, u, r) + 1.0f;
  int32_t ni = (int32_t)n, n1 = ni >> 1;
  uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(ni - n1 + 127) << 23;
  float s1, s2; memcpy(&s1, &b1, 4); memcpy(&s2, &b2, 4);
  float e = u * s1 * s2;
  return x < -87.33654f ? 0.0f : e;
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
  return (x < 0.0f || x != x) ? NAN : res;
}
static inline float pl_erf(float x) {  // rational approximation (Eigen's fast erf), |error| < 4e-7, no exp
  float xc = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  float x2 = xc * xc;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f; p = p * x2 - 5.69250639462346e-05f; p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f; p = p * x2 - 1.60960333262415e-02f; p = p * xc;
  float q = x2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f; q = q * x2 - 7.37332916720468e-03f; q = q * x2 - 1.42647390514189e-02f;
  float res = p / q;   // |erf| <= 1, and erf(+-inf) = +-1 exactly (gelu(-inf) = -inf * 0 = NaN, as eager)
  res = res > 1.0f ? 1.0f : res;   // one condition per select: gcc 12 does not vectorize a loop
  res = x >= 4.0f ? 1.0f : res;     // whose select tests "a || b" here (GELU ran scalar, 14x eager)
  res = res < -1.0f ? -1.0f : res;
  return x <= -4.0f ? -1.0f : res;
}
// float -> integer as ATen's conversion gives it on x86 (NaN and out of range: the minimum). The
// "- (x != x)" (0 wherever it is used) keeps gcc from folding a float -> int -> float round trip
// into truncf, which would turn -0.4 into -0.0 where the int is 0
static inline int64_t pl_f2i64(float x) {
  int64_t i = (int64_t)x - (int64_t)(x != x);
  return (x >= -9223372036854775808.0f && x < 9223372036854775808.0f) ? i : INT64_MIN;
}
static inline int64_t pl_f2i32(float x) {
  int64_t i = (int64_t)(int32_t)x - (int64_t)(x != x);
  return (x >= -2147483648.0f && x < 2147483648.0f) ? i : (int64_t)INT32_MIN;
}
static inline float pl_sigmoid(float x) { return 1.0f / (1.0f + pl_exp(-x)); }
static inline float pl_tanh(float x) {  // near 0 Cephes' odd polynomial (tanh(1e-30) is 1e-30, not 0)
  float z = x * x;
  float p = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z
             - 3.33332819422e-1f) * z * x + x;
  return pl_abs(x) < 0.625f ? p : 1.0f - 2.0f / (pl_exp(2.0f * x) + 1.0f);
}

"""



def const(value, type_) -> str:
    if type_ == "b":
        return "true" if value else "false"
    if type_ == "i":
        return f"(int64_t){int(value)}"
    v = torch.tensor(float(value), dtype=torch.float32).item()   # the float ATen's ops compute with
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return f"{v!r}f"


def byte_loads(k, need) -> set:
    """Elem-level loads of 1-byte data (masks) in a loop that also touches wider data:
    gcc does not vectorize such mixed loops, so each row is first widened into a
    float scratch array by a loop of its own."""
    loads = [v for v in k.values if v.id in need and v.op == "load" and v.elem]
    small = {v.id for v in loads if k.inputs[v.args[0]].dtype.itemsize == 1}
    wide = any(k.inputs[v.args[0]].dtype.itemsize > 1 for v in loads)
    return small if small and wide and k.r_size <= SCRATCH_MAX else set()


def load_expr(k, v, inner_idx: bool, scratch=frozenset()) -> str:
    """A load (or a gather: its row, clamped into a concatenation part's rows, times the row stride)."""
    if v.id in scratch:
        return CAST[v.type][0].format(f"sb{v.id}[r]")
    astr, shifts = v.address
    inner = [term(t, CLAMP) for t in terms(astr, k.inner, shifts)] if inner_idx else []
    src = v.params[0] if v.op == "gather" else v.args[0]
    if v.op == "gather":
        inner.append(gather_row(v, CLAMP))
    off = " + ".join([f"o{v.id}"] + inner)
    raw = f"in{src}[{off}]"
    if k.inputs[src].dtype == torch.bfloat16:
        raw = f"pl_bf16({raw})"
    return CAST[v.type][0].format(raw)


def expr(k, v, vals, scratch=frozenset()) -> str:
    if v.op == "const":
        return const(v.args[0], v.type)
    if v.op in ("load", "gather"):
        return load_expr(k, v, v.elem, scratch)
    if v.op == "gix":
        n, wrap = v.params
        return f"pl_gix(v{v.args[0]}{f' + (v{v.args[0]} < 0 ? {n} : 0)' if wrap else ''}, {n}, &pl_bad)"
    if v.op == "iota":
        d, start, step = v.args
        return CAST[v.type][0].format(f"{start} + {step} * i{d}")
    if v.op == "cast":
        if v.type == "i" and vals[v.args[0]].type == "f":
            return f"pl_f2i64(v{v.args[0]})"
        return CAST[v.type][0].format(f"v{v.args[0]}")
    args = []
    for a in v.args:
        t = vals[a].type
        want = v.type if v.op not in ("where", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not") else t
        args.append(CAST[want][0].format(f"v{a}") if (t != want and v.op not in ("div", "f2i32")) else f"v{a}")
    if v.op == "where":
        args = [f"v{v.args[0]}"] + [CAST[v.type][0].format(f"v{a}") if vals[a].type != v.type else f"v{a}"
                                    for a in v.args[1:]]
    return EXPR[v.op][0].format(*args)


class Body(Printer):
    """C++ statements: `omp parallel for` over rows, `omp simd` loops over r
    accumulating in scalars, per-row scratch arrays on the stack."""
    INDENT, LOOP_INDENT, scratch_rows, column, types = "    ", "  ", SCRATCH_MAX, 0, CTYPE

    def __init__(self, fk, name):
        super().__init__(fk, name)
        self.widened = byte_loads(self.k, self.plan.need)

    def begin(self):
        k = self.k
        lines = self.comment("//") + [f'extern "C" int {self.name}(void* const* pl_args) {{', "  int pl_bad = 0;"]
        for i, b in enumerate(k.inputs):
            lines.append(f"  const {STORAGE[b.dtype]}* __restrict in{i} = (const {STORAGE[b.dtype]}*)pl_args[{i}];")
        for j, b in enumerate(k.outputs):
            t = STORAGE[b.dtype]
            lines.append(f"  {t}* __restrict out{j} = ({t}*)pl_args[{len(k.inputs) + j}];")
        if k.m_size > 1 and k.m_size * k.r_size >= PARALLEL_MIN_WORK:
            lines.append("  #pragma omp parallel for schedule(static)")
        return lines + [f"  for (int64_t m = 0; m < {k.m_size}; ++m) {{"]

    def end(self):
        return ["  }", "  return pl_bad;", "}"]

    def expr(self, v):
        return expr(self.k, v, self.vals, self.widened)

    def before_loops(self):
        """Each 1-byte elementwise load widened into a float row of its own first (see byte_loads)."""
        out, R = [], self.k.r_size
        for vid in sorted(self.widened):
            out += [f"float sb{vid}[{R}];", "#pragma omp simd", f"for (int64_t r = 0; r < {R}; ++r) {{"]
            out += ["  " + self.index(d, div, size, "r") for d, div, size in self.plan.inner]
            out += [f"  sb{vid}[r] = (float){load_expr(self.k, self.vals[vid], True)};", "}"]
        return out

    def declare(self, loop):
        out = [f"{SCRATCH_T[self.vals[vid].type]} sv{vid}[{self.k.r_size}];" for vid in loop.keep]
        for v in loop.reductions:
            acc_t = "int" if v.type == "b" else CTYPE[v.type]    # a sum of bools counts in int64
            if v.op == "sum" and v.type == "f" and self.k.r_size > LONG_ROW:
                acc_t = "double"    # each simd lane sums a long row in turn: fp32 would drift (eager sums pairwise)
            init = {"sum": "0", "max": "-INFINITY" if acc_t == "float" else "INT64_MIN",
                    "min": "INFINITY" if acc_t == "float" else "INT64_MAX"}[v.op]
            if v.type == "b":
                init = {"max": "0", "min": "1", "sum": "0"}[v.op]
            out.append(f"{acc_t} acc{v.id} = {init};")
            if nan_flagged(v):
                out.append(f"int nan{v.id} = 0;")
        return out

    def accumulate(self, v):
        line = super().accumulate(v)
        return line + " " + self.stmt("nan_seen", id=v.id, x=v.args[0]) if nan_flagged(v) else line

    def loop_head(self, loop, lo: int = 0, hi: int | None = None):
        clauses = [f"reduction({'+' if v.op == 'sum' else v.op}:acc{v.id})" for v in loop.reductions]
        clauses += [f"reduction(|:nan{v.id})" for v in loop.reductions if nan_flagged(v)]
        hi = self.k.r_size if hi is None else hi
        return [f"#pragma omp simd {' '.join(clauses)}".rstrip(), f"for (int64_t r = {lo}; r < {hi}; ++r) {{"]

    def loop_nest(self, loop, inner):
        """A store loop reading a concatenation along r runs once per input's range of r:
        in each copy gcc knows which input every element comes from (no clamped,
        gathered loads, no select), and each element's value is the same."""
        cuts = [] if loop.reductions else cat_bounds(self.k, self.vals, self.plan)
        if not cuts:
            return super().loop_nest(loop, inner)
        out, edges = [], [0] + cuts + [self.k.r_size]
        for lo, hi in zip(edges, edges[1:]):
            out += self.loop_head(loop, lo, hi) + [self.LOOP_INDENT + s for s in inner] + self.loop_end()
        return out

    def loop_end(self):
        return ["}"]

    def reuse(self, vid):
        t = CTYPE[self.vals[vid].type]
        return f"const {t} v{vid} = ({t})sv{vid}[r];"

    def keep(self, vid):
        return f"sv{vid}[r] = ({SCRATCH_T[self.vals[vid].type]})v{vid};"

    def stored(self, j, vid, elem_loop):
        return store(self.k.outputs[j], vid)


def body(fk, name: str) -> str:
    return Body(fk, name).render()


symbol, render = naming(body)


MAX_SEGMENTS = 8


def cat_bounds(k, vals, plan) -> list[int]:
    """The ends of a concatenation's inputs along r (`iota(r) < end` selects), where r
    is the kernel's one inner index; empty when there are none or too many."""
    if len(plan.inner) != 1 or plan.inner[0][1] not in (None, 1):
        return []
    d = plan.inner[0][0]
    cuts = set()
    for v in k.values:
        if v.op != "lt" or v.id not in plan.need:
            continue
        a, b = (vals[x] for x in v.args)
        if a.op == "iota" and tuple(a.args) == (d, 0, 1) and b.op == "const" and isinstance(b.args[0], int):
            if 0 < b.args[0] < k.r_size:
                cuts.add(b.args[0])
    return sorted(cuts) if len(cuts) < MAX_SEGMENTS else []


def nan_flagged(v) -> bool:
    """A float max/min reduction: NaN-propagating via a flag, so the accumulation stays a plain simd max."""
    return v.type == "f" and v.op in ("max", "min")


def store(b, vid) -> str:
    if b.dtype == torch.bfloat16:
        return f"pl_to_bf16((float)v{vid})"
    return f"({STORAGE[b.dtype]})v{vid}"
