"""The `fuse` pass on every sample: numerics against eager on fresh inputs,
graph structure, options, launch reduction, and every generated kernel run
through Triton's interpreter."""
import operator

import pytest
import torch

from passlab.graphs import capture, clone, load
from passlab.passes import PassContext, TOLERANCE, get_pass, relative_error
from passlab.runtime import codegen, costmodel
from passlab.runtime.executor import compile_graph, fused_kernels
from passlab.runtime.kernel import FusedKernel
from passlab.runtime.opclass import OpClass, op_class

SAMPLES = ["mlp", "transformer", "llama", "moe", "convnet"]
HF = ["hf:gpt2", "hf:llama", "hf:mixtral"]


def fused(name, dtype=None, captured=None, **options):
    sample, gm = captured or (None, None)
    if sample is None:
        sample = load(name, "tiny", dtype=dtype)
        gm = capture(sample.module, sample.example_inputs)
    res = get_pass("fuse")(clone(gm), PassContext(sample=sample, options=options))
    return sample, gm, res


def numerics(sample, gm, seed=11):
    x = sample.make_inputs(seed)
    with torch.no_grad():
        return relative_error(compile_graph(gm, "cpu")(*x), sample.module(*x))


@pytest.fixture(scope="module")
def fused_samples():
    return {name: fused(name) for name in SAMPLES}


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_fuses_with_eager_numerics(fused_samples, name):
    sample, gm, res = fused_samples[name]
    assert numerics(sample, res.gm) <= TOLERANCE[torch.float32]
    st = res.stats
    assert st["launches_after"] <= st["launches_before"]
    # the graph itself: each fused kernel replaced the ATen launches of its subgraph by one
    kernels = [n.target for n in res.gm.graph.nodes if n.op == "call_function" and isinstance(n.target, FusedKernel)]
    inner = sum(1 for k in kernels for m in k.subgraph.graph.nodes
                if m.op == "call_function" and op_class(m) not in (OpClass.VIEW, OpClass.BROADCAST))
    assert len(kernels) == st["groups"] and inner == st["nodes_fused"]
    assert st["launches_before"] - st["launches_after"] == inner - len(kernels), st
    if name != "mlp":   # mlp is GEMM, gelu, GEMM, add: nothing to fuse without GEMM epilogues
        assert st["groups"] > 0 and st["bytes_saved"] > 0


@pytest.mark.parametrize("name", ["llama", "moe", "convnet"])
def test_launches_drop_by_40_percent(fused_samples, name):
    st = fused_samples[name][2].stats
    assert st["launches_after"] <= 0.6 * st["launches_before"], st


def test_fused_node_interface(fused_samples):
    gm = fused_samples["transformer"][2].gm
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, FusedKernel)]
    assert nodes
    kinds = set()
    for n in nodes:
        k = n.target
        assert k.is_fused_kernel and isinstance(k.subgraph, torch.fx.GraphModule)
        assert k.ops and isinstance(k.name, str)
        assert n.meta["fused_from"] and "val" in n.meta
        assert "extern \"C\"" in k.source("cpu") and "@triton.jit" in k.source("cuda")
        assert k.name in k.describe()
        assert costmodel.node_cost(n).launches == 1
        placeholders = [p for p in k.subgraph.graph.nodes if p.op == "placeholder"]
        assert len(placeholders) == len(n.args)
        kinds.add(frozenset(k.ops))
        if k.multi_output:
            assert all(u.target is operator.getitem for u in n.users)
    ops = {o for s in kinds for o in s}
    assert {"_softmax", "native_layer_norm"} <= ops
    # a GELU nothing fuses with stays ATen's (its MKL path beats the generated erf)
    assert "gelu" not in ops and any(n.target == torch.ops.aten.gelu.default for n in gm.graph.nodes)
    # the attention mask and scaling fuse with the softmax; residual adds with the LayerNorm
    assert any({"mul.Tensor", "where.self", "_softmax"} <= s for s in kinds)
    assert any({"add.Tensor", "native_layer_norm"} <= s for s in kinds)


