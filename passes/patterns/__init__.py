"""Pattern passes: each finds one idiom in the core-aten graph and rewrites it.

- `fold_batchnorm`         conv/linear + eval batchnorm -> conv/linear with folded weights
- `fuse_attention`         bmm, scale, mask, softmax, bmm -> scaled_dot_product_attention
- `decode_attention`       SDPA of a few query rows over a KV cache -> grouped-head bmm + softmax + bmm
- `merge_projections`      sibling GEMMs on one input (Q/K/V, gate/up) -> one GEMM + slices
- `decode_gemm`            a GEMM of a few rows by a constant weight (+ bias, + residual) -> the C++ decode-GEMM template
- `fuse_epilogue`          GEMM + bias / residual / activation -> addmm (the `folds.py` rule table), oneDNN
                           linear + post-op, a generated kernel, or (CUDA) a Triton GEMM + epilogue
- `recompose_activations`  decomposed SiLU / GELU (also their bf16 upcast form) -> one aten op (a rule table)
- `group_experts`          gathered per-token expert GEMMs -> sort by expert + one grouped GEMM
- `gather_rows`            x[idx] with a 1-D integer idx -> index_select
- `sum_pairs`              a sum over a dim of size 2 -> the add of its two halves
- `unbroadcast_gemm`       bmm by one matrix expanded over the batch -> one mm over the batch's rows

All of them are written in the passes' vocabulary (`passes/vocabulary.py`) and
count what they saw (`Counters`: matched / rewritten / skipped{reason}), so the
run record tells which pattern fired where and why one did not. `rewrite.py`
is the short way to add one: `register_rewrite(name, pattern, replacement)`,
and `Rules`, a table of such rewrites applied as one pass, counted per rule.
"""
