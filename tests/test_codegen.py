"""Kernel-level tests: lowering, the C++ and Triton printers, the build cache.

Each case captures a small function, lowers the whole graph into one kernel
and checks the generated C++ (and Triton, in interpreter mode) against eager
on fresh random inputs: strided and broadcast inputs, fp32/bf16/fp16,
reductions along every dim.
"""
import glob
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from torch.fx.experimental.proxy_tensor import make_fx

from passlab.runtime import codegen
from passlab.runtime.kernel import FusedKernel, LoweringError

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *a):
        return self.fn(*a)


def kernel_of(fn, *inputs) -> FusedKernel:
    """The whole aten graph of `fn` as one kernel (make_fx: much faster than export for tests)."""
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and not n.users and n.target is torch.ops.aten.empty.memory_format:
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return FusedKernel("test", gm)


def rel_err(out, ref) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    assert len(outs) == len(refs)
    worst = 0.0
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype
        o, r = o.double(), r.double()
        worst = max(worst, float((o - r).abs().max()) / max(float(r.abs().max()), 1e-6))
    return worst


def rnd(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


CASES = {
    "gelu_add": lambda x: F.gelu(x) + x,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu_mul": lambda x: F.silu(x) * torch.sigmoid(x),
    "tanh_exp_log": lambda x: torch.tanh(x) + torch.exp(-x.abs()) + torch.log(x.abs() + 1),
    "softmax_last": lambda x: torch.softmax(x, -1),
    "log_softmax": lambda x: torch.log_softmax(x, -1),
    "layer_norm": lambda x: F.layer_norm(x, x.shape[-1:]),
    "rms_norm": lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
    "masked_scale_softmax": lambda x: torch.softmax((x * 0.3).masked_fill(x > 1.0, float("-inf")), -1),
    "var_mean": lambda x: (x.var(-1, keepdim=True), x.mean(-1)),
}
DIM_OPS = {"sum": lambda d: lambda x: x.sum(d), "amax": lambda d: lambda x: x.amax(d, keepdim=True),
           "softmax": lambda d: lambda x: torch.softmax(x, d), "mean": lambda d: lambda x: (x * 2).mean(d) + 1}
_w, _b, _rm, _rv = rnd(3), rnd(3, seed=1), rnd(3, seed=2), torch.rand(3, generator=torch.Generator().manual_seed(3)) + 0.5
_x = rnd(2, 4, 16, 8)
SPECS = {  # name -> (fn, inputs); every C++ kernel here is built in ONE compiler call (the `built` fixture)
    **{f"{c}-{str(dt)[6:]}": (CASES[c], (rnd(3, 5, 37, dtype=dt),))
       for c in CASES for dt in (torch.float32, torch.bfloat16)},
    **{f"{c}-float16": (CASES[c], (rnd(3, 5, 37, dtype=torch.float16),))
       for c in ("softmax_last", "layer_norm", "gelu_add")},
    **{f"{op}-dim{d}": (DIM_OPS[op](d), (rnd(4, 6, 9),)) for op in DIM_OPS for d in (0, 1, 2)},
    **{f"softmax-dim{d}-bf16": (DIM_OPS["softmax"](d), (rnd(4, 6, 9, dtype=torch.bfloat16),)) for d in (0, 1, 2)},
    "mean-hw": (lambda x: F.relu(x).mean((2, 3), keepdim=True), (rnd(2, 3, 5, 7),)),
    "sum-dims02": (lambda x: x.sum((0, 2)), (rnd(4, 3, 5),)),
    "gelu-strided": (lambda a: F.gelu(a) + 1, (rnd(12, 8).t(),)),
    "softmax-copy-in": (lambda a: torch.softmax(a, -1) * 2, (rnd(8, 12),)),
    "broadcast": (lambda a, b, c, s: (a + b) * c - s,
                  (rnd(4, 6, 10), rnd(10, seed=1), rnd(6, 1, seed=2), torch.tensor(0.5))),
    "layer_norm-weight": (lambda a, w: F.layer_norm(a, (10,), w, None), (rnd(4, 6, 10), rnd(10, seed=3))),
    "batch_norm": (lambda x, w, b, rm, rv: F.relu(F.batch_norm(x, rm, rv, w, b, False)),
                   (rnd(2, 3, 4, 5), _w, _b, _rm, _rv)),
    "any": (lambda x: (x > 0).any(), (rnd(5, 7),)),
    "int-sum": (lambda i: (i * 3 + 1).sum(-1), (torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(0)),)),
    "where-bool": (lambda x, m: torch.where(~m, x, 0.0) * 2, (rnd(4, 6), rnd(4, 6, seed=5) > 0)),
    "to-bf16": (lambda a: (a * 3.0).to(torch.bfloat16), (rnd(64, 33),)),
    # rotary's rotate_half: cat of computed values along the inner dim, inputs are strided halves
    "cat-rotary": (lambda x, x1, x2, c, s: x * c + torch.cat([-x2, x1], -1) * s,
                   (_x, _x[..., :4], _x[..., 4:], rnd(16, 8, seed=1), rnd(16, 8, seed=2))),
    "shape-only-input": (lambda a, b: torch.full_like(a, 3.0) * b + 1, (rnd(4, 5), rnd(4, 5, seed=1))),
    "cat-outer": (lambda a, b: torch.cat([a * 2, torch.exp(b)], 0) + 1, (rnd(3, 5), rnd(4, 5, seed=1))),
}


