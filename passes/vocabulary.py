"""The pass vocabulary: the few words the passes are written in (the pattern
passes, `fuse`, `cleanup`, `layout`, `write_in_place`).

- `users(n)`            the users that consume a value (side-effect-only users such as export's
                        `_assert_tensor_metadata` never count, so they never block a rewrite)
- `erase_dead(g, ns)`   erase rewritten nodes (and their asserts) once nothing reads them
- `Counters`, `Skip`    matched / rewritten / skipped{snake_case_reason} (`count(reason)` per match);
                        a matcher raises Skip(reason)
- `VIEW_OPS`            view-like ops, read from `runtime/opclass.py`'s table (VIEW and BROADCAST)
- `RESHAPES`            the view ops that keep elements in logical order (a chain of them is one reshape)
- `STRICT_VIEWS`        view / _unsafe_view: they need viewable strides (reshape copies when it must)
- `through_views(n)`    back from a value through reshapes (and eval-dropout clones) to its producer
                        (`passes=` another test, e.g. attention's: also `expands_nothing`)
- `sole_user_through_views(n)`  forward through single-user reshapes to the op that reads the value
- `gemm_operands(n)`    (x, w, bias) of an mm / addmm (alpha = beta = 1) / bmm, else None
- `residual_of(n, passed)`  (residual, add) where n's value (through views) is added to a same-shape tensor
- `activation_at(t)`    the activation applied to `t` (gelu / gelu_tanh / silu / relu) and its nodes
- `new_constant`, `constant_of`   register a new buffer `_<stem>` (weights are never edited) / read one

A pattern pass reads: match (raise `Skip(reason)`), check legality, rewrite, count;
`passes/patterns/attention.py` is the long example, `passes/patterns/rewrite.py`
the short way (`register_rewrite`: a pattern and its replacement as PyTorch functions).
"""
from __future__ import annotations

import re
from collections import Counter

import torch
import torch.fx

from passlab.graphs.capture import fetch_attr, returns_value
from passlab.runtime.opclass import TABLE, OpClass

aten = torch.ops.aten
REASON = re.compile(r"[a-z][a-z0-9_]*\Z")


# ---------------------------------------------------------------- users, erasure, counting

def side_effect_only(node: torch.fx.Node) -> bool:
    """A call that returns nothing and exists for its effect (a runtime assert)."""
    return node.op == "call_function" and not returns_value(node)


