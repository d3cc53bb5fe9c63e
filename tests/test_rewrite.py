"""register_rewrite: a pattern and its replacement as plain PyTorch functions.

Every rewrite is checked for numerics against eager on fresh random inputs,
for the graph it leaves (which ops, meta["val"] everywhere, asserts gone), and
for the statistics it reports."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passlab.graphs import capture, check_metadata, clone
from passlab.passes import PassContext, RewriteError, get_pass, register_rewrite, relative_error, unregister_pass
from passlab.passes.patterns.rewrite import Rewrite

aten = torch.ops.aten
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture
def registered():
    names = []

    def reg(name, *args, **kw):
        names.append(name)
        return register_rewrite(name, *args, **kw)
    yield reg
    for n in names:
        unregister_pass(n)


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def run(name, gm, **options):
    res = get_pass(name)(gm, PassContext(options=options))
    res.gm.graph.lint()
    assert check_metadata(res.gm) == []
    return res


def close(gm, module, make, dtype, seeds=(1, 2)):
    for s in seeds:
        torch.manual_seed(s)
        x = make(dtype)
        with torch.no_grad():
            err = relative_error(gm(*x), module(*x))
        assert err <= TOL[dtype], err


class Swish(nn.Module):
    """Swish written by hand, as many codebases do, in both operand orders."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = self.up(x)
        h = h * torch.sigmoid(h)
        return torch.sigmoid(x) * x + self.down(h)


def pattern(x):
    return x * torch.sigmoid(x)


def replacement(x):
    return F.silu(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_back_fires_on_hand_written_swish(registered, dtype):
    registered("silu_back", pattern, replacement)          # the acceptance example, as written
    m = Swish().to(dtype)
    make = lambda dt: (torch.randn(2, 5, 16, dtype=dt),)
    gm = capture(m, make(dtype))
    res = run("silu_back", gm)
    assert res.stats["matched"] == 2 and res.stats["rewritten"] == 2, res.stats
    assert res.stats["skipped"] == {}
    assert aten.sigmoid.default not in targets(res.gm)
    assert targets(res.gm).count(aten.silu.default) == 2
    assert all(n.meta.get("rewrite") == "silu_back" for n in res.gm.graph.nodes if n.target == aten.silu.default)
    close(res.gm, m, make, dtype)


class UpcastSwish(nn.Module):
    """bf16 computed the way decompositions compute it: up to fp32, down again."""

    def forward(self, x):
        xf = x.float()
        return (xf * torch.sigmoid(xf)).to(x.dtype) * 3.0


def test_cast_variant_takes_the_casts_with_it(registered):
    registered("silu_back", pattern, replacement)
    m = UpcastSwish()
    make = lambda dt: (torch.randn(4, 16, dtype=dt),)
    gm = capture(m, make(torch.bfloat16))
    res = run("silu_back", gm)
    assert res.stats["by_variant"] == {"cast": 1}, res.stats
    assert aten._to_copy.default not in targets(res.gm)      # both casts went with the pattern
    assert aten.silu.default in targets(res.gm)
    close(res.gm, m, make, torch.bfloat16)
    off = registered("silu_back_nocast", pattern, replacement, casts=False)
    res = run("silu_back_nocast", capture(m, make(torch.bfloat16)))
    assert res.stats["by_variant"] == {"plain": 1}           # only the fp32 body: the casts stay
    assert targets(res.gm).count(aten._to_copy.default) == 2
    assert [v.label for v in off.variants] == ["plain"]


class Norm(nn.Module):
    def __init__(self, eps, dim=-1):
        super().__init__()
        self.w, self.eps, self.dim = nn.Parameter(torch.randn(16)), eps, dim

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(self.dim, keepdim=True) + self.eps)
        return self.w * y