@pytest.fixture(scope="module")
def built():
    ks = {name: kernel_of(fn, *inputs) for name, (fn, inputs) in SPECS.items()}
    codegen.build(list(ks.values()), "cpu")
    return ks


def run_spec(built, name, device="cpu", call_inputs=None, tol=None):
    fn, inputs = SPECS[name]
    fk = built[name] if device == "cpu" else kernel_of(fn, *inputs)
    args = call_inputs or inputs
    out = codegen.runner(fk, device)(*args)
    ref = fn(*args)
    dt = (ref[0] if isinstance(ref, tuple) else ref).dtype
    tol = tol if tol is not None else TOL.get(dt, 0)
    assert rel_err(out, ref) <= tol, fk.source("cuda" if device == "triton" else "cpu")
    return fk


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cpp_kernel(built, name):
    run_spec(built, name)


def test_strided_inputs_read_in_place_or_copied(built):
    assert built["gelu-strided"].kernel.inputs[0].strides == (1, 8)
    x = rnd(8, 12)
    run_spec(built, "softmax-copy-in", call_inputs=(x.t().contiguous().t(),))   # copied to the baked strides
    run_spec(built, "gelu-strided", call_inputs=(rnd(8, 12),))                  # contiguous where strided was baked


def test_every_dim_and_dtype_is_covered(built):
    """The generated kernels themselves reduce along every dim and store every dtype."""
    for op in DIM_OPS:
        loops = set()
        for d in range(3):
            k = built[f"{op}-dim{d}"].kernel
            x = SPECS[f"{op}-dim{d}"][1][0]
            assert k.reductions and math.prod(k.sizes[i] for i in k.inner) == x.shape[d], (op, d, k.sizes, k.inner)
            loops.add((tuple(k.sizes), tuple(k.inner)))
        assert len(loops) == 3, (op, loops)
    stored = {b.dtype for fk in built.values() for b in fk.kernel.inputs + fk.kernel.outputs}
    assert {torch.float32, torch.bfloat16, torch.float16} <= stored


def test_bf16_storage_rounds_to_nearest_even(built):
    x = SPECS["to-bf16"][1][0]
    assert torch.equal(codegen.runner(built["to-bf16"], "cpu")(x), (x * 3.0).to(torch.bfloat16))


def test_unsupported_ops_raise_lowering_error():
    with pytest.raises(LoweringError):
        kernel_of(lambda x: torch.cumsum(x, 0) + 1, rnd(4, 5))
    with pytest.raises(LoweringError):  # reductions over different dims in one kernel
        kernel_of(lambda x: x.sum(0, keepdim=True) + x.sum(1, keepdim=True), rnd(4, 5))


def test_fake_tensor_call_runs_the_subgraph():
    from torch._subclasses.fake_tensor import FakeTensorMode
    fk = kernel_of(lambda x: torch.softmax(x, -1), rnd(3, 4))
    with FakeTensorMode() as mode:
        out = fk(mode.from_tensor(rnd(3, 4)))
    assert out.shape == (3, 4)


