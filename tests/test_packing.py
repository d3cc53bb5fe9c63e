"""`pack_weights`: constant convolution and linear weights packed into oneDNN's
layout, with the activation / residual add after a convolution as post-ops.
Numerics against eager on fresh inputs, the graph it leaves, what it refuses."""
import copy

import pytest
import torch
from torch import nn

from passlab.graphs import capture, clone, fetch_attr
from passlab.passes import PassContext, get_pass, relative_error
from passlab.passes.patterns.onednn import onednn_available, onednn_dtype_ok

aten = torch.ops.aten
mkldnn = torch.ops.mkldnn if hasattr(torch.ops, "mkldnn") else None
pytestmark = pytest.mark.skipif(not onednn_available("cpu"), reason="no oneDNN in this torch build")
DTYPES = [torch.float32] + ([torch.bfloat16] if onednn_dtype_ok(torch.bfloat16) else [])
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class Block(nn.Module):
    """conv + ReLU, conv + residual add + ReLU, a depthwise conv + ReLU6, a plain conv."""

    def __init__(self, c=16):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 1, bias=False)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.last = nn.Conv2d(c, 8, 3, stride=2)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y) + x)
        y = nn.functional.relu6(self.dw(y))
        return self.last(y)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def run_pass(gm, **options):
    return get_pass("pack_weights")(clone(gm), PassContext(device="cpu", options=options))


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def fresh(shape, dtype, seed, channels_last=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_convolutions_packed_with_post_ops_match_eager(dtype, channels_last):
    model = Block().to(dtype).eval()
    example = fresh((2, 16, 12, 12), dtype, 0, channels_last)
    gm = capture(model, (example,))
    res = run_pass(gm, choose="always")
    assert res.changed
    t = targets(res.gm)
    assert aten.convolution.default not in t
    assert t.count(mkldnn._convolution_pointwise.default) == 3 and t.count(mkldnn._convolution_pointwise.binary) == 1
    assert aten.relu.default not in t and aten.add.Tensor not in t and aten.hardtanh.default not in t
    assert res.stats["convolutions"] == 4 and res.stats["post_ops"] == 4      # relu, add + relu, relu6
    res.gm.graph.lint()
    for seed in (1, 2):                                                        # fresh inputs, not the example
        x = fresh((2, 16, 12, 12), dtype, seed, channels_last)
        with torch.no_grad():
            assert relative_error(res.gm(x), model(x)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linears_packed_match_eager(dtype):
    model = Mlp().to(dtype).eval()
    gm = capture(model, (fresh((8, 32), dtype, 0),))
    res = run_pass(gm, choose="always")
    assert res.stats["linears"] == 2
    t = targets(res.gm)
    assert aten.mm.default not in t and aten.addmm.default not in t
    assert t.count(mkldnn._linear_pointwise.default) == 2
    packed = [n for n in res.gm.graph.nodes if n.op == "get_attr" and "packed" in n.target]
    assert len(packed) == 2 and all(fetch_attr(res.gm, n.target).is_mkldnn for n in packed)
    x = fresh((8, 32), dtype, 5)
    with torch.no_grad():
        assert relative_error(res.gm(x), model(x)) <= TOL[dtype]


def test_fuse_epilogue_linear_gets_the_packed_weight():
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU()).eval()
    gm = capture(model, (fresh((4, 32), torch.float32, 0),))
    gm = get_pass("fuse_epilogue")(gm, PassContext(device="cpu")).gm
    node = next(n for n in gm.graph.nodes if n.target == mkldnn._linear_pointwise.default)
    assert not fetch_attr(gm, node.args[1].target).is_mkldnn
    res = run_pass(gm, choose="always")
    node = next(n for n in res.gm.graph.nodes if n.target == mkldnn._linear_pointwise.default)
    assert node.args[3] == "gelu" and fetch_attr(res.gm, node.args[1].target).is_mkldnn
    x = fresh((4, 32), torch.float32, 9)
    with torch.no_grad():
        assert relative_error(res.gm(x), model(x)) <= 1e-4


def test_weights_that_are_inputs_are_left_alone():
    class F(nn.Module):
        def forward(self, x, w):
            return torch.nn.functional.conv2d(x, w, padding=1), x.flatten(1)[:, :9] @ w.flatten(1).t()[:9]
    gm = capture(F(), (fresh((1, 4, 6, 6), torch.float32, 0), fresh((4, 4, 3, 3), torch.float32, 1)))
    res = run_pass(gm, choose="always")
    assert not res.changed
    assert res.stats["skipped"].get("weight_not_constant", 0) >= 1


def test_packed_buffers_are_not_state_and_the_graph_copies():
    model = Block().eval()
    gm = capture(model, (fresh((1, 16, 8, 8), torch.float32, 0),))
    res = run_pass(gm, choose="always")
    assert not any("packed" in k for k in res.gm.state_dict())
    twin = copy.deepcopy(res.gm)              # a user's deepcopy of the optimized module must not fail
    x = fresh((1, 16, 8, 8), torch.float32, 3)
    with torch.no_grad():
        assert torch.equal(twin(x), res.gm(x))


def test_measured_choice_is_recorded_either_way():
    model = Mlp().eval()
    gm = capture(model, (fresh((8, 32), torch.float32, 0),))
    res = run_pass(gm)                        # choose=measure: each shape timed, no assumption about the winner
    stats = res.stats
    assert stats["linears"] + stats["skipped"].get("aten_measured_faster", 0) == 2


def test_bad_option_is_an_error():
    gm = capture(Mlp().eval(), (fresh((2, 32), torch.float32, 0),))
    with pytest.raises(ValueError, match="choose"):
        run_pass(gm, choose="sometimes")


def test_folded_weights_are_not_held_twice():
    """A compiler-made weight (batch norm folded into the convolution) that only the
    packed call read is dropped from the module: the packed copy replaces it."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    gm = capture(model, (fresh((1, 8, 6, 6), torch.float32, 0),))
    gm = get_pass("fold_batchnorm")(gm, PassContext(device="cpu")).gm
    folded = {k for k in dict(gm.named_buffers()) if k.startswith("_")}
    assert folded
    res = run_pass(gm, choose="always")
    assert res.stats["plain_buffers_dropped"] >= 1
    left = {k for k in dict(res.gm.named_buffers()) if k.startswith("_") and not k.startswith("_packed")}
    assert not (left & folded) or all(any(n.op == "get_attr" and n.target == k for n in res.gm.graph.nodes)
                                     for k in left & folded)
    x = fresh((1, 8, 6, 6), torch.float32, 4)
    with torch.no_grad():
        assert relative_error(res.gm(x), model(x)) <= 1e-4
