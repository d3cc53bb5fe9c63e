"""The front door: passlab.optimize and the torch.compile backend — guards and
re-specialization, any pytree in and out, the measured guard."""
import collections

import pytest
import torch
import torch.fx

import passlab
from passlab.passes import register_pass, unregister_pass
from passlab.tools import optimize as opt_mod
from passlab.tools.optimize import InputMismatch, dynamo_backend, optimize

SHORT = "dce,cse,fuse"      # enough to generate a kernel, fast to run


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16)).eval()


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_batch_changes_respecialize_and_match_eager():
    m = mlp()
    fast = optimize(m, (torch.randn(4, 16),), pipeline=SHORT, guard="off")
    with torch.no_grad():
        for b in (4, 2, 8, 1, 2):
            x = torch.randn(b, 16)
            y = fast(x)
            assert y.shape == (b, 16) and close(y, m(x)), b
    sigs = [s["signature"] for s in fast.record["specializations"]]
    assert sigs == ["(float32[4, 16])", "(float32[2, 16])", "(float32[8, 16])", "(float32[1, 16])"]
    assert fast.record["signature"] == "(float32[2, 16])"          # the record of the one used last
    assert all(s["setup_seconds"] > 0 for s in fast.record["specializations"])


def test_cache_is_lru_bounded(monkeypatch):
    m = mlp()
    fast = optimize(m, (torch.randn(1, 16),), pipeline="dce", guard="off")
    fast.cache_size = 2
    with torch.no_grad():
        for b in (2, 3, 1):
            fast(torch.randn(b, 16))
        batches = lambda: [k[0][0][0] for k in fast.specs]     # noqa: E731
        assert batches() == [3, 1] and len(fast.record["specializations"]) == 4   # 1 was evicted, made again
        fast(torch.randn(3, 16))
        assert batches() == [1, 3] and len(fast.record["specializations"]) == 4   # a hit moves to the end


def test_on_new_input_error_names_both_signatures():
    fast = optimize(mlp(), (torch.randn(4, 16),), pipeline="dce", guard="off", on_new_input="error")
    with pytest.raises(InputMismatch) as e:
        fast(torch.randn(2, 16))
    assert "float32[4, 16]" in str(e.value) and "float32[2, 16]" in str(e.value)
    with pytest.raises(ValueError, match="on_new_input"):
        optimize(mlp(), (torch.randn(4, 16),), on_new_input="maybe")


def test_dtype_and_strides_are_part_of_the_signature():
    m = mlp()
    fast = optimize(m, (torch.randn(4, 16),), pipeline=SHORT, guard="off")
    with torch.no_grad():
        x = torch.randn(4, 16, dtype=torch.float64)
        y = fast(x.float())
        m64 = mlp().double()
        fast64 = optimize(m64, (x,), pipeline=SHORT, guard="off", on_new_input="error")
        with pytest.raises(InputMismatch, match="float64"):
            fast64(x.float())
        xt = torch.randn(16, 4).t()                                   # same shape, other strides
        assert close(fast(xt), m(xt))
    assert y.dtype == torch.float32
    assert any("stride (1, 4)" in s["signature"] for s in fast.record["specializations"])


def test_device_change_is_refused():
    fast = optimize(mlp(), (torch.randn(4, 16),), pipeline="dce", guard="off")
    key = list(fast.first.key)
    meta = torch.empty(4, 16, device="meta")
    with pytest.raises(InputMismatch, match="device"):
        fast(meta)
    assert list(fast.first.key) == key


class Outputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(16, 16)

    def forward(self, x, scale=2, attention_mask=None, position_ids=None):
        h = self.l(x) * scale
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        if position_ids is not None:
            h = h + position_ids[..., None].float()
        Pair = collections.namedtuple("Pair", "a b")
        return {"h": h, "nested": (h.relu(), (None, h.sum(-1))), "pair": Pair(h + 1, h - 1)}


