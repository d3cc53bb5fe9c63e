"""Pattern passes: each fires where its pattern is, keeps numerics, and leaves
graphs it cannot prove equivalent alone (counted as skipped[reason])."""
import importlib.util
import math

import pytest
import torch
from torch import nn

from passlab.graphs import capture, clone, load
from passlab.passes import PassContext, PassManager, CheckNumerics, TOLERANCE, relative_error
from passlab.passes.contract import captured
from passlab.passes.patterns.epilogue import onednn_available
from passlab.passes.registry import get_pass
from passlab.runtime.costmodel import graph_cost, node_cost
from passlab.runtime.opclass import OpClass, op_class

aten = torch.ops.aten
ONEDNN = onednn_available("cpu")
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="oneDNN linear post-ops unavailable")
ONEDNN_BF16 = ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bf16 kernels on this processor "
                                                              "(no AVX512-BF16/AMX exposed)")
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")


def run(name, gm, **options):
    res = get_pass(name)(gm, PassContext(options=options))
    res.gm.graph.lint()
    return res


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def check_sample(pass_name, model):
    sample, original = captured(model)
    res = run(pass_name, clone(original))
    for seed in (11, 12):
        x = sample.make_inputs(seed)
        with torch.no_grad():
            assert relative_error(res.gm(*x), sample.module(*x)) < 1e-4
    return res


# --------------------------------------------------------------------- fires on the samples

FIRES = [  # pass, model, rewrites, extra stats
    ("fold_batchnorm", "convnet", 6, {}),
    ("fuse_attention", "transformer", 2, {"causal": 2, "gqa": 0}),
    ("fuse_attention", "llama", 2, {"causal": 2, "gqa": 2}),
    ("merge_projections", "transformer", 2, {"gemms_merged": 6}),
    ("merge_projections", "llama", 4, {"gemms_merged": 10}),
    ("merge_projections", "moe", 2, {"gemms_merged": 4}),
]
if ONEDNN:      # GEMM + GELU/SiLU -> oneDNN linear with a post-op, GEMM + residual -> linear + add
    FIRES += [("fuse_epilogue", "mlp", 4, {"onednn_linear": 2, "onednn_binary": 2}),
              ("fuse_epilogue", "transformer", 6, {"onednn_linear": 2, "onednn_binary": 4, "residual_folded": 0}),
              ("fuse_epilogue", "llama", 6, {"onednn_linear": 2, "onednn_binary": 4, "epilogue_kernels": 0})]
else:
    FIRES += [("fuse_epilogue", "transformer", 6, {"residual_folded": 4, "epilogue_kernels": 2}),
              ("fuse_epilogue", "llama", 6, {"residual_folded": 4, "epilogue_kernels": 2})]
HF_FIRES = [
    ("fuse_attention", "hf:gpt2", 2, {"causal": 2}),
    ("fuse_attention", "hf:llama", 2, {"causal": 2, "gqa": 2}),
    ("fuse_attention", "hf:mixtral", 2, {"causal": 2, "gqa": 2}),
    ("merge_projections", "hf:llama", 4, {"gemms_merged": 10}),
    ("merge_projections", "hf:mixtral", 2, {"gemms_merged": 6}),
    # GPT-2 writes GELU as the tanh formula: recomposed to one gelu, it becomes the linear's post-op too
    ("fuse_epilogue", "hf:gpt2", 6, {"onednn_linear": 2, "onednn_binary": 4, "activations_recomposed": 2}
     if ONEDNN else {"residual_folded": 4, "epilogue_kernels": 2}),
    ("fuse_epilogue", "hf:llama", 6, {"onednn_linear": 2, "onednn_binary": 4} if ONEDNN
     else {"residual_folded": 4, "epilogue_kernels": 2}),
]


def expect_fired(res, rewrites, extra):
    assert res.changed and res.stats["rewritten"] == rewrites, res.stats
    assert res.stats["matched"] >= rewrites
    for k, v in extra.items():
        assert res.stats[k] == v, (k, res.stats)