def test_llama_groups_rmsnorm_and_swiglu(fused_samples):
    kinds = [set(k.ops) for k in fused_kernels(fused_samples["llama"][2].gm)]
    assert any({"pow.Tensor_Scalar", "mean.dim", "rsqrt", "mul.Tensor"} <= s for s in kinds)
    assert any({"silu", "mul.Tensor"} <= s for s in kinds)    # SwiGLU: capture keeps silu whole
    assert any({"neg", "cat", "mul.Tensor", "add.Tensor"} <= s for s in kinds)   # rotary embedding


def test_fused_graph_survives_clone_and_meta(fused_samples):
    sample, _, res = fused_samples["llama"]
    c = clone(res.gm)
    assert len(fused_kernels(c)) == len(fused_kernels(res.gm))
    assert numerics(sample, c) <= 1e-4


def test_max_nodes_and_horizontal_options(fused_samples):
    sample, gm, on = fused_samples["moe"]
    _, _, res = fused("moe", captured=(sample, gm), max_nodes=2)
    assert fused_kernels(res.gm)
    for k in fused_kernels(res.gm):
        assert len(k.ops) <= 2
    _, _, off = fused("moe", captured=(sample, gm), horizontal=False)
    assert off.stats["horizontal_merges"] == 0 and on.stats["horizontal_merges"] > 0
    assert on.stats["groups"] < off.stats["groups"]


def test_bf16_transformer_within_tolerance():
    sample, _, res = fused("transformer", dtype="bf16")
    assert res.stats["groups"] > 0
    assert numerics(sample, res.gm) <= TOLERANCE[torch.bfloat16]


@pytest.mark.slow
@pytest.mark.parametrize("name", HF)
def test_hf_models_fuse(name):
    sample, _, res = fused(name)
    assert res.stats["groups"] > 0
    assert res.stats["launches_after"] <= 0.7 * res.stats["launches_before"]
    assert numerics(sample, res.gm) <= 1e-4


def kernel_inputs(gm, inputs):
    """The real inputs every fused node of `gm` sees on `inputs`."""
    seen = []

    class Spy(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if isinstance(target, FusedKernel):
                seen.append((target, args))
            return super().call_function(target, args, kwargs)
    with torch.no_grad():
        Spy(gm).run(*inputs)
    return seen


@pytest.mark.parametrize("name", SAMPLES)
def test_every_generated_kernel_in_triton_interpreter(fused_samples, name):
    sample, _, res = fused_samples[name]
    tested = set()
    for k, args in kernel_inputs(res.gm, sample.make_inputs(3)):
        src = k.source("cuda").split("@triton.jit", 1)[1]   # identical layers give identical kernels
        if src in tested:
            continue
        tested.add(src)
        ref = k.subgraph(*args)
        out = codegen.runner(k, "triton")(*args)
        assert relative_error(out, ref) <= 1e-4, k.source("cuda")


def test_pipeline_run_through_manager():
    from passlab.tools.runner import run
    r = run("transformer", pipeline="fuse", measure=False)
    step = r.record["steps"][0]
    assert step["status"] == "ok" and step["numerics_ok"]
    assert step["stats"]["groups"] > 0 and step["launches"] < r.record["baseline"]["launches"]


def test_bf16_routing_inputs_stay_exact():
    """In bf16, whatever the MoE router's top-k reads is left to ATen (bit-exact with eager)."""
    sample, gm, res = fused("moe", dtype="bf16")
    assert res.stats["skipped"].get("feeds_routing_decision", 0) > 0
    assert numerics(sample, res.gm) <= TOLERANCE[torch.bfloat16]
    _, _, free = fused("moe", captured=(sample, gm), exact_routing=False)
    assert free.stats["groups"] > res.stats["groups"]


class Router(torch.nn.Module):
    """What an MoE layer's router reads, written as Hugging Face writes it: rotary, a residual
    add, RMSNorm in its fp32 upcast form, the gate, softmax, top-2."""

    def __init__(self, d=64, experts=8, seq=16):
        super().__init__()
        self.q, self.gate = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, experts, bias=False)
        self.w = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.register_buffer("cos", torch.randn(seq, d))
        self.register_buffer("sin", torch.randn(seq, d))

    def forward(self, x):
        q = self.q(x)
        a, b = q.chunk(2, -1)
        h = x + (q * self.cos + torch.cat((-b, a), -1) * self.sin)
        hf = h.float()
        h = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.w
        weights, experts = torch.topk(torch.softmax(self.gate(h), -1, dtype=torch.float), 2, -1)
        return weights, experts, h


