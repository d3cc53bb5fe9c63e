"""`write_in_place`: state updated functionally and written back -> updated in place.

torch.export captures `cache.index_copy_(2, pos, k)` (a KV cache, a counter) as
a functional update of the whole tensor followed, at the end of the graph, by
a write-back into the state:

    new = index_put(cache, [None, None, pos], k)     # copies all of `cache`, writes one row
    ...  readers of `new` (attention) ...
    copy_(cache, new)                                # copies all of it back

so a decode step moves the whole cache twice per layer to write one token.
When nothing reads the old value of `cache` after the update, the update can
run on `cache` itself:

    new = index_put_(cache, [None, None, pos], k)    # writes one row; `new` is `cache`

and the write-back, now a copy of `cache` onto itself, goes. (torch.fx's own
`reinplace` pass leaves updates of program inputs alone: "a future
optimization ... currently isn't implemented".) Legal when the written-back
value is one of the functional updates below applied to the very tensor it is
written back to, and every other reader of that tensor runs before the
update. The graph still writes the same values into the same state; the
numerics check compares the written state too. Run it last: a pass that
reorders nodes after it could move a reader of the old value past the update.

A functional update of a tensor the graph has just made (`full`, `zeros`,
`empty`, ...: a static cache's first fill, on the prefill) and nothing else
reads runs in place on it too: the update's copy of the fresh buffer goes.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.utils._pytree as pytree

from .api import PassResult
from .vocabulary import Counters, Skip, aten, users
from .registry import register_pass

IN_PLACE = {aten.index_put.default: aten.index_put_.default,
            aten.index_copy.default: aten.index_copy_.default,
            aten.scatter.src: aten.scatter_.src,
            aten.scatter.value: aten.scatter_.value}


def match(cp: torch.fx.Node, order: dict):
    dst, src = cp.args[:2]
    if not (isinstance(src, torch.fx.Node) and src.op == "call_function" and src.target in IN_PLACE):
        raise Skip("not_a_functional_update")
    if src.args[0] is not dst:
        raise Skip("updates_another_tensor")
    if dst.op not in ("placeholder", "get_attr"):
        raise Skip("not_state")
    if any(order.get(u, -1) > order[src] for u in users(dst) if u not in (src, cp)):
        raise Skip("old_value_read_after_update")
    if any(a is dst for a in pytree.tree_leaves((src.args[1:], src.kwargs))):
        raise Skip("reads_itself")
    return dst, src


FRESH = {aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
         aten.empty_strided.default, aten.full_like.default, aten.zeros_like.default, aten.ones_like.default,
         aten.empty_like.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default}


def fresh_target(src: torch.fx.Node):
    """The tensor `src` updates where the graph made it just for this update, else Skip."""
    buf = src.args[0]
    if not (isinstance(buf, torch.fx.Node) and buf.op == "call_function" and buf.target in FRESH):
        raise Skip("not_fresh")
    if users(buf) != [src]:
        raise Skip("fresh_buffer_read_elsewhere")
    if any(a is buf for a in pytree.tree_leaves((src.args[1:], src.kwargs))):
        raise Skip("reads_itself")
    return buf


def in_place(g: torch.fx.Graph, src: torch.fx.Node) -> torch.fx.Node:
    with g.inserting_before(src):
        new = g.call_function(IN_PLACE[src.target], src.args, src.kwargs)
    new.meta["val"] = src.meta.get("val")
    src.replace_all_uses_with(new)
    g.erase_node(src)
    return new


@register_pass("write_in_place")
def write_in_place(gm: torch.fx.GraphModule, ctx) -> PassResult:
    """State updated functionally then copied back (index_put + copy_) -> the update done in place."""
    g, c = gm.graph, Counters()
    order = {n: i for i, n in enumerate(g.nodes)}
    for cp in [n for n in g.nodes if n.op == "call_function" and n.target == aten.copy_.default]:
        try:
            dst, src = match(cp, order)
        except Skip as e:
            if str(e) != "not_a_functional_update":
                c.matched += 1
                c.skip(str(e))
            continue
        c.matched += 1
        cp.replace_all_uses_with(dst)             # copy_ returns its destination (a cache returned as an output)
        g.erase_node(cp)                          # copy_(dst, dst): nothing left to write back
        in_place(g, src)
        c.rewritten += 1
    fresh = 0
    for src in [n for n in g.nodes if n.op == "call_function" and n.target in IN_PLACE]:
        try:
            fresh_target(src)
        except Skip:
            continue
        in_place(g, src)
        fresh += 1
    return PassResult(gm, changed=c.rewritten + fresh > 0, stats=c.as_dict(fresh_buffers=fresh))