@pytest.mark.parametrize("pass_name,model,rewrites,extra", FIRES, ids=[f"{p}-{m}" for p, m, *_ in FIRES])
def test_pass_fires_on_sample(pass_name, model, rewrites, extra):
    res = check_sample(pass_name, model)
    expect_fired(res, rewrites, extra)
    t = targets(res.gm)
    if pass_name == "fuse_attention":
        assert t.count(aten.scaled_dot_product_attention.default) == rewrites
        assert aten._softmax.default not in t and aten.bmm.default not in t
    if pass_name == "fold_batchnorm":
        assert aten._native_batch_norm_legit_no_training.default not in t


@pytest.mark.slow
@needs_hf
@pytest.mark.parametrize("pass_name,model,rewrites,extra", HF_FIRES, ids=[f"{p}-{m}" for p, m, *_ in HF_FIRES])
def test_pass_fires_on_hf(pass_name, model, rewrites, extra):
    expect_fired(check_sample(pass_name, model), rewrites, extra)


@pytest.mark.slow
@needs_hf
def test_mixtral_experts_are_plain_aten():
    _, gm = captured("hf:mixtral")
    assert not [n for n in gm.graph.nodes if "grouped_mm" in str(n.target)]


@pytest.mark.parametrize("pass_name", ["fold_batchnorm", "fuse_attention", "merge_projections", "fuse_epilogue"])
def test_pass_leaves_unrelated_model_alone(pass_name):
    model = {"fold_batchnorm": "transformer", "fuse_epilogue": "convnet"}.get(pass_name, "mlp")
    _, original = captured(model)
    res = run(pass_name, clone(original))
    assert res.stats["rewritten"] == 0 and not res.changed
    assert str(res.gm.graph) == str(original.graph)


def test_patterns_compose_in_pipeline():
    sample, gm = captured("llama")
    pipeline = "cleanup,fold_batchnorm,fuse_attention,merge_projections,fuse_epilogue"
    pm = PassManager(pipeline, instruments=[CheckNumerics(sample.module, sample.make_inputs, "cpu",
                                                           TOLERANCE[torch.float32])])
    res = pm.run(clone(gm), PassContext(sample=sample))
    steps = {r.name: r for r in res.steps}
    assert all(r.status == "ok" for r in res.steps), [(r.name, r.error) for r in res.steps]
    assert steps["fuse_attention"].stats["rewritten"] == 2
    assert steps["merge_projections"].stats["rewritten"] == 4


def test_weights_are_never_mutated():
    sample, original = captured("convnet")
    gm = clone(original)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    run("fold_batchnorm", gm)
    for k, v in before.items():
        assert torch.equal(original.state_dict()[k], v)


# --------------------------------------------------------------------- attention: what it must not rewrite

class Attn(nn.Module):
    """Attention written out, with knobs to break one SDPA assumption at a time."""

    def __init__(self, heads=2, kv_heads=None, softmax_dim=-1, mask="causal", fill=float("-inf"),
                 tensor_scale=False, return_probs=False, seq=8, dim=16):
        super().__init__()
        self.h, self.kvh, self.hd = heads, kv_heads or heads, dim // heads
        self.qkv = nn.Linear(dim, dim + 2 * self.kvh * self.hd)
        self.softmax_dim, self.mask, self.fill, self.return_probs = softmax_dim, mask, fill, return_probs
        self.register_buffer("causal", torch.tril(torch.ones(seq, seq, dtype=torch.bool)))
        self.register_buffer("wide", torch.zeros(1, 4, seq, seq))
        self.register_buffer("scale_t", torch.tensor(1.0 / math.sqrt(self.hd)))
        self.tensor_scale = tensor_scale

    def forward(self, x, extra=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split([D, self.kvh * self.hd, self.kvh * self.hd], -1)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.kvh, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kvh, 1)
        v = v.view(B, T, self.kvh, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kvh, 1)
        s = q @ k.transpose(-2, -1)
        s = s * self.scale_t if self.tensor_scale else s / math.sqrt(self.hd)
        if self.mask == "causal":
            s = s.masked_fill(~self.causal[:T, :T], self.fill)
        elif self.mask == "wide":               # broadcasts the scores to more heads
            s = s + self.wide
        elif self.mask == "input_bool":         # a padding mask given at run time: True = attend
            s = s.masked_fill(~extra, float("-inf"))
        elif self.mask == "input_additive":
            s = s + extra
        p = torch.softmax(s, dim=self.softmax_dim)
        out = p @ v
        return (out, p) if self.return_probs else out


