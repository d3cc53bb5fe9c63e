"""The two doors into passlab for users.

`passlab.optimize(model, example_inputs, example_kwargs=..., pipeline=...,
device=...)` returns an `Optimized`: callable like the model, with the model's
output types (tensors, tuples, dicts, HF ModelOutput, None), and a `.record`.
`torch.compile(model, backend="passlab")` reaches `dynamo_backend` through
torch's `torch_dynamo_backends` entry-point group.

Both specialize: one capture + pipeline per input signature (pytree structure,
shapes, dtypes, devices, strides, constant values), cached LRU
(`CACHE_SIZE`). A call whose signature is new is re-specialized, or refused
with `on_new_input="error"`; a change of device is always refused. Nothing
is ever run on inputs it was not specialized for. At most `SPECIALIZE_LIMIT`
specializations are made; after that a new signature runs the model itself
(warned once): shapes that keep changing (a growing DynamicCache) cost a
bounded setup, not one pipeline per step.

State the graph writes in place (caches, counters; graphs/state.py) is only
ever written by the user's own calls: the numerics check, its eager reference
and the guard's timings run on copies.

The measured guard (`guard="measure"`, the default): after the pipeline the
final graph is timed against eager and the captured graph at the model's own
shapes, interleaved, and the fastest of the three is what runs
(`record["guard"]`). When the final graph does not clearly win, passes are
left out one at a time (within `GUARD_BUDGET_S`), and a pass whose absence
makes the *end result* faster beyond its CI is dropped (`rolled_back`,
"slower: -x%").
"""
from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from passlab.graphs import Sample, capture, clone, random_like, stateful
from passlab.graphs.hf import find_caches, register_caches, return_given_caches
from passlab.graphs.state import live_state
from passlab.passes import parse
from passlab.passes.pipeline import available_default
from passlab.runtime import timing
from passlab.runtime.executor import compile_graph

from . import record as records
from .runner import context, make_manager

CACHE_SIZE = 8           # specializations kept per optimized model (LRU)
GUARD_BUDGET_S = 2.0     # leave-one-out reruns of the pipeline, wall time
GUARD_TIMING_S = 0.25    # timing budget per contender per measurement
GUARD_DROP_SLOWER = 2.0  # a contender 2x slower than another on every sample leaves the guard's timing
GROWING_CACHE_WARN = 3   # specializations for calls with an HF cache before the DynamicCache warning
SPECIALIZE_LIMIT = 16    # specializations per optimized model; later new signatures run the model itself
GUARDS = ("measure", "off")
ON_NEW_INPUT = ("specialize", "error")


class InputMismatch(TypeError):
    """A call's inputs do not match any specialization, and none may be made."""


# ---------------------------------------------------------------- signatures

def fast_key(args) -> tuple:
    """The signature of a call with positional tensors and ints only (what
    dynamo's graphs take): one tuple compare per call. Raises AttributeError
    where an argument is anything else."""
    return tuple([a if type(a) is int else (a.shape, a.dtype, a.device, a.stride()) for a in args])


def leaf_key(x):
    if isinstance(x, torch.Tensor):
        return (x.shape, x.dtype, x.device, x.stride())
    try:
        hash(x)
        return (type(x), x)
    except TypeError:
        return (type(x), repr(x))


def call_key(args: tuple, kwargs: dict) -> tuple[tuple, list]:
    """The signature of any call (equal to `fast_key` where that applies) and
    the call's flat inputs, the leaves of `(args, kwargs)`."""
    if not kwargs:
        try:
            return fast_key(args), args
        except AttributeError:
            pass
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (spec, tuple(leaf_key(x) for x in leaves)), leaves


def is_tensor_key(k) -> bool:
    return type(k) is tuple and len(k) == 4 and isinstance(k[1], torch.dtype)


def describe_leaf(k) -> str:
    if type(k) is int:
        return repr(k)
    if is_tensor_key(k):
        shape, dtype, device, stride = k
        s = f"{str(dtype).replace('torch.', '')}{list(shape)}"
        if device.type != "cpu":
            s += f"@{device}"
        if tuple(stride) != tuple(torch.empty(shape, device="meta").stride()):
            s += f" stride {tuple(stride)}"
        return s
    return repr(k[1])


