"""The exhaustive exactness check of 16-bit transcendentals (`runtime/kernel/exactness.py`) and
what `fuse` does with it in an MoE routing cone: an op fuses there only where the check passed,
and the router's outputs stay eager's bit for bit."""
import pytest
import torch

from passlab.graphs import Sample, capture, clone
from passlab.passes import PassContext, get_pass
from passlab.runtime.codegen import exprs
from passlab.runtime.executor import compile_graph, fused_kernels
from passlab.runtime.kernel import exactness

aten = torch.ops.aten


@pytest.fixture
def fresh_checks():
    exactness.rounds_as_aten.cache_clear()
    yield
    exactness.rounds_as_aten.cache_clear()


def test_every_value_is_each_bit_pattern_once_then_a_tail():
    v = exactness.every_value(torch.bfloat16)
    bits = v.view(torch.int16)
    assert v.numel() == 65536 + 17 and torch.unique(bits[:65536]).numel() == 65536
    assert v[65536:].view(torch.int16).equal(bits[:17])


def test_check_catches_a_kernel_one_ulp_off(fresh_checks, monkeypatch):
    """exp passes as printed on machines where it does; an exp that is off by a factor of
    1 + 2^-10 (a few bf16 values round differently) fails, as does any op outside the probed set."""
    monkeypatch.setitem(exprs.EXPR, "exp", ("(pl_exp({0}) * 1.0009765625f)", exprs.EXPR["exp"][1]))
    assert exactness.rounds_as_aten(aten.exp.default, torch.bfloat16) is False
    assert exactness.rounds_as_aten(aten.sin.default, torch.bfloat16) is False     # libm: never probed
    assert exactness.rounds_as_aten(aten.exp.default, torch.float32) is False      # not exhaustible


def test_check_agrees_with_a_direct_comparison(fresh_checks):
    """Where the check says exact, a kernel of the op equals ATen on random bf16 tensors of odd
    sizes (vector loop and tail), contiguous and strided."""
    from passlab.runtime.kernel import FusedKernel, ROUND_EACH_OP
    for target in (aten.silu.default, aten.exp.default, aten.sigmoid.default):
        if not exactness.rounds_as_aten(target, torch.bfloat16):
            continue
        for n in (7, 1000, 4099):
            x = (torch.randn(n) * 6).to(torch.bfloat16)
            g = torch.fx.Graph()
            p = g.placeholder("x")
            p.meta["val"] = x
            y = g.call_function(target, (p,))
            y.meta["val"], y.meta[ROUND_EACH_OP] = target(x), True
            g.output(y)
            got = FusedKernel("probe", torch.fx.GraphModule({}, g))(x)
            assert torch.equal(got, target(x)) and torch.equal(got, target(x[None].expand(2, n)[1]))


class ExpertThenRouter(torch.nn.Module):
    """A SwiGLU expert's output added to the residual stream, then the next layer's router
    (gate, softmax, top-2): the SiLU sits in the routing cone."""

    def __init__(self, d=64, hidden=96, experts=8):
        super().__init__()
        self.up = torch.nn.Linear(d, 2 * hidden, bias=False)
        self.down = torch.nn.Linear(hidden, d, bias=False)
        self.gate = torch.nn.Linear(d, experts, bias=False)

    def forward(self, x):
        g, u = self.up(x).chunk(2, -1)
        h = x + self.down(torch.nn.functional.silu(g) * u)
        weights, experts = torch.topk(torch.softmax(self.gate(h), -1, dtype=torch.float), 2, -1)
        return weights, experts, h


def fuse_router(m, x):
    gm = capture(m, (x,))
    sample = Sample("expert_router", m, (x,), dtype=torch.bfloat16)
    return get_pass("fuse")(clone(gm), PassContext(sample=sample)).gm


def silu_fused(gm) -> bool:
    return any("silu" in k.ops for k in fused_kernels(gm))


@pytest.mark.parametrize("exact", [True, False])
def test_silu_in_the_routing_cone_fuses_only_where_checked_exact(fresh_checks, monkeypatch, exact):
    torch.manual_seed(0)
    m = ExpertThenRouter().to(torch.bfloat16).eval()
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    if not exact:
        monkeypatch.setattr(exactness, "rounds_as_aten", lambda target, dtype: False)
    elif not exactness.rounds_as_aten(aten.silu.default, torch.bfloat16):
        pytest.skip("this machine's ATen and kernel SiLU differ on some bf16 value: it stays in ATen")
    gm = fuse_router(m, x)
    assert silu_fused(gm) is exact
    run = compile_graph(gm, "cpu")
    for seed in range(4):
        x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) * (seed + 1)
        with torch.no_grad():
            for got, want in zip(run(x), m(x)):
                assert torch.equal(got, want)