def attention_result(module, *inputs):
    gm = capture(module.eval(), inputs)
    res = run("fuse_attention", gm)
    with torch.no_grad():
        assert relative_error(res.gm(*inputs), module(*inputs)) < 1e-4
    return res


@pytest.mark.parametrize("knobs,reason", [
    (dict(softmax_dim=-2), "softmax_dim"),
    (dict(tensor_scale=True), "scale_not_constant"),
    (dict(fill=-1e4), "mask_fill_not_neg_inf"),
    (dict(heads=1, kv_heads=1, mask="wide"), "mask_shape"),
    (dict(return_probs=True), "probs_used_elsewhere"),
])
def test_attention_skips_what_it_cannot_prove(knobs, reason):
    torch.manual_seed(0)
    res = attention_result(Attn(**knobs), torch.randn(2, 8, 16))
    assert res.stats["rewritten"] == 0 and res.stats["skipped"] == {reason: 1}, res.stats
    assert aten.scaled_dot_product_attention.default not in targets(res.gm)


def test_attention_keeps_runtime_masks():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    keep = torch.rand(2, 1, 8, 8) > 0.3
    keep[..., 0] = True                          # no fully masked rows
    res = attention_result(Attn(mask="input_bool"), x, keep)
    assert res.stats["rewritten"] == 1 and res.stats["causal"] == 0
    sdpa = [n for n in res.gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default][0]
    assert sdpa.args[3] is not None and sdpa.args[5] is False
    res = attention_result(Attn(mask="input_additive"), x, torch.randn(2, 2, 8, 8))
    assert res.stats["rewritten"] == 1 and res.stats["causal"] == 0


def test_attention_gqa_and_no_mask():
    torch.manual_seed(0)
    res = attention_result(Attn(heads=4, kv_heads=2, mask=None), torch.randn(2, 8, 16))
    assert res.stats["rewritten"] == 1 and res.stats["gqa"] == 1 and res.stats["causal"] == 0


# --------------------------------------------------------------------- merge_projections

