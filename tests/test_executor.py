"""The executor (runtime/executor.py): one bound function per graph, the heap setting."""
import torch
import torch.nn as nn

from passlab.graphs import capture, random_like
from passlab.passes import parse
from passlab.passes.manager import PassManager
from passlab.passes.api import PassContext
from passlab.runtime import executor
from passlab.runtime.executor import bind, compile_graph, fused_kernels


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())
                                      for _ in range(2)])

    def forward(self, x, y):
        return self.blocks(x) + y, x.sum()


def test_bound_function_matches_the_graph_and_fetches_no_weights():
    m = Nested().eval()
    x = (torch.randn(2, 4, 16), torch.randn(2, 4, 16))
    gm = capture(m, x)
    fn = bind(gm)
    assert fn is not gm and fn.graph_module is gm
    src = fn.func.__code__.co_names
    assert "getattr" not in src, "weights are bound once, not fetched per call"
    for seed in (1, 2):
        inp = random_like(x, seed)
        with torch.no_grad():
            want, got = m(*inp), fn(*inp)
        assert len(got) == 2 and all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))


def test_bind_is_cached_per_code_and_redone_after_recompile():
    m = Nested().eval()
    x = (torch.randn(2, 4, 16), torch.randn(2, 4, 16))
    gm = capture(m, x)
    assert bind(gm) is bind(gm)
    first = bind(gm)
    out = gm.graph.output_node()
    a, b = out.args[0]
    with gm.graph.inserting_before(out):
        doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (a, 2.0))
    out.args = ((doubled, b),)
    gm.recompile()
    again = bind(gm)
    assert again is not first
    with torch.no_grad():
        assert torch.allclose(again(*x)[0], 2 * first(*x)[0])


def test_graphs_with_submodules_run_as_themselves():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert bind(gm) is gm


def test_compile_graph_runs_fused_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("PASSLAB_CACHE", str(tmp_path))
    m = Nested().eval()
    x = (torch.randn(2, 4, 16), torch.randn(2, 4, 16))
    gm = capture(m, x)
    res = PassManager(parse("cleanup,fuse")).run(gm, PassContext(device="cpu"))
    assert fused_kernels(res.gm)
    fn = compile_graph(res.gm, "cpu")
    inp = random_like(x, 3)
    with torch.no_grad():
        want, got = m(*inp), fn(*inp)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-4)


def test_keep_heap_once_and_opt_out(monkeypatch):
    monkeypatch.setattr(executor, "_HEAP", {"done": False, "ok": False})
    monkeypatch.setenv("PASSLAB_MALLOC", "system")
    assert executor.keep_heap() is False
    monkeypatch.setattr(executor, "_HEAP", {"done": False, "ok": False})
    monkeypatch.delenv("PASSLAB_MALLOC")
    ok = executor.keep_heap()
    assert isinstance(ok, bool) and executor._HEAP["done"]
    assert executor.keep_heap() is ok          # once per process


class Chains(nn.Module):
    """Chains of order-keeping views (the middle of one also read elsewhere), an in-place write
    through a chained view of an input, a chain ending in a transpose (not folded past it)."""

    def forward(self, x, buf):
        a = x.view(4, 6).unsqueeze(0).view(2, 2, 6).unsqueeze(-1)        # one view of x
        b = x.view(24)
        c = b.unsqueeze(1).squeeze(1).view(3, 8)                          # b is also an output
        buf.view(2, 12).unsqueeze(0)[0, 1].add_(1.0)                       # writes the caller's buffer
        d = x.view(2, 12).unsqueeze(0).transpose(1, 2).unsqueeze(0)
        return a * 2, b, c + 1, d.contiguous()


def test_bound_function_runs_a_chain_of_views_as_one():
    x, buf = torch.randn(2, 3, 4), torch.zeros(24)
    gm = capture(Chains(), (x, buf))
    views = lambda g: sum(1 for n in g.nodes if n.op == "call_function" and n.target in executor.ORDER_VIEWS)  # noqa: E731
    fn = bind(gm)
    assert any(v.startswith("_pl_aten_") for v in fn.func.__code__.co_names), \
        "ATen calls go through their overloads' C++ callables"
    for seed in (1, 2):
        xi, b1, b2 = random_like((x,), seed)[0], torch.zeros(24), torch.zeros(24)
        with torch.no_grad():
            want, got = Chains()(xi, b1), fn(xi, b2)
        assert all(torch.equal(g, w) and g.shape == w.shape for g, w in zip(got, want))
        assert torch.equal(b1, b2) and b2.sum() == 12          # the write reached the caller's buffer
    assert fn.bound_views < views(gm.graph), (fn.bound_views, views(gm.graph))
