"""`register_rewrite(name, pattern, replacement, **options)`: a rewrite written as
two plain PyTorch functions, registered as a pass.

    def pattern(x):
        return x * torch.sigmoid(x)

    def replacement(x):
        return F.silu(x)

    register_rewrite("silu_back", pattern, replacement)

How it works:

- **Tracing.** Both functions are traced to core aten the way models are
  captured (`make_fx` with the decomposition table `capture` uses), so the
  pattern looks like what `capture` produces. Tensor parameters are the
  pattern's inputs; parameters with a default are literals.
- **Shapes and dtypes do not matter.** The pattern is traced twice, at two
  input shapes (the second 3x the first) and two values of every free literal;
  the literals that differ between the traces (view sizes, expanded shapes)
  are wildcards. The replacement is traced once per match signature with
  tensors of the matched inputs' shapes and dtypes, so it may read `x.shape`
  as plain ints: no `getattr`/`sym_size` nodes, and the sizes are right.
- **Casts.** The pattern also matches its low-precision form with the casts
  around it (`to(fp32)` on each input, the body in fp32, `to(bf16|fp16)` on the
  output), the way decompositions compute bf16 ops; the replacement is then
  traced on the bf16 inputs (`casts=False` turns this off).
- **Matching rules** (torch.fx's `SubgraphMatcher`, extended): asserts and
  other side-effect-only users never block a match; `add`/`mul`/`maximum`/
  `minimum` match either operand order; a literal is fixed (exponents, dims,
  what the pattern writes) unless declared free (`free=("eps",)`): a free
  literal matches any value of its type, the same value at every place it
  occurs, and the replacement receives that value.
- **Rewriting.** The replacement's nodes are inserted before the matched
  output, its constants become new buffers, the matched nodes and their
  asserts are erased, and `meta["val"]` is propagated (`passes/meta.py`).
  A match is skipped (and counted) when `check(match)` returns a reason, when
  the replacement's outputs differ in shape or dtype, or when an earlier
  rewrite took its nodes.

Statistics: `matched`, `rewritten`, `skipped{reason}`, `by_variant`. The
registered pass has the pipeline option `max_rewrites` (bisecting a miscompile:
`silu_back(max_rewrites=1)`).
"""
from __future__ import annotations

import functools
import inspect
import numbers
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from passlab.graphs.decompositions import decomp_table

from ..api import Option, Pass, PassResult, summary
from ..fuse import FusionError, fuse_nodes
from ..registry import register_pass
from ..vocabulary import Counters, aten, erase_dead, new_constant, side_effect_only, users

COMMUTATIVE = frozenset({aten.add.Tensor, aten.mul.Tensor, aten.maximum.default, aten.minimum.default})
SAME_RESHAPE = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})  # one op to a pattern
LOW = (torch.bfloat16, torch.float16)
DEFAULT_SHAPE = (8, 16)
SCALE = 3          # the second trace's sizes: SCALE x the first (size-1 dims stay 1)
KERNEL = "kernel"  # replacement: one generated kernel of the matched nodes (`fuse_nodes`)


class RewriteError(ValueError):
    """A pattern or replacement that cannot be used; the message says what to change."""


@functools.lru_cache(maxsize=1)
def decompositions() -> dict:
    """The decomposition table `capture` uses (graphs/decompositions.py)."""
    return decomp_table()


def trace(fn, tensors, literals: dict) -> torch.fx.GraphModule:
    """`fn(*tensors, **literals)` as a core-aten graph (fake tensors: nothing is computed)."""
    def body(*ts):
        return fn(*ts, **literals)
    with torch.no_grad():
        gm = make_fx(body, decomposition_table=decompositions(), tracing_mode="fake")(*tensors)
    for n in list(gm.graph.nodes):
        if side_effect_only(n):
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    return gm


# ---------------------------------------------------------------- the pattern, with its wildcards

