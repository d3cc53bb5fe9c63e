"""CPU: decode-shaped GEMMs (a few rows times a weight) as one C++ template
kernel that reads each weight row once: `y = x @ W^T (+ bias) (+ residual)`.

When a model decodes, every linear layer multiplies M = batch rows (1-8) by
its weight: the work is reading the weight, and a general GEMM library pays
packing and blocking made for large M (measured on Zen 4, bf16: torch.mm at
[4, 512] x [512, 2752] reaches about half the copy bandwidth). The template
walks the weight's rows (a Linear's own [N, K] layout, contiguous), keeps the
M input rows in L1, and accumulates each (m, n) dot product in fp32: AVX512-BF16
`vdpbf16ps` for bf16, AVX512 FMA for fp32, plain loops (which gcc vectorizes)
where the processor has neither. Bias and a residual add are applied to the
fp32 sum, which is rounded to the output dtype once. Rows of N are split over
OpenMP threads.

`DecodeGemm` is the node target: `(x [M, K], w [N, K], bias [N] | None,
residual [M, N] | None) -> y [M, N]`. It checks its inputs before touching
memory (device, dtype, shapes, strides) and runs the ATen reference for
anything else, so it never crashes; on fake tensors it only gives the shape.
"""
from __future__ import annotations

import ctypes
import functools

import torch

MAX_ROWS = 8
DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}

SOURCE = r"""// passlab decode GEMM: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]) (+ r[m, n]), m < M <= 8
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
static inline float pl_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t pl_to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : r;
}
static inline float ld(const uint16_t* p, int64_t i) { return pl_bf16(p[i]); }
static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline void st(uint16_t* p, int64_t i, float v) { p[i] = pl_to_bf16(v); }
static inline void st(float* p, int64_t i, float v) { p[i] = v; }

// the M dot products of weight row n with the input rows, in fp32
template <int M> static inline void dots(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float* s) {
  int64_t k = 0;
#if defined(__AVX512BF16__)
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(w + k));
    for (int m = 0; m < M; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512((const void*)(x + m * ldx + k)), wv);
  }
  for (int m = 0; m < M; ++m) s[m] = _mm512_reduce_add_ps(acc[m]);
#else
  for (int m = 0; m < M; ++m) s[m] = 0.0f;
#endif
  for (int m = 0; m < M; ++m) {
    float t = 0.0f;
    for (int64_t kk = k; kk < K; ++kk) t += pl_bf16(x[m * ldx + kk]) * pl_bf16(w[kk]);
    s[m] += t;
  }
}
template <int M> static inline void dots(const float* x, int64_t ldx, const float* w, int64_t K, float* s) {
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m512 wv = _mm512_loadu_ps(w + k);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k), wv, acc[m]);
  }
  for (int m = 0; m < M; ++m) s[m] = _mm512_reduce_add_ps(acc[m]);
#else
  for (int m = 0; m < M; ++m) s[m] = 0.0f;
#endif
  for (int m = 0; m < M; ++m) {
    float t = 0.0f;
    for (int64_t kk = k; kk < K; ++kk) t += x[m * ldx + kk] * w[kk];
    s[m] += t;
  }
}

template <int M, typename T>
static void gemv(const T* x, int64_t ldx, const T* w, const T* b, const T* r, int64_t ldr, T* y,
                 int64_t N, int64_t K) {
  #pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
  for (int64_t nb = 0; nb < N; nb += 32) {
    int64_t ne = nb + 32 < N ? nb + 32 : N;
    for (int64_t n = nb; n < ne; ++n) {
      float s[M];
      dots<M>(x, ldx, w + n * K, K, s);
      for (int m = 0; m < M; ++m) {
        float v = s[m];
        if (b) v += ld(b, n);
        if (r) v += ld(r, m * ldr + n);
        st(y, m * N + n, v);
      }
    }
  }
}

template <typename T>
static int dispatch(int64_t M, const T* x, int64_t ldx, const T* w, const T* b, const T* r, int64_t ldr, T* y,
                    int64_t N, int64_t K) {
  switch (M) {
    case 1: gemv<1>(x, ldx, w, b, r, ldr, y, N, K); return 0;
    case 2: gemv<2>(x, ldx, w, b, r, ldr, y, N, K); return 0;
    case 3: gemv<3>(x, ldx, w, b, r, ldr, y, N, K); return 0;
    case 4: gemv<4>(x, ldx, w, b, r, ldr, y, N, K); return 0;
    case 5: gemv<5>(x, ldx, w, b, r, ldr, y, N, K); return 0;
    case 6: gemv<6>(x, ldx, w, b, r, ldr, y, N, K); return 0;
    case 7: gemv<7>(x, ldx, w, b, r, ldr, y, N, K); return 0;
    case 8: gemv<8>(x, ldx, w, b, r, ldr, y, N, K); return 0;
  }
  return 1;
}

// a grouped GEMM of S <= 8 rows: rows offs[g-1]:offs[g] times weight g ([G, N, K]); rows past offs[G-1] are 0
template <typename T>
static int grouped(int64_t S, const T* x, int64_t ldx, const T* w, int64_t G, const int32_t* offs, T* y,
                   int64_t N, int64_t K) {
  int64_t s = 0;
  for (int64_t g = 0; g < G; ++g) {
    int64_t e = offs[g];
    if (e < s || e > S) return 1;
    if (e > s && dispatch(e - s, x + s * ldx, ldx, w + g * N * K, (const T*)0, (const T*)0, 0, y + s * N, N, K))
      return 1;
    s = e;
  }
  for (int64_t i = s * N; i < S * N; ++i) st(y, i, 0.0f);
  return 0;
}

extern "C" int pl_grouped_gemv_bf16(int64_t S, const void* x, int64_t ldx, const void* w, int64_t G,
                                    const int32_t* offs, void* y, int64_t N, int64_t K) {
  return grouped(S, (const uint16_t*)x, ldx, (const uint16_t*)w, G, offs, (uint16_t*)y, N, K);
}
extern "C" int pl_grouped_gemv_f32(int64_t S, const void* x, int64_t ldx, const void* w, int64_t G,
                                   const int32_t* offs, void* y, int64_t N, int64_t K) {
  return grouped(S, (const float*)x, ldx, (const float*)w, G, offs, (float*)y, N, K);
}

extern "C" int pl_gemv_bf16(int64_t M, const void* x, int64_t ldx, const void* w, const void* b, const void* r,
                            int64_t ldr, void* y, int64_t N, int64_t K) {
  return dispatch(M, (const uint16_t*)x, ldx, (const uint16_t*)w, (const uint16_t*)b, (const uint16_t*)r, ldr,
                  (uint16_t*)y, N, K);
}
extern "C" int pl_gemv_f32(int64_t M, const void* x, int64_t ldx, const void* w, const void* b, const void* r,
                           int64_t ldr, void* y, int64_t N, int64_t K) {
  return dispatch(M, (const float*)x, ldx, (const float*)w, (const float*)b, (const float*)r, ldr, (float*)y, N, K);
}
"""


