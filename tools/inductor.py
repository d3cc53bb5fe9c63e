"""What each of torch.compile's own optimizations contributes:
`passlab run MODEL --compiler inductor [--pipeline ITEMS] [--ablate] [--shapley]`.

An item is either an Inductor switch from `SWITCHES` (a named set of
`torch._inductor.config` values, read from torch/_inductor/config.py of
torch 2.13: each has the values it sets when on and when off) or a passlab
pass, which then runs inside torch.compile as Inductor's post-grad custom
pass (`passlab.passes.inductor.InductorPass`). A configuration is a subset
of the items: listed switches not in it are off, Inductor's other settings
keep their defaults. The baseline is every listed item off; step k is the
first k items on; `--ablate` / `--shapley` add leave-one-out, solos and every
subset (exact up to `EXACT_MAX` items; beyond, the prefixes of 2n sampled
orders: `attribution.cyclic_permutations`).

Each configuration is compiled once (`torch.compile` of a wrapper with its
own code object, so dynamo's per-code cache holds one entry per
configuration and no configuration pays another's guards; the options are
also patched into the global config during the first call, since dynamo
reads `freezing` while tracing, before `options=` applies). Inductor's FX
graph cache stays on, keyed per configuration (`TORCHINDUCTOR_CACHE_DIR`
picks its folder), so a second run recompiles little. Every configuration is
checked against eager on fresh inputs, then all are timed in one interleaved
batch with eager (`runtime.timing.measure_many`), and the record is a
passlab run record (CONTRACT.md): steps, CIs, vs-eager, `shapley`,
`interaction`, `interaction_matrix`, plus `inductor` (every configuration's
config, compile seconds, cache hits, output-code kernel count).
"""
from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable
from unittest import mock

import torch

from passlab.graphs import capture, load, stateful
from passlab.passes import TOLERANCE, StepRecord, parse, relative_error
from passlab.passes.inductor import InductorPass
from passlab.passes.pipeline import ITEM, PipelineError, split_items
from passlab.runtime import timing

from . import attribution
from . import record as records
from .peers import compiling

EXACT_MAX = 6          # exact Shapley up to this many items (2^6 = 64 compiles); sampled orders beyond


@dataclass(frozen=True)
class Switch:
    name: str
    help: str
    on: dict
    off: dict
    devices: tuple = ("cpu", "cuda")