class Described(str):
    def __repr__(self):
        return str(self)


def describe(key: tuple) -> str:
    """A call signature for people: `(float32[4, 16], {'mask': int64[4, 8]})`."""
    if key and isinstance(key[0], pytree.TreeSpec):
        spec, leaves = key
        args, kwargs = pytree.tree_unflatten([Described(describe_leaf(k)) for k in leaves], spec)
        return "(" + ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]) + ")"
    return "(" + ", ".join(describe_leaf(k) for k in key) + ")"


def key_devices(key: tuple) -> set[str]:
    leaves = key[1] if key and isinstance(key[0], pytree.TreeSpec) else key
    return {k[2].type for k in leaves if is_tensor_key(k)}


def unflattener(spec) -> Callable[[Any], Any]:
    """`tree_unflatten(leaves, spec)` with the tree walk done once, up front:
    the per-call cost is the containers' constructors only."""
    if spec is None or spec.is_leaf():
        return lambda out: out
    node = pytree.SUPPORTED_NODES[spec.type].unflatten_fn
    ctx = spec.context
    parts, start = [], 0
    for child in spec.children():
        n = child.num_leaves
        if child.is_leaf():
            parts.append((start, None))
        else:
            parts.append((start, start + n, unflattener(child)))
        start += n
    if all(p[1] is None for p in parts) and spec.type in (tuple, list):
        typ = spec.type
        return lambda out: typ(out)
    if all(p[1] is None for p in parts):
        return lambda out: node(list(out), ctx)

    def run(out):
        return node([out[p[0]] if p[1] is None else p[2](out[p[0]:p[1]]) for p in parts], ctx)
    return run


# ---------------------------------------------------------------- one specialization

@dataclass
class Specialization:
    key: tuple
    gm: torch.fx.GraphModule           # the graph that runs (final, captured; or final where eager runs)
    result: Any                        # the PipelineResult
    record: dict
    fast: Callable                     # (*args) for all-positional-tensor calls
    call: Callable                     # (args, kwargs, flat inputs) for any call
    summary: dict = field(default_factory=dict)


def graph_runner(gm, device: str, out_spec, model=None, state=()) -> Callable:
    """The compiled graph called on a call's flat inputs, its outputs re-nested.
    `state`: buffer names the graph takes as trailing inputs (lifted, see
    graphs/state.py): the model's own buffers are passed on each call, so the
    graph's one write-back lands in them, as eager's would."""
    fn = compile_graph(gm, device)
    # the generated forward itself: nn.Module.__call__'s hook machinery costs microseconds per call
    fn = getattr(fn, "forward", fn)
    unflat = unflattener(out_spec)
    if state:
        graph_fn = fn

        def fn(*flat):
            return graph_fn(*flat, *live_state(model, state))
    if out_spec is None or out_spec.is_leaf():
        return fn
    return lambda *flat: unflat(fn(*flat))


def fresh_inputs(args: tuple, kwargs: dict, vocab) -> Callable[[int], tuple]:
    """Fresh flat inputs for the numerics check and the guard: random like the
    call's (graphs/sample.random_like), token ids (`input_ids`, or a first
    positional integer tensor) over the vocabulary; other integers (positions,
    cache positions, counters) stay within the example's range."""
    paths = [p for p, _ in pytree.tree_flatten_with_path((args, kwargs))[0]]

    def is_ids(path, x) -> bool:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        return isinstance(x, torch.Tensor) and not x.dtype.is_floating_point and x.dtype != torch.bool and \
            (keys[-1:] == ["input_ids"] or keys[:2] == [0, 0])

    def make(seed: int) -> tuple:
        flat = pytree.tree_leaves(random_like((args, kwargs), seed))
        if isinstance(vocab, int):
            g = torch.Generator().manual_seed(seed)
            flat = [torch.randint(0, vocab, x.shape, generator=g, dtype=x.dtype).to(x.device)
                    if is_ids(p, x) else x for p, x in zip(paths, flat)]
        return tuple(flat)
    return make


