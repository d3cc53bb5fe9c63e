"""The decomposition table capture uses: core aten, minus the ops we keep whole.

`torch.export.default_decompositions()` lowers every op to the core-aten set,
including ops that have a fast fused ATen kernel, which the decomposition then
replaces by several slower ones. `decomp_table()` starts from that table and
removes (keeps as single nodes) the ops in `KEEP`, each for a measured or
structural reason:

- `scaled_dot_product_attention`: decomposed it becomes bmm on permuted and
  expanded operands, a scale, the masked-row guard (`logical_not`, `any`,
  `where`, `full_like`) and `_softmax`: 3-4x slower than the fused CPU flash
  kernel on nn.MultiheadAttention / nn.TransformerEncoderLayer / HF BERT,
  and on HF GPT-2 the decomposition fails outright (a `view` of its
  non-contiguous output). `nn.MultiheadAttention` (`need_weights=False`) and
  HF's default `sdpa` attention export as this op, so keeping it recovers
  their attention without a pattern.
- `silu`: decomposed it is `x * sigmoid(x)` with bf16 <-> fp32 `_to_copy`
  around it, ~4x eager's vectorized silu on moe bench. The fusion engine
  lowers `silu` itself, and `fuse_epilogue` matches it.
- `softplus`, `hardswish`, `hardsigmoid`, `mish`, `log_sigmoid`: one
  vectorized ATen pointwise kernel each; decomposed they are 3-6 ops
  (`where`/`gt`/`log1p`/`exp`, clamp chains).
- `upsample_*`, `pad`-free resampling: the decompositions gather with
  `_unsafe_index` (one index tensor per dim); ATen's kernels are direct loops.
- `dropout` in inference (`train=False`) returns its input in eager; core aten
  makes it a `clone` (a full copy). `run()` drops such nodes before
  decomposing (unless one is a graph output, which must not alias an input).

Kept on purpose *decomposed* (measured or needed by passes):
- `linear` -> `t` + `addmm` (2-D) / `view` + `mm` + `view`: the same kernels
  eager's `linear` calls, and `fuse_epilogue`, `merge_projections`,
  `fold_batchnorm` and `layout` match `addmm` / `mm`;
- `layer_norm` -> `native_layer_norm`, `softmax` -> `_softmax`: the same
  kernels under their core-aten names (the fusion engine lowers these);
- `matmul` -> `bmm` / `mm` on views: `fuse_attention` matches `bmm`.
"""
from __future__ import annotations

import functools

import torch

aten = torch.ops.aten

KEEP = (
    "scaled_dot_product_attention.default",
    "silu.default", "softplus.default", "hardswish.default", "hardsigmoid.default", "mish.default",
    "log_sigmoid.default",
    "upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec",
    "upsample_nearest1d.default", "upsample_nearest2d.default", "upsample_nearest3d.default",
    "upsample_bilinear2d.vec", "upsample_linear1d.vec", "upsample_bicubic2d.vec",
    "upsample_trilinear3d.vec",
)


def _op(name: str):
    packet, _, overload = name.partition(".")
    p = getattr(aten, packet, None)
    return getattr(p, overload, None) if p is not None else None


def kept_ops() -> list:
    """The aten overloads capture keeps as single nodes (those this torch has)."""
    return [op for op in map(_op, KEEP) if op is not None]


def leading_order(x) -> list | None:
    """The permutation of `x`'s leading dims that makes it contiguous (the last
    dim staying innermost), or None when there is none."""
    if x.dim() < 3 or x.stride(-1) != 1 or x.is_contiguous():
        return None
    order = sorted(range(x.dim() - 1), key=lambda d: (-x.stride(d), d))
    return order if x.permute(order + [x.dim() - 1]).is_contiguous() else None


def linear_on_permuted(default):
    """`linear` decomposed so that a batch-permuted input stays one GEMM.

    nn.MultiheadAttention (batch_first) and similar code apply a Linear to a
    transposed activation (`x.transpose(0, 1)`). The default decomposition
    (`matmul`) cannot flatten it without a copy and emits a bmm over the
    first dim against an expanded weight (64 small GEMMs in a ViT block:
    1.0 ms of its 7 ms). A Linear acts on the last dim only, so it commutes
    with any permutation of the others: undo the permutation (a view of a
    contiguous tensor), run one `addmm`/`mm` on the flat view, and permute the
    result back. Same values, one large GEMM, no copy."""
    def linear(x, w, b=None):
        order = leading_order(x)
        if order is None:
            return default(x, w, b)
        xc = x.permute(order + [x.dim() - 1])
        flat = xc.reshape(-1, x.shape[-1])
        y = aten.addmm.default(b, flat, w.t()) if b is not None else aten.mm.default(flat, w.t())
        y = y.view(*xc.shape[:-1], w.shape[0])
        inverse = sorted(range(len(order)), key=lambda i: order[i])
        return y.permute(inverse + [x.dim() - 1])
    return linear


@functools.lru_cache(maxsize=None)
def _table_items() -> tuple:
    table = torch.export.default_decompositions()
    for op in kept_ops():
        table.pop(op, None)
    table[aten.linear.default] = linear_on_permuted(table[aten.linear.default])
    return tuple(table.items())


def decomp_table() -> dict:
    """A fresh decomposition table for `ExportedProgram.run_decompositions`."""
    return dict(_table_items())


def drop_inference_dropout(ep) -> int:
    """Remove `dropout(x, p, train=False)` nodes (identities) from an exported
    program's graph, in place; returns how many went."""
    g = ep.graph_module.graph
    outputs = set(g.output_node().all_input_nodes)
    gone = 0
    for n in list(g.nodes):
        if n.op == "call_function" and n.target in (aten.dropout.default, aten.feature_dropout.default) \
                and n not in outputs and not _arg(n, 2, "train", True):
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
            gone += 1
    if gone:
        ep.graph_module.recompile()
    return gone


def _arg(n, i, name, default):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def run(ep):
    """`ep` lowered with `decomp_table()` (after dropping inference dropout)."""
    drop_inference_dropout(ep)
    return ep.run_decompositions(decomp_table())