TRITON_SPECS = ["gelu_add-float32", "softmax_last-float32", "layer_norm-float32", "rms_norm-float32",
                "masked_scale_softmax-float32", "var_mean-float32", "tanh_exp_log-float32", "silu_mul-float32",
                "gelu_add-bfloat16", "softmax-dim0", "sum-dims02", "gelu-strided", "where-bool", "broadcast",
                "batch_norm", "any", "int-sum", "cat-rotary", "cat-outer"]


@pytest.mark.parametrize("name", TRITON_SPECS)
def test_triton_interpreter(name):
    run_spec(None, name, device="triton", tol=None if "bfloat16" in name else 1e-5)


def test_triton_interpreter_several_blocks():
    fk = kernel_of(lambda x: torch.softmax(x, -1), rnd(3, 2500))
    x = rnd(3, 2500, seed=9)
    assert rel_err(codegen.runner(fk, "triton")(x), torch.softmax(x, -1)) <= 1e-5


def test_one_compiler_call_per_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path))
    ks = [kernel_of(f, rnd(4, 9 + i)) for i, f in enumerate([CASES["gelu_add"], CASES["softmax_last"],
                                                             CASES["layer_norm"]])]
    before = codegen.STATS["compiles"]
    codegen.build(ks, "cpu")
    assert codegen.STATS["compiles"] == before + 1
    assert len(glob.glob(str(tmp_path / "*.so"))) == 1
    again = [kernel_of(f, rnd(4, 9 + i)) for i, f in enumerate([CASES["gelu_add"], CASES["softmax_last"],
                                                                CASES["layer_norm"]])]
    hits = codegen.STATS["cache_hits"]
    codegen.build(again, "cpu")   # same sources: served from the cache
    assert codegen.STATS["cache_hits"] == hits + 1 and codegen.STATS["compiles"] == before + 1