def norm(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_free_literal_binds_and_fixed_literal_does_not_match(registered):
    seen = []

    def rms(x, eps=1e-6):
        seen.append(eps)
        return x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + eps)
    registered("rms_free", norm, rms, free=("eps",))
    make = lambda dt: (torch.randn(3, 8, 16, dtype=dt),)
    m = Norm(eps=1e-5)
    res = run("rms_free", capture(m, make(torch.float32)))
    assert res.stats["rewritten"] == 1 and seen[-1] == 1e-5        # the replacement got the graph's eps
    assert aten.pow.Tensor_Scalar not in targets(res.gm)
    close(res.gm, m, make, torch.float32)
    registered("rms_fixed", norm, rms)                               # eps fixed at 1e-6: no match
    assert run("rms_fixed", capture(m, make(torch.float32))).stats["matched"] == 0
    wrong_dim = Norm(eps=1e-6, dim=1)                                # the reduced dim is fixed
    assert run("rms_free", capture(wrong_dim, make(torch.float32))).stats["matched"] == 0


def test_asserts_never_block_a_match(registered):
    class WithCast(nn.Module):   # .to() leaves an _assert_tensor_metadata on the intermediate
        def forward(self, x):
            s = torch.sigmoid(x).to(torch.float32)
            return x * s
    registered("silu_back", pattern, replacement)
    m = WithCast()
    make = lambda dt: (torch.randn(4, 16, dtype=dt),)
    gm = capture(m, make(torch.float32))
    assert aten._assert_tensor_metadata.default in targets(gm)
    res = run("silu_back", gm)
    assert res.stats["rewritten"] == 1
    assert aten._assert_tensor_metadata.default not in targets(res.gm)
    close(res.gm, m, make, torch.float32)


def test_shapes_are_wildcards_and_bind_in_the_replacement(registered):
    def flat_sum(x):
        return x.reshape(x.shape[0], -1).sum(-1)

    def flat_sum_2(x):                    # reads the matched shape as plain ints
        b, *rest = x.shape
        return x.sum(list(range(1, len(rest) + 1)))
    registered("flat_sum", flat_sum, flat_sum_2, example_inputs=[(2, 3, 5)])

    class M(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1).sum(-1) * 2
    m = M()
    make = lambda dt: (torch.randn(4, 6, 7, dtype=dt),)
    res = run("flat_sum", capture(m, make(torch.float32)))
    assert res.stats["rewritten"] == 1, res.stats
    assert aten.view.default not in targets(res.gm)
    assert not any(n.op == "call_function" and "sym_size" in str(n.target) for n in res.gm.graph.nodes)
    close(res.gm, m, make, torch.float32)


def test_replacement_that_changes_dtype_is_skipped(registered):
    registered("bad_dtype", pattern, lambda x: F.silu(x).double())
    m = Swish()
    res = run("bad_dtype", capture(m, (torch.randn(2, 16),)))
    assert res.stats["rewritten"] == 0 and res.stats["skipped"] == {"replacement_changes_dtype": 2}


def test_check_and_max_rewrites(registered):
    registered("only_big", pattern, replacement,
               check=lambda m: None if m.val("x").shape[-1] > 16 else "too_narrow")
    gm = capture(Swish(), (torch.randn(2, 16),))
    res = run("only_big", clone(gm))
    assert res.stats["skipped"] == {"too_narrow": 1} and res.stats["rewritten"] == 1
    registered("silu_back", pattern, replacement)
    res = run("silu_back", clone(gm), max_rewrites=1)
    assert res.stats["rewritten"] == 1 and res.stats["skipped"] == {"max_rewrites_reached": 1}


def test_in_a_pipeline_with_the_manager(registered):
    from passlab.passes import CheckNumerics, PassManager
    from passlab.passes.manager import VerifyGraph
    registered("silu_back", pattern, replacement)
    m = Swish()
    make = lambda seed: (torch.randn(2, 16, generator=torch.Generator().manual_seed(seed)),)
    pm = PassManager("cleanup,silu_back(max_rewrites=-1),fuse",
                     instruments=[VerifyGraph(), CheckNumerics(m, make, "cpu", 1e-4)])
    res = pm.run(capture(m, make(0)), PassContext(example_inputs=make(0)))
    step = next(s for s in res.steps if s.name == "silu_back")
    assert step.status == "ok" and step.numerics_ok and step.stats["rewritten"] == 2, step


