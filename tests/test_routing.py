"""MoE numerics: routing pinned to eager's choice on near ties only (passes/routing.py),
and the grouped expert GEMM rewrite (`group_experts`) against eager."""
from __future__ import annotations

import pytest
import torch

from passlab.graphs import capture, load
from passlab.passes import PassManager, get_pass
from passlab.passes.manager import CheckNumerics, PassRejected, StepRecord
from passlab.passes.meta import propagate
from passlab.tools.runner import context

aten = torch.ops.aten


class TiedRouter(torch.nn.Module):
    """Top-1 routing whose first two experts' scores tie exactly (identical router rows),
    so the choice between them rests on the last bit."""

    def __init__(self, d=8, e=4):
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(e, d)
        w[1] = w[0]
        self.router = torch.nn.Parameter(w)
        self.experts = torch.nn.Parameter(torch.randn(e, d, d))

    def forward(self, x):
        scores = torch.softmax(x @ self.router.t(), dim=-1)
        w, idx = scores.topk(1, dim=-1)
        return torch.bmm(x.unsqueeze(1), self.experts[idx[:, 0]]).squeeze(1) * w


def nudged(gm, eps: float):
    """The graph with expert 0's router score raised and expert 1's lowered by `eps` (relative)
    right before topk: the tie between them goes to expert 0, whichever way eager breaks it."""
    g = gm.graph
    topk = next(n for n in g.nodes if n.target == aten.topk.default)
    scores = topk.args[0]
    e = scores.meta["val"].shape[-1]
    bump = torch.ones(e)
    bump[0] += eps
    bump[1] -= eps
    gm.register_buffer("_bump", bump)
    with g.inserting_before(topk):
        b = g.get_attr("_bump")
        m = g.call_function(aten.mul.Tensor, (scores, b))
    topk.replace_input_with(scores, m)
    gm.recompile()
    propagate(gm)
    return gm


def check_of(model, tol=1e-4):
    make = lambda seed: (torch.randn(16, 8, generator=torch.Generator().manual_seed(seed)),)   # noqa: E731
    return CheckNumerics(model, make, "cpu", tol)


def test_near_tie_is_pinned_and_accepted():
    m = TiedRouter().eval()
    check = check_of(m)
    gm = nudged(capture(m, (torch.randn(16, 8),)), 1e-6)
    rec = StepRecord("nudge")
    check.after_pass(None, gm, None, rec)        # raises if rejected
    assert rec.numerics_ok and rec.max_error <= 1e-4
    assert rec.stats["routing_pinned"] > 0        # the tie flipped and was pinned


def test_real_router_error_is_still_caught():
    m = TiedRouter().eval()
    check = check_of(m)
    gm = nudged(capture(m, (torch.randn(16, 8),)), 0.5)     # 50% wrong scores: no tie any more
    with pytest.raises(PassRejected, match="numerics changed"):
        check.after_pass(None, gm, None, StepRecord("nudge"))


@pytest.mark.parametrize("name", ["zoo:mixtral", "zoo:qwen2-moe", "zoo:gpt-oss"])   # gpt-oss: x @ W[ids], biases
def test_group_experts_matches_eager(name):
    sample = load(name, "tiny")
    gm = capture(sample.module, sample.example_inputs, sample.example_kwargs)
    check = CheckNumerics(sample.reference, sample.make_inputs, "cpu", 1e-4)
    res = PassManager(["dce", "group_experts"], instruments=[check]).run(gm, context(sample, "cpu"))
    step = res.steps[-1]
    assert step.status == "ok" and step.stats["rewritten"] == 4 and step.stats["sorts"] == 2, step
    targets = {n.target for n in res.gm.graph.nodes if n.op == "call_function"}
    gathers = [n for n in res.gm.graph.nodes if n.target == aten.index.Tensor and n.args[0].op == "get_attr"
               and n.args[0].meta["val"].dim() == 3]
    assert not gathers                                       # no per-token copies of expert matrices left
    assert targets & {aten._grouped_mm.default, torch.ops.passlab.grouped_mm.default}
    assert step.max_error <= 1e-4