class Siblings(nn.Module):
    def __init__(self, flatten=False, weight_input=False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(8, 10, bias=False), nn.Linear(8, 6)
        self.flatten, self.weight_input = flatten, weight_input

    def forward(self, x, w=None):
        a, b, c = self.a(x), self.b(x), self.c(x)
        if self.weight_input:
            return a + c, x @ w
        if self.flatten:                        # a view a column slice cannot satisfy
            return a.reshape(-1).sum() + b.reshape(-1)[:4] + c.reshape(-1)[:4]
        return torch.relu(a) * c, b


def test_merge_projections_mixed_bias_numerics():
    torch.manual_seed(0)
    m, x = Siblings().eval(), torch.randn(5, 8)
    gm = capture(m, (x,))
    res = run("merge_projections", gm)
    assert res.stats["rewritten"] == 1 and res.stats["gemms_merged"] == 3
    assert sum(t in (aten.mm.default, aten.addmm.default) for t in targets(res.gm)) == 1
    with torch.no_grad():
        assert relative_error(res.gm(x), m(x)) < 1e-5


def test_merge_projections_skips_views_needing_contiguous():
    torch.manual_seed(0)
    m, x = Siblings(flatten=True).eval(), torch.randn(5, 8)
    res = run("merge_projections", capture(m, (x,)))
    assert res.stats["rewritten"] == 0 and res.stats["skipped"] == {"view_needs_contiguous_output": 1}


def test_merge_projections_skips_runtime_weights():
    torch.manual_seed(0)
    m, x, w = Siblings(weight_input=True).eval(), torch.randn(5, 8), torch.randn(8, 3)
    res = run("merge_projections", capture(m, (x, w)))
    assert res.stats["skipped"] == {"weight_not_constant": 1}
    assert res.stats["gemms_merged"] == 2      # a and c still merge
    with torch.no_grad():
        assert relative_error(res.gm(x, w), m(x, w)) < 1e-5


# --------------------------------------------------------------------- fold_batchnorm

class LinearBN(nn.Module):
    def __init__(self, bias=True, double_use=False):
        super().__init__()
        self.fc, self.bn, self.double_use = nn.Linear(6, 4, bias=bias), nn.BatchNorm1d(4), double_use
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        y = self.fc(x)
        return (self.bn(y), y) if self.double_use else self.bn(y)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_into_linear(bias):
    torch.manual_seed(0)
    m, x = LinearBN(bias).eval(), torch.randn(3, 6)
    res = run("fold_batchnorm", capture(m, (x,)))
    assert res.stats["rewritten"] == 1
    assert aten._native_batch_norm_legit_no_training.default not in targets(res.gm)
    with torch.no_grad():
        assert relative_error(res.gm(x), m(x)) < 1e-5


def test_fold_batchnorm_skips():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    res = run("fold_batchnorm", capture(LinearBN(double_use=True).eval(), (x,)))
    assert res.stats == {"matched": 1, "rewritten": 0, "skipped": {"producer_has_other_users": 1}}
    bn_after_relu = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6)).eval()
    res = run("fold_batchnorm", capture(bn_after_relu, (x,)))
    assert res.stats["skipped"] == {"no_conv_or_linear_before": 1} and not res.changed


# --------------------------------------------------------------------- fuse_epilogue

class GemmAdds(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.w, self.b, self.case = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6)), case

    def forward(self, x, r):
        y = x @ self.w
        if self.case == "bias":
            return y + self.b
        if self.case == "bias_residual":
            return (y + self.b) + r
        if self.case == "broadcast":            # the add makes the GEMM output bigger
            return y + r
        return y.double() + r.double()


@pytest.mark.parametrize("case,r_shape,stats", [
    ("bias", (5, 6), {"rewritten": 1, "bias_folded": 1, "residual_folded": 0}),
    ("bias_residual", (5, 6), {"rewritten": 2, "bias_folded": 1, "residual_folded": 0 if ONEDNN else 1,
                               "onednn_binary": 1 if ONEDNN else 0}),
    ("broadcast", (3, 5, 6), {"rewritten": 0, "skipped": {"add_broadcasts_gemm_output": 1}}),
    ("dtype", (5, 6), {"rewritten": 0, "matched": 0}),
])
def test_fuse_epilogue_cases(case, r_shape, stats):
    torch.manual_seed(0)
    m, x, r = GemmAdds(case).eval(), torch.randn(5, 8), torch.randn(*r_shape)
    res = run("fuse_epilogue", capture(m, (x, r)))
    for k, v in stats.items():
        assert res.stats[k] == v, res.stats
    if stats["rewritten"]:
        assert aten.mm.default not in targets(res.gm)
        assert {aten.addmm.default, torch.ops.mkldnn._linear_pointwise.binary} & set(targets(res.gm))
    with torch.no_grad():
        assert relative_error(res.gm(x, r), m(x, r)) < 1e-5