class Hole:
    """A literal of the pattern that matches any value of its type. Named holes
    (free literals) bind one value for every place they occur; anonymous ones
    (sizes) match independently. It poses as a placeholder to SubgraphMatcher,
    which stores the bound value in `match.nodes_map`."""
    op = "placeholder"

    def __init__(self, example, name: str | None = None):
        self.example, self.name = example, name

    def accepts(self, value) -> bool:
        if isinstance(value, torch.fx.Node):
            return False
        if isinstance(self.example, list):
            return (isinstance(value, (list, tuple)) and len(value) == len(self.example)
                    and all(type(v) is int for v in value))
        if isinstance(self.example, bool) or isinstance(value, bool):
            return type(value) is type(self.example)
        if isinstance(self.example, numbers.Number):
            return isinstance(value, numbers.Number)
        return type(value) is type(self.example)

    def __repr__(self):
        return f"Hole({self.name or self.example!r})"


@dataclass
class Variant:
    label: str                    # "plain" | "cast"
    graph: torch.fx.Graph
    holes: dict = field(default_factory=dict)     # free literal name -> Hole


def perturbed(value):
    if isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value):
        return type(value)(scaled(value))        # sizes scale with the second trace's inputs
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * SCALE + 7
    if isinstance(value, float):
        return value * 1.618 + 0.25
    raise RewriteError(f"free literal {value!r}: only int, float, bool and size (list of int) literals can be free")


def scaled(shape) -> tuple:
    return tuple(s if s == 1 else s * SCALE for s in shape)


def with_holes(a, b, free_a: dict, free_b: dict, holes: dict):
    """The literal structure `a` (first trace) with a Hole wherever `b` (second trace) differs."""
    if isinstance(a, torch.fx.Node):
        return a
    for name, v in free_a.items():
        if isinstance(v, (list, tuple)) and isinstance(a, (list, tuple)) and list(a) == list(v) \
                and list(b) == list(free_b[name]):
            return holes.setdefault(name, Hole(list(v), name))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(with_holes(x, y, free_a, free_b, holes) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: with_holes(a[k], b[k], free_a, free_b, holes) for k in a}
    if type(a) is type(b) and a == b:
        return a
    for name, v in free_a.items():
        if type(a) is type(v) and a == v and b == free_b[name]:
            return holes.setdefault(name, Hole(v, name))
    return Hole(a)


def same_structure(ga: torch.fx.Graph, gb: torch.fx.Graph) -> bool:
    na, nb = list(ga.nodes), list(gb.nodes)
    if len(na) != len(nb):
        return False
    index = {n: i for i, n in enumerate(na)}
    index_b = {n: i for i, n in enumerate(nb)}
    for a, b in zip(na, nb):
        if a.op != b.op or (a.op == "call_function" and a.target != b.target):
            return False
        if [index[x] for x in a.all_input_nodes] != [index_b[x] for x in b.all_input_nodes]:
            return False
    return True


def build_variant(label, fn, inputs_a, inputs_b, literals, free) -> Variant:
    free_a = {k: literals[k] for k in free}
    free_b = {k: perturbed(v) for k, v in free_a.items()}
    ga = trace(fn, inputs_a, literals)
    gb = trace(fn, inputs_b, {**literals, **free_b})
    if not same_structure(ga.graph, gb.graph):
        raise RewriteError(f"the {label} pattern traces to different graphs at two input shapes "
                           f"({[tuple(t.shape) for t in inputs_a]} and {[tuple(t.shape) for t in inputs_b]}); "
                           "give example_inputs= whose sizes are all distinct and > 1")
    if any(n.op == "get_attr" for n in ga.graph.nodes):
        raise RewriteError("the pattern creates tensor constants; write them as inputs instead")
    holes: dict = {}
    for a, b in zip(ga.graph.nodes, gb.graph.nodes):
        if a.op == "call_function":
            a.args = with_holes(a.args, b.args, free_a, free_b, holes)
            a.kwargs = with_holes(a.kwargs, b.kwargs, free_a, free_b, holes)
    missing = set(free) - set(holes)
    if missing:
        raise RewriteError(f"free literal(s) {sorted(missing)} are not an argument of any op in the traced "
                           "pattern (use them directly, e.g. `x + eps`, not in arithmetic on Python numbers)")
    return Variant(label, ga.graph, holes)


