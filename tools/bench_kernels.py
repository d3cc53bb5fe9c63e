"""Kernel benchmark: generated fused kernels against the machine's copy bandwidth.

Like the Triton tutorials' benchmarks: each kernel's bytes moved (inputs read
+ outputs written once) over its median time, as a percentage of this
machine's copy bandwidth measured the same way (`Tensor.copy_` of 64 MB into a
preallocated buffer, read + write bytes). C++ kernels are called through
their C entry point with preallocated outputs, so allocation and page faults
are excluded on both sides; Triton kernels (`--device cuda`) through their
runner, timed with CUDA events and an L2 flush; eager is shown for reference.

    python -m passlab.tools.bench_kernels [--device cuda] [--scale 0.25] [--budget 2]
"""
from __future__ import annotations

import argparse
import ctypes

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from passlab.runtime import codegen
from passlab.runtime.kernel import FusedKernel
from passlab.runtime.timing import measure_many

from .table import render

F32, BF16 = torch.float32, torch.bfloat16
# label -> (fn, inputs as (shape, dtype), rows): "R" in a shape is `rows`, scaled by `--scale`
CASES = {
    "gelu+add fp32": (lambda x, y: F.gelu(x) + y, [(("R", 4096), F32), (("R", 4096), F32)], 4096),
    "gelu bf16": (lambda x: F.gelu(x), [(("R", 4096), BF16)], 4096),
    "softmax fp32": (lambda x: torch.softmax(x, -1), [(("R", 1024), F32)], 16384),
    "softmax bf16": (lambda x: torch.softmax(x, -1), [(("R", 1024), BF16)], 16384),
    "layer_norm bf16": (lambda x, w, b: F.layer_norm(x, (512,), w, b),
                        [(("R", 512), BF16), ((512,), BF16), ((512,), BF16)], 32768),
    "rmsnorm fp32": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                     [(("R", 512), F32), ((512,), F32)], 32768),
}


def cases(scale: float = 1.0, device: str = "cpu") -> dict:
    """name with its size -> (fn, inputs): each case's rows scaled by `scale`."""
    out = {}
    for label, (fn, specs, rows) in CASES.items():
        r = max(1, int(rows * scale))
        shapes = [tuple(r if s == "R" else s for s in shape) for shape, _ in specs]
        ins = tuple(torch.randn(sh, device=device).to(dt) for sh, (_, dt) in zip(shapes, specs))
        out[f"{label} {'x'.join(map(str, shapes[0]))}"] = (fn, ins)
    return out


def kernel_of(fn, *inputs) -> FusedKernel:
    """The whole aten graph of `fn` as one fused kernel."""
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return FusedKernel("bench", gm)


def raw_call(k: FusedKernel, inputs):
    """The kernel's C entry point with outputs preallocated."""
    lib = codegen.runner(k, "cpu").keepalive
    f = getattr(lib, codegen.printer("cpu").symbol(k))
    outs = [torch.empty_strided(b.shape, b.strides, dtype=b.dtype) for b in k.kernel.outputs]
    args = (ctypes.c_void_p * (len(inputs) + len(outs)))(*[t.data_ptr() for t in inputs],
                                                          *[t.data_ptr() for t in outs])
    keep = (lib, inputs, outs, args)  # the raw pointers stay valid while these live
    return lambda: (f(args), keep)[1]


def measure(device: str = "cpu", scale: float = 1.0, budget_s: float = 2.0) -> dict:
    """Every case's generated kernel and eager, and a copy, timed interleaved on `device`:
    "cpu" (C++ kernels), "cuda" (Triton kernels) or "triton" (Triton kernels on CPU
    tensors, under TRITON_INTERPRET=1). Bytes moved are inputs read + outputs written once."""
    torch.manual_seed(0)
    home = "cuda" if device == "cuda" else "cpu"
    src = torch.randn(max(1024, int(16 * 1024 * 1024 * scale)), device=home)
    dst = torch.empty_like(src)
    made = cases(scale, home)
    kernels = {name: kernel_of(fn, *ins) for name, (fn, ins) in made.items()}
    codegen.build(list(kernels.values()), device)
    fns = {"copy_": lambda: dst.copy_(src)}
    for name, (fn, ins) in made.items():
        if device == "cpu":
            fns[name] = raw_call(kernels[name], ins)
        else:
            fns[name] = (lambda run=codegen.runner(kernels[name], device), ins=ins: run(*ins))
        fns["eager " + name] = (lambda fn=fn, ins=ins: fn(*ins))
    t = measure_many(fns, [()], device=home, budget_s=budget_s)
    copy_bw = 2 * src.numel() * src.element_size() / t["copy_"].median_s
    rows = []
    for name in made:
        moved = kernels[name].kernel.bytes_moved()
        tk, te = t[name], t["eager " + name]
        rows.append({"kernel": name, "median_s": tk.median_s, "ci_rel": tk.ci_rel, "n": tk.n,
                     "bytes": moved, "gb_per_s": moved / tk.median_s / 1e9,
                     "percent_of_copy": 100 * moved / tk.median_s / copy_bw,
                     "eager_median_s": te.median_s, "vs_eager": te.median_s / tk.median_s})
    return {"device": device, "scale": scale, "copy_gb_per_s": copy_bw / 1e9, "copy_bytes": 2 * src.numel() * src.element_size(),
            "threads": torch.get_num_threads(), "timing_method": t["copy_"].method, "kernels": rows}


def table(res: dict) -> str:
    rows = [[r["kernel"], f"{r['median_s'] * 1e3:.3f}", f"±{100 * r['ci_rel']:.1f}%", f"{r['gb_per_s']:.1f}",
             f"{r['percent_of_copy']:.0f}%", f"{r['eager_median_s'] * 1e3:.3f}", f"{r['vs_eager']:.2f}x"]
            for r in res["kernels"]]
    return render(["kernel", "ms", "CI", "GB/s", "% of copy BW", "eager ms (allocating)", "vs eager"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m passlab.tools.bench_kernels")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="row-count factor of every case (default 1)")
    ap.add_argument("--budget", type=float, default=2.0, help="timing budget per callable, seconds")
    args = ap.parse_args(argv)
    res = measure(args.device, args.scale, args.budget)
    print(f"copy bandwidth (Tensor.copy_ of {res['copy_bytes'] // 2 >> 20} MB, read+write): "
          f"{res['copy_gb_per_s']:.1f} GB/s, {res['threads']} threads, {res['timing_method']}")
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
