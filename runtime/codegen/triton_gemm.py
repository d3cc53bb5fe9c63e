"""Triton GEMM template with a fused epilogue: `out = act(a @ b + bias) + residual`.

One kernel instead of GEMM + one or more pointwise kernels: the epilogue runs
on the fp32 accumulator tile while it is still in registers, so the output is
written once (bytes saved: one read and one write of the output per fused op).
a, b, the residual and the output are addressed by strides, so `permute(W)`
(a Linear's weight) is read in place.

Block sizes come from a small candidate set; on CUDA each (M, N, K, dtype,
epilogue) key is timed once with `triton.testing.do_bench` and the winner is
cached for the process; under `TRITON_INTERPRET=1` (CPU tests) the first
candidate that fits the shape is used without timing. fp32 inputs use IEEE
dot products (TF32 would miss the 1e-4 numerics tolerance).
"""
from __future__ import annotations

import math
import os

import torch

ACTS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "relu": 4}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
CANDIDATES = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
              (32, 64, 64, 4, 3), (16, 32, 32, 2, 2)]
_BEST: dict = {}
_KERNEL = None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel():
    """The @triton.jit kernel, defined on first use so importing passlab needs no triton."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def gemm_epilogue(a_ptr, b_ptr, bias_ptr, res_ptr, c_ptr, M, N, K,
                      sam, sak, sbk, sbn, srm, srn, scm, scn,
                      HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + kk[:, None] * sbk + rn[None, :] * sbn,
                        mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        elif ACT == 2:
            t = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (1.0 + (2.0 * tl.sigmoid(2.0 * t) - 1.0))
        elif ACT == 3:
            acc = acc * tl.sigmoid(acc)
        elif ACT == 4:
            acc = tl.maximum(acc, 0.0)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if HAS_RES:
            acc += tl.load(res_ptr + rm[:, None] * srm + rn[None, :] * srn, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty), mask=mask)

    _KERNEL = gemm_epilogue
    return _KERNEL


def template_source() -> str:
    import inspect
    k = kernel()
    return getattr(k, "src", None) or inspect.getsource(k.fn)


def fits(cfg, M, N, K) -> bool:
    bm, bn, bk = cfg[:3]
    p2 = lambda x: max(16, 1 << (max(1, x) - 1).bit_length())
    return bm <= p2(M) and bn <= p2(N) and bk <= p2(K)


def launch(a, b, bias=None, residual=None, act: str = "none", cfg=None):
    """Run the kernel: a [M, K] @ b [K, N] (+ bias [N]) -> act -> (+ residual [M, N])."""
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    cfg = cfg or choose(a, b, bias, residual, act)
    bm, bn, bk, warps, stages = cfg
    grid = (math.ceil(M / bm), math.ceil(N / bn))
    res = residual if residual is not None else out
    extra = {} if interpreted() else {"num_warps": warps, "num_stages": stages}
    kernel()[grid](a, b, bias if bias is not None else out, res, out, M, N, K,
                   a.stride(0), a.stride(1), b.stride(0), b.stride(1), res.stride(0), res.stride(1),
                   out.stride(0), out.stride(1),
                   HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=ACTS[act],
                   IEEE=a.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra)
    return out


def choose(a, b, bias, residual, act):
    """Block sizes for this shape: timed once per key on CUDA, cached."""
    M, K = a.shape
    N = b.shape[1]
    key = (M, N, K, a.dtype, act, bias is not None, residual is not None)
    if key in _BEST:
        return _BEST[key]
    fitting = [c for c in CANDIDATES if fits(c, M, N, K)] or [CANDIDATES[-1]]
    if interpreted() or a.device.type != "cuda" or len(fitting) == 1:
        best = min(fitting, key=lambda c: c[0] * c[1])
    else:
        from triton.testing import do_bench
        best = min(fitting, key=lambda c: do_bench(lambda: launch(a, b, bias, residual, act, cfg=c),
                                                   warmup=5, rep=20))
    _BEST[key] = best
    return best


def reference(a, b, bias=None, residual=None, act: str = "none"):
    """The same computation in ATen: what runs on fake tensors and off-GPU."""
    y = torch.addmm(bias, a, b) if bias is not None else torch.mm(a, b)
    if act == "gelu":
        y = torch.nn.functional.gelu(y)
    elif act == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    elif act == "silu":
        y = torch.nn.functional.silu(y)
    elif act == "relu":
        y = torch.relu(y)
    return y + residual if residual is not None else y


class GemmEpilogue:
    """The target of a GEMM+epilogue node: `(a, b, bias | None, residual | None) -> out`.

    Runs the Triton kernel on CUDA tensors and the ATen reference elsewhere
    (fake tensors, CPU), so a graph made for CUDA still runs and propagates
    metadata anywhere. That fallback is not hidden: off CUDA its cost counts
    the reference's ATen launches (GEMM, activation, residual add), and
    `fallback(node)` says what runs instead (the run record lists it). Not a
    `FusedKernel`: the pointwise code generators do not print it; it carries
    its own template."""

    is_gemm_template = True

    def __init__(self, act: str, has_bias: bool, has_residual: bool):
        if act not in ACTS:
            raise ValueError(f"unknown epilogue activation {act!r}; known: {', '.join(ACTS)}")
        self.act, self.has_bias, self.has_residual = act, has_bias, has_residual
        parts = ["gemm"] + (["bias"] if has_bias else []) + ([act] if act != "none" else []) + \
            (["residual"] if has_residual else [])
        self.name = self.__name__ = "_".join(parts)
        self.ops = parts

    def __call__(self, a, b, bias=None, residual=None):
        from torch._subclasses.fake_tensor import FakeTensor
        if a.device.type == "cuda" and not isinstance(a, FakeTensor):
            return launch(a, b, bias, residual, self.act)
        return reference(a, b, bias, residual, self.act)

    def source(self, device: str = "cuda") -> str:
        """The Triton template (every epilogue is a constexpr branch of one kernel)."""
        return f"# {self.name}: act={self.act} bias={self.has_bias} residual={self.has_residual}\n" + template_source()

    def fallback(self, node) -> str | None:
        """What runs instead of the Triton kernel where the node's tensors are
        not on CUDA (None: the kernel runs)."""
        dev = node.args[0].meta["val"].device.type
        if dev == "cuda":
            return None
        ops = ["addmm" if self.has_bias else "mm"] + ([self.act] if self.act != "none" else []) + \
            (["add"] if self.has_residual else [])
        return f"ATen reference on {dev} ({', '.join(ops)}: {len(ops)} launches), not the Triton kernel"

    def cost(self, node):
        from passlab.runtime.costmodel import Cost, nbytes
        a, b = (x.meta["val"] for x in node.args[:2])
        moved = nbytes(node.meta.get("val")) + sum(nbytes(x.meta.get("val")) for x in node.all_input_nodes)
        launches = 1 if self.fallback(node) is None else 1 + (self.act != "none") + self.has_residual
        return Cost(2 * a.shape[0] * a.shape[1] * b.shape[1], moved, launches)

    def describe(self) -> str:
        return f"== {self.name}: Triton GEMM template, epilogue {' -> '.join(self.ops[1:]) or 'none'}"

    def __repr__(self):
        return f"GemmEpilogue({self.name})"
