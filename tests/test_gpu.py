"""GPU tests (`-m gpu`, skipped without CUDA) and the GPU check's CPU rehearsal.

On a CUDA machine these compile real Triton kernels (the interpreter must be
off: TRITON_INTERPRET unset or 0), autotune the GEMM-epilogue template with
`triton.testing.do_bench`, run the fusion and pattern pipelines with
`device="cuda"` against eager, capture an optimized graph as a CUDA graph and
read the NVML energy counter. `test_gpu_check_dry_run` runs
`python -m passlab.tools.gpu_check --cpu-dry-run` on one tiny model here.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from passlab.graphs import capture, load
from passlab.passes import PassContext, get_pass
from passlab.runtime import codegen, timing
from passlab.runtime.codegen import triton_gemm
from passlab.runtime.executor import compile_graph, fused_kernels

from test_codegen import SPECS, TOL, kernel_of, rel_err

GPU_SPECS = ["gelu_add-float32", "softmax_last-bfloat16", "layer_norm-float32", "rms_norm-bfloat16",
             "var_mean-float32", "softmax-dim0", "sum-dims02", "gelu-strided", "broadcast", "batch_norm",
             "any", "int-sum", "where-bool", "to-bf16", "cat-rotary", "masked_scale_softmax-float32"]
TINY = ["mlp", "transformer", "llama", "moe", "convnet"]


@pytest.fixture
def compiled_triton():
    """Real compiles only: a forced interpreter would hide exactly what these tests are for."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.fail("TRITON_INTERPRET is set: run the gpu tests with TRITON_INTERPRET=0 "
                    "(tests/conftest.py should set it only where CUDA is absent)")


def on_cuda(xs):
    return tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in xs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_SPECS)
def test_triton_kernel_compiles_and_matches_eager(name, compiled_triton):
    assert set(GPU_SPECS) <= set(SPECS)
    fn, inputs = SPECS[name]
    x = on_cuda(inputs)
    fk = kernel_of(fn, *x)
    run = codegen.runner(fk, "cuda")
    out, ref = run(*x), fn(*x)
    dt = (ref[0] if isinstance(ref, tuple) else ref).dtype
    assert rel_err(tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu(),
                   tuple(r.cpu() for r in ref) if isinstance(ref, tuple) else ref.cpu()) <= TOL.get(dt, 0), \
        fk.source("cuda")
    from triton.runtime.jit import JITFunction
    jit = getattr(run.keepalive, codegen.printer("cuda").symbol(fk))
    assert isinstance(jit, JITFunction), type(jit)               # compiled, not the interpreter


@pytest.mark.gpu
def test_gemm_epilogue_autotunes_with_do_bench(monkeypatch, compiled_triton):
    import triton.testing
    calls = []
    real = triton.testing.do_bench
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append(1) or real(fn, **kw))
    monkeypatch.setattr(triton_gemm, "_BEST", {})
    torch.manual_seed(0)
    a = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
    bias, res = torch.randn(384, device="cuda", dtype=torch.bfloat16), torch.randn(512, 384, device="cuda",
                                                                                  dtype=torch.bfloat16)
    fitting = [c for c in triton_gemm.CANDIDATES if triton_gemm.fits(c, 512, 384, 256)]
    out = triton_gemm.launch(a, b.t().contiguous().t(), bias, res, "gelu")    # b read through its strides
    assert len(calls) == len(fitting) > 1                                       # every fitting candidate timed
    ref = triton_gemm.reference(a.float(), b.float(), bias.float(), res.float(), "gelu")
    assert rel_err(out.float().cpu(), ref.cpu()) <= 2e-2
    triton_gemm.launch(a, b, bias, res, "gelu")
    assert len(calls) == len(fitting)                                           # the winner is cached per key


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", [(n, "fp32") for n in TINY] + [("transformer", "bf16"), ("llama", "bf16")])
def test_default_pipeline_on_cuda(name, dtype, compiled_triton):
    """Every pass of the default pipeline (fusion, patterns, layout) on cuda: the pass
    manager checks each step against eager on fresh inputs; fused kernels run as Triton."""
    from passlab.tools.runner import run
    r = run(name, preset="tiny", device="cuda", dtype=dtype, measure=False)
    bad = [(s["pass"], s["status"], s.get("error")) for s in r.record["steps"] if s["status"] != "ok"]
    assert not bad, bad
    assert all(s["numerics_ok"] for s in r.record["steps"])
    for fk in fused_kernels(r.gm):
        assert "cuda" in fk._compiled, fk          # the numerics check ran it as a Triton kernel


