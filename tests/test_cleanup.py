"""The cleanup passes (passes/cleanup.py): what each removes, what it must keep."""
import pytest
import torch

from passlab.graphs import capture, check_metadata, clone
from passlab.passes import PassContext, get_pass, relative_error
from passlab.passes.api import as_result
from passlab.passes.contract import captured
from passlab.passes.meta import propagate

aten = torch.ops.aten


class Messy(torch.nn.Module):
    """Everything cleanup should see: no-op views and copies, identity arithmetic,
    random ops, side-effect asserts, a weight expand that would grow memory and
    a weight cast."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        a = x.view(x.shape).clone() + x.to(torch.float32).contiguous()
        b = x.transpose(0, 1) * 1 + 0
        c = torch.rand_like(x) + torch.rand_like(x)
        d = self.w.expand(3, 4, 4).sum(0) + self.w.to(torch.float64).float()
        return a + b + c * 0 + d + x.expand(4, 4)


class ReturnsCopy(torch.nn.Module):
    def forward(self, x):
        return x.clone()


class ReturnsTwice(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        return y, y.clone(), (y + 1).view(y.shape)


@pytest.fixture(scope="module")
def messy():
    m = Messy().eval()
    return m, capture(m, (torch.randn(4, 4),))


def run(name, gm, **options):
    gm = clone(gm)
    res = as_result(get_pass(name)(gm, PassContext(options=options)), gm)
    res.gm.recompile()
    res.gm.graph.lint()
    assert check_metadata(res.gm) == []
    return res


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def close_to(module, gm, seed=0):
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(0)
    want = module(x)
    torch.manual_seed(0)
    return relative_error(gm(x), want)


def test_dce_removes_dead_nodes_and_keeps_side_effects(messy):
    _, gm = messy
    gm = clone(gm)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    out = gm.graph.output_node()
    with gm.graph.inserting_before(out):
        dead = gm.graph.call_function(aten.mul.Tensor, (x, 2.0))
        gm.graph.call_function(aten.neg.default, (dead,))
        gm.graph.call_function(aten._assert_async.msg, (gm.graph.call_function(aten.any.default, (x,)), "x"))
    propagate(gm)
    asserts_before = sum(1 for t in targets(gm) if "assert" in str(t))
    res = run("dce", gm)
    assert res.changed and res.stats["removed"] == 2
    assert res.stats["removed_by_op"] == {"mul": 1, "neg": 1}
    assert sum(1 for t in targets(res.gm) if "assert" in str(t)) == asserts_before == 4
    assert res.stats["kept_side_effects"] == 4
    assert aten.rand_like.default in targets(res.gm)


def test_dce_on_clean_graph_changes_nothing(messy):
    res = run("dce", messy[1])
    assert not res.changed and res.stats["removed"] == 0


def test_cse_merges_duplicates_but_not_random_ops():
    s, gm = captured("transformer")
    res = run("cse", gm)
    assert res.changed and res.stats["merged"] >= 3     # q, k, v read the same layer-norm view
    inputs = s.make_inputs(3)
    out = res.gm(*inputs)
    assert isinstance(out, torch.Tensor)                  # the plain signature survives the rebuild
    assert relative_error(out, s.module(*inputs)) < 1e-5
    m = Messy().eval()
    rand = run("cse", capture(m, (torch.randn(4, 4),)))
    assert targets(rand.gm).count(aten.rand_like.default) == 2


def test_remove_noops(messy):
    m, gm = messy
    res = run("remove_noops", gm)
    removed = res.stats["removed_by_op"]
    assert removed == {"view": 1, "clone": 1, "mul": 1, "add": 1, "expand": 1}
    left = targets(res.gm)
    assert aten.permute.default in left            # a transpose of a square matrix moves elements
    assert aten._to_copy.default in left           # casts to another dtype stay
    assert close_to(m, res.gm) == 0.0


def test_remove_noops_casts_permutes_slices_that_change_nothing():
    s, gm = captured("mlp")
    gm = clone(gm)
    add = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
    chain = [(aten._to_copy.default, (), {"dtype": torch.float32}), (aten.permute.default, ([0, 1],), {}),
             (aten.slice.Tensor, (0, 0, 2 ** 63 - 1), {}), (aten.alias.default, (), {}),
             (aten.mul.Tensor, (1,), {}), (aten.div.Tensor, (1.0,), {}), (aten.sub.Tensor, (0,), {})]
    keep = [(aten._to_copy.default, (), {"dtype": torch.float64}),
            (aten._to_copy.default, (), {"dtype": torch.float32}),
            (aten.permute.default, ([1, 0],), {}), (aten.slice.Tensor, (1, 0, 4), {})]
    last = add
    for target, args, kwargs in chain + keep:
        with gm.graph.inserting_after(last):
            last = gm.graph.call_function(target, (last, *args), kwargs)
    with gm.graph.inserting_after(last):
        back = gm.graph.call_function(aten.sum.default, (last,))
    out = gm.graph.output_node()
    out.args = ((out.args[0], back),)
    propagate(gm)
    gm.recompile()
    res = run("remove_noops", gm)
    assert res.stats["removed_by_op"] == {"_to_copy": 1, "permute": 1, "slice": 1, "alias": 1, "mul": 1,
                                          "div": 1, "sub": 1}
    assert targets(res.gm).count(aten._to_copy.default) == 2
    inputs = s.make_inputs(2)
    torch.testing.assert_close(res.gm(*inputs), gm(*inputs), rtol=0, atol=0)


def test_remove_noops_never_returns_an_input_itself():
    gm = capture(ReturnsCopy(), (torch.randn(3),))
    res = run("remove_noops", gm)
    assert not res.changed and targets(res.gm) == [aten.clone.default]
    assert res.stats["skipped"] == {"output_would_alias_input": 1}
    two = run("remove_noops", capture(ReturnsTwice(), (torch.randn(3),)))
    assert two.stats["removed_by_op"] == {"view": 1} and targets(two.gm).count(aten.clone.default) == 1
    y, y2, z = two.gm(torch.ones(3))
    assert y is not y2 and torch.equal(y, y2) and torch.equal(z, torch.full((3,), 3.0))


@pytest.mark.parametrize("model", ["transformer", "moe", "convnet"])
def test_cleanup_is_idempotent(model):
    from passlab.passes.contract import prepared
    _, gm = prepared(model, "cleanup")
    for name in ("dce", "cse", "remove_noops", "fold_constants"):
        res = run(name, gm)
        assert not res.changed, (name, res.stats)


def test_fold_constants_caps_memory_and_keeps_weights(messy):
    m, gm = messy
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    res = run("fold_constants", gm)
    assert res.stats["skipped"]["would_grow_memory"] >= 2      # the expand and the fp64 cast
    assert aten.expand.default in targets(res.gm) and aten._to_copy.default in targets(res.gm)
    wider = run("fold_constants", gm, max_growth=2.0)
    assert aten._to_copy.default not in targets(wider.gm)
    assert wider.stats["constants"] >= 1 and wider.stats["bytes_new"] > 0
    assert aten.expand.default in targets(wider.gm)          # 3x the weight: still too big
    assert sum(1 for t in targets(wider.gm) if "assert" in str(t)) == 3
    for g in (res.gm, wider.gm):
        assert close_to(m, g) < 1e-6
    for k, v in m.state_dict().items():
        assert torch.equal(v, weights[k]), f"fold_constants changed weight {k} in place"


def test_fold_constants_leaves_mutated_weights_alone(messy):
    m, gm = messy
    gm = clone(gm)
    w = next(n for n in gm.graph.nodes if n.op == "get_attr")
    with gm.graph.inserting_after(w):
        bump = gm.graph.call_function(aten.add_.Tensor, (w, 0.0))
    bump.meta["val"] = w.meta["val"]
    res = run("fold_constants", gm, max_growth=2.0)
    assert res.stats["skipped"]["weight_mutated_in_graph"] == 1
    assert not res.changed and aten._to_copy.default in targets(res.gm)
    assert run("cse", gm).stats == {"merged": 0, "skipped": {"graph_mutates_in_place": 1}}


def test_fold_constants_folds_weight_transposes_as_views():
    s, gm = captured("mlp")
    res = run("fold_constants", gm)
    assert res.stats["constants"] == 4 and res.stats["bytes_new"] == 0
    assert aten.permute.default not in targets(res.gm)
    inputs = s.make_inputs(5)
    assert relative_error(res.gm(*inputs), s.module(*inputs)) == 0.0


def test_cleanup_alias_on_transformer():
    from passlab.passes import PassManager
    from passlab.passes.manager import CheckNumerics, Statistics, VerifyGraph
    s, gm = captured("transformer")
    pm = PassManager("cleanup", instruments=[VerifyGraph(), CheckNumerics(s.module, s.make_inputs, "cpu", 1e-5),
                                             Statistics()])
    r = pm.run(gm, PassContext(sample=s))
    assert [st.name for st in r.steps] == ["dce", "cse", "remove_noops", "fold_constants"]
    assert all(st.status == "ok" for st in r.steps), [st.error for st in r.steps]
    assert r.steps[-1].nodes < r.baseline.nodes * 0.85