def upcast(fn):
    """`fn` computed the way decompositions compute a bf16/fp16 op: inputs to fp32, outputs back."""
    def body(*ts, **literals):
        low = next(t.dtype for t in ts if t.dtype in LOW)
        up = [t.float() if t.dtype in LOW else t for t in ts]
        out = fn(*up, **literals)
        return pytree.tree_map(lambda o: o.to(low) if isinstance(o, torch.Tensor) and o.dtype == torch.float32
                               else o, out)
    return body


# ---------------------------------------------------------------- matching

class Matcher(SubgraphMatcher):
    """SubgraphMatcher with the rules of register_rewrite: Holes for free literals
    and sizes, commutative add/mul, asserts never count as outside users, and a
    failed branch leaves no half-made bindings behind."""

    def __init__(self, pattern: torch.fx.Graph, commutative: bool = True):
        super().__init__(pattern, match_output=False, match_placeholder=False,
                         remove_overlapping_matches=True, ignore_literals=False)
        self.commutative = commutative

    def _nodes_are_equal(self, pn, gn, node_name_match: str = "") -> bool:
        if pn.op == gn.op == "call_function" and pn.target in SAME_RESHAPE and gn.target in SAME_RESHAPE:
            return True
        return super()._nodes_are_equal(pn, gn, node_name_match)

    def _match_literals(self, pn, gn, match: InternalMatch) -> bool:
        if isinstance(pn, Hole):
            if not pn.accepts(gn):
                return False
            if pn in match.nodes_map:
                return match.nodes_map[pn] == gn
            match.nodes_map[pn] = gn
            return True
        return super()._match_literals(pn, gn, match)

    def _match_nodes(self, pn, gn, match: InternalMatch, node_name_match: str = "") -> bool:
        saved = dict(match.nodes_map)
        if super()._match_nodes(pn, gn, match, node_name_match):
            return True
        match.nodes_map.clear()
        match.nodes_map.update(saved)
        if not (self.commutative and pn.op == "call_function" and pn.target in COMMUTATIVE
                and len(pn.args) == 2 and not pn.kwargs and pn not in saved):
            return False
        a, b = pn.args
        pn.args = (b, a)
        try:
            if super()._match_nodes(pn, gn, match, node_name_match):
                return True
            match.nodes_map.clear()
            match.nodes_map.update(saved)
            return False
        finally:
            pn.args = (a, b)

    def _is_contained(self, nodes_map) -> bool:
        inside = {gn for pn, gn in nodes_map.items() if pn.op != "placeholder"}
        for pn, gn in nodes_map.items():
            if pn.op == "placeholder" or pn in self.pattern_returning_nodes:
                continue
            if any(u not in inside for u in users(gn)):
                return False
        return True


@dataclass
class Match:
    """One occurrence, as `check(match)` sees it."""
    inputs: dict          # pattern parameter name -> graph node
    literals: dict        # literal parameter name -> value (free ones as matched)
    nodes: list           # the matched graph nodes (compute nodes, graph order)
    outputs: list         # the graph nodes the pattern returns
    variant: str          # "plain" or "cast"

    def val(self, name: str):
        """The fake tensor (shape, dtype, device) of input `name`."""
        return self.inputs[name].meta.get("val")


# ---------------------------------------------------------------- the rewrite, as a pass

def example_tensor(spec, dtype=torch.float32) -> torch.Tensor:
    if isinstance(spec, torch.Tensor):
        return torch.empty(spec.shape, dtype=dtype if spec.dtype.is_floating_point else spec.dtype)
    return torch.empty(tuple(spec), dtype=dtype)