@functools.lru_cache(maxsize=None)
def library():
    """The compiled template (through the kernel cache: keyed, HMAC-checked, private copy)."""
    from .cpp import FLAGS
    from .cxx import compiler, toolchain
    from .loading import load_cached_library
    from .trust import digest
    cxx, flags = compiler(), tuple(FLAGS)
    symbols = [f"pl_gemv_{s}" for s in DTYPES.values()]
    grouped = [f"pl_grouped_gemv_{s}" for s in DTYPES.values()]
    lib = load_cached_library(digest(SOURCE + "\0" + toolchain(cxx, flags)), SOURCE, symbols + grouped, cxx, flags)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for s in symbols:
        fn = getattr(lib, s)
        fn.argtypes = [i64, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64]
        fn.restype = ctypes.c_int
    for s in grouped:
        fn = getattr(lib, s)
        fn.argtypes = [i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64]
        fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def kernel(dtype: torch.dtype, grouped: bool = False):
    return getattr(library(), f"pl_{'grouped_' if grouped else ''}gemv_{DTYPES[dtype]}")


def template_cost(node):
    """FLOPs and bytes of a template node: x [M, K] times weights giving y [M, N]."""
    from passlab.runtime.costmodel import Cost, nbytes
    x, y = node.args[0].meta["val"], node.meta["val"]
    moved = nbytes(y) + sum(nbytes(a.meta.get("val")) for a in node.all_input_nodes)
    return Cost(2 * x.shape[0] * x.shape[1] * y.shape[1], moved, 1)


def reference(x, w, bias=None, residual=None):
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    return y if residual is None else y + residual


def supported(x, w, bias, residual) -> bool:
    """What the kernel was written for: CPU, one dtype, M <= 8, unit inner strides."""
    dt = x.dtype
    if x.is_meta or x.device.type != "cpu" or dt not in DTYPES or w.dtype != dt or x.dim() != 2 or w.dim() != 2:
        return False
    M, K = x.shape
    if not (1 <= M <= MAX_ROWS) or w.shape[1] != K or K == 0 or w.shape[0] == 0:
        return False
    if x.stride(1) != 1 or not w.is_contiguous():
        return False
    if bias is not None and (bias.dtype != dt or bias.shape != (w.shape[0],) or not bias.is_contiguous()):
        return False
    if residual is not None and (residual.dtype != dt or residual.shape != (M, w.shape[0])
                                 or residual.stride(1) != 1):
        return False
    return True