def test_fuse_epilogue_residual_option():
    sample, gm = captured("llama")
    res = run("fuse_epilogue", clone(gm), residual=False, kernels=False, onednn=False)
    assert res.stats["rewritten"] == 0 and res.stats["skipped"] == {"residual_disabled": 4}


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.ReLU()])
def test_cpu_epilogue_kernel(act):
    torch.manual_seed(0)
    m, x = FFN(act).eval(), torch.randn(2, 5, 16)
    res = run("fuse_epilogue", capture(m, (x,)), onednn=False)
    assert res.stats["epilogue_kernels"] == 1 and res.stats["residual_folded"] == 1, res.stats
    kernels = [n for n in res.gm.graph.nodes if getattr(n.target, "is_fused_kernel", False)]
    assert len(kernels) == 1 and kernels[0].args[0].target in (aten.view.default, aten.addmm.default)
    with torch.no_grad():
        assert relative_error(res.gm(x), m(x)) < 1e-5


# --------------------------------------------------------------------- fuse_epilogue on CPU: oneDNN post-ops

MKLDNN = {torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._linear_pointwise.binary}


class Swish(nn.Module):
    def forward(self, h):                        # SiLU as core aten sees it after decomposition
        return h * torch.sigmoid(h)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_onednn_bf16)])
@pytest.mark.parametrize("act,attr", [(nn.GELU(), ("gelu", "none")), (nn.GELU("tanh"), ("gelu", "tanh")),
                                      (nn.SiLU(), ("swish", "")), (Swish(), ("swish", "")), (nn.ReLU(), ("relu", ""))])
def test_onednn_linear_post_ops(act, attr, dtype):
    torch.manual_seed(0)
    m, x = FFN(act).eval().to(dtype), torch.randn(2, 5, 16, dtype=dtype)
    gm = capture(m, (x,))
    before = graph_cost(gm).launches
    res = run("fuse_epilogue", gm)
    assert res.stats["onednn_linear"] == 1 and res.stats["onednn_binary"] == 1 and res.stats["rewritten"] == 2
    nodes = [n for n in res.gm.graph.nodes if n.op == "call_function" and op_class(n) != OpClass.VIEW]
    assert [n.target for n in nodes] == [torch.ops.mkldnn._linear_pointwise.default,
                                         torch.ops.mkldnn._linear_pointwise.binary], res.gm.graph
    assert tuple(nodes[0].args[3:]) == (attr[0], [], attr[1])
    assert graph_cost(res.gm).launches == 2 < before
    for n, N in zip(nodes, (40, 16)):            # classed and costed as the GEMM it is
        assert op_class(n) == OpClass.GEMM and n.meta["val"].shape == (10, N) and n.meta["val"].dtype == dtype
    assert node_cost(nodes[0]).flops == 2 * 10 * 40 * 16 and node_cost(nodes[1]).flops == 2 * 10 * 16 * 40
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for seed in (1, 2):
            x = torch.randn(2, 5, 16, dtype=dtype, generator=torch.Generator().manual_seed(seed))
            assert relative_error(res.gm(x), m(x)) < tol


@needs_onednn_bf16
def test_onednn_llama_bf16_upcast_silu():
    """bf16 llama upcasts around SiLU (`_to_copy` fp32, x * sigmoid(x), `_to_copy` bf16):
    oneDNN computes the post-op in fp32 and rounds once, which is that, in one launch."""
    sample = load("llama", dtype=torch.bfloat16)
    gm = capture(sample.module, sample.example_inputs)
    assert sum(n.target == aten._to_copy.default for n in gm.graph.nodes) > 0
    res = run("fuse_epilogue", gm)
    assert res.stats["onednn_linear"] == 2 and res.stats["onednn_binary"] == 4, res.stats
    assert not [n for n in res.gm.graph.nodes if n.target == aten.sigmoid.default]
    with torch.no_grad():
        x = sample.make_inputs(5)
        assert relative_error(res.gm(*x), sample.module(*x)) < 2e-2