def users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that consume the value: asserts and other side-effect-only users do not count."""
    return [u for u in node.users if not side_effect_only(u)]


def erase_dead(graph: torch.fx.Graph, nodes, *, upstream=None) -> int:
    """Erase the given nodes (and the asserts hanging on them) once nothing reads them.

    Only the nodes a rewrite replaced are touched, so a pattern pass never
    removes dead code it did not create (that is `dce`'s job). With
    `upstream(node) -> bool`, an erased node's inputs that satisfy it become
    candidates too (layout: the views and copies that only fed a removed copy)."""
    erased = 0
    pending = [n for n in dict.fromkeys(nodes)
               if isinstance(n, torch.fx.Node) and n.graph is graph and not getattr(n, "_erased", False)]
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if getattr(n, "_erased", False):
                pending.remove(n)
                continue
            if users(n) or n.op in ("placeholder", "output") or side_effect_only(n):
                continue
            inputs = n.all_input_nodes
            for a in list(n.users):
                graph.erase_node(a)
            graph.erase_node(n)
            pending.remove(n)
            erased += 1
            changed = True
            if upstream is not None:
                pending.extend(i for i in inputs if i not in pending and upstream(i))
    return erased


class Skip(Exception):
    """The pattern is there but a condition the rewrite needs does not hold; the
    message is the snake_case reason counted in `skipped`."""


class Counters:
    """matched / rewritten / skipped{reason: n}: the statistics of a pattern pass.
    Reasons are snake_case identifiers, so run records and tables can key on them.

    `skip(reason, nodes=...)` also records WHERE it declined: the candidate's
    node names (`declined`: [{"reason", "nodes"}], each node set once, at most
    `DECLINED_MAX`), which `passlab explain` lists, prices and measures."""

    DECLINED_MAX = 200

    def __init__(self):
        self.matched, self.rewritten, self.skipped = 0, 0, Counter()
        self.declined: list[dict] = []
        self._seen: set = set()

    def skip(self, reason: str, n: int = 1, nodes=None) -> None:
        reason = str(reason)
        if not REASON.match(reason):
            raise ValueError(f"skip reason {reason!r} is not snake_case (e.g. 'dtype_mismatch')")
        self.skipped[reason] += n
        if nodes:
            names = [x.name if isinstance(x, torch.fx.Node) else str(x) for x in nodes]
            key = (reason, frozenset(names))
            if key not in self._seen and len(self.declined) < self.DECLINED_MAX:
                self._seen.add(key)
                self.declined.append({"reason": reason, "nodes": names})

    def attempt(self, match, node, *args, not_candidates=()):
        """`match(node, *args)` for a candidate at `node`, counted: its result (one
        match), or None where it raised `Skip`: a skip with its reason and node,
        unless the reason is one of `not_candidates` (the node was never a candidate)."""
        try:
            found = match(node, *args)
        except Skip as e:
            if str(e) not in not_candidates:
                self.matched += 1
                self.skip(str(e), nodes=[node])
            return None
        self.matched += 1
        return found

    def matches(self, graph: torch.fx.Graph, target, match, *args, not_candidates=()):
        """(node, what `match` found) for every call of `target` in `graph` that matched,
        each attempt counted (`attempt`); the nodes are listed first, so a rewrite may erase."""
        for node in [n for n in graph.nodes if n.op == "call_function" and n.target == target]:
            found = self.attempt(match, node, *args, not_candidates=not_candidates)
            if found is not None:
                yield node, found

    def count(self, reason: str | None) -> None:
        """One match: rewritten (`reason` None) or skipped for `reason`."""
        self.matched += 1
        if reason:
            self.skip(reason)
        else:
            self.rewritten += 1

    def as_dict(self, **extra) -> dict:
        d = {"matched": self.matched, "rewritten": self.rewritten,
             "skipped": dict(sorted(self.skipped.items())), **extra}
        if self.declined:
            d["declined"] = list(self.declined)
        return d


# ---------------------------------------------------------------- views

VIEW_OPS = frozenset(op for op, cls in TABLE.items()
                     if cls in (OpClass.VIEW, OpClass.BROADCAST) and isinstance(op, torch._ops.OpOverload))
RESHAPES = frozenset(op for op in VIEW_OPS if op.overloadpacket in (
    aten.view, aten._unsafe_view, aten.reshape, aten.alias, aten.unsqueeze, aten.squeeze))
STRICT_VIEWS = frozenset({aten.view.default, aten._unsafe_view.default})   # fail on unviewable strides


def shape(n) -> tuple:
    return tuple(n.meta["val"].shape)


def is_view(n) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in VIEW_OPS


def copies_only(n) -> bool:
    """A clone that only copies (eval-mode dropout): the value passes through it."""
    return (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target == aten.clone.default
            and not set(n.kwargs) - {"memory_format"})


def passes_value(n) -> bool:
    """A reshape or a plain copy: the value, in logical order, flows through it."""
    return (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in RESHAPES) or copies_only(n)


def expands_nothing(n) -> bool:
    """An expand to the shape it already has: the value passes through it."""
    return (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target == aten.expand.default
            and shape(n.args[0]) == shape(n))


def through_views(n, *, passes=passes_value):
    """(producer, nodes passed): back from `n` through the ops `passes` accepts."""
    between = []
    while passes(n):
        between.append(n)
        n = n.args[0]
    return n, between


def sole_user_through_views(n, passed: list, *, passes=passes_value):
    """Follow single-user reshapes/copies forward from `n` (appending them to
    `passed`); returns the first other op reading the value, or None."""
    while True:
        us = users(n)
        if len(us) != 1:
            return None
        u = us[0]
        if passes(u) and u.args[0] is n:
            passed.append(u)
            n = u
            continue
        return u


def is_cast(n, dtype: torch.dtype | None = None) -> bool:
    """A plain dtype conversion (`.float()`, `.to(dtype)`) on the same device and layout."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target == aten._to_copy.default):
        return False
    kw, src = n.kwargs, n.args[0].meta.get("val")
    same_device = src is None or torch.device(kw.get("device", src.device)) == src.device
    return (set(kw) <= {"dtype", "layout", "device"} and kw.get("layout", torch.strided) == torch.strided
            and same_device and (dtype is None or kw.get("dtype") == dtype))


# ---------------------------------------------------------------- GEMMs and what follows them

GEMMS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default})