class Rewrite(Pass):
    """A registered pattern -> replacement rewrite (see the module docstring)."""
    options = {"max_rewrites": Option(int, -1, "stop after this many rewrites (-1: no limit)")}

    def __init__(self, name, pattern, replacement, *, free=(), example_inputs=None, check=None,
                 casts: bool = True, commutative: bool = True, description: str | None = None,
                 label: str | None = None):
        self.kernel = replacement == KERNEL
        for what, fn in (("pattern", pattern), ("replacement", replacement)):
            if what == "replacement" and self.kernel:
                continue
            if not callable(fn):
                raise RewriteError(f"register_rewrite({name!r}): the {what} must be a function of tensors, "
                                   f"got {type(fn).__name__}")
        params = list(inspect.signature(pattern).parameters.values())
        self.tensor_names = [p.name for p in params if p.default is inspect.Parameter.empty
                             and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.literals = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        if not self.tensor_names:
            raise RewriteError(f"register_rewrite({name!r}): the pattern needs at least one tensor parameter")
        free = (free,) if isinstance(free, str) else tuple(free)
        unknown = [f for f in free if f not in self.literals]
        if unknown:
            raise RewriteError(f"register_rewrite({name!r}): free literal(s) {unknown} are not parameters "
                               f"with a default of the pattern (it has {sorted(self.literals) or 'none'})")
        rep_params = {} if self.kernel else inspect.signature(replacement).parameters
        if len([p for p in rep_params.values() if p.default is inspect.Parameter.empty]) > len(self.tensor_names):
            raise RewriteError(f"register_rewrite({name!r}): the replacement takes more tensors than the "
                               f"pattern's {self.tensor_names}")
        self.rep_literals = [k for k in self.literals if k in rep_params]
        if example_inputs is None:
            example_inputs = [DEFAULT_SHAPE] * len(self.tensor_names)
        if len(example_inputs) != len(self.tensor_names):
            raise RewriteError(f"register_rewrite({name!r}): {len(example_inputs)} example inputs for "
                               f"{len(self.tensor_names)} tensor parameters {self.tensor_names}")
        self.name, self.pattern, self.replacement = name, pattern, replacement
        self.description = summary(description or inspect.getdoc(pattern)) or f"rewrite {name}: pattern -> replacement"
        self.free, self.examples, self.check = free, list(example_inputs), check
        self.casts, self.commutative, self.label = casts, commutative, label or name
        self._variants: list[Variant] | None = None
        self._replacements: dict = {}

    # -- tracing (`register_rewrite` traces at once; a built-in table's rules on first use)

    @property
    def variants(self) -> list[Variant]:
        """The pattern traced (plain, and cast where it has a low-precision form); a
        pattern that cannot be used raises RewriteError naming this rewrite."""
        if self._variants is None:
            try:
                self._variants = self.trace_variants()
            except RewriteError as e:
                raise RewriteError(f"register_rewrite({self.name!r}): {e}") from None
            except Exception as e:
                raise RewriteError(f"register_rewrite({self.name!r}): the pattern does not trace at example_inputs "
                                   f"{self.examples}: {type(e).__name__}: {e}") from e
        return self._variants

    def trace_variants(self) -> list[Variant]:
        a = [example_tensor(s) for s in self.examples]
        b = [example_tensor(scaled(t.shape), t.dtype) for t in a]
        found = []
        if self.casts and any(t.dtype.is_floating_point for t in a):
            la = [t.to(torch.bfloat16) if t.dtype.is_floating_point else t for t in a]
            lb = [t.to(torch.float16) if t.dtype.is_floating_point else t for t in b]
            try:   # bf16 and fp16 traces: the output cast's dtype is a wildcard
                found.append(build_variant("cast", upcast(self.pattern), la, lb, self.literals, self.free))
            except RewriteError:
                pass   # no low-precision form at these shapes: the plain pattern only
        found.append(build_variant("plain", self.pattern, a, b, self.literals, self.free))
        return found

    def replacement_for(self, vals: list, literals: dict) -> torch.fx.GraphModule:
        key = (tuple((tuple(v.shape), v.dtype, str(v.device)) for v in vals),
               tuple(sorted((k, literals[k]) for k in self.rep_literals)))
        if key not in self._replacements:
            tensors = [torch.empty(tuple(v.shape), dtype=v.dtype, device=v.device) for v in vals]
            self._replacements[key] = trace(self.replacement, tensors, {k: literals[k] for k in self.rep_literals})
        return self._replacements[key]

    # -- matching and rewriting

    def matches(self, graph: torch.fx.Graph, variant: Variant) -> list[Match]:
        out = []
        for m in Matcher(variant.graph, self.commutative).match(graph):
            inputs = dict(zip(self.tensor_names, m.placeholder_nodes))
            if not all(isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)
                       for n in inputs.values()):
                continue       # a tensor parameter matched a literal or a non-tensor: not this pattern
            bound = {name: m.nodes_map[h] for name, h in variant.holes.items()}
            order = {n: i for i, n in enumerate(graph.nodes)}
            nodes = sorted({gn for pn, gn in m.nodes_map.items() if pn.op != "placeholder"}, key=order.get)
            out.append(Match(inputs, {**self.literals, **bound}, nodes, list(m.returning_nodes), variant.label))
        return out

    def each(self, gm: torch.fx.GraphModule, *, max_rewrites: int = -1, check=None):
        """Rewrite every occurrence in `gm` (in place, no recompile), yielding
        (match, None) after each rewrite and (match, reason) for each skip."""
        check = check if check is not None else self.check
        done = 0
        for variant in self.variants:
            for m in self.matches(gm.graph, variant):
                if any(getattr(n, "_erased", False) for n in m.nodes + list(m.inputs.values())):
                    yield m, "overlaps_earlier_rewrite"
                    continue
                if 0 <= max_rewrites <= done:
                    yield m, "max_rewrites_reached"
                    continue
                reason = (check(m) if check is not None else None) or self.rewrite(gm, m)
                if not reason:
                    done += 1
                yield m, reason

    def apply(self, gm: torch.fx.GraphModule, counters: Counters | None = None, *, max_rewrites: int = -1,
              by_variant: dict | None = None, check=None) -> int:
        """Rewrite every occurrence in `gm` (in place, no recompile), counting in
        `counters`; returns the number of rewrites."""
        c = counters if counters is not None else Counters()
        done = 0
        for m, reason in self.each(gm, max_rewrites=max_rewrites, check=check):
            c.count(reason)
            if not reason:
                done += 1
                if by_variant is not None:
                    by_variant[m.variant] = by_variant.get(m.variant, 0) + 1
        return done

    def rewrite(self, gm: torch.fx.GraphModule, m: Match) -> str | None:
        """Insert the replacement for one match; returns a skip reason or None."""
        g = gm.graph
        if self.kernel:
            try:
                fuse_nodes(gm, m.nodes, label=self.label).meta["rewrite"] = self.name
            except FusionError as e:
                return str(e)
            return None
        ins = list(m.inputs.values())
        try:
            rep = self.replacement_for([n.meta["val"] for n in ins], m.literals)
        except Exception:  # the replacement does not trace at these shapes: leave the match alone
            return "replacement_does_not_trace"
        out_node = rep.graph.output_node()
        new_vals = [n.meta.get("val") if isinstance(n, torch.fx.Node) else n
                    for n in pytree.tree_leaves(out_node.args[0])]
        old_vals = [n.meta.get("val") for n in m.outputs]
        if len(new_vals) != len(old_vals):
            return "replacement_output_count"
        for new, old in zip(new_vals, old_vals):
            if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(old.shape):
                return "replacement_changes_shape"
            if new.dtype != old.dtype:
                return "replacement_changes_dtype"
        order = {n: i for i, n in enumerate(g.nodes)}
        anchor = min(m.outputs, key=order.get)
        if any(order[i] > order[anchor] for i in ins):
            return "inputs_after_output"
        val_map = dict(zip([n for n in rep.graph.nodes if n.op == "placeholder"], ins))
        with g.inserting_before(anchor):
            for n in rep.graph.nodes:
                if n.op == "get_attr":
                    value = getattr(rep, n.target)
                    val_map[n] = g.get_attr(new_constant(gm, f"{self.name}_{n.target}", value))
                    val_map[n].meta["val"] = n.meta.get("val")
            before = set(g.nodes)
            result = g.graph_copy(rep.graph, val_map)
        for n in g.nodes:
            if n not in before:
                n.meta["rewrite"] = self.name
                for k in ("stack_trace", "nn_module_stack"):
                    if k in anchor.meta:
                        n.meta.setdefault(k, anchor.meta[k])
        for old, new in zip(m.outputs, pytree.tree_leaves(result)):
            old.replace_all_uses_with(new)
        erase_dead(g, m.nodes[::-1])
        return None

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        c, by_variant = Counters(), {}
        self.apply(gm, c, max_rewrites=int(ctx.options.get("max_rewrites", -1)), by_variant=by_variant)
        return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict(by_variant=by_variant))