def test_bf16_routing_cone_fuses_rounding_as_eager():
    """In the routing cone the ops ATen computes as one fp32 operation fuse, each result rounded
    to bf16 in the kernel: router weights, chosen experts and hidden state equal eager bit for bit."""
    from passlab.graphs import Sample
    torch.manual_seed(0)
    m = Router().to(torch.bfloat16).eval()
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    sample = Sample("router", m, (x,), dtype=torch.bfloat16)
    gm = capture(m, (x,))
    res = get_pass("fuse")(clone(gm), PassContext(sample=sample))
    kernels = fused_kernels(res.gm)
    assert kernels and any("neg" in k.ops and "cat" in k.ops for k in kernels)     # the rotary chain
    assert res.stats["skipped"].get("feeds_routing_decision", 0) > 0                  # mean, softmax stay
    assert any("pl_to_bf16" in k.source("cpu").split("{", 1)[1] for k in kernels)
    run = compile_graph(res.gm, "cpu")
    for seed in range(4):
        x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) * (seed + 1)
        with torch.no_grad():
            for got, want in zip(run(x), m(x)):
                assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["transformer", "llama"])
def test_cuda_triton_end_to_end(name):
    sample = load(name, "tiny", device="cuda")
    gm = capture(sample.module, sample.example_inputs)
    res = get_pass("fuse")(clone(gm), PassContext(device="cuda", sample=sample))
    x = sample.make_inputs(4)
    with torch.no_grad():
        assert relative_error(compile_graph(res.gm, "cuda")(*x), sample.module(*x)) <= 1e-4


def test_kernel_of_constants_only_survives_shape_propagation():
    """A kernel whose inputs are all weights or buffers (Swin's relative-position index
    arithmetic) is called with real tensors during fake-tensor propagation: it must run its
    subgraph there, not the compiled kernel (whose outputs would be fake)."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("idx", torch.arange(64).view(8, 8))

        def forward(self, x):
            keep = (self.idx < 40) & (self.idx % 3 != 0)
            return x.masked_fill(keep, 0.0) * 2.0

    m = M()
    x = torch.randn(8, 8)
    sample = Sample_of(m, x)
    gm = capture(m, (x,))
    res = get_pass("fuse")(clone(gm), PassContext(sample=sample))
    assert fused_kernels(res.gm)
    y = torch.randn(8, 8)
    assert torch.equal(compile_graph(res.gm, "cpu")(y), m(y))


def Sample_of(m, x):
    from passlab.graphs import Sample
    return Sample("m", m, (x,))


class LayerScaleResidual(torch.nn.Module):
    """ConvNeXt's block tail as Hugging Face writes it: the layer scale in NHWC, a permute
    back to NCHW, the residual add; the sum is also returned in NHWC (a view read outside)."""

    def __init__(self, c=16):
        super().__init__()
        self.fc = torch.nn.Linear(c, c)
        self.gamma = torch.nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):                       # x: NCHW
        h = self.fc(x.permute(0, 2, 3, 1))
        z = x + (self.gamma * torch.relu(h)).permute(0, 3, 1, 2)
        return z, z.permute(0, 2, 3, 1)


def test_permute_between_fused_ops_stays_in_one_kernel():
    """A permute of a computed value between two fusible ops is read through inside one kernel
    (no copy, no split); a permute whose result leaves the kernels stays a view."""
    from passlab.graphs import Sample
    torch.manual_seed(0)
    m = LayerScaleResidual().eval()
    x = torch.randn(2, 16, 5, 7)
    sample = Sample("layer_scale", m, (x,))
    gm = capture(m, (x,))
    res = get_pass("fuse")(clone(gm), PassContext(sample=sample))
    kernels = fused_kernels(res.gm)
    assert any({"relu", "mul.Tensor", "permute", "add.Tensor"} <= set(k.ops) for k in kernels)
    returned = [n for n in res.gm.graph.nodes if n.target is torch.ops.aten.permute.default
                and any(u.op == "output" for u in n.users)]
    assert returned, "the returned permute was materialized by a kernel instead of staying a view"
    run = compile_graph(res.gm, "cpu")
    for seed in range(3):
        x = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            got, want = run(x), m(x)
        for g, w in zip(got, want):
            assert g.shape == w.shape and relative_error(g, w) < 1e-6


class PaddedGather(torch.nn.Module):
    """An MoE's dispatch and combine as the `moe` sample writes them: rows gathered from a
    table padded with a zeros row (`cat([h, zeros])[src]`), scaled; and an embedding."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)

    def forward(self, h, src, w, ids):
        pad = torch.cat([h, h.new_zeros(1, h.shape[1])])
        y = pad[src] * w.unsqueeze(-1) + 1.0
        z = torch.cat([h * 2.0, h.new_zeros(1, h.shape[1])])       # read by two gathers: copied for each
        return y, self.emb(ids) * 0.5, z[src[::2]] + z[src[1::2]]