# Read from torch/_inductor/config.py (torch 2.13); "on" is Inductor's default where the default is on.
SWITCHES = {s.name: s for s in [
    Switch("fusion", "the scheduler fuses producer/consumer and sibling loops into one kernel "
           "(off: at most one node per kernel, scheduler.can_fuse refuses every pair)",
           {"max_fusion_size": 64}, {"max_fusion_size": 1}),
    Switch("inlining", "pointwise ops are inlined into their consumers while lowering instead of "
           "materialized (off: the realize thresholds at 0, so a pointwise result with several users or "
           "reads is realized into a buffer; a single-read chain into one consumer still inlines, no config "
           "value stops that)",
           {"realize_opcount_threshold": None, "realize_acc_reads_threshold": None, "realize_reads_threshold": 4},
           {"realize_opcount_threshold": 0, "realize_acc_reads_threshold": 0, "realize_reads_threshold": 0}),
    Switch("pattern_matcher", "Inductor's joint-graph and post-grad pattern rewrites (SDPA, GEMM + pointwise, "
           "mkldnn fusions under freezing, ...)", {"pattern_matcher": True}, {"pattern_matcher": False}),
    Switch("freezing", "parameters become constants: constant folding, weight prepacking (inference)",
           {"freezing": True}, {"freezing": False}),
    Switch("epilogue_fusion", "pointwise ops fused into GEMM template epilogues (on CPU only with "
           "max_autotune's C++ GEMM templates)", {"epilogue_fusion": True}, {"epilogue_fusion": False}),
    Switch("cpp_wrapper", "the wrapper that calls the kernels is generated C++ instead of Python",
           {"cpp_wrapper": True}, {"cpp_wrapper": False}),
    Switch("max_autotune", "benchmark GEMM choices at compile time: C++ GEMM templates on CPU "
           "(constant weights need freezing), Triton templates on GPU",
           {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
           {"max_autotune": False}, ("cpu",)),
    Switch("max_autotune_gpu", "max_autotune on a GPU: Triton GEMM templates benchmarked against ATen",
           {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"}, {"max_autotune": False},
           ("cuda",)),
    Switch("cudagraphs", "the compiled graph is replayed as a CUDA graph (launch overhead gone)",
           {"triton.cudagraphs": True}, {"triton.cudagraphs": False}, ("cuda",)),
]}


def device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def switches_for(device: str) -> list[str]:
    return [n for n, s in SWITCHES.items() if device_kind(device) in s.devices]


def describe(s: Switch) -> str:
    """For `passlab list switches`: what it does and the config it sets."""
    fmt = lambda d: ", ".join(f"{k}={v!r}" for k, v in d.items())
    return f"{s.help}. on: {fmt(s.on)}; off: {fmt(s.off)} [{'/'.join(s.devices)}]"


def list_switches() -> dict[str, str]:
    return {n: describe(s) for n, s in SWITCHES.items()}


@dataclass
class Item:
    """One player: an Inductor switch, or passlab passes run inside Inductor."""
    name: str
    switch: Switch | None = None
    steps: list = field(default_factory=list)


def parse_items(text: str | None, device: str) -> list[Item]:
    """`--pipeline` for `--compiler inductor`: switch names and passlab pass
    items (`fuse_attention`, `cleanup`, `fuse_attention(choose=always)`).
    None: every switch that applies to the device."""
    if text is None:
        return [Item(n, SWITCHES[n]) for n in switches_for(device)]
    items = []
    for raw in split_items(text):
        if not raw.strip():
            continue
        m = ITEM.match(raw)
        name = m.group(1) if m else raw.strip()
        if name in SWITCHES:
            s = SWITCHES[name]
            if m.group(2):
                raise PipelineError(f"switch {name!r} takes no options (it sets {describe(s)})")
            if device_kind(device) not in s.devices:
                raise PipelineError(f"switch {name!r} applies to {'/'.join(s.devices)} only, not {device}")
            items.append(Item(name, s))
            continue
        try:
            items.append(Item(raw.strip(), None, parse(raw)))
        except ValueError as e:
            raise PipelineError(f"{e} (--compiler inductor items are Inductor switches: "
                                f"{', '.join(switches_for(device))}; or passlab passes)") from e
    if len({i.name for i in items}) != len(items):
        raise PipelineError(f"an item is listed twice in {text!r}")
    return items


def config_for(items: list[Item], subset: tuple) -> dict:
    """Inductor options of a configuration: each listed switch on or off, and
    the passlab items in it (pipeline order) as one post-grad custom pass."""
    cfg: dict = {}
    for i, it in enumerate(items):
        if it.switch is not None:
            cfg.update(it.switch.on if i in subset else it.switch.off)
    steps = [s for i in sorted(subset) for s in items[i].steps]
    if steps:
        cfg["post_grad_custom_post_pass"] = InductorPass(steps)
    return cfg


def shown(cfg: dict) -> dict:
    return {k: (repr(v) if k.endswith("custom_post_pass") else v) for k, v in cfg.items()}


# ---------------------------------------------------------------- one configuration

@dataclass
class Compiled:
    fn: Callable | None
    compile_s: float
    code: str = ""
    error: str | None = None
    cache_hit: bool = False
    max_error: float | None = None
    numerics_ok: bool | None = None
    passes: list = field(default_factory=list)       # what the passlab items did (InductorPass.runs)

    @property
    def launches(self) -> int | None:
        return launches_in(self.code) if self.code else None


KERNEL_CALL = re.compile(r"^\s*(?:[\w.]+ = )?(?:cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|"
                         r"torch\.ops\.\w+\.\w+(?:\.\w+)?|aoti_torch_\w+)\(|"
                         r"AOTI_TORCH_ERROR_CODE_CHECK\(aoti_torch_(?:cpu|cuda)_\w+\(", re.M)


def normalized(code: str) -> str:
    """Output code without what differs between two compiles of the same
    program (the AOT graph id, cache paths)."""
    code = re.sub(r"^# AOT ID:.*$", "", code, flags=re.M)
    return re.sub(r"/[\w./-]*torchinductor[\w./-]*", "<cache>", code)


def launches_in(code: str) -> int:
    """Kernel calls in Inductor's output code (generated kernels and extern
    calls), a count read from the code, not an estimate."""
    body = code.split("def call(", 1)[-1] if "def call(" in code else code
    return len(KERNEL_CALL.findall(body))


def compile_config(sample, cfg: dict, label: str, inputs: tuple) -> Compiled:
    """torch.compile the sample's model with `cfg`, run it once (the compile),
    and keep the output code. A failure is returned, not raised."""
    from torch._dynamo.utils import counters
    from torch._inductor.graph import GraphLowering
    module = sample.module

    def call(*args, **kwargs):
        return module(*args, **kwargs)
    tag = re.sub(r"\W", "_", label)[:60] or "baseline"
    call.__code__ = call.__code__.replace(co_name=f"passlab_{tag}_{hashlib.sha1(label.encode()).hexdigest()[:8]}")
    codes: list[str] = []
    hits = counters["inductor"]["fxgraph_cache_hit"]
    t0 = time.perf_counter()
    try:
        compiled = attribution.model_call(sample, torch.compile(call, options=cfg))
        with torch.no_grad(), compiling(cfg), \
                mock.patch.object(GraphLowering, "save_output_code", codes.append):
            compiled(*inputs)
    except Exception as e:   # a configuration that does not compile is reported, not fatal
        msg = str(e).strip().splitlines()
        return Compiled(None, time.perf_counter() - t0, error=f"{type(e).__name__}: {msg[0] if msg else ''}")
    p = cfg.get("post_grad_custom_post_pass")
    return Compiled(compiled, time.perf_counter() - t0, normalized("\n".join(codes)),
                    cache_hit=counters["inductor"]["fxgraph_cache_hit"] > hits,
                    passes=list(p.runs) if isinstance(p, InductorPass) else [])


def check(c: Compiled, sample, tol: float) -> None:
    """Numerics against eager on fresh inputs (seed 1234), on copies of what the model writes."""
    from passlab.graphs import fresh_copies
    x = sample.make_inputs(1234)
    with torch.no_grad():
        ref = sample.reference(*fresh_copies(x, sample.writes))
        out = c.fn(*fresh_copies(x, sample.writes))
    c.max_error = relative_error(out, ref)
    c.numerics_ok = c.max_error <= tol


# ---------------------------------------------------------------- the run

class Budget:
    """Stops compiling attribution subsets after `max_configs` compiles or
    `seconds` of compiling (the baseline and the prefixes always compile)."""

    def __init__(self, max_configs: int | None, seconds: float | None):
        self.max_configs, self.seconds = max_configs, seconds
        self.count, self.spent, self.hit = 0, 0.0, None

    def charge(self, seconds: float) -> None:
        self.count += 1
        self.spent += seconds

    def exhausted(self) -> bool:
        if self.max_configs is not None and self.count >= self.max_configs:
            self.hit = f"--max-configs {self.max_configs}"
        elif self.seconds is not None and self.spent >= self.seconds:
            self.hit = f"--compile-budget {self.seconds:g}s"
        return self.hit is not None


def prepare(model, preset: str, pipeline: str | None, device: str, dtype, say) -> tuple:
    """The items and the sample (in eval mode, knowing which inputs it writes)."""
    items = parse_items(pipeline, device)
    if not items:
        raise PipelineError("--compiler inductor: no items (name Inductor switches or passlab passes)")
    sample = model if not isinstance(model, str) else load(model, preset, dtype=dtype, device=device)
    sample.module.eval()
    say(f"{sample.name} ({sample.preset}, {str(sample.dtype).replace('torch.', '')}, {device}): "
        f"Inductor items {', '.join(i.name for i in items)}")
    try:     # only to learn which inputs the model writes in place (they are copied for every run)
        sample = stateful(sample, capture(sample.module, sample.example_inputs, sample.example_kwargs), lift=False)
    except Exception as e:
        say(f"note: torch.export could not capture the model ({type(e).__name__}); assuming it writes no inputs")
    return sample, items


def configuration_order(n: int, *, ablate: bool, shapley: bool) -> tuple[list, list | None, list]:
    """The prefixes (baseline, then the first k items on), the sampled Shapley
    orders (None when exact or not asked), and every subset to compile, prefixes first."""
    prefixes = [tuple(range(k)) for k in range(n + 1)]
    perms = attribution.cyclic_permutations(n) if shapley and n > 1 else None
    extra = attribution.needed_subsets(n, ablate=ablate, shapley=shapley, exact_max=EXACT_MAX,
                                       perms=perms) if (ablate or shapley) else []
    return prefixes, perms, list(dict.fromkeys(prefixes + extra))


@dataclass
class Compilation:
    """What compiling the configurations left, keyed by effective subset
    (the subset less the items rolled back)."""
    compiled: dict = field(default_factory=dict)     # subset -> Compiled (it compiled)
    failed: dict = field(default_factory=dict)       # subset -> error (an attribution subset that did not compile)
    dropped: dict = field(default_factory=dict)      # item index -> why it was rolled back (its prefix failed)
    configs: list = field(default_factory=list)      # the record's `inductor.configs`, one entry per compile

    def effective(self, subset: tuple) -> tuple:
        return tuple(i for i in subset if i not in self.dropped)

    def keep(self, items: list[Item], subset: tuple, eff: tuple, is_prefix: bool, c: Compiled, tol: float,
             say) -> None:
        """File one compiled configuration: a prefix whose last item broke it
        (no compile, or a passlab item changed the numerics) rolls that item back."""
        if is_prefix and subset and (c.fn is None or (c.numerics_ok is False and items[subset[-1]].switch is None)):
            i = subset[-1]
            self.dropped[i] = c.error or f"numerics changed: relative error {c.max_error:.3g} > tolerance {tol:g}"
            say(f"{items[i].name} rolled back: {self.dropped[i]}")
        elif c.fn is None and not subset:
            raise RuntimeError(f"Inductor could not compile the baseline (every item off): {c.error}")
        elif c.fn is None:        # an attribution subset that does not compile: left out, reported
            self.failed[eff] = c.error
        else:
            self.compiled[eff] = c


def compile_checked(sample, cfg: dict, label: str, x0: tuple, tol: float) -> Compiled:
    """One configuration compiled and, where it compiled, checked against eager."""
    c = compile_config(sample, cfg, label, x0)
    if c.fn is not None:
        check(c, sample, tol)
    return c


def config_entry(items: list[Item], eff: tuple, cfg: dict, c: Compiled) -> dict:
    """A configuration as the record's `inductor.configs` lists it."""
    passlab_bad = [f"{st['pass']}: {st['error']}" for r in c.passes for st in r["steps"] if st["status"] != "ok"]
    return {"items": [items[i].name for i in eff], "config": shown(cfg), "compile_s": c.compile_s,
            "cache_hit": c.cache_hit, "launches": c.launches, "error": c.error,
            "max_error": c.max_error, "numerics_ok": c.numerics_ok, "passlab_rolled_back": passlab_bad}


def compile_all(sample, items: list[Item], order: list, prefixes: list, x0: tuple, tol: float,
                budget: Budget, say, bar) -> Compilation:
    """Compile and check every configuration of `order` once (a subset that
    becomes an already-seen one after rollbacks is skipped); attribution subsets
    stop when the budget is reached."""
    done = Compilation()
    for k, subset in enumerate(order):
        eff = done.effective(subset)
        label = "+".join(items[i].name for i in eff) or "(none)"
        if eff in done.compiled or eff in done.failed:
            continue
        is_prefix = subset in prefixes
        if not is_prefix and budget.exhausted():
            say(f"budget reached ({budget.hit}): {len(order) - k} configurations left uncompiled")
            break
        if bar:
            bar(k, len(order), f"compiling {label}")
        cfg = config_for(items, eff)
        c = compile_checked(sample, cfg, label, x0, tol)
        say(f"[{k + 1}/{len(order)}] {label}: {c.compile_s:.1f}s"
            f"{' (FX graph cache hit)' if c.cache_hit else ''}"
            + (f" FAILED {c.error}" if c.error else "")
            + ("" if c.numerics_ok in (None, True) else f" numerics {c.max_error:.2g} > {tol:g}"))
        if not is_prefix:
            budget.charge(c.compile_s)
        done.configs.append(config_entry(items, eff, cfg, c))
        done.keep(items, subset, eff, is_prefix, c, tol, say)
    if bar:
        bar(len(order), len(order), "compiled")
    return done


@dataclass
class Timed:
    """The interleaved timing of the compiled configurations and eager, and
    the numbers each configuration gets from it."""
    sample: object
    device: str
    timings: dict            # contender -> timing.Timing
    fns: dict                # contender -> callable
    contender: dict          # effective subset -> its contender (configurations with one output code share one)
    inputs: list
    recompiled: int          # graphs dynamo compiled while timing (a guard failed)
    memory: dict = field(default_factory=dict)

    def throughput(self, eff: tuple) -> float:
        return attribution.throughput(self.timings[self.contender[eff]], self.sample)["throughput"]

    def numbers(self, eff: tuple, prev: tuple | None = None) -> dict:
        """A configuration's measured numbers (and the speedup over `prev`)."""
        from passlab.graphs import fresh_copies
        key = self.contender[eff]
        d = attribution.timed(self.timings, key, self.sample, None if prev is None else self.contender[prev])
        if key not in self.memory:
            self.memory[key] = timing.peak_memory(self.fns[key], fresh_copies(self.inputs[0], self.sample.writes),
                                                  self.device)
        d["peak_memory_bytes"], d["memory_method"] = self.memory[key]
        d["energy_j_per_unit"] = None
        return d


def time_contenders(sample, compiled: dict, device: str, budget_s: float, say, bar) -> Timed:
    """One timed contender per distinct output code, all interleaved with eager."""
    from torch._dynamo.utils import counters
    timed_key, fns = {}, {attribution.EAGER: sample.reference}
    by_code: dict[str, str] = {}
    for eff, c in compiled.items():
        key = "cfg:" + ("+".join(map(str, eff)) or "none")
        dup = by_code.get(c.code) if c.code else None
        timed_key[eff] = dup or key
        if dup is None:
            fns[key] = c.fn
            if c.code:
                by_code[c.code] = key
    inputs = [sample.make_inputs(seed) for seed in (11, 12, 13)]
    say(f"timing {len(fns)} contenders interleaved with eager (budget {budget_s:g}s each)")
    graphs_before = counters["stats"]["unique_graphs"]
    t = timing.measure_many(fns, inputs, device=device, budget_s=budget_s, writes=sample.writes,
                            progress=None if bar is None else
                            (lambda msg: bar(*[int(v) for v in msg.split()[1].split("/")], "timing")))
    recompiled = counters["stats"]["unique_graphs"] - graphs_before    # a guard that failed while timing
    if recompiled:
        say(f"warning: dynamo compiled {recompiled} graph(s) while timing; those timings include a recompile")
    return Timed(sample, device, t, fns, timed_key, inputs, recompiled)


def step_record(items: list[Item], c: Compiled, name: str, eff: tuple, prev_code, options: dict) -> StepRecord:
    """A kept step: the configuration `eff` against the one before it."""
    stats = {"compile_seconds": round(c.compile_s, 3), "fx_graph_cache_hit": c.cache_hit,
             "kernels_in_output_code": c.launches, "config": shown(config_for(items, eff))}
    passes = [st for r in c.passes for st in r["steps"]]
    for st in passes:      # what the passlab passes did inside Inductor (a cache hit ran none)
        stats[f"{st['pass']}"] = {k: v for k, v in st["stats"].items() if k != "traceback" and k != "declined"}
    return StepRecord(name, options, "ok", c.code != prev_code, None, None, c.launches, None, None,
                      c.max_error, c.numerics_ok, c.compile_s, stats)


def steps_and_numbers(items: list[Item], done: Compilation, timed: Timed) -> tuple:
    """The baseline and one step per item (the first k items on; a rolled-back
    item repeats the step before it), each with its measured numbers; and the
    final configuration."""
    compiled = done.compiled
    baseline = step_record(items, compiled[()], "baseline", (), None, {})
    measured = {"baseline": timed.numbers(())}
    measured["eager"] = {**attribution.timed(timed.timings, attribution.EAGER, timed.sample),
                         "settings": attribution.EAGER_SETTINGS}
    steps, prev_eff = [], ()
    for i, it in enumerate(items):
        options = shown(it.switch.on if it.switch else {"post_grad_custom_post_pass": InductorPass(it.steps)})
        prev = compiled[prev_eff]
        if i in done.dropped:
            rec = StepRecord(it.name, options, "rolled_back", False, done.dropped[i], None, prev.launches,
                             None, None, prev.max_error, prev.numerics_ok, 0.0, {})
            measured[i] = timed.numbers(prev_eff, prev_eff)
        else:
            eff = done.effective(tuple(range(i + 1)))
            rec = step_record(items, compiled[eff], it.name, eff, prev.code, options)
            measured[i] = timed.numbers(eff, prev_eff)
            prev_eff = eff
        steps.append(rec)
    return baseline, steps, measured, prev_eff


def attribution_extra(items: list[Item], order: list, done: Compilation, timed: Timed, *,
                      ablate: bool, shapley: bool, perms: list | None) -> dict:
    """`--ablate` / `--shapley`: the attribution over log throughput of every
    compiled subset, the rollbacks each subset saw, and how Shapley was computed."""
    if not (ablate or shapley):
        return {}
    effective, players = done.effective, [it.name for it in items]
    v = {s: math.log(timed.throughput(effective(s))) for s in order if effective(s) in done.compiled}
    extra = attribution.attribute(v, players, ablate=ablate, shapley=shapley, exact_max=EXACT_MAX, perms=perms)
    extra["subset_rollbacks"] = {"+".join(items[i].name for i in s): [
        {"pass": items[i].name, "status": "rolled_back", "error": done.dropped[i]} for i in s if i in done.dropped]
        for s in order if any(i in done.dropped for i in s) and effective(s) in done.compiled}
    if shapley:
        extra["shapley_method"] = ("exact: every subset" if extra.get("shapley_samples") is None else
                                   f"sampled: {extra['shapley_samples']} orders (cyclic shifts of one random "
                                   "order and their reverses)")
    return extra


def inductor_section(items: list[Item], order: list, done: Compilation, budget: Budget, recompiled: int) -> dict:
    """The record's `inductor`: the items' settings, every configuration compiled, the budget, failures."""
    configs = done.configs
    return {
        "switches": {it.name: {"on": shown(it.switch.on), "off": shown(it.switch.off)} for it in items if it.switch},
        "passlab_items": {it.name: InductorPass(it.steps).pipeline for it in items if not it.switch},
        "baseline": "torch.compile (Inductor) with every listed item off; unlisted settings at Inductor's defaults",
        "configs": configs, "configs_compiled": len(configs),
        "configs_needed": len(order), "compile_seconds_total": sum(c["compile_s"] for c in configs),
        "budget": {"max_configs": budget.max_configs, "compile_budget_s": budget.seconds, "reached": budget.hit},
        "failed_subsets": {"+".join(items[i].name for i in s): e for s, e in done.failed.items()},
        "recompiles_during_timing": recompiled,
        "cache_dir": cache_dir(), "torch": torch.__version__}


def run(model, *, preset: str = "tiny", pipeline: str | None = None, device: str = "cpu", dtype=None,
        ablate: bool = False, shapley: bool = False, budget_s: float = 1.0, max_configs: int | None = None,
        compile_budget_s: float | None = None, tolerance: float | None = None,
        say: Callable[[str], None] | None = None, bar: Callable[[int, int, str], None] | None = None) -> dict:
    """The Inductor attribution run; returns the run record (schema 1)."""
    say = say or (lambda m: None)
    sample, items = prepare(model, preset, pipeline, device, dtype, say)
    tol = tolerance if tolerance is not None else TOLERANCE.get(sample.dtype, 1e-4)
    prefixes, perms, order = configuration_order(len(items), ablate=ablate, shapley=shapley)
    budget = Budget(max_configs, compile_budget_s)
    done = compile_all(sample, items, order, prefixes, sample.make_inputs(11), tol, budget, say, bar)
    timed = time_contenders(sample, done.compiled, device, budget_s, say, bar)
    baseline, steps, measured, final = steps_and_numbers(items, done, timed)
    extra = {"compiler": "inductor",
             **attribution_extra(items, order, done, timed, ablate=ablate, shapley=shapley, perms=perms)}
    extra["inductor"] = inductor_section(items, order, done, budget, timed.recompiled)
    rec = records.build(model=sample.name, preset=sample.preset, device=device, pipeline=[it.name for it in items],
                        baseline=baseline, steps=steps, measured=measured, extra=extra,
                        capture_seconds=done.compiled[()].compile_s, setup_seconds=done.compiled[final].compile_s)
    rec["pipeline_text"] = pipeline
    rec["dtype"] = str(sample.dtype).replace("torch.", "")
    rec["description"] = sample.description
    return rec


def cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as where
        return where()
    except Exception:
        return None