FIRST_BUILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_codegen import kernel_of, rnd
from passlab.runtime import codegen
codegen.build([kernel_of(lambda a: torch.softmax(a * 1.5, -1), rnd(5, 11))], "cpu")
"""


def test_corrupt_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    # the intact entry is built by another process: damaging a library this process has mapped would crash it
    pristine = tmp_path / "pristine"
    env = dict(os.environ, PASSLAB_CACHE=str(pristine))
    subprocess.run([sys.executable, "-c", FIRST_BUILD.format(tests=os.path.dirname(__file__))], env=env,
                   check=True)
    x = rnd(5, 11)
    fn = lambda a: torch.softmax(a * 1.5, -1)  # noqa: E731
    for damage in ("truncate", "garbage", "missing_signature"):
        cache = tmp_path / damage
        shutil.copytree(pristine, cache)
        monkeypatch.setenv("PASSLAB_CACHE", str(cache))
        so = glob.glob(str(cache / "*.so"))[0]
        if damage == "truncate":
            data = open(so, "rb").read()
            open(so, "wb").write(data[: len(data) // 3])
        elif damage == "garbage":
            open(so, "wb").write(os.urandom(4096))
        else:
            os.unlink(so[:-3] + ".hmac")
        assert codegen.verified_entry(so, so[:-3] + ".hmac") is None
        before = codegen.STATS["compiles"]
        fk = kernel_of(fn, x)
        out = codegen.runner(fk, "cpu")(x)
        assert codegen.STATS["compiles"] == before + 1, damage
        assert rel_err(out, fn(x)) <= 1e-5
        assert codegen.verified_entry(so, so[:-3] + ".hmac") is not None   # rebuilt and signed again


def test_cat_along_r_runs_one_loop_per_input(built):
    """rotate_half's cat along the inner index: the store loop runs once per input's range of r,
    so no element is read through a clamped index (and the values are the same: test_cpp_kernel)."""
    src = built["cat-rotary"].source("cpu")
    assert "for (int64_t r = 0; r < 4; ++r)" in src and "for (int64_t r = 4; r < 8; ++r)" in src, src
    assert "for (int64_t r = 0; r < 8; ++r)" not in src
    assert "r = 3;" not in built["cat-outer"].source("cpu")      # a cat along an outer dim: one loop


VECTOR_LOOPS = {   # each C++ math helper and bool operator, in the loop shape the printer writes
    "exp": "out[r] = pl_exp(a[r]);", "log": "out[r] = pl_log(a[r]);", "erf": "out[r] = pl_erf(a[r]);",
    "tanh": "out[r] = pl_tanh(a[r]);", "sigmoid": "out[r] = pl_sigmoid(a[r]);",
    "max": "out[r] = pl_max(a[r], b[r]);", "min": "out[r] = pl_min(a[r], b[r]);",
    "bf16": "out[r] = pl_bf16(pl_to_bf16(a[r]));",
    "and": "outb[r] = " + "({0} & {1});".format("(a[r] > 0)", "(b[r] > 0)"),
    "or": "outb[r] = " + "({0} | {1});".format("(a[r] > 0)", "(b[r] > 0)"),
}


@pytest.mark.skipif(not shutil.which("g++") or os.uname().machine != "x86_64", reason="gcc on x86-64 only")
def test_every_math_helper_vectorizes(tmp_path):
    """gcc leaves a whole loop scalar when one helper defeats its vectorizer (an `a || b`
    select in erf made a GELU kernel 14x slower than eager): each helper's loop must be
    reported vectorized with the printer's own flags."""
    from passlab.runtime.codegen import cpp
    assert EXPR_AND_OR_BITWISE()
    src = cpp.HEADER
    for name, stmt in VECTOR_LOOPS.items():
        src += (f'extern "C" void t_{name}(const float* __restrict a, const float* __restrict b, '
                f'float* __restrict out, bool* __restrict outb) {{\n#pragma omp simd\n'
                f'for (int64_t r = 0; r < 4096; ++r) {{ {stmt} }}\n}}\n')
    path = tmp_path / "helpers.cpp"
    path.write_text(src)
    flags = [f for f in cpp.FLAGS if f not in ("-shared", "-fPIC") and not f.startswith("-Wl")]
    r = subprocess.run(["g++", *flags, "-S", "-o", os.devnull, "-fopt-info-vec-optimized", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = src.splitlines()
    vectorized = set()
    for msg in r.stderr.splitlines():
        if "loop vectorized" in msg:
            line = int(msg.split(":")[1])
            head = next(lines[i] for i in range(line - 1, -1, -1) if lines[i].startswith('extern "C" void t_'))
            vectorized.add(head.split("t_", 1)[1].split("(")[0])
    assert set(VECTOR_LOOPS) - vectorized == set()


def EXPR_AND_OR_BITWISE() -> bool:
    """The printer's and/or on bools are the bitwise operators the loops above use."""
    from passlab.runtime.codegen import EXPR
    return EXPR["and"][0] == "({0} & {1})" and EXPR["or"][0] == "({0} | {1})"


def test_exp_within_an_ulp_and_flushes_below_flt_min():
    """The kernels' exp: within 1 ulp of torch's wherever exp(x) >= FLT_MIN; 0 below (a masked
    score never goes through the denormal range); inf, -inf and NaN as eager."""
    tiny = torch.finfo(torch.float32).tiny
    special = torch.tensor([float("-inf"), -1e4, -104.0, -100.0, -88.0, -87.34, -87.33, -1.0, 0.0, 1.0,
                            88.0, 88.72, 89.0, float("inf"), float("nan")])
    x = torch.cat([special, torch.linspace(-110, 90, 20001), torch.randn(4096) * 30])
    out = codegen.runner(kernel_of(torch.exp, x), "cpu")(x)
    want = torch.exp(x.double())
    normal = want >= tiny
    ulp = torch.finfo(torch.float32).eps
    finite = torch.isfinite(torch.exp(x))                  # beyond FLT_MAX both are inf
    assert ((out.double() - want).abs() <= ulp * want)[normal & finite].all()
    assert torch.equal(out[~finite & ~x.isnan()], torch.exp(x)[~finite & ~x.isnan()])
    assert (out[(want < tiny) & ~x.isnan()] == 0).all()
    assert torch.isinf(out[x == float("inf")]).all() and out[x.isnan()].isnan().all()