def test_group_experts_leaves_dense_bmm_alone():
    sample = load("moe", "tiny")          # capacity-dispatched: dense [E, C, D] bmm, no gather of weights
    gm = capture(sample.module, sample.example_inputs)
    res = get_pass("group_experts")(gm, context(sample, "cpu"))
    assert res.stats["rewritten"] == 0


def test_sum_pairs_is_bit_exact_and_fires_on_the_moe_combine():
    from passlab.passes.patterns.pairs import sum_pairs  # noqa: F401  (registered)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(64, 2, 33) * torch.logspace(-4, 4, 33)).to(dtype)
        x[0, 0, 0], x[1, 1, 1], x[2, 0, 2] = float("nan"), float("inf"), -0.0

        class Combine(torch.nn.Module):
            def forward(self, x):
                return x.sum(1), x.sum(-2, keepdim=True), x.sum(2)     # the last: not a pair

        gm = capture(Combine(), (x,))
        res = get_pass("sum_pairs")(gm, context(load("mlp", "tiny"), "cpu"))
        assert res.stats["rewritten"] == 2
        for got, want in zip(res.gm(x), Combine()(x)):
            assert got.shape == want.shape and torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    sample = load("moe", "tiny")
    gm = capture(sample.module, sample.example_inputs)
    assert get_pass("sum_pairs")(gm, context(sample, "cpu")).stats["rewritten"] == 4   # per layer: top-2 weights, combine


def test_sum_pairs_builds_each_half_from_its_own_gathered_rows():
    """The top-2 combine `(ys[slot] * w).view(n, 2, d).sum(1)`: each half gathers its own rows
    (every other index), so the gathers, the scaling and the add make one kernel; the values
    stay eager's bit for bit."""
    class Combine(torch.nn.Module):
        def forward(self, ys, slot, w, x):
            y = ys[slot] * w.reshape(-1, 1)
            return x + y.view(x.shape[0], 2, ys.shape[1]).sum(1)

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(9, 16, generator=g), torch.randint(0, 9, (12,), generator=g), torch.rand(12, generator=g),
            torch.randn(6, 16, generator=g))
    gm = capture(Combine(), args)
    res = PassManager(["dce", "gather_rows", "sum_pairs", "fuse"]).run(gm, context(load("mlp", "tiny"), "cpu"))
    pairs = next(s for s in res.steps if s.name == "sum_pairs")
    assert pairs.stats["rewritten"] == 1 and pairs.stats["gathered"] == 1
    left = [n for n in res.gm.graph.nodes if n.op == "call_function" and n.target in
            (aten.index_select.default, aten.index.Tensor, aten.add.Tensor, aten.mul.Tensor)]
    assert not left, left                              # all of it in one kernel
    from passlab.runtime.executor import compile_graph
    run = compile_graph(res.gm, "cpu")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed + 1)
        args = (torch.randn(9, 16, generator=g), torch.randint(-9, 9, (12,), generator=g),
                torch.rand(12, generator=g), torch.randn(6, 16, generator=g))
        assert torch.equal(run(*args), Combine()(*args))
    sample = load("moe", "tiny")
    gm = capture(sample.module, sample.example_inputs)
    res = PassManager(["dce", "gather_rows", "sum_pairs"]).run(gm, context(sample, "cpu"))
    assert res.steps[-1].stats["gathered"] == 2                          # the combine of each layer


def test_gather_rows_matches_advanced_indexing():
    class Gather(torch.nn.Module):
        def forward(self, x, idx):
            srt = torch.sort(idx % x.shape[0]).indices
            return x[idx], x[srt], x[:, idx % x.shape[1]]             # the last indexes dim 1: left alone

    x = torch.randn(7, 5, 3)
    idx = torch.tensor([0, -1, 3, -7, 6, 2])                         # negatives count from the end
    gm = capture(Gather(), (x, idx))
    res = get_pass("gather_rows")(gm, context(load("mlp", "tiny"), "cpu"))
    assert res.stats["rewritten"] == 2 and res.stats["wrapped"] == 1   # the sort's indices need no wrap
    for got, want in zip(res.gm(x, idx), Gather()(x, idx)):
        assert torch.equal(got, want)
    with pytest.raises(IndexError):                                  # out of range still raises
        res.gm(x, torch.tensor([0, 7, 1, 2, 3, 4]))
