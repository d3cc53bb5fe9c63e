"""Contract tests: every registered pass on every sample model.

The list of passes is read from the registry at collection time, so a new
pass (built in, or from an installed plugin) is covered without writing a
test. Each case checks the whole pass contract (passlab.passes.contract):
valid graph, metadata, weights untouched, numerics against eager on fresh
inputs. A pass that does not apply must still return a valid graph.
"""
import os
import sys

import pytest
import torch

from passlab.passes import ALIASES, TOLERANCE, list_passes, relative_error, unregister_pass
from passlab.runtime.executor import compile_graph
from passlab.passes.contract import ContractViolation, captured, check

from conftest import SAMPLES

PASSES = [name for name in list_passes() if name not in ALIASES]
MODELS = os.environ.get("PASSLAB_CONTRACT_MODELS", ",".join(SAMPLES)).split(",")   # e.g. add hf:llama
PLUGIN_SRC = os.path.join(os.path.dirname(__file__), "plugins", "passlab_badpass")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_pass_contract(pass_name, model):
    report = check(pass_name, model)
    assert report.pass_name == pass_name and report.model == model
    # the graph it returned, on inputs the contract check did not use, against eager
    sample, _ = captured(model)
    x = sample.make_inputs(777)
    with torch.no_grad():
        err = relative_error(compile_graph(report.result.gm, "cpu")(*x), sample.module(*x))
    assert err <= TOLERANCE[sample.dtype], f"{pass_name} on {model}: relative error {err:.3g} on seed 777"


@pytest.mark.parametrize("model", ["transformer", "convnet"])
@pytest.mark.parametrize("pass_name", PASSES)
def test_pass_contract_after_cleanup(pass_name, model):
    """Passes meet cleaned-up graphs in practice: folded weights, merged views."""
    check(pass_name, model, after="cleanup")


def test_every_builtin_pass_is_covered():
    from passlab.passes.registry import LOAD_ERRORS
    assert {"dce", "cse", "remove_noops", "fold_constants"} <= set(PASSES)
    assert {k: v for k, v in LOAD_ERRORS.items() if k.startswith("passlab.passes")} == {}, \
        "a pass module failed to import, so its passes are neither registered nor tested"


@pytest.fixture
def plugin_module():
    """The test plugin imported in-process from its source folder (not installed),
    and its passes unregistered afterwards."""
    sys.path.insert(0, PLUGIN_SRC)
    try:
        import passlab_badpass
        yield passlab_badpass
    finally:
        sys.path.remove(PLUGIN_SRC)
        sys.modules.pop("passlab_badpass", None)
        for name in ("recompose_silu", "bad_pass"):
            unregister_pass(name)


def test_contract_catches_a_wrong_pass(plugin_module):
    with pytest.raises(ContractViolation, match=r"pass 'bad_pass' on mlp: numerics changed: relative error"):
        check(plugin_module.CheaperGelu(), "mlp")
    check(plugin_module.CheaperGelu(), "llama")      # no GELU there: nothing to break


def test_contract_accepts_a_good_plugin_pass(plugin_module):
    import torch
    report = check("recompose_silu", "llama")
    # capture keeps silu whole (graphs/decompositions.py), so llama has no sigmoid*mul left to recompose
    assert report.result.stats["matched"] == report.result.stats["rewritten"]
    assert torch.ops.aten.silu.default in [n.target for n in report.result.gm.graph.nodes]


def test_contract_catches_in_place_weight_edits():
    from passlab.passes import PassResult, register_pass

    @register_pass("scale_weights_in_place")
    def scale(gm, ctx):
        next(iter(gm.parameters())).mul_(2.0)
        return PassResult(gm, False)
    try:
        with pytest.raises(ContractViolation, match="changed weight .* in place"):
            check("scale_weights_in_place", "mlp")
        assert captured.cache_info().currsize == 0     # the spoiled model is not reused
    finally:
        unregister_pass("scale_weights_in_place")