def gathers(k) -> bool:
    return any(op in ("index.Tensor", "index_select") for op in k.ops)


def padded_gather_inputs(dtype, seed, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(10, 32, generator=g).to(dtype), torch.randint(0, 11, (40,), generator=g).to(index_dtype),
            torch.randn(40, generator=g).to(dtype), torch.randint(0, 50, (3, 7), generator=g).to(index_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathers_fuse_into_kernels_with_eager_values(dtype):
    """Rows gathered from a zero-padded table and an embedding are read inside kernels (the
    padded table is never written); in fp32 every value is eager's, bit for bit."""
    from passlab.graphs import Sample
    torch.manual_seed(0)
    m = PaddedGather().to(dtype).eval()
    x = padded_gather_inputs(dtype, 0)
    sample = Sample("gathers", m, x, dtype=dtype)
    res = get_pass("fuse")(clone(capture(m, x)), PassContext(sample=sample))
    kernels = fused_kernels(res.gm)
    assert sum(gathers(k) for k in kernels) == 2 and any("embedding" in k.ops for k in kernels), kernels
    left = {n.target for n in res.gm.graph.nodes if n.op == "call_function"}
    assert not left & {torch.ops.aten.cat.default, torch.ops.aten.index.Tensor, torch.ops.aten.embedding.default}
    assert res.stats["constants_copied"] >= 1
    assert any("pl_gix" in k.source("cpu") for k in kernels)
    run = compile_graph(res.gm, "cpu")
    for seed in range(1, 4):
        x = padded_gather_inputs(dtype, seed, torch.int32 if seed == 3 else torch.int64)
        if seed == 3:     # a new index dtype: capture and fuse again for it
            res = get_pass("fuse")(clone(capture(m, x)), PassContext(sample=Sample("gathers", m, x, dtype=dtype)))
            run = compile_graph(res.gm, "cpu")
        with torch.no_grad():
            for got, want in zip(run(*x), m(*x)):     # bf16: one rounding per kernel, not per op
                assert got.shape == want.shape
                assert torch.equal(got, want) if dtype == torch.float32 else relative_error(got, want) <= 1e-2


def test_gather_out_of_range_raises_index_error_as_eager():
    """A row index outside the table makes the kernel flag the call: IndexError, as eager's,
    never a read out of bounds; the next call with good indices runs as before."""
    from passlab.graphs import Sample
    m = PaddedGather().eval()
    x = padded_gather_inputs(torch.float32, 0)
    res = get_pass("fuse")(clone(capture(m, x)), PassContext(sample=Sample("gathers", m, x)))
    run = compile_graph(res.gm, "cpu")
    for bad in (11, -12, 1 << 40):
        src = x[1].clone()
        src[5] = bad
        with pytest.raises(IndexError):
            m(x[0], src, x[2], x[3])
        with pytest.raises(IndexError, match="index out of range"):
            run(x[0], src, x[2], x[3])
    ids = x[3].clone()
    ids[2, 3] = 50
    with pytest.raises(IndexError, match="index out of range"):
        run(x[0], x[1], x[2], ids)
    for got, want in zip(run(*x), m(*x)):
        assert torch.equal(got, want)


def test_gathers_stay_in_aten_for_triton():
    """Triton kernels have no error flag: `fuse` leaves gathers to ATen off the CPU (a gathering
    kernel printed for Triton reads the rows in range, as the interpreter test shows)."""
    from passlab.graphs import Sample
    m = PaddedGather().eval()
    x = padded_gather_inputs(torch.float32, 0)
    res = get_pass("fuse")(clone(capture(m, x)), PassContext(device="triton", sample=Sample("gathers", m, x)))
    assert not any(gathers(k) or "embedding" in k.ops for k in fused_kernels(res.gm))
    cats = sum(1 for n in res.gm.graph.nodes if n.target is torch.ops.aten.cat.default) + \
        sum(k.ops.count("cat") for k in fused_kernels(res.gm))
    assert cats == 2          # the table two ATen gathers read is not copied per reader (made twice)
    cpu = get_pass("fuse")(clone(capture(m, x)), PassContext(sample=Sample("gathers", m, x)))
    printed = 0
    for k, args in kernel_inputs(cpu.gm, x):
        if gathers(k) or "embedding" in k.ops:
            printed += 1
            assert torch.equal(codegen.runner(k, "triton")(*args), k.subgraph(*args)), k.source("cuda")
    assert printed == 3


def test_routing_cone_skips_rounding_values_already_bf16():
    """In the bf16 routing cone each op's result is rounded in the kernel, except a value that
    is a bf16 value already (a gathered row, a choice between rows and zeros, a bool as 0/1)."""
    from passlab.passes import PassManager
    from passlab.tools.runner import context
    sample = load("moe", "tiny", dtype="bf16")
    res = PassManager(["dce", "gather_rows", "sum_pairs", "fuse"]).run(
        capture(sample.module, sample.example_inputs), context(sample, "cpu"))
    combine = [k for k in fused_kernels(res.gm) if gathers(k) and "add.Tensor" in k.ops]
    assert combine
    for k in combine:
        vals = {v.id: v for v in k.kernel.values}
        for v in vals.values():
            if v.op == "round_bf16":
                assert vals[v.args[0]].op not in ("gather", "where", "cast", "round_bf16"), k.source("cpu")
    assert numerics(sample, res.gm) <= TOLERANCE[torch.bfloat16]


class Divisions(torch.nn.Module):
    def forward(self, a, b, x, y):
        return (a // b) * 2, torch.div(a, b, rounding_mode="trunc") + 1, (x // y) * 1.0, \
            torch.div(x, y, rounding_mode="trunc") + 0.0


def test_divisions_with_rounding_are_eagers():
    """Integer division in integer arithmetic (float32 would round 2^25 + 1), float floor
    division by ATen's fmod algorithm (1 // 0.1 is 9, not floor(1 / 0.1) = 10), and an integer
    division by zero raises ZeroDivisionError as eager's does."""
    from passlab.graphs import Sample
    a = torch.tensor([2**25 + 1, 2**25 + 3, -7, 7, -7, 2**62 + 5, -(2**62) - 3, 9] * 4)
    b = torch.tensor([3, 3, 2, -2, -2, 7, -1, 4] * 4)
    x = torch.tensor([1.0, -1.0, 5.5, -5.5, 7.0, 1e30, 3.0, 0.3] * 4)
    y = torch.tensor([0.1, 0.1, 2.0, 2.0, -0.0, 1e-30, float("inf"), 0.1] * 4)
    m = Divisions()
    res = get_pass("fuse")(clone(capture(m, (a, b, x, y))), PassContext(sample=Sample("div", m, (a, b, x, y))))
    assert sum("div.Tensor_mode" in k.ops for k in fused_kernels(res.gm)) == 2
    run = compile_graph(res.gm, "cpu")
    for got, want in zip(run(a, b, x, y), m(a, b, x, y)):
        assert torch.equal(got, want)
    b[3] = 0
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        m(a, b, x, y)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        run(a, b, x, y)