@needs_onednn
@pytest.mark.parametrize("options,dtype,skipped", [
    ({"onednn": False}, torch.float32, {}),
    ({}, torch.float16, {"onednn_dtype": 2}),
])
def test_onednn_left_alone(options, dtype, skipped):
    torch.manual_seed(0)
    m, x = FFN(nn.GELU()).eval().to(dtype), torch.randn(2, 5, 16, dtype=dtype)
    res = run("fuse_epilogue", capture(m, (x,)), **options)
    assert res.stats["onednn_linear"] == res.stats["onednn_binary"] == 0 and res.stats["skipped"] == skipped
    assert not MKLDNN & set(targets(res.gm)) and aten.addmm.default in targets(res.gm)
    with torch.no_grad():
        assert relative_error(res.gm(x), m(x)) < (1e-5 if dtype == torch.float32 else 2e-2)


class RawWeights(nn.Module):
    """GEMMs on an [in, out] parameter (GPT-2's Conv1D) and on a weight given at run time."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x, w):
        return torch.relu(x @ self.w), torch.relu(x @ w)


@needs_onednn
def test_onednn_weights():
    torch.manual_seed(0)
    m, x, w = RawWeights().eval(), torch.randn(5, 8), torch.randn(8, 6)
    gm = capture(m, (x, w))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    res = run("fuse_epilogue", gm)
    assert res.stats["onednn_linear"] == 1 and res.stats["skipped"] == {"weight_not_constant": 1}, res.stats
    fused = [n for n in res.gm.graph.nodes if n.target in MKLDNN]
    assert fused[0].args[1].op == "get_attr" and fused[0].args[1].meta["val"].shape == (6, 8)
    for k, v in before.items():
        assert torch.equal(res.gm.state_dict()[k], v)
    with torch.no_grad():
        for a, b in zip(res.gm(x, w), m(x, w)):
            assert relative_error(a, b) < 1e-5


# --------------------------------------------------------------------- fuse_epilogue on CUDA: Triton GEMM template

class FFN(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc, self.out, self.act = nn.Linear(16, 40), nn.Linear(40, 16), act

    def forward(self, x):
        return x + self.out(self.act(self.fc(x)))


class TritonInterpreter(torch.fx.Interpreter):
    """Runs GEMM-template nodes through the Triton kernel (TRITON_INTERPRET=1 on CPU)."""

    def call_function(self, target, args, kwargs):
        if getattr(target, "is_gemm_template", False):
            from passlab.runtime.codegen import triton_gemm
            return triton_gemm.launch(*args, act=target.act)
        return super().call_function(target, args, kwargs)


@pytest.mark.parametrize("act,name", [(nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu_tanh"), (nn.SiLU(), "silu"),
                                      (nn.ReLU(), "relu")])
def test_gemm_epilogue_template(act, name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    m, x = FFN(act).eval(), torch.randn(2, 5, 16)
    res = get_pass("fuse_epilogue")(capture(m, (x,)), PassContext(device="cuda"))
    assert res.stats["gemm_templates"] == 2, res.stats
    kinds = sorted(n.target.name for n in res.gm.graph.nodes if getattr(n.target, "is_gemm_template", False))
    assert kinds == sorted([f"gemm_bias_{name}", "gemm_bias_residual"])
    assert aten.addmm.default not in targets(res.gm)
    with torch.no_grad():
        expected = m(x)
        assert relative_error(res.gm(x), expected) < 1e-5                          # ATen reference path
        pytest.importorskip("triton", reason="the kernel half of this test needs triton (the dev extra)")
        assert relative_error(TritonInterpreter(res.gm).run(x), expected) < 1e-4      # the kernel


@pytest.mark.gpu
def test_gemm_epilogue_template_on_gpu():
    torch.manual_seed(0)
    m, x = FFN(nn.GELU()).eval().cuda(), torch.randn(4, 64, 16, device="cuda")
    res = get_pass("fuse_epilogue")(capture(m, (x,)), PassContext(device="cuda"))
    assert res.stats["gemm_templates"] == 2
    with torch.no_grad():
        assert relative_error(res.gm(x), m(x)) < 1e-4
