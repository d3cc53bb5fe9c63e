"""The loop plan (runtime/codegen/plan.py): computed once per kernel and scratch
policy, and rendered as it is by both printers."""
import torch
import torch.nn.functional as F

from passlab.runtime.codegen import cpp, plan, triton

from test_codegen import kernel_of, rnd


def loops_in(src: str, head: str) -> int:
    return src.count(head)


def test_layer_norm_plan_two_phases_then_store():
    fk = kernel_of(lambda x: F.layer_norm(x, (37,)), rnd(6, 37).bfloat16())   # bf16 rows are kept, fp32 reloaded
    p = plan.schedule(fk.kernel, cpp.SCRATCH_MAX)
    assert plan.schedule(fk.kernel, cpp.SCRATCH_MAX) is p                      # computed once, then cached
    assert [bool(loop.reductions) for loop in p.loops] == [True, True, False]  # mean, variance, store
    assert p.loops[-1].stores and not p.row_stores
    kept = {vid for loop in p.loops for vid in loop.keep}
    assert kept and kept <= {vid for loop in p.loops for vid in loop.reuse}   # what is kept is read back
    tp = plan.schedule(fk.kernel, 0)                                           # Triton: recompute, no scratch
    assert not any(loop.keep or loop.reuse for loop in tp.loops) and len(tp.loops) == len(p.loops)
    assert loops_in(fk.source("cpu"), "for (int64_t r = 0;") == len(p.loops)
    assert loops_in(fk.source("cuda"), "for r0 in range(") == len(tp.loops)
    assert "sv" in fk.source("cpu") and "sv" not in fk.source("cuda")


def test_row_values_and_row_stores():
    """A row output (the sum) is stored once per row; the elementwise one in the store loop."""
    fk = kernel_of(lambda x: (x.sum(-1, keepdim=True), torch.exp(x) * 2), rnd(5, 9))
    p = plan.schedule(fk.kernel)
    assert len(p.row_stores) == 1 and len(p.loops[-1].stores) == 1
    assert p.loops[0].rows_after == [] or all(not v.elem for v in p.loops[0].rows_after)


def test_pointwise_plan_has_one_store_loop():
    fk = kernel_of(lambda x, y: F.gelu(x) + y, rnd(4, 64), rnd(64, seed=1))
    p = plan.schedule(fk.kernel)
    assert len(p.loops) == 1 and not p.loops[0].reductions and p.loops[0].stores
    assert [v.id for v in p.loops[0].body] == sorted(v.id for v in p.loops[0].body)   # SSA order
    src = triton.body(fk, "K")
    assert src.count("tl.store(") == 1 and "tl.sum" not in src