def test_pytree_in_and_out_keep_types_and_values():
    m = Outputs().eval()
    x = torch.randn(2, 5, 16)
    kw = {"attention_mask": torch.ones(2, 5), "position_ids": torch.arange(5).expand(2, 5)}
    fast = optimize(m, (x,), example_kwargs=kw, pipeline=SHORT, guard="off")
    with torch.no_grad():
        mask = (torch.rand(2, 5) > 0.3).float()
        pos = torch.arange(5).expand(2, 5)
        out = fast(torch.randn(2, 5, 16), position_ids=pos, attention_mask=mask)   # other keyword order
        x2 = torch.randn(2, 5, 16)
        out, ref = fast(x2, attention_mask=mask, position_ids=pos), m(x2, attention_mask=mask, position_ids=pos)
    assert isinstance(out, dict) and list(out) == ["h", "nested", "pair"]
    assert out["nested"][1][0] is None and type(out["pair"]).__name__ == "Pair"
    assert close(out["h"], ref["h"]) and close(out["nested"][1][1], ref["nested"][1][1])
    assert close(out["pair"].b, ref["pair"].b)
    assert len(fast.record["specializations"]) == 1                     # keyword order is not a new signature
    assert "attention_mask=float32[2, 5]" in fast.record["signature"]
    with torch.no_grad():
        out3 = fast(x2, 3, attention_mask=mask, position_ids=pos)       # a new constant: new specialization
    assert close(out3["h"], m(x2, 3, attention_mask=mask, position_ids=pos)["h"])
    assert len(fast.record["specializations"]) == 2


def test_unflattener_matches_tree_unflatten():
    import torch.utils._pytree as pytree
    Pair = collections.namedtuple("Pair", "a b")
    for tree in [(1, 2), [1, (2, 3)], {"a": 1, "b": (2, {"c": 3})}, Pair(1, (2, None)), 5]:
        leaves, spec = pytree.tree_flatten(tree)
        flat = leaves[0] if spec.is_leaf() else tuple(leaves)   # a graph returns a lone leaf as itself
        assert opt_mod.unflattener(spec)(flat) == tree


def test_hf_model_output_class_kept():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.BertModel(cfg).eval()
    ids, mask = torch.randint(0, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    fast = optimize(m, (ids,), example_kwargs={"attention_mask": mask}, pipeline="dce,cse", guard="off")
    assert [s["pass"] for s in fast.record["steps"] if s["status"] != "ok"] == []
    with torch.no_grad():
        ids2 = torch.randint(0, 50, (2, 6))
        out, ref = fast(ids2, attention_mask=mask), m(ids2, attention_mask=mask)
    assert type(out) is type(ref)
    assert close(out.last_hidden_state, ref.last_hidden_state) and close(out.pooler_output, ref.pooler_output)


# ---------------------------------------------------------------- the measured guard

def test_guard_measures_and_records_its_choice():
    m = mlp()
    fast = optimize(m, (torch.randn(8, 16),), pipeline=SHORT)
    g = fast.record["guard"]
    assert g["mode"] == "measure" and g["chosen"] in ("final", "captured", "eager")
    assert set(g["timings"]) == {"final", "captured", "eager"}
    for t in g["timings"].values():
        assert t["ci_low_s"] <= t["median_s"] <= t["ci_high_s"] and t["n"] >= 1
    assert g["speedup_vs_eager"]["eager"][0] == pytest.approx(1.0)
    assert fast.record["setup_seconds"] >= g["seconds"] > 0
    assert fast.record["specializations"][0]["runs"] == g["chosen"]
    with torch.no_grad():
        x = torch.randn(8, 16)
        assert close(fast(x), m(x))


def test_guard_runs_what_it_chose(monkeypatch):
    """Whatever timing says, the chosen contender is what runs."""
    m = mlp()
    real = opt_mod.timing.measure_many

    def eager_wins(fns, sets, **kw):
        out = real(fns, sets, **{**kw, "budget_s": 0.01})
        for k, t in out.items():
            if k == "eager":
                t.median_s = t.ci_low_s = t.ci_high_s = 1e-9
                t.samples_s = [1e-9] * len(t.samples_s)
        return out
    monkeypatch.setattr(opt_mod.timing, "measure_many", eager_wins)
    fast = optimize(m, (torch.randn(4, 16),), pipeline=SHORT)
    assert fast.record["guard"]["chosen"] == "eager"
    called = []
    m.register_forward_hook(lambda *a: called.append(1))
    with torch.no_grad():
        fast(torch.randn(4, 16))
    assert called


def test_guard_drops_a_pass_by_its_effect_on_the_end_result(monkeypatch):
    """Leave-one-out against the end result: the variant without the pass that
    measures faster beyond its CI is what runs; the pass is reported rolled back."""
    m = mlp()
    real = opt_mod.timing.measure_many

    def fake(fns, sets, **kw):
        out = real(fns, sets, **{**kw, "budget_s": 0.01})
        for k, t in out.items():
            v = 1e-4 if k == "without 1" else 1e-3                   # leaving out step 1 (fuse) wins
            t.median_s, t.ci_low_s, t.ci_high_s = v, v * 0.99, v * 1.01
            t.samples_s = [v * (1 + 0.001 * (i % 3)) for i in range(len(t.samples_s))]
        return out
    monkeypatch.setattr(opt_mod.timing, "measure_many", fake)
    monkeypatch.setattr(opt_mod, "GUARD_BUDGET_S", 600.0)     # a loaded machine must not skip a variant
    fast = optimize(m, (torch.randn(4, 16),), pipeline="fold_constants,fuse")
    steps, g = fast.record["steps"], fast.record["guard"]
    assert g["left_out"] == ["fold_constants", "fuse"] and g["dropped"] == ["fuse"]
    assert steps[0]["status"] == "ok" and steps[0]["changed"]
    assert steps[1]["status"] == "rolled_back" and steps[1]["error"].startswith("slower: -")
    assert g["chosen"] == "final"
    assert not any(getattr(n.target, "is_fused_kernel", False) for n in fast.gm.graph.nodes)
    with torch.no_grad():
        x = torch.randn(4, 16)
        assert close(fast(x), m(x))


# ---------------------------------------------------------------- torch.compile backend

@pytest.fixture
def backend_env(monkeypatch):
    monkeypatch.setenv("PASSLAB_GUARD", "off")
    monkeypatch.setenv("PASSLAB_PIPELINE", SHORT)
    torch._dynamo.reset()
    yield monkeypatch
    torch._dynamo.reset()


def compiled_matches_eager(m, batches=(4,)) -> bool:
    c = torch.compile(m, backend="passlab")
    with torch.no_grad():
        return all(close(c(x), m(x)) for x in (torch.randn(b, 16) for b in batches))


def test_backend_dynamic_shapes_match_eager(backend_env):
    assert compiled_matches_eager(mlp(), (4, 2, 8, 3, 16))
    rec = dynamo_backend.last.record
    assert len(rec["specializations"]) >= 3              # dynamo's dynamic graph, specialized per batch
    # dynamo hands weights as inputs; the backend holds them as constants again
    assert any(n.op == "get_attr" for n in dynamo_backend.last.gm.graph.nodes)


def test_backend_rolls_back_a_bad_pass(backend_env):
    @register_pass("_fd_bad_scale")
    def bad(gm: torch.fx.GraphModule, ctx):
        out = gm.graph.output_node()
        with gm.graph.inserting_before(out):
            val = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (val, 1.5))
            scaled.meta["val"] = val.meta["val"]
        out.args = ((scaled, *out.args[0][1:]),) if isinstance(out.args[0], (tuple, list)) else (scaled,)
        return gm
    try:
        backend_env.setenv("PASSLAB_PIPELINE", "dce,_fd_bad_scale")
        assert compiled_matches_eager(mlp())
        step = [s for s in dynamo_backend.last.record["steps"] if s["pass"] == "_fd_bad_scale"][0]
        assert step["status"] == "rolled_back" and "numerics" in step["error"]
    finally:
        unregister_pass("_fd_bad_scale")