class DecodeGemm:
    """The target of a decode-GEMM node: `(x, w, bias | None, residual | None) -> y`."""

    is_gemm_template = True

    def __init__(self, has_bias: bool, has_residual: bool):
        self.has_bias, self.has_residual = has_bias, has_residual
        parts = ["gemv"] + (["bias"] if has_bias else []) + (["residual"] if has_residual else [])
        self.name = self.__name__ = "_".join(parts)
        self.ops = parts

    def __call__(self, x, w, bias=None, residual=None):
        if type(x) is not torch.Tensor or not supported(x, w, bias, residual):    # fake, meta, subclasses
            return reference(x, w, bias, residual)
        M, K = x.shape
        N = w.shape[0]
        y = torch.empty(M, N, dtype=x.dtype)
        fn = kernel(x.dtype)
        rc = fn(M, x.data_ptr(), x.stride(0), w.data_ptr(), None if bias is None else bias.data_ptr(),
                None if residual is None else residual.data_ptr(), 0 if residual is None else residual.stride(0),
                y.data_ptr(), N, K)
        return y if rc == 0 else reference(x, w, bias, residual)

    def source(self, device: str = "cpu") -> str:
        return f"// {self.name}: bias={self.has_bias} residual={self.has_residual}\n" + SOURCE

    def fallback(self, node) -> str | None:
        vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else None for a in node.args]
        vals += [None] * (4 - len(vals))
        return None if supported(*vals) else "ATen reference (mm / addmm, add): inputs the template was not built for"

    def cost(self, node):
        return template_cost(node)

    def describe(self) -> str:
        return f"== {self.name}: C++ decode GEMM template (each weight row read once)"

    def __repr__(self):
        return f"DecodeGemm({self.name})"


class DecodeGroupedGemm:
    """The target of a decode grouped-GEMM node (a MoE decode step's experts):
    `(x [S, K], w [E, N, K], offs [E] int32) -> y [S, N]`, rows `offs[e-1]:offs[e]`
    of x times expert e's [N, K] weight, S <= 8 rows in all (each expert's rows
    through the template above; rows past `offs[-1]` are zero). Anything else
    runs `passlab::grouped_mm`, the op it replaces."""

    is_gemm_template = True
    name = __name__ = "grouped_gemv"

    def __call__(self, x, w, offs):
        if type(x) is not torch.Tensor or not grouped_supported(x, w, offs):   # fake, meta, subclasses
            return grouped_reference(x, w, offs)
        S, K = x.shape
        E, N, _ = w.shape
        y = torch.empty(S, N, dtype=x.dtype)
        rc = kernel(x.dtype, grouped=True)(S, x.data_ptr(), x.stride(0), w.data_ptr(), E,
                                           offs.data_ptr(), y.data_ptr(), N, K)
        return y if rc == 0 else grouped_reference(x, w, offs)

    def source(self, device: str = "cpu") -> str:
        return "// grouped_gemv: each expert's rows through the decode GEMM template\n" + SOURCE

    def fallback(self, node) -> str | None:
        vals = [a.meta["val"] for a in node.args]
        return None if grouped_supported(*vals) else "passlab::grouped_mm: inputs the template was not built for"

    def cost(self, node):
        return template_cost(node)

    def describe(self) -> str:
        return f"== {self.name}: C++ decode GEMM template per expert (each weight row read once)"

    def __repr__(self):
        return "DecodeGroupedGemm()"


def grouped_reference(x, w, offs):
    from passlab.runtime import ops  # noqa: F401  (registers passlab::grouped_mm)
    return torch.ops.passlab.grouped_mm(x, w.transpose(1, 2), offs)


def grouped_supported(x, w, offs) -> bool:
    """CPU, one dtype, at most 8 rows, unit inner strides, contiguous [E, N, K]
    weights, one int32 offset per expert (their order is checked in the kernel)."""
    dt = x.dtype
    if x.is_meta or x.device.type != "cpu" or dt not in DTYPES or w.dtype != dt or x.dim() != 2 or w.dim() != 3:
        return False
    S, K = x.shape
    E, N, Kw = w.shape
    if not (1 <= S <= MAX_ROWS) or Kw != K or K == 0 or N == 0 or x.stride(1) != 1 or not w.is_contiguous():
        return False
    return (offs.dtype == torch.int32 and offs.dim() == 1 and offs.shape[0] == E and offs.is_contiguous()
            and offs.device.type == "cpu" and not offs.is_meta)