def test_bad_declarations_say_what_to_change():
    with pytest.raises(RewriteError, match="free literal.*'eps'.*not parameters"):
        Rewrite("x", pattern, replacement, free=("eps",))
    with pytest.raises(RewriteError, match="at least one tensor parameter"):
        Rewrite("x", lambda eps=1.0: eps, replacement)
    with pytest.raises(RewriteError, match="example inputs"):
        Rewrite("x", pattern, replacement, example_inputs=[(2,), (3,)])

    def uses_eps_twice_removed(x, eps=1e-6):
        return x * (2 * eps)          # eps folded into a Python number: cannot be matched
    with pytest.raises(RewriteError, match="not an argument of any op"):
        Rewrite("x", uses_eps_twice_removed, replacement, free=("eps",)).variants


def test_scaffolded_rewrite_registers_and_its_test_passes(tmp_path):
    import importlib.util
    import sys

    from passlab.tools import scaffold
    (tmp_path / "passes").mkdir()
    (tmp_path / "tests").mkdir()
    paths = scaffold.new_pass("square_by_rewrite", str(tmp_path), rewrite=True)

    def load_file(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        mod = load_file("passlab.passes.square_by_rewrite", paths[0])
        assert "register_rewrite" in open(paths[0]).read()
        assert get_pass("square_by_rewrite") is mod.square_by_rewrite
        assert get_pass("square_by_rewrite").options["max_rewrites"].default == -1
        test = load_file("test_pass_square_by_rewrite", paths[1])
        test.test_registered()
        test.test_contract("llama")
        test.test_rewrites_where_its_pattern_occurs()
        test.test_option_limits_rewrites()
    finally:
        unregister_pass("square_by_rewrite")
        sys.modules.pop("passlab.passes.square_by_rewrite", None)


def test_show_graph_lists_every_node(capsys):
    from passlab.tools.cli import main
    assert main(["show", "mlp", "--after", "cleanup,fuse_epilogue", "--graph"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("node "))
    assert header.split() == ["node", "op", "dtype", "shape", "users"]
    assert "float32  8x32" in out and "placeholder" in out


def test_get_pass_of_an_alias_says_it_is_one():
    from passlab.passes import UnknownPassError
    with pytest.raises(UnknownPassError, match=r"'cleanup' is a pipeline alias for dce,cse,remove_noops,fold_constants"):
        get_pass("cleanup")


# --------------------------------------------------------------------- fuse_nodes, and fuse extending kernels

def rmsnorm(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusion_pattern_then_fuse_costs_no_launches(registered, dtype):
    """A pre-fused RMSNorm (a kernel made by a rewrite) is one unit `fuse` extends:
    cleanup,fuse_rmsnorm,fuse gives as few launches as cleanup,fuse (was 43 vs 39)."""
    from passlab.passes import PassContext, parse
    from passlab.passes.api import as_result
    from passlab.passes.contract import captured
    from passlab.runtime import costmodel
    registered("fuse_rmsnorm", rmsnorm, "kernel", free=("eps",), label="rmsnorm")
    sample, base = captured("llama", "tiny", dtype)
    launches, stats = {}, {}
    for pipe in ("cleanup,fuse", "cleanup,fuse_rmsnorm", "cleanup,fuse_rmsnorm,fuse"):
        gm = clone(base)
        for step in parse(pipe):
            r = as_result(step.pass_(gm, PassContext(options=dict(step.options))), gm)
            gm = r.gm
            gm.recompile()
            stats[(pipe, step.name)] = r.stats
        launches[pipe] = costmodel.graph_cost(gm).launches
        close(gm, sample.module, lambda dt: sample.make_inputs(7), dtype, seeds=(7,))
    rw = stats[("cleanup,fuse_rmsnorm", "fuse_rmsnorm")]
    assert rw["rewritten"] == 5 and rw["by_variant"] == {"cast" if dtype == torch.bfloat16 else "plain": 5}
    assert stats[("cleanup,fuse_rmsnorm,fuse", "fuse")]["kernels_extended"] == 5
    assert launches["cleanup,fuse_rmsnorm,fuse"] <= launches["cleanup,fuse"] < launches["cleanup,fuse_rmsnorm"]


def test_fuse_nodes_names_checks_and_drops_asserts():
    from passlab.passes.fuse import FusionError, fuse_nodes

    class M(nn.Module):
        def forward(self, x, w):
            h = torch.sigmoid(x).to(torch.float32) * 2.0       # .to() leaves an assert on sigmoid
            return h @ w, torch.relu(h)
    m = M()
    make = lambda dt: (torch.randn(4, 8, dtype=dt), torch.randn(8, 3, dtype=dt))
    gm = capture(m, make(torch.float32))
    sig, mul = (next(n for n in gm.graph.nodes if n.target == t) for t in (aten.sigmoid.default, aten.mul.Tensor))
    mm = next(n for n in gm.graph.nodes if n.target == aten.mm.default)
    with pytest.raises(FusionError, match="not_fusible_op"):
        fuse_nodes(gm, [mul, mm])
    k = fuse_nodes(gm, [sig, mul], label="scaled_sigmoid")
    assert k.target.name == "scaled_sigmoid_0" and k.meta["val"].shape == (4, 8)
    assert aten._assert_tensor_metadata.default not in targets(gm)
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    k2 = fuse_nodes(gm, [relu], label="scaled_sigmoid")     # the graph's other nodes stay valid
    assert k2.target.name == "scaled_sigmoid_1"
    gm.graph.lint()
    gm.recompile()
    close(gm, m, make, torch.float32)
    with pytest.raises(ValueError, match="identifier"):
        fuse_nodes(gm, [k2], label="no spaces")


# --------------------------------------------------------------------- rule tables, errors at registration

def test_rule_table_applies_its_rules_as_one_pass_counted_per_rule():
    from passlab.passes import Rules
    from passlab.passes.patterns.activations import gelu, gelu_erf, silu, swish

    class Both(nn.Module):
        def forward(self, x):
            a = x * torch.sigmoid(x)
            return 0.5 * a * (1.0 + torch.erf(a / 1.4142135623730951))

    m, make = Both(), (lambda dtype: (torch.randn(4, 8, dtype=dtype),))
    table = Rules("t_table", [Rewrite("t_swish", swish, silu), Rewrite("t_gelu", gelu_erf, gelu)])
    res = table(capture(m, make(torch.float32)), PassContext())          # the pass, then its end
    assert res.stats["by_rule"] == {"t_swish": {"matched": 1, "rewritten": 1},
                                    "t_gelu": {"matched": 1, "rewritten": 1}}, res.stats
    assert res.stats["rewritten"] == 2 and aten.silu.default in targets(res.gm) and check_metadata(res.gm) == []
    close(res.gm, m, make, torch.float32)
    limited = table(capture(m, make(torch.float32)), PassContext(options={"max_rewrites": 1}))
    assert limited.stats["by_rule"]["t_gelu"] == {"matched": 1, "rewritten": 0}
    with pytest.raises(RewriteError, match=r"'t_swish'\] occur twice"):
        Rules("t_twice", [Rewrite("t_swish", swish, silu), Rewrite("t_swish", gelu_erf, gelu)])


def test_pattern_errors_show_at_registration_with_the_rewrites_name():
    def scaled_twice(x, eps=1e-6):
        return x * (2 * eps)          # eps folded into a Python number: cannot be matched

    def wrong_rank(x):
        return x @ torch.ones(3, 3)  # does not fit the example shapes (8, 16)

    with pytest.raises(RewriteError, match=r"register_rewrite\('t_eps'\): free literal.*not an argument"):
        register_rewrite("t_eps", scaled_twice, replacement, free=("eps",))
    with pytest.raises(RewriteError, match=r"register_rewrite\('t_rank'\): the pattern does not trace"):
        register_rewrite("t_rank", wrong_rank, replacement)
    from passlab.passes import list_passes
    assert "t_eps" not in list_passes() and "t_rank" not in list_passes()


def test_pass_descriptions_are_whole_paragraphs():
    from passlab.passes import list_passes
    descriptions = {k: v for k, v in list_passes().items() if not v.startswith("alias:")}
    assert descriptions["fuse_epilogue"].endswith("(CUDA: Triton GEMM + epilogue).")
    assert all(v.endswith(".") for v in descriptions.values()), descriptions
