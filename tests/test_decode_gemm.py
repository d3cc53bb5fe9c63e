"""The C++ decode-GEMM template (runtime/codegen/cpp_gemv.py) and the `decode_gemm` pass."""
from __future__ import annotations

import pytest
import torch

from passlab.graphs import capture, load
from passlab.passes import PassManager
from passlab.passes.manager import CheckNumerics, VerifyGraph
from passlab.runtime.codegen.cpp_gemv import DecodeGemm, reference
from passlab.tools.runner import context


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("M, N, K", [(1, 7, 5), (4, 96, 64), (3, 33, 70), (8, 130, 512)])
@pytest.mark.parametrize("bias, residual", [(False, False), (True, True), (False, True)])
def test_template_matches_aten(dtype, tol, M, N, K, bias, residual):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K + 3, generator=g).to(dtype)[:, 1:K + 1]          # rows strided, offset view
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    r = torch.randn(M, N, generator=g).to(dtype) if residual else None
    y = DecodeGemm(bias, residual)(x, w, b, r)
    ref = reference(x.float(), w.float(), None if b is None else b.float(), None if r is None else r.float())
    assert y.dtype == dtype and y.shape == (M, N)
    assert ((y.float() - ref).abs().max() / ref.abs().max()) < tol


def test_inputs_it_was_not_built_for_run_in_aten():
    k = DecodeGemm(False, False)
    w = torch.randn(16, 32)
    for x in (torch.randn(9, 32), torch.randn(32, 4).t(), torch.randn(4, 32, dtype=torch.float64),
              torch.randn(0, 32)):
        ww = w.to(x.dtype)
        assert torch.allclose(k(x, ww), reference(x, ww), atol=1e-5)
    assert k(torch.randn(4, 32), torch.randn(32, 16).t()).shape == (4, 16)    # weight not contiguous


def test_pass_on_decode_step_matches_eager():
    sample = load("llama_decode", "tiny")
    gm = capture(sample.module, sample.example_inputs, sample.example_kwargs)
    check = CheckNumerics(sample.reference, sample.make_inputs, "cpu", 1e-4)
    res = PassManager(["dce", "merge_projections", "decode_gemm(choose=always)"],
                      instruments=[VerifyGraph(), check]).run(gm, context(sample, "cpu"))
    step = res.steps[-1]
    assert step.status == "ok", step.error
    assert step.stats["rewritten"] > 0 and step.stats["residual_folded"] > 0
    assert any(isinstance(n.target, DecodeGemm) for n in res.gm.graph.nodes)
    assert not any(n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
                   for n in res.gm.graph.nodes)


def test_prefill_rows_are_left_to_aten():
    sample = load("llama", "tiny")          # batch x seq = 32 rows per GEMM
    gm = capture(sample.module, sample.example_inputs)
    res = PassManager(["decode_gemm(choose=always)"], instruments=[]).run(gm, context(sample, "cpu"))
    assert res.steps[-1].stats["rewritten"] == 0


# ---------------------------------------------------------------- decode_attention

class Attend(torch.nn.Module):
    """SDPA of `rows` query rows over a cache, grouped heads, a bool or additive mask."""

    def __init__(self, bool_mask: bool):
        super().__init__()
        self.bool_mask = bool_mask

    def forward(self, q, k, v, keep):
        mask = keep if self.bool_mask else torch.where(keep, 0.0, float("-inf"))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("rows, bool_mask", [(1, True), (1, False), (3, True), (16, True)])
def test_decode_attention_matches_sdpa(rows, bool_mask):
    g = torch.Generator().manual_seed(rows)
    q, k, v = torch.randn(2, 8, rows, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), \
        torch.randn(2, 2, 40, 16, generator=g)
    keep = torch.rand(1, 1, rows, 40, generator=g) > 0.3
    keep[..., 0] = True
    m = Attend(bool_mask).eval()
    make = lambda seed: (q + seed, k, v, keep)                     # noqa: E731
    gm = capture(m, (q, k, v, keep))
    check = CheckNumerics(lambda *a: m(*a), make, "cpu", 1e-4)
    res = PassManager(["decode_attention(choose=always)"], instruments=[VerifyGraph(), check]).run(
        gm, context(load("mlp", "tiny"), "cpu"))
    step = res.steps[-1]
    assert step.status == "ok", step.error
    sdpa_left = any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in res.gm.graph.nodes)
    assert step.stats["rewritten"] == (0 if rows > 8 else 1) and sdpa_left == (rows > 8)


class AttendRepeated(torch.nn.Module):
    """Hugging Face's sdpa attention without `enable_gqa`: keys and values copied per query head (repeat_kv)."""

    def forward(self, q, k, v, keep):
        B, G, S, D = k.shape
        R = q.shape[1] // G
        k = k[:, :, None].expand(B, G, R, S, D).reshape(B, G * R, S, D)
        v = v[:, :, None].expand(B, G, R, S, D).reshape(B, G * R, S, D)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_decode_attention_reads_the_cache_before_repeat_kv():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), \
        torch.randn(2, 2, 40, 16, generator=g)
    keep = torch.rand(2, 1, 1, 40, generator=g) > 0.3
    keep[..., 0] = True
    m = AttendRepeated().eval()
    gm = capture(m, (q, k, v, keep))
    assert any(n.target == torch.ops.aten.expand.default for n in gm.graph.nodes)
    check = CheckNumerics(lambda *a: m(*a), lambda seed: (q + seed, k - seed, v, keep), "cpu", 1e-4)
    res = PassManager(["decode_attention(choose=always)"], instruments=[VerifyGraph(), check]).run(
        gm, context(load("mlp", "tiny"), "cpu"))
    step = res.steps[-1]
    assert step.status == "ok" and step.stats["rewritten"] == 1, step.error
    ops = [n.target for n in res.gm.graph.nodes]
    assert torch.ops.aten.expand.default not in ops and torch.ops.aten.clone.default not in ops
    bmm = next(n for n in res.gm.graph.nodes if n.target == torch.ops.aten.bmm.default)
    assert tuple(bmm.meta["val"].shape) == (2 * 2, 4, 40)        # the 4 query heads of a key head: one GEMM