def specialize(model: torch.nn.Module, args: tuple, kwargs: dict, *, name: str, pipeline, device: str,
               strict: bool, tolerance: float | None, check_numerics: bool, guard: str) -> Specialization:
    t0 = time.perf_counter()
    leaves = pytree.tree_leaves((args, kwargs))
    floats = [t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
    floats += [p.dtype for p in model.parameters() if p.dtype.is_floating_point]   # token-id inputs: the weights'
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    sample = Sample(name, model, args, example_kwargs=kwargs, dtype=floats[0] if floats else torch.float32,
                    device=device, preset="user", input_factory=fresh_inputs(args, kwargs, vocab))
    steps = parse(available_default() if pipeline is None else pipeline)
    gm = capture(model, args, kwargs)
    sample = stateful(sample, gm)        # state the graph writes: lifted, checked and timed on copies only
    state = gm.meta.get("lifted_state") or []
    capture_s = time.perf_counter() - t0
    manager = make_manager(steps, sample, device, strict=strict, tolerance=tolerance,
                           check_numerics=check_numerics)
    result = manager.run(clone(gm), context(sample, device))
    out_spec = gm.meta.get("out_spec")
    run_final = graph_runner(result.gm, device, out_spec, model, state)
    chosen, guard_rec = "final", None
    if guard == "measure":
        chosen, guard_rec, result, run_final = measured_guard(
            sample, gm, result, steps, run_final, out_spec, device=device, strict=strict,
            tolerance=tolerance, check_numerics=check_numerics, model=model, state=state)
    setup_s = time.perf_counter() - t0
    key = call_key(args, kwargs)[0]
    rec = records.build(model=name, preset="user", device=device, pipeline=[str(s) for s in steps],
                        baseline=result.baseline, steps=result.steps, capture_seconds=capture_s,
                        setup_seconds=setup_s)
    rec["signature"] = describe(key)
    rec["guard"] = guard_rec or {"mode": "off", "chosen": "final"}
    if chosen == "eager":
        def fast(*a):
            return model(*a)

        def call(a, kw, flat):
            return model(*a, **kw)
        runs = result.gm
    else:
        fast = run_final if chosen == "final" else graph_runner(result.baseline.snapshot, device, out_spec,
                                                                   model, state)
        runs = result.gm if chosen == "final" else result.baseline.snapshot

        if find_caches((args, kwargs)):      # HF caches given: the caller's object is updated, as eager's
            def call(a, kw, flat):
                return return_given_caches(find_caches((a, kw)), fast(*flat))
        else:
            def call(a, kw, flat):
                return fast(*flat)
    n_user = len(sample.flat_inputs) - len(state)
    rec["writes_state"] = {"inputs": [i for i in sample.writes if i < n_user], "buffers": list(state)}
    summary = {"signature": rec["signature"], "setup_seconds": setup_s, "runs": chosen,
               "rolled_back": [s.name for s in result.steps if s.status != "ok"]}
    return Specialization(key, runs, result, rec, fast, call, summary)


# ---------------------------------------------------------------- the measured guard

def timing_dict(t: timing.Timing) -> dict:
    return {"median_s": t.median_s, "ci_low_s": t.ci_low_s, "ci_high_s": t.ci_high_s, "n": t.n}


def measured_guard(sample: Sample, captured, result, steps, run_final, out_spec, *, device, strict,
                   tolerance, check_numerics, model=None, state=()):
    """Time final vs captured vs eager at the model's own shapes; when the final
    graph does not clearly win, try leaving out each pass that changed the
    graph (within GUARD_BUDGET_S) and drop the one whose absence makes the end
    result faster beyond its CI. Returns (chosen, record, result, run_final).

    Every contender, eager too, runs on the sample's inputs: where the graph
    writes state those are copies (lifted buffers) and each call gets fresh
    copies of what it writes (`sample.writes`), never the user's tensors."""
    t0 = time.perf_counter()
    # the example's values (masks, positions as the model is called) but copies: no contender, eager
    # included, runs on the user's own tensors
    sets = [sample.example_copies(), sample.make_inputs(21)]
    base = compile_graph(result.baseline.snapshot, device)
    fns = {"final": compile_graph(result.gm, device), "captured": base, "eager": sample.reference}

    def timed(contenders):
        return timing.measure_many(contenders, sets, device=device, budget_s=GUARD_TIMING_S, writes=sample.writes,
                                   drop_slower=GUARD_DROP_SLOWER)
    try:
        times = timed(fns)
    except Exception:     # the model refuses the random set (a divisor drawn as 0): the example's values only
        sets = sets[:1]
        times = timed(fns)
    fin = timing.speedup(times["final"], times["eager"])
    vs_cap = timing.speedup(times["final"], times["captured"])
    tried, dropped = [], []
    clear_win = fin[1] > 1.0 and vs_cap[1] > 1.0
    changed = [i for i, s in enumerate(result.steps) if s.status == "ok" and s.changed]
    if not clear_win and len(changed) > 1:
        variants = {}
        for i in changed:
            if time.perf_counter() - t0 > GUARD_BUDGET_S:
                break
            keep = [s for j, s in enumerate(steps) if j != i]
            manager = make_manager(keep, sample, device, strict=strict, tolerance=tolerance,
                                   check_numerics=check_numerics, snapshots=False)
            try:
                variants[i] = manager.run(clone(captured), context(sample, device))
            except Exception:   # under strict a left-out run may fail; it is then no candidate
                continue
            tried.append(steps[i].name)
        if variants:
            fns2 = {"final": fns["final"], **{f"without {i}": compile_graph(v.gm, device)
                                              for i, v in variants.items()}}
            t2 = timed(fns2)
            best, gain = None, None
            for i in variants:
                s = timing.speedup(t2[f"without {i}"], t2["final"])
                if s[1] > 1.0 and (gain is None or s[0] > gain[0]):
                    best, gain = i, s
            if best is not None:
                result = drop_step(result, variants[best], best, gain[0])
                dropped.append(steps[best].name)
                run_final = graph_runner(result.gm, device, out_spec, model, state)
                fns["final"] = compile_graph(result.gm, device)
                times = timed(fns)
    chosen = min(times, key=lambda k: times[k].median_s)
    rec = {"mode": "measure", "chosen": chosen, "timings": {k: timing_dict(t) for k, t in times.items()},
           "speedup_vs_eager": {k: list(timing.speedup(t, times["eager"])) for k, t in times.items()},
           "left_out": tried, "dropped": dropped, "seconds": time.perf_counter() - t0}
    return chosen, rec, result, run_final


def drop_step(full, without, i: int, gain: float):
    """The pipeline result without step i, with step i reported as rolled back."""
    rec = full.steps[i]
    rec.status, rec.changed = "rolled_back", False
    rec.error = f"slower: {(1 / gain - 1) * 100:+.1f}% on the end result (left out by the measured guard)"
    steps = list(without.steps)
    steps.insert(i, rec)
    return type(full)(without.gm, without.baseline, steps)


# ---------------------------------------------------------------- the optimized model

class Optimized:
    """The optimized model: call it like the original.

    `record`: the run record of the specialization used last, with
    `record["specializations"]` summarizing all of them (oldest first).
    `gm`, `result`: that specialization's graph and pipeline result."""

    def __init__(self, build: Callable[[tuple, dict], Specialization], first: Specialization, *,
                 on_new_input: str = "specialize", cache_size: int = CACHE_SIZE,
                 fallback: Callable | None = None, limit: int | None = None):
        self.build, self.on_new_input, self.cache_size = build, on_new_input, cache_size
        self.fallback, self.limit = fallback, SPECIALIZE_LIMIT if limit is None else limit
        self.specs: OrderedDict[tuple, Specialization] = OrderedDict()
        self.history: list[dict] = []
        self.first = first
        self.kwarg_order = list(first.key[0].child(1).context) \
            if first.key and isinstance(first.key[0], pytree.TreeSpec) else None
        self.add(first)

    def add(self, spec: Specialization) -> None:
        self.specs[spec.key] = spec
        self.history.append(spec.summary)
        spec.record["specializations"] = self.history
        while len(self.specs) > self.cache_size:
            self.specs.popitem(last=False)
        self.use(spec)

    def warn_growing(self, args, kwargs) -> None:
        """A DynamicCache grows one token per decode step: every step is a new
        signature, so a new specialization (capture, pipeline, guard: seconds
        each). Said once, at the third such call."""
        if find_caches((args, kwargs)):
            self.cache_specs = getattr(self, "cache_specs", 0) + 1
            if self.cache_specs == GROWING_CACHE_WARN:
                warnings.warn(f"passlab.optimize: {self.cache_specs} specializations for calls with a growing "
                              "cache (each decode step of a DynamicCache is a new shape, each costs a capture "
                              "and the pipeline); use a StaticCache (cache_implementation='static') for "
                              "generation: one specialization for the prefill, one for every decode step",
                              stacklevel=3)

    def use(self, spec: Specialization) -> None:
        self.current = spec
        self.specs.move_to_end(spec.key)
        self.fast_key = spec.key if not (spec.key and isinstance(spec.key[0], pytree.TreeSpec)) else None
        self.fast = spec.fast

    @property
    def record(self) -> dict:
        return self.current.record

    @property
    def gm(self):
        return self.current.gm

    @property
    def result(self):
        return self.current.result

    def __call__(self, *args, **kwargs):
        if not kwargs:
            try:
                if fast_key(args) == self.fast_key:
                    return self.fast(*args)
            except AttributeError:
                pass
        return self.slow(args, kwargs)

    def slow(self, args: tuple, kwargs: dict):
        order = self.kwarg_order
        if kwargs and order and list(kwargs) != order and set(kwargs) == set(order):
            kwargs = {k: kwargs[k] for k in order}      # the example's keyword order
        key, flat = call_key(args, kwargs)
        spec = self.specs.get(key)
        if spec is None:
            expected = self.current.record["signature"]
            devices, want = key_devices(key), key_devices(self.first.key)
            if devices and want and devices != want:
                raise InputMismatch(f"passlab.optimize specialized this model for device "
                                    f"{', '.join(sorted(want))}; called with inputs on {', '.join(sorted(devices))}. "
                                    f"Call passlab.optimize again with device=... for that device.\n"
                                    f"  expected {expected}\n  got      {describe(key)}")
            if self.on_new_input == "error":
                raise InputMismatch(f"inputs do not match the specialization (on_new_input='error'):\n"
                                    f"  expected {expected}\n  got      {describe(key)}\n"
                                    "call with inputs like the example, or pass on_new_input='specialize'")
            if self.fallback is not None and len(self.history) >= self.limit:
                if not getattr(self, "limit_said", False):
                    self.limit_said = True
                    warnings.warn(f"passlab.optimize: {len(self.history)} specializations made, the limit "
                                  f"(SPECIALIZE_LIMIT); calls with a new signature now run the model itself, "
                                  f"unoptimized. Shapes that keep changing (a growing cache) want a static "
                                  f"shape: a StaticCache for generation", stacklevel=3)
                return self.fallback(*args, **kwargs)
            spec = self.build(args, kwargs)
            self.add(spec)
            self.warn_growing(args, kwargs)
        else:
            self.use(spec)
        return spec.call(args, kwargs, flat)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(map(repr, allowed))}")