class Rules(Pass):
    """A rule table, as tinygrad's `PatternMatcher` and Inductor's `pass_dicts`:
    rewrites (`Rewrite`) applied as one pass, counted per rule. The rules apply
    in table order, each to its matches in graph order, so a rule sees what
    the rules before it made (`mm + b -> addmm`, then `addmm + r -> addmm(r + b)`);
    a match an earlier rule took is left alone. `check(match)` (the table's, or
    one given to `apply`) is the legality every rule shares."""
    options = {"max_rewrites": Option(int, -1, "stop after this many rewrites (-1: no limit)")}

    def __init__(self, name: str, rules, *, description: str = "", check=None):
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RewriteError(f"rule table {name!r}: rule name(s) {twice} occur twice; each rule needs its own name")
        self.name, self.description, self.check = name, summary(description), check

    def each(self, gm: torch.fx.GraphModule, *, check=None, max_rewrites: int = -1):
        """(rule, match, reason) for every match of every rule, rewriting as it goes
        (in place, no recompile); `reason` None: rewritten."""
        check = check if check is not None else self.check
        done = 0
        for rule in self.rules:
            left = max_rewrites - done if max_rewrites >= 0 else -1
            for m, reason in rule.each(gm, check=check, max_rewrites=left):
                done += not reason
                yield rule, m, reason

    def apply(self, gm: torch.fx.GraphModule, counters: Counters | None = None, *, check=None,
              max_rewrites: int = -1) -> dict:
        """Apply the table to `gm` in place (no recompile), counting in `counters`;
        returns {rule name: {"matched": n, "rewritten": n}}."""
        c = counters if counters is not None else Counters()
        by_rule = {r.name: {"matched": 0, "rewritten": 0} for r in self.rules}
        for rule, _, reason in self.each(gm, check=check, max_rewrites=max_rewrites):
            c.count(reason)
            by_rule[rule.name]["matched"] += 1
            by_rule[rule.name]["rewritten"] += not reason
        return by_rule

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        c = Counters()
        by_rule = self.apply(gm, c, max_rewrites=int(ctx.options.get("max_rewrites", -1)))
        return PassResult(gm, changed=c.rewritten > 0, stats=c.as_dict(by_rule=by_rule))


def register_rewrite(name: str, pattern, replacement, **options) -> Rewrite:
    """Register `pattern -> replacement` (plain PyTorch functions of tensors) as the pass `name`.

    Options: `free=("eps",)` literals (pattern parameters with a default) that
    match any value; `example_inputs=[(8, 16), (16,)]` shapes (or tensors) to
    trace the pattern at, one per tensor parameter (default (8, 16) each);
    `check=fn(match) -> reason | None` legality beyond the structure;
    `casts=True` also match the bf16/fp16 form with casts around it;
    `commutative=True` match add/mul in either operand order; `description`.
    `replacement="kernel"` makes each match ONE generated kernel (`fuse_nodes`,
    named `label`, default the rewrite's name) instead of inserting a function.
    The pattern is traced here, so its errors (RewriteError, naming the
    rewrite) show at registration. Returns the registered `Rewrite` (a Pass)."""
    rw = Rewrite(name, pattern, replacement, **options)
    rw.variants
    register_pass(rw)
    return rw