@pytest.mark.gpu
def test_gemm_epilogue_pass_on_cuda(compiled_triton):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval().cuda()
    x = torch.randn(8, 32, 64, device="cuda")
    res = get_pass("fuse_epilogue")(capture(m, (x,)), PassContext(device="cuda"))
    assert res.stats["gemm_templates"] >= 1, res.stats
    with torch.no_grad():
        assert rel_err(res.gm(x).cpu(), m(x).cpu()) < 1e-4


@pytest.mark.gpu
def test_cuda_graph_replays_the_optimized_graph(compiled_triton):
    sample = load("transformer", "tiny", device="cuda")
    gm = capture(sample.module, sample.example_inputs)
    res = get_pass("fuse")(gm, PassContext(device="cuda", sample=sample))
    fn = compile_graph(res.gm, "cuda")
    assert fused_kernels(res.gm)
    held = {}

    def keep(*a):
        held["out"] = fn(*a)
        return held["out"]
    static = sample.make_inputs(3)
    with torch.no_grad():
        replay = timing.cuda_graph(keep, static)
        fresh = sample.make_inputs(4)
        for s, f in zip(static, fresh):
            s.copy_(f)                        # new values into the captured input buffers
        replay()
        torch.cuda.synchronize()
        assert rel_err(held["out"].cpu(), sample.module(*fresh).cpu()) <= 1e-4


@pytest.mark.gpu
def test_cuda_timing_and_energy_counter():
    a = torch.randn(4096, 4096, device="cuda")
    t = timing.measure(lambda x: x @ x, [(a,)], device="cuda", budget_s=0.3)
    assert t.method == "cuda_events+l2_flush" and 0 < t.median_s < 1
    meter = timing.EnergyMeter("cuda")
    if not meter.available:
        pytest.skip("NVML energy counter unavailable (pynvml missing or the GPU does not expose it)")
    j = meter.joules(lambda x: x @ x, (a,), reps=200)
    assert j is not None and j > 0


def test_gpu_check_dry_run(tmp_path):
    """The GPU check's rehearsal: same parts and code paths, on CPU, Triton printer interpreted."""
    out = tmp_path / "out"
    env = dict(os.environ)          # the session's private cache (conftest), with its fixed CPU profile
    env.pop("PASSLAB_DTYPE", None)
    proc = subprocess.run([sys.executable, "-m", "passlab.tools.gpu_check", "--cpu-dry-run", "--out", str(out),
                           "--parts", "bench,kernels", "--models", "mlp,no_such_model", "--no-compile-peer"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["mode"] == "dry"
    mlp = rep["parts"]["bench"]["models"]["mlp"]
    assert mlp["status"] == "ok" and {"eager", "passlab"} <= set(mlp["graph"])
    assert mlp["graph"]["passlab"]["max_rel_error_vs_eager"] <= 2e-2
    assert [s["pass"] for s in mlp["record"]["steps"]] == mlp["pipeline"]["passes"]
    assert rep["parts"]["bench"]["models"]["no_such_model"]["status"] == "skipped"
    kern = rep["parts"]["kernels"]
    assert kern["device"] == "triton" and len(kern["kernels"]) == 6 and kern["copy_gb_per_s"] > 0
    md = (out / "results.md").read_text()
    assert "| mlp |" in md and "% of copy" in md
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log", "results.md"]


def test_gpu_check_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from passlab.tools import gpu_check
    assert gpu_check.main(["--out", "/nonexistent/never-written"]) == 2