def test_decode_attention_on_plain_multi_head_attention():
    """Keys and values with as many heads as the queries, not copies: nothing to read through."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 1, 16, generator=g) for _ in range(3))
    keep = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    m = Attend(True).eval()
    gm = capture(m, (q, k, v, keep))
    check = CheckNumerics(lambda *a: m(*a), lambda seed: (q + seed, k, v - seed, keep), "cpu", 1e-4)
    res = PassManager(["decode_attention(choose=always)"], instruments=[VerifyGraph(), check]).run(
        gm, context(load("mlp", "tiny"), "cpu"))
    assert res.steps[-1].status == "ok" and res.steps[-1].stats["rewritten"] == 1, res.steps[-1].error


def test_decode_attention_on_hf_decode_step():
    from passlab.graphs import stateful
    from passlab.tools import serve
    model, ids = serve.causal_lm("llama", "tiny", new_tokens=4)
    sample = serve.decode_sample(model, ids, new_tokens=4)
    gm = capture(sample.module, sample.example_inputs, sample.example_kwargs)
    sample = stateful(sample, gm)
    check = CheckNumerics(sample.reference, sample.make_inputs, "cpu", 1e-4, mutated=sample.writes)
    res = PassManager(["decode_attention(choose=always)"], instruments=[VerifyGraph(), check]).run(
        gm, context(sample, "cpu"))
    step = res.steps[-1]
    assert step.status == "ok" and step.stats["rewritten"] == model.config.num_hidden_layers, step


# ---------------------------------------------------------------- grouped (MoE decode)

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("counts", [[1, 0, 2, 1], [0, 0, 0, 3], [2, 2, 2, 2], [1, 1, 0, 0]])
def test_grouped_template_matches_the_grouped_gemm(dtype, tol, counts):
    from passlab.runtime.codegen.cpp_gemv import DecodeGroupedGemm
    g = torch.Generator().manual_seed(sum(counts) * 7 + len(counts))
    S, E, N, K = 8, len(counts), 40, 70
    x = torch.randn(S, K + 2, generator=g).to(dtype)[:, 1:K + 1]              # rows strided
    w = torch.randn(E, N, K, generator=g).to(dtype)
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)   # rows past offs[-1]: zero
    y = DecodeGroupedGemm()(x, w, offs)
    ref, start = torch.zeros(S, N), 0
    for e, end in enumerate(offs.tolist()):
        ref[start:end] = x[start:end].float() @ w[e].float().t()
        start = end
    assert y.dtype == dtype and y.shape == (S, N)
    assert ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)) < tol
    assert (y[int(offs[-1]):] == 0).all()


def test_grouped_template_refuses_what_it_was_not_built_for():
    from passlab.runtime.codegen.cpp_gemv import DecodeGroupedGemm, grouped_reference
    k = DecodeGroupedGemm()
    w = torch.randn(3, 16, 32)
    for x, offs in ((torch.randn(9, 32), torch.tensor([3, 6, 9], dtype=torch.int32)),      # too many rows
                    (torch.randn(4, 32), torch.tensor([3, 1, 4], dtype=torch.int32)),      # offsets not sorted
                    (torch.randn(4, 32), torch.tensor([1, 2, 4]))):                        # int64 offsets
        try:
            ref = grouped_reference(x, w, offs)
        except Exception as e:                      # the op it replaces refuses too: so must the template
            with pytest.raises(type(e)):
                k(x, w, offs)
            continue
        assert torch.allclose(k(x, w, offs), ref, atol=1e-5)


class Experts(torch.nn.Module):
    """A decode step's experts as `group_experts` leaves them: rows sorted by expert, one grouped GEMM."""

    def __init__(self, E=4, N=24, K=48):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(E, N, K) * 0.1)

    def forward(self, x, offs):
        return torch.ops.passlab.grouped_mm(x, self.w.permute(0, 2, 1), offs)


def test_pass_runs_a_decode_steps_experts_through_the_template():
    from passlab.passes import PassContext, get_pass
    from passlab.runtime import ops  # noqa: F401
    from passlab.runtime.codegen.cpp_gemv import DecodeGroupedGemm
    m = Experts().eval()
    offs = torch.tensor([1, 1, 3, 4], dtype=torch.int32)
    gm = capture(m, (torch.randn(4, 48), offs))
    res = get_pass("decode_gemm")(gm, PassContext(device="cpu", options={"choose": "always"}))
    assert res.stats["grouped"] == 1
    assert any(isinstance(n.target, DecodeGroupedGemm) for n in res.gm.graph.nodes)
    for seed in (1, 2):
        x = torch.randn(4, 48, generator=torch.Generator().manual_seed(seed))
        o = torch.tensor([0, 2, 2, 4], dtype=torch.int32) if seed == 2 else offs
        with torch.no_grad():
            assert torch.allclose(res.gm(x, o), m(x, o), atol=1e-5)
