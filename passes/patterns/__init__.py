"""Pattern passes: each finds one idiom in the core-aten graph and rewrites it.

- `fold_batchnorm`         conv/linear + eval batchnorm -> conv/linear with folded weights
- `fuse_attention`         bmm, scale, mask, softmax, bmm -> scaled_dot_product_attention
- `merge_projections`      sibling GEMMs on one input (Q/K/V, gate/up) -> one GEMM + slices
- `fuse_epilogue`          GEMM + bias / residual / activation -> addmm, oneDNN linear + post-op,
                           a generated kernel, or (CUDA) a Triton GEMM + epilogue
- `recompose_activations`  decomposed SiLU / GELU (also their bf16 upcast form) -> one aten op
- `fold_bias`, `fold_residual`  GEMM + bias / residual add -> addmm (declared with `register_rewrite`)

All of them are written in one vocabulary (`vocabulary.py`, re-exported here) and
count what they saw (`Counters`: matched / rewritten / skipped{reason}), so the
run record tells which pattern fired where and why one did not. `rewrite.py` is
the short way to add one: `register_rewrite(name, pattern, replacement)`.
"""
from .vocabulary import (ACTIVATIONS, GEMMS, RESHAPES, STRICT_VIEWS, VIEW_OPS, Counters, Skip, act_of, activation_at,
                         aten, constant_of, copies_only, erase_dead, gemm_operands, is_cast, is_view,
                         new_constant, passes_value, shape, side_effect_only, sole_user_through_views,
                         through_views, users)

__all__ = ["ACTIVATIONS", "GEMMS", "RESHAPES", "STRICT_VIEWS", "VIEW_OPS", "Counters", "Skip", "act_of", "activation_at",
           "aten", "constant_of", "copies_only", "erase_dead", "gemm_operands", "is_cast", "is_view",
           "new_constant", "passes_value", "shape", "side_effect_only", "sole_user_through_views",
           "through_views", "users"]