def gemm_operands(n):
    """(x, w, bias) of `out = x @ w (+ bias)`: mm, addmm with alpha = beta = 1, bmm; else None."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in GEMMS):
        return None
    if n.target == aten.addmm.default:
        if any(n.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
            return None
        b, x, w = n.args[:3]
        return x, w, b
    x, w = n.args[:2]
    return x, w, None


def residual_of(gemm, c_passed: list):
    """(residual node, add node) where the GEMM's value (through views) is added to
    a same-shape, same-dtype tensor, else (None, None)."""
    nxt = sole_user_through_views(gemm, c_passed)
    t = c_passed[-1] if c_passed else gemm
    if nxt is None or nxt.target != aten.add.Tensor or nxt.kwargs or len(nxt.args) != 2:
        return None, None
    y = nxt.args[1] if nxt.args[0] is t else nxt.args[0]
    if isinstance(y, torch.fx.Node) and y is not t and shape(y) == shape(nxt) == shape(t) \
            and y.meta["val"].dtype == gemm.meta["val"].dtype:
        return y, nxt
    return None, None


ACTIVATIONS = {aten.gelu.default: "gelu", aten.silu.default: "silu", aten.relu.default: "relu"}


def act_of(n) -> str | None:
    """The activation `n` computes (gelu, gelu_tanh, silu, relu), or None."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function":
        return None
    if n.target == aten.gelu.default:
        return "gelu_tanh" if n.kwargs.get("approximate", "none") == "tanh" else "gelu"
    return ACTIVATIONS.get(n.target)


def activation_at(t, nxt=None):
    """(name, [nodes]) of the activation applied to `t` (`nxt`: t's sole user, if
    known), or None. Decomposed SiLU (`t * sigmoid(t)`) is recomposed first by the
    `recompose_activations` rewrites, so only the single aten ops are read here."""
    if nxt is None:
        us = users(t)
        nxt = us[0] if len(us) == 1 else None
    if nxt is not None and act_of(nxt) and nxt.args[0] is t:
        return act_of(nxt), [nxt]
    return None


# ---------------------------------------------------------------- constants

def new_constant(gm: torch.fx.GraphModule, stem: str, value: torch.Tensor, *, persistent: bool = True,
                 memory_format: torch.memory_format | None = torch.contiguous_format) -> str:
    """Register `value` as a new buffer under a fresh name (`_<stem>`, `_<stem>_1`, ...) and
    return the name; parameters are never mutated. The buffer is made dense in
    `memory_format` (None: `value` as it is, e.g. a folded view sharing its weight's storage)."""
    base = "_" + "".join(c if c.isalnum() else "_" for c in stem)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    value = value.detach()
    gm.register_buffer(name, value if memory_format is None else value.contiguous(memory_format=memory_format),
                       persistent=persistent)
    return name


def constant_of(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor behind a get_attr node (or None)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    try:
        obj = fetch_attr(gm, node.target)
    except AttributeError:
        return None
    return obj if isinstance(obj, torch.Tensor) else None
