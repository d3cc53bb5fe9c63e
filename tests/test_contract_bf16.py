"""The pass contract in bf16: every registered pass on the tiny samples built in
bf16 (graphs with the casts decompositions put around low-precision ops),
alone and after `cleanup`. The tolerance follows the dtype (2e-2)."""
import pytest
import torch

from passlab.passes import ALIASES, list_passes
from passlab.passes.contract import ContractViolation, check

PASSES = [name for name in list_passes() if name not in ALIASES]
MODELS = ["mlp", "llama"]      # GEMM + GELU chains; RMSNorm's fp32 upcast, SwiGLU, attention


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_pass_contract_bf16(pass_name, model):
    report = check(pass_name, model, dtype="bf16")
    assert 0.0 <= report.max_error <= 2e-2


@pytest.mark.parametrize("pass_name", ["fuse_epilogue", "fuse"])
def test_pass_contract_bf16_after_cleanup(pass_name):
    check(pass_name, "transformer", dtype=torch.bfloat16, after="cleanup")


def test_bf16_violation_names_the_dtype():
    from passlab.passes import PassResult, register_pass, unregister_pass

    @register_pass("negate_outputs_bf16")
    def negate(gm, ctx):
        out = gm.graph.output_node()
        with gm.graph.inserting_before(out):
            neg = gm.graph.call_function(torch.ops.aten.neg.default, (out.args[0],))
        out.args = (neg,)
        gm.recompile()
        from passlab.passes.meta import propagate
        propagate(gm)
        return PassResult(gm, True)
    try:
        with pytest.raises(ContractViolation, match=r"pass 'negate_outputs_bf16' on mlp in bfloat16: numerics changed"):
            check("negate_outputs_bf16", "mlp", dtype="bf16")
    finally:
        unregister_pass("negate_outputs_bf16")