def test_backend_numerics_check_can_be_turned_off(backend_env):
    backend_env.setenv("PASSLAB_CHECK_NUMERICS", "0")
    assert compiled_matches_eager(mlp())
    assert all(s["max_error"] is None for s in dynamo_backend.last.record["steps"])


def test_backend_guard_env_is_checked(backend_env):
    backend_env.setenv("PASSLAB_GUARD", "sometimes")
    c = torch.compile(mlp(), backend="passlab")
    with pytest.raises(Exception, match="PASSLAB_GUARD"):
        with torch.no_grad():
            c(torch.randn(4, 16))


def test_optimize_is_the_package_entry():
    assert passlab.optimize is optimize


class IntegerDivision(torch.nn.Module):
    def forward(self, a, b):
        return (a // b) * 2 + 1


def test_a_model_that_raises_on_random_inputs_is_checked_on_the_examples_values():
    """Fresh random integers drawn from the example's range include a 0 divisor, on which the
    model itself raises: the numerics check and the guard use copies of the example's values
    instead (and the record says so), and a zero divisor in the user's call still raises."""
    m = IntegerDivision()
    a = torch.tensor([2**25 + 1, 2**25 + 3, -7, 7, -7, 9] * 4)
    b = torch.tensor([3, 3, 2, -2, -2, 4] * 4)
    fast = optimize(m, (a, b), pipeline="cleanup,fuse")
    steps = fast.record["steps"]
    assert steps and all(s["numerics_ok"] for s in steps)
    assert "ZeroDivisionError" in steps[-1]["stats"]["numerics_checked_on"]
    assert torch.equal(fast(a, b), m(a, b))
    b[2] = 0
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        fast(a, b)