def optimize(model: torch.nn.Module, example_inputs, pipeline=None, device: str = "cpu", *,
             example_kwargs: dict | None = None, strict: bool = False, tolerance: float | None = None,
             check_numerics: bool = True, guard: str = "measure",
             on_new_input: str = "specialize") -> Optimized:
    """Capture `model` at `example_inputs` (+ `example_kwargs`), run the pipeline
    under the pass manager's checks and (guard="measure") keep what measures
    fastest of final graph, captured graph and eager. Calls with a new input
    signature re-specialize (on_new_input="specialize") or raise InputMismatch
    (on_new_input="error")."""
    check_choice("guard", guard, GUARDS)
    check_choice("on_new_input", on_new_input, ON_NEW_INPUT)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"passlab.optimize needs a torch.nn.Module, got {type(model).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    name = type(model).__name__
    register_caches(model)      # HF cache types are pytree nodes before any call is keyed or flattened

    def build(a, kw):
        return specialize(model, a, kw, name=name, pipeline=pipeline, device=device, strict=strict,
                          tolerance=tolerance, check_numerics=check_numerics, guard=guard)
    return Optimized(build, build(args, kwargs), on_new_input=on_new_input, fallback=model)


# ---------------------------------------------------------------- torch.compile backend

class FrozenParams(torch.nn.Module):
    """Dynamo's graph with its parameter inputs held as parameters again, so the
    captured graph sees weights as constants (get_attr) that passes can fold."""

    def __init__(self, gm: torch.fx.GraphModule, positions: list[int], params: list, n: int):
        super().__init__()
        self.graph_module, self.positions, self.n = gm, positions, n
        self.weights = torch.nn.ParameterList(params)
        self.slot = {p: k for k, p in enumerate(positions)}

    def forward(self, *rest):
        it = iter(rest)
        args = [self.weights[self.slot[i]] if i in self.slot else next(it) for i in range(self.n)]
        return self.graph_module(*args)


