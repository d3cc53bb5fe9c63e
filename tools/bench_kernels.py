"""Kernel benchmark: generated fused kernels against the machine's copy bandwidth.

Like the Triton tutorials' benchmarks: each kernel's bytes moved (inputs read
+ outputs written once) over its median time, as a percentage of this
machine's copy bandwidth measured the same way (`Tensor.copy_` of 64 MB into a
preallocated buffer, read + write bytes). Kernels are called through their
C entry point with preallocated outputs, so allocation and page faults are
excluded on both sides; eager is shown for reference.

    python -m passlab.tools.bench_kernels
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from passlab.runtime import codegen
from passlab.runtime.kernel import FusedKernel
from passlab.runtime.timing import measure_many

from .table import render

CASES = {
    "gelu+add fp32 4096x4096": (lambda x, y: F.gelu(x) + y, lambda: (torch.randn(4096, 4096), torch.randn(4096, 4096))),
    "gelu bf16 4096x4096": (lambda x: F.gelu(x), lambda: (torch.randn(4096, 4096).bfloat16(),)),
    "softmax fp32 16384x1024": (lambda x: torch.softmax(x, -1), lambda: (torch.randn(16384, 1024),)),
    "softmax bf16 16384x1024": (lambda x: torch.softmax(x, -1), lambda: (torch.randn(16384, 1024).bfloat16(),)),
    "layer_norm bf16 32768x512": (lambda x, w, b: F.layer_norm(x, (512,), w, b),
                                  lambda: (torch.randn(32768, 512).bfloat16(), torch.randn(512).bfloat16(),
                                           torch.randn(512).bfloat16())),
    "rmsnorm fp32 32768x512": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                               lambda: (torch.randn(32768, 512), torch.randn(512))),
}


def kernel_of(fn, *inputs) -> FusedKernel:
    """The whole aten graph of `fn` as one fused kernel."""
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return FusedKernel("bench", gm)


def raw_call(k: FusedKernel, inputs):
    """The kernel's C entry point with outputs preallocated."""
    lib = codegen.runner(k, "cpu").keepalive
    f = getattr(lib, codegen.cpp.symbol(k))
    outs = [torch.empty_strided(b.shape, b.strides, dtype=b.dtype) for b in k.kernel.outputs]
    args = (ctypes.c_void_p * (len(inputs) + len(outs)))(*[t.data_ptr() for t in inputs],
                                                          *[t.data_ptr() for t in outs])
    keep = (lib, inputs, outs, args)  # the raw pointers stay valid while these live
    return lambda: (f(args), keep)[1]


def main() -> int:
    torch.manual_seed(0)
    src = torch.randn(16 * 1024 * 1024)
    dst = torch.empty_like(src)
    cases = {name: (fn, make()) for name, (fn, make) in CASES.items()}
    kernels = {name: kernel_of(fn, *ins) for name, (fn, ins) in cases.items()}
    codegen.build(list(kernels.values()), "cpu")
    fns = {"copy_": lambda: dst.copy_(src)}
    for name, (fn, ins) in cases.items():
        fns[name] = raw_call(kernels[name], ins)
        fns["eager " + name] = (lambda fn=fn, ins=ins: fn(*ins))
    t = measure_many(fns, [()], budget_s=2.0)
    copy_bw = 2 * src.numel() * 4 / t["copy_"].median_s
    rows = []
    for name in cases:
        moved = kernels[name].kernel.bytes_moved()
        tk, te = t[name], t["eager " + name]
        rows.append([name, f"{tk.median_s * 1e3:.2f}", f"±{100 * tk.ci_rel:.1f}%", f"{moved / tk.median_s / 1e9:.1f}",
                     f"{100 * moved / tk.median_s / copy_bw:.0f}%", f"{te.median_s * 1e3:.2f}",
                     f"{te.median_s / tk.median_s:.2f}x"])
    print(f"copy bandwidth (Tensor.copy_ of 64 MB, read+write): {copy_bw / 1e9:.1f} GB/s, "
          f"{torch.get_num_threads()} threads")
    print(render(["kernel", "ms", "CI", "GB/s", "% of copy BW", "eager ms (allocating)", "vs eager"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
