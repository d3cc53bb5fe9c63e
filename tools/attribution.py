"""Measurement and attribution: what each pass contributes.

All graphs of a run — PyTorch eager (always: it is the reference), the
captured baseline, the graph after each pass, the peers (torch.compile default
and with freezing) and, on request, the graphs of pass subsets for
leave-one-out and Shapley — are timed *in one interleaved batch* (paired
rounds), so their ratios are measured under the same machine conditions; each
ratio to eager and to the previous step comes with its paired-bootstrap CI.
Capture is a step of its own: the baseline's `speedup_vs_eager` is what
capturing the model cost (or gained).

Contribution is attributed in log-throughput: Shapley values over the
pipeline's items (an alias such as `cleanup` is one item), exact for up to 8
items and sampled by random permutations beyond; `interaction` is the total
log gain minus the sum of each item's solo log gain.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from typing import Callable

import torch
import torch.utils._pytree as pytree

from passlab.graphs import Sample, fresh_copies
from passlab.passes import CheckNumerics, PassContext, PassManager, TOLERANCE
from passlab.passes.manager import Statistics, VerifyGraph
from passlab.passes.pipeline import parse_items
from passlab.runtime import costmodel, timing
from passlab.runtime.executor import compile_graph, fused_kernels
from passlab.runtime.profiles import get_profile

from .peers import EAGER, EAGER_SETTINGS, PEER_SETTINGS, compiling

EXACT_SHAPLEY_MAX = 8


def signature(gm) -> str:
    """Two graphs with the same signature run the same code."""
    return str(gm.graph) + "".join(k.name for k in fused_kernels(gm))


def measure_run(sample: Sample, result, steps, *, device: str = "cpu", budget_s: float = 2.0,
                ablate: bool = False, shapley: bool = False, peers: bool = False,
                pipeline: str | None = None, say: Callable[[str], None] | None = None,
                bar: Callable[[int, int, str], None] | None = None):
    """Returns (measured, extra): `measured` maps "baseline" and each step index
    to its numbers; `extra` holds shapley / interaction / ablation / peers."""
    say = say or (lambda m: None)
    inputs = [sample.make_inputs(seed) for seed in (11, 12, 13)]
    graphs, key_of_step = step_graphs(result)
    players, subsets, subset_rollbacks = None, {}, {}
    if ablate or shapley:
        players = [name for name, _ in parse_items(pipeline)] if pipeline is not None else [str(s) for s in steps]
        player_steps = [st for _, st in parse_items(pipeline)] if pipeline is not None else [[s] for s in steps]
        subsets, subset_rollbacks = subset_graphs(sample, result, player_steps, device, ablate=ablate,
                                                  shapley=shapley, say=say)
    fns, alias = compile_once({**graphs, **{f"subset{k}": g for k, g in subsets.items()}}, device)
    fns[EAGER] = sample.reference
    peer_info = {}
    if peers:
        peer_info, peer_fns = make_peers(sample, inputs[0], device, say)
        fns.update(peer_fns)

    say(f"timing {len(fns)} graphs interleaved (budget {budget_s:g}s each)")
    t = timing.measure_many(fns, inputs, device=device, budget_s=budget_s, writes=sample.writes,
                            progress=None if bar is None else
                            (lambda msg: bar(*[int(x) for x in msg.split()[1].split("/")], "timing")))
    profile = get_profile(device)
    numbers = numbers_of(t, alias, sample, profile, costmodel.materialized_bytes(graphs["baseline"]))
    energy = timing.EnergyMeter(device)
    costs = memory_and_energy(graphs, alias, fns, inputs[0], sample, energy, device)
    measured = step_numbers(result, graphs, key_of_step, alias, numbers, costs)

    extra = {"energy_source": energy.source, "profile": profile}
    if peers:
        extra["peers"] = {name: ({**numbers(name), **info} if name in fns else info)
                          for name, info in peer_info.items()}
    if players:
        extra.update(subset_numbers(players, subsets, subset_rollbacks, numbers, ablate=ablate, shapley=shapley))
    return measured, extra


def step_graphs(result) -> tuple[dict, dict]:
    """({"baseline": graph, "stepI": graph of each step that changed it}, {step index: the key of its graph})."""
    graphs: dict[str, torch.fx.GraphModule] = {"baseline": result.baseline.snapshot}
    key_of_step: dict[int, str] = {}
    prev = "baseline"
    for i, rec in enumerate(result.steps):
        if rec.changed and rec.status == "ok" and rec.snapshot is not None:
            prev = f"step{i}"
            graphs[prev] = rec.snapshot
        key_of_step[i] = prev
    return graphs, key_of_step


def compile_once(graphs: dict, device: str) -> tuple[dict, dict]:
    """Each distinct graph (by `signature`) compiled once: ({key: runner}, {every key: the key it runs as})."""
    fns, dedup = {}, {}
    for key, gm in graphs.items():
        sig = signature(gm)
        if sig not in dedup:
            dedup[sig] = key
            fns[key] = compile_graph(gm, device)
    return fns, {key: dedup[signature(gm)] for key, gm in graphs.items()}


def numbers_of(t: dict, alias: dict, sample: Sample, profile: dict, base_bytes: int) -> Callable:
    """`numbers(key, gm=None, prev=None)`: a timed graph's throughput, speedups
    (vs eager, vs `prev`, with CIs) and, given its graph, its roofline bound
    and the intermediate bytes it saves."""
    def numbers(key: str, gm=None, prev: str | None = None) -> dict:
        d = timed(t, alias.get(key, key), sample, None if prev is None else alias.get(prev, prev))
        if gm is not None:
            tm = t[alias.get(key, key)]
            bound = costmodel.roofline_bound_s(gm, profile, sample.dtype)
            d["bound_s"], d["percent_of_bound"] = bound, 100 * bound / tm.median_s
            d["intermediate_bytes_saved"] = base_bytes - costmodel.materialized_bytes(gm)
        return d
    return numbers


def memory_and_energy(graphs: dict, alias: dict, fns: dict, x: tuple, sample: Sample, energy, device: str) -> dict:
    """{runner key: (peak bytes, how measured, joules per unit or None)}, once per distinct graph."""
    out = {}
    for key in graphs:
        k = alias[key]
        if k not in out:
            once = fresh_copies(x, sample.writes)     # a graph that writes its inputs: copies
            out[k] = timing.peak_memory(fns[k], once, device)
            ej = energy.joules(fns[k], fresh_copies(x, sample.writes), reps=5) if energy.available else None
            out[k] += (None if ej is None else ej / sample.units_per_forward,)
    return out


def step_numbers(result, graphs: dict, key_of_step: dict, alias: dict, numbers: Callable, costs: dict) -> dict:
    """The numbers of the baseline, eager and every step (a step that changed
    nothing has its predecessor's graph, and its numbers)."""
    def with_costs(d: dict, key: str) -> dict:
        d["peak_memory_bytes"], d["memory_method"], d["energy_j_per_unit"] = costs[alias[key]]
        return d
    measured = {"baseline": with_costs(numbers("baseline", graphs["baseline"]), "baseline"),
                "eager": {**numbers(EAGER), "settings": EAGER_SETTINGS}}
    for i in range(len(result.steps)):
        key = key_of_step[i]
        measured[i] = with_costs(numbers(key, graphs[key], prev=key_of_step.get(i - 1, "baseline")), key)
    return measured


def subset_numbers(players: list, subsets: dict, subset_rollbacks: dict, numbers: Callable, *,
                   ablate: bool, shapley: bool) -> dict:
    """Ablation (each player's loss when left out, its gain alone) and/or
    Shapley values with the interaction term (`attribute`), from the log
    throughput of every timed subset of the players."""
    extra = {"subset_rollbacks": {"+".join(players[i] for i in k) or "(none)": bad
                                  for k, bad in subset_rollbacks.items() if bad}}
    v = {k: math.log(numbers(f"subset{k}")["throughput"]) for k in subsets}
    extra.update(attribute(v, players, ablate=ablate, shapley=shapley))
    return extra


def subset_graphs(sample, result, player_steps, device, *, ablate, shapley, say):
    """The graph after each needed subset of players (kept in pipeline order),
    and for each subset the passes rolled back or failed inside it."""
    need = needed_subsets(len(player_steps), ablate=ablate, shapley=shapley)
    tol = TOLERANCE.get(sample.dtype, 1e-4)
    check = CheckNumerics(sample.reference, sample.make_inputs, device, tol, mutated=sample.writes)
    ctx = PassContext(device=device, dtype=sample.dtype, example_inputs=sample.flat_inputs, sample=sample)
    out, rolled_back = {}, {}
    for k, subset in enumerate(sorted(need, key=len)):
        steps = [s for i in subset for s in player_steps[i]]
        say(f"subset {k + 1}/{len(need)}: {'+'.join(str(i) for i in subset) or 'none'}")
        pm = PassManager(steps, instruments=[VerifyGraph(), check, Statistics()])
        res = pm.run(result.baseline.snapshot, ctx)
        out[subset] = res.gm
        rolled_back[subset] = [{"pass": r.name, "status": r.status, "error": r.error}
                               for r in res.steps if r.status != "ok"]
    return out, rolled_back


def permutations(n: int, count: int | None = None, seed: int = 0):
    rng = random.Random(seed)
    count = count or max(32, 4 * n)
    for _ in range(count):
        p = list(range(n))
        rng.shuffle(p)
        yield tuple(p)


def cyclic_permutations(n: int, seed: int = 0) -> list[tuple]:
    """2n orders for a cheap sampled Shapley estimate: the n cyclic shifts of
    one random order and their reverses. Every player stands at every position
    exactly twice, and the prefixes are the cycle's n(n-1) arcs plus the empty
    and full sets: n(n-1)+2 subsets instead of 2^n (44 instead of 128 at n=7)."""
    rng = random.Random(seed)
    base = list(range(n))
    rng.shuffle(base)
    shifts = [tuple(base[(i + k) % n] for i in range(n)) for k in range(n)]
    return shifts + [tuple(reversed(p)) for p in shifts]


def prefixes(perm):
    return [tuple(sorted(perm[:k])) for k in range(len(perm) + 1)]


def needed_subsets(n: int, *, ablate: bool, shapley: bool, exact_max: int = EXACT_SHAPLEY_MAX,
                   perms: list[tuple] | None = None) -> list[tuple]:
    """The subsets of n players an attribution measures, in the order to build
    them: none and all first, then (ablate) each solo and each leave-one-out,
    then (shapley) the prefixes of the sampled orders `perms` (default
    `permutations(n)`) one order at a time, so that a run cut short still holds
    whole orders, and, up to `exact_max` players, every remaining subset."""
    out: dict[tuple, None] = {(): None, tuple(range(n)): None}
    if ablate:
        out.update({(i,): None for i in range(n)})
        out.update({tuple(j for j in range(n) if j != i): None for i in range(n)})
    if shapley:
        if n > exact_max:
            out.update({(i,): None for i in range(n)})
        for p in (perms if perms is not None else [] if n <= exact_max else permutations(n)):
            out.update({c: None for c in prefixes(p)})
        if n <= exact_max:
            out.update({c: None for r in range(n + 1) for c in itertools.combinations(range(n), r)})
    return list(out)


def shapley_values(v: dict[tuple, float], n: int, *, exact_max: int = EXACT_SHAPLEY_MAX,
                   perms: list[tuple] | None = None) -> tuple[list[float] | None, int | None]:
    """Shapley values of v over n players: exact when n <= exact_max and v holds
    every subset; otherwise the mean marginal gain over the orders `perms`
    (default `permutations(n)`) whose prefixes v all holds, and the second
    value is how many orders that was (phi is None when none was whole).
    Either way the values sum to v[all] - v[none] (each order telescopes)."""
    phi = [0.0] * n
    if n <= exact_max and len(v) >= 2 ** n:
        for i in range(n):
            others = [j for j in range(n) if j != i]
            for r in range(n):
                w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
                for s in itertools.combinations(others, r):
                    phi[i] += w * (v[tuple(sorted(s + (i,)))] - v[s])
        return phi, None
    whole = [p for p in (perms if perms is not None else permutations(n)) if all(c in v for c in prefixes(p))]
    if not whole:
        return None, 0
    for p in whole:
        for k, i in enumerate(p):
            phi[i] += v[tuple(sorted(p[:k + 1]))] - v[tuple(sorted(p[:k]))]
    return [x / len(whole) for x in phi], len(whole)


def interaction_matrix(v: dict[tuple, float], players: list[str]) -> dict[str, dict[str, float | None]]:
    """Pairwise interactions in log-throughput: off the diagonal
    v(i,j) - v(i) - v(j) + v(none) (> 0: the pair gains more together than
    apart), on it each player's solo gain v(i) - v(none); None where a subset
    was not measured."""
    n, out = len(players), {}
    for i in range(n):
        row = {}
        for j in range(n):
            keys = [(i,), ()] if i == j else [tuple(sorted((i, j))), (i,), (j,), ()]
            if not all(k in v for k in keys):
                row[players[j]] = None
            elif i == j:
                row[players[j]] = v[(i,)] - v[()]
            else:
                row[players[j]] = v[keys[0]] - v[(i,)] - v[(j,)] + v[()]
        out[players[i]] = row
    return out


def attribute(v: dict[tuple, float], players: list[str], *, ablate: bool, shapley: bool,
              exact_max: int = EXACT_SHAPLEY_MAX, perms: list[tuple] | None = None) -> dict:
    """The record's attribution fields from v (subset of player indices ->
    log-throughput): `ablation` and `solo` (--ablate), `shapley`,
    `shapley_samples` (None: exact), `interaction` (total log gain minus the
    sum of solo log gains) and `interaction_matrix` (--shapley). A value whose
    subsets were not all measured (a budget cut the run short) is None."""
    n, full = len(players), tuple(range(len(players)))
    have = lambda *keys: all(k in v for k in keys)
    extra: dict = {"players": players}
    if ablate:
        drop = lambda i: tuple(j for j in full if j != i)
        extra["ablation"] = {players[i]: math.exp(v[full] - v[drop(i)]) if have(full, drop(i)) else None
                             for i in range(n)}
        extra["solo"] = {players[i]: math.exp(v[(i,)] - v[()]) if have((i,), ()) else None for i in range(n)}
    if shapley:
        phi, samples = shapley_values(v, n, exact_max=exact_max, perms=perms)
        extra["shapley"] = None if phi is None else {players[i]: phi[i] for i in range(n)}
        extra["shapley_samples"] = samples
        extra["total_log_gain"] = v[full] - v[()]
        extra["interaction"] = ((v[full] - v[()]) - sum(v[(i,)] - v[()] for i in range(n))
                                if have(full, (), *[(i,) for i in range(n)]) else None)
        extra["interaction_matrix"] = interaction_matrix(v, players)
    return extra


def throughput(tm: timing.Timing, sample: Sample) -> dict:
    """A timing as throughput in the sample's unit, with its CI and how it was measured."""
    units = sample.units_per_forward
    return {"throughput": units / tm.median_s, "ci_low": units / tm.ci_high_s, "ci_high": units / tm.ci_low_s,
            "unit": f"{sample.unit}/s", "median_s": tm.median_s, "n": tm.n, "threads": tm.threads,
            "timing_method": tm.method}


def timed(t: dict[str, timing.Timing], key: str, sample: Sample, prev: str | None = None) -> dict:
    """One contender's numbers from an interleaved batch `t` (which holds
    EAGER): throughput with its CI, speedup over eager with its paired CI and,
    given `prev`, the CI of its speedup over that contender."""
    tm = t[key]
    d = throughput(tm, sample)
    d["speedup_vs_eager"], *d["speedup_vs_eager_ci"] = timing.speedup(tm, t[EAGER])
    if prev is not None:
        d["speedup_vs_prev_ci"] = list(timing.speedup(tm, t[prev])[1:])
    return d


def model_call(sample: Sample, fn: Callable) -> Callable:
    """`fn` (a compiled copy of the model, or what passlab.optimize returned)
    called on flat graph inputs the way `sample.reference` calls the model:
    as the model's own (args, kwargs)."""
    if not sample.example_kwargs and all(isinstance(x, torch.Tensor) for x in sample.example_inputs):
        return fn
    spec = sample.in_spec

    def call(*flat):
        args, kwargs = pytree.tree_unflatten(list(flat), spec)
        return fn(*args, **kwargs)
    return call


def make_peers(sample: Sample, x: tuple, device: str, say) -> tuple[dict, dict]:
    """PyTorch eager, torch.compile with default settings and torch.compile
    with freezing, each compiled here (its compile time is its first call).

    `options={"freezing": True}` patches inductor's config for that one
    compile only: the later default compile does not freeze."""
    info, fns = {EAGER: {"settings": EAGER_SETTINGS, "compile_s": 0.0}}, {EAGER: sample.reference}
    torch._dynamo.reset()
    for name, (settings, options) in PEER_SETTINGS.items():
        say(f"compiling the {name} peer")
        try:
            compiled = model_call(sample, torch.compile(sample.module, options=options))
            t0 = time.perf_counter()
            with torch.no_grad(), compiling(options):
                compiled(*x)
            info[name] = {"settings": settings, "compile_s": time.perf_counter() - t0}
            fns[name] = compiled
        except Exception as e:  # a peer that cannot compile is reported, not fatal
            info[name] = {"settings": settings,
                          "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return info, fns