def env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None or v == "" else v.strip().lower() not in ("0", "false", "no", "off")


def dynamo_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """torch.compile backend: specializes dynamo's graph on the concrete shapes
    of each call (cached), capturing it to core aten and running the pipeline
    (env PASSLAB_PIPELINE, default the built-in one) with numerics checked
    (PASSLAB_CHECK_NUMERICS=0 turns that off) and the measured guard
    (PASSLAB_GUARD=measure|off); `torch.compile(..., backend="passlab",
    options={"pipeline": ..., "guard": ..., "check_numerics": ...})` sets them
    per compile. `dynamo_backend.last` is the Optimized made last.

    Inference only: with autograd recording it falls back to dynamo's graph."""
    needs_grad = torch.is_grad_enabled() and (
        any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
        or any(p.requires_grad for p in gm.parameters()))
    if needs_grad:
        warnings.warn("passlab backend: autograd is recording; running the graph unoptimized "
                      "(use torch.no_grad() for inference)")
        return gm.forward
    given = dict(kwargs.get("options") or {})
    unknown = set(given) - {"pipeline", "guard", "check_numerics"}
    if unknown:
        raise ValueError(f"passlab backend: unknown option(s) {', '.join(sorted(unknown))}; "
                         "use pipeline, guard, check_numerics")
    guard = given.get("guard") or os.environ.get("PASSLAB_GUARD") or "measure"
    check_choice("PASSLAB_GUARD", guard, GUARDS)
    opts = dict(pipeline=given.get("pipeline", os.environ.get("PASSLAB_PIPELINE")), guard=guard,
                check_numerics=given.get("check_numerics", env_flag("PASSLAB_CHECK_NUMERICS", True)))
    n = len(example_inputs)
    positions = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
    by_params: dict[tuple, Optimized] = {}

    def run(*args):
        params = tuple(args[i] for i in positions)
        pk = tuple(id(p) for p in params)
        opt = by_params.get(pk)
        rest = tuple(a for i, a in enumerate(args) if i not in positions) if positions else args
        with torch.no_grad():
            if opt is None:
                device = next((x.device.type for x in args if isinstance(x, torch.Tensor)), "cpu")
                module = FrozenParams(gm, positions, list(params), n) if positions else gm
                opt = by_params[pk] = optimize(module, rest, device=device, **opts)
                opt.params = params          # keeps the ids above alive, so unique
                dynamo_backend.last = opt
            made = len(opt.history)
            out = opt(*rest)
            if len(opt.history) != made:     # a new specialization
                dynamo_backend.last = opt
        return out if isinstance(out, (tuple, list)) else (out,)
    return run
