"""The decomposition table capture uses (graphs/decompositions.py)."""
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from passlab.graphs import capture, random_like
from passlab.graphs.decompositions import KEEP, decomp_table, kept_ops, leading_order
from passlab.runtime.opclass import OpClass, op_class

aten = torch.ops.aten


def ops(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def same_as_eager(module, inputs, gm, tol=1e-5):
    for seed in (1, 2):
        x = random_like(inputs, seed)
        with torch.no_grad():
            want, got = module(*x), gm(*x)
        assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()


class Activations(nn.Module):
    def forward(self, x):
        return F.silu(x) + F.softplus(x) + F.hardswish(x) + F.mish(x) + F.hardsigmoid(x)


def test_fast_activations_stay_single_nodes():
    m, x = Activations().eval(), (torch.randn(4, 32),)
    gm = capture(m, x)
    h = ops(gm)
    for op in (aten.silu.default, aten.softplus.default, aten.hardswish.default, aten.mish.default,
               aten.hardsigmoid.default):
        assert h[op] == 1, (op, h)
    assert aten.sigmoid.default not in h and aten.log1p.default not in h
    same_as_eager(m, x, gm)


def test_bf16_silu_has_no_casts():
    """Core aten decomposes bf16 silu as fp32 x * sigmoid(x) with casts around it."""
    m = nn.Sequential(nn.Linear(16, 16), nn.SiLU()).eval().to(torch.bfloat16)
    gm = capture(m, (torch.randn(4, 16, dtype=torch.bfloat16),))
    h = ops(gm)
    assert h[aten.silu.default] == 1 and aten._to_copy.default not in h


class MHA(nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        self.attn, self.need_weights = nn.MultiheadAttention(32, 4, batch_first=True), need_weights

    def forward(self, x):
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


def test_multihead_attention_keeps_sdpa_and_one_gemm_per_projection():
    m, x = MHA(need_weights=False).eval(), (torch.randn(2, 8, 32),)
    gm = capture(m, x)
    h = ops(gm)
    assert h[aten.scaled_dot_product_attention.default] == 1
    # the in-projection runs on a batch-transposed input: one addmm, no bmm over an expanded weight
    assert aten.bmm.default not in h and h[aten.addmm.default] == 2
    assert aten.any.dim not in h and aten._softmax.default not in h   # sdpa's decomposition is gone
    same_as_eager(m, x, gm)


def test_multihead_attention_with_weights_is_still_correct():
    m, x = MHA(need_weights=True).eval(), (torch.randn(2, 8, 32),)
    gm = capture(m, x)
    assert aten._softmax.default in ops(gm)          # the weights are returned: written-out attention
    same_as_eager(m, x, gm)


class PermutedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 24)

    def forward(self, x):                 # [B, T, D] -> [T, B, D] -> Linear: what MHA does
        return self.lin(x.transpose(0, 1)) * 2


def test_linear_on_permuted_input_is_one_gemm():
    m, x = PermutedLinear().eval(), (torch.randn(3, 5, 16),)
    gm = capture(m, x)
    h = ops(gm)
    assert h[aten.addmm.default] == 1 and aten.bmm.default not in h and aten.clone.default not in h
    assert gm.graph.output_node().args[0].meta["val"].shape == (5, 3, 24)
    same_as_eager(m, x, gm)


def test_leading_order():
    x = torch.randn(2, 3, 4)
    assert leading_order(x) is None                              # contiguous already
    assert leading_order(x.transpose(0, 1)) == [1, 0]
    assert leading_order(x.transpose(1, 2)) is None              # last dim not innermost
    assert leading_order(torch.randn(4, 6)[:, ::2].reshape(4, 3, 1)) is None


def test_inference_dropout_is_gone():
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.ReLU()).eval()
    gm = capture(m, (torch.randn(2, 8),))
    h = ops(gm)
    assert aten.clone.default not in h and aten.dropout.default not in h
    same_as_eager(m, (torch.randn(2, 8),), gm)


def test_dropout_as_the_output_stays_correct():
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).eval()
    gm = capture(m, (torch.randn(2, 8),))
    same_as_eager(m, (torch.randn(2, 8),), gm)


def test_table_is_core_aten_minus_kept():
    t = decomp_table()
    default = torch.export.default_decompositions()
    kept = kept_ops()
    assert len(kept) >= len(KEEP) - 4              # names this torch lacks are skipped, not errors
    assert not set(kept) & set(t)
    assert aten.matmul.default in t and aten.layer_norm.default in t   # decomposed on purpose
    # out= overloads and other namespaces' entries (quantized_decomposed, ...) come and go in the
    # global table as other code registers kernels; the comparison is over functional aten overloads
    functional = lambda ops: {op for op in ops if getattr(op, "_overloadname", "") != "out"
                              and getattr(op, "namespace", "") == "aten"}
    assert functional(t) == functional(default) - set(kept)
    t.clear()
    assert decomp_table(), "decomp_table() hands out a fresh dict each time"


def test_opclass_knows_the_kept_ops():
    resampling = {"upsample"}
    for op in kept_ops():
        if any(r in str(op) for r in resampling):
            continue
        assert op_class(op) != OpClass.OPAQUE, op
    assert op_class(aten.scaled_dot_product_attention.default) == OpClass.GEMM


@pytest.mark.slow
def test_hf_gpt2_sdpa_captures():
    """HF's default sdpa attention: the core-aten decomposition of sdpa breaks a
    later view (non-contiguous output); keeping sdpa captures it."""
    tf = pytest.importorskip("transformers")
    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32, use_cache=False)
    torch.manual_seed(0)
    model = tf.GPT2Model(cfg).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m(input_ids=ids).last_hidden_state

    w, ids = Wrap().eval(), (torch.randint(0, 64, (2, 8)),)
    gm = capture(w, ids)
    assert aten.scaled_dot_product_attention.default in ops(gm)
    with torch.no_grad():
        assert torch.allclose(gm(*ids), w(*ids), atol=1e-5)
