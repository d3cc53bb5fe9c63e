"""Serving: a Hugging Face causal LM generating, as users run it.

`passlab run hf:ARCH --generate N` (and the serving rows of `make bench`)
times `model.generate(prompt, max_new_tokens=N + 1, do_sample=False)` with a
static cache, prefill plus N decode steps, for each contender in one
interleaved run (paired rounds, the order rotated each round):

- `eager`: the model as it is (static cache, no compile);
- `torch.compile`, `torch.compile(freezing)`: `model.forward = torch.compile(
  model.forward[, options={"freezing": True}])` (inductor; dynamo reads
  `freezing` while tracing, so the first, compiling call runs with inductor's
  config patched too, as the `torch.compile(freezing)` peer of a run does);
- `HF recipe`: Hugging Face's documented recipe, `torch.compile(model.forward,
  mode="reduce-overhead", fullgraph=True)` (no CUDA graphs on CPU);
- `passlab`: the same recipe with `backend="passlab"` (its numerics check and
  measured guard on, as a user gets it).

A timestamp taken as each step's logits arrive (a logits processor) splits
every generate call into time to first token (prefill and the first token)
and decode time; decode tokens/s is batch x N over the decode time. Setup is
each contender's first generate (its compiles). Tokens per joule come from
an energy counter where one is readable (RAPL under /sys/class/powercap,
NVML on NVIDIA GPUs: runtime/timing.EnergyMeter); elsewhere "n/a: no counter
here", never an estimate. Each pass's contribution is measured on the decode
step itself: one token against a filled StaticCache, captured and run through
the pipeline by tools/runner.run (the cache is written in place, so every
check and timed run gets its own copy of it).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch

from passlab.graphs import Sample
from passlab.graphs.errors import UnknownModelError
from passlab.runtime import timing

from .peers import COMPILE, FREEZING, PEER_SETTINGS, compiling

DECODERS = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gemma", "mixtral", "qwen2-moe")
PEERS = (COMPILE, FREEZING, "HF recipe")
NO_COUNTER = "n/a: no counter here"
SIZES = {"tiny": dict(prompt=16), "bench": dict(prompt=128)}
RECOMPILE_LIMIT = 64


# ---------------------------------------------------------------- models

def arch_of(model: str) -> str:
    arch = model.removeprefix("serve:").removeprefix("hf:")
    if arch not in DECODERS:
        raise UnknownModelError(f"--generate needs a Hugging Face decoder, hf:ARCH with ARCH one of "
                                f"{', '.join(DECODERS)}; got {model!r}")
    return arch


def causal_lm(arch: str, preset: str = "tiny", *, new_tokens: int = 8, dtype: torch.dtype = torch.float32,
              device: str = "cpu"):
    """(model, prompt ids): a transformers causal LM at graphs/hf's sizes with
    random weights, its cache on (`use_cache=True`), HF's default attention
    (sdpa), positions for the prompt and `new_tokens`."""
    from passlab.graphs import hf
    tf = hf.require_transformers()
    s = dict(hf.SIZES[preset])
    prompt = SIZES[preset]["prompt"]
    s["seq"] = prompt
    cls, keywords = hf.CONFIGS[arch]
    cfg = getattr(tf, cls)(**keywords(s), attn_implementation="sdpa")
    cfg.use_cache = True
    cfg.max_position_embeddings = max(getattr(cfg, "max_position_embeddings", 0) or 0, prompt + new_tokens + 8)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval().to(device, dtype)
    ids = torch.randint(1, s["vocab"], (s["batch"], prompt), device=device)
    return model, ids


# ---------------------------------------------------------------- generate, timed per token

class Stamps:
    """A logits processor that notes the time each step's logits arrive."""

    def __init__(self, device: str):
        self.times: list[float] = []
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def generate(model, ids, n_new: int, *, max_cache_len: int, stamps: Stamps | None = None):
    """Greedy generation of exactly `n_new` tokens with a static cache."""
    from transformers import LogitsProcessorList
    return model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          cache_implementation="static", max_cache_len=max_cache_len,
                          pad_token_id=0, logits_processor=LogitsProcessorList([stamps] if stamps else []))


def contenders(model, names, pipeline=None) -> dict[str, Callable]:
    """Each contender's forward (model.forward is swapped in before its generate);
    `pipeline`: passlab's (default: the default pipeline)."""
    forward = model.forward
    fwd = {"eager": forward}
    compilers = {COMPILE: lambda: torch.compile(forward, options=PEER_SETTINGS[COMPILE][1]),
                 FREEZING: lambda: torch.compile(forward, options=PEER_SETTINGS[FREEZING][1]),
                 "HF recipe": lambda: torch.compile(forward, mode="reduce-overhead", fullgraph=True),
                 "passlab": lambda: torch.compile(forward, backend="passlab",
                                                  options={"pipeline": pipeline} if pipeline else None)}
    for name in names:
        if name != "eager":
            fwd[name] = compilers[name]()
    return fwd


def first_call(name: str, run: Callable[[], object]) -> dict:
    """A contender's first generate (its compiles): {"setup_s"}, or {"error"} if it fails.
    A torch.compile peer's compiling call runs with its options patched into inductor's config."""
    t0 = time.perf_counter()
    try:
        with compiling(PEER_SETTINGS.get(name, (None, None))[1]):
            run()
        return {"setup_s": time.perf_counter() - t0}
    except Exception as e:  # a contender that fails is reported, not fatal
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def measure_generate(arch: str, preset: str = "tiny", *, new_tokens: int = 8, peers: bool = True,
                     budget_s: float = 3.0, min_rounds: int = 5, device: str = "cpu", dtype=None, pipeline=None,
                     say: Callable[[str], None] | None = None) -> dict:
    """Prefill + `new_tokens` decode steps per contender, interleaved: time to
    first token, decode tokens/s, setup, tokens/J, and whether each
    contender's greedy tokens equal eager's."""
    from passlab.graphs.sample import preset_dtype
    from .optimize import dynamo_backend
    say = say or (lambda m: None)
    dtype = preset_dtype(preset, device, dtype)
    model, ids = causal_lm(arch, preset, new_tokens=new_tokens + 1, dtype=dtype, device=device)
    n_gen = new_tokens + 1                      # the first token comes with the prefill
    cache_len = ids.shape[1] + n_gen
    names = ["eager", *(PEERS if peers else ()), "passlab"]
    fwd = contenders(model, names, pipeline)
    info: dict[str, dict] = {}
    tokens = {}
    torch._dynamo.reset()
    # every contender compiles model.forward's one code object (prefill, decode: two graphs each; dynamo
    # keeps one cache entry per backend): room for all of them, so none falls back to eager unseen
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        for name in names:                      # the first call: setup (compiles), and the tokens
            say(f"generate: {name}: first call (setup)")
            model.forward = fwd[name]
            info[name] = first_call(name, lambda: tokens.update({name: generate(model, ids, n_gen,
                                                                                max_cache_len=cache_len)}))
        if "error" in info["eager"]:
            raise RuntimeError(f"eager generate failed: {info['eager']['error']}")
        live = [n for n in names if "error" not in info[n]]
        ttft = {n: [] for n in live}
        decode = {n: [] for n in live}
        rounds = {n: [] for n in live}
        spent = {n: 0.0 for n in live}
        rnd = 0
        say(f"generate: timing {len(live)} contenders interleaved (budget {budget_s:g}s each)")
        while live and (rnd < min_rounds or any(spent[n] < budget_s for n in live)):
            shift = rnd % len(live)
            for name in live[shift:] + live[:shift]:
                model.forward = fwd[name]
                stamps = Stamps(device)
                t0 = time.perf_counter()
                try:
                    generate(model, ids, n_gen, max_cache_len=cache_len, stamps=stamps)
                except Exception as e:  # a contender failing later (e.g. a recompile) leaves the run
                    if name == "eager":
                        raise
                    info[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                    live.remove(name)
                    continue
                t1 = time.perf_counter()
                ttft[name].append(stamps.times[0] - t0)
                decode[name].append(stamps.times[-1] - stamps.times[0])
                rounds[name].append(rnd)
                spent[name] += t1 - t0
            rnd += 1
        energy = timing.EnergyMeter(device)
        for name in live:
            model.forward = fwd[name]
            info[name].update(numbers(ttft[name], decode[name], rounds[name], ids.shape[0], new_tokens))
            info[name]["same_tokens_as_eager"] = bool(torch.equal(tokens[name], tokens["eager"]))
            info[name]["tokens_per_joule"] = tokens_per_joule(
                energy, lambda: generate(model, ids, n_gen, max_cache_len=cache_len), ids.shape[0] * n_gen)
        for name in live:
            for what, xs in (("ttft", ttft), ("decode", decode)):
                ref, new = as_timing(xs["eager"], rounds["eager"]), as_timing(xs[name], rounds[name])
                info[name][f"{what}_speedup_vs_eager"] = list(timing.speedup(new, ref))
    model.forward = fwd["eager"]
    opt = getattr(dynamo_backend, "last", None)
    return {"model": f"hf:{arch}", "preset": preset, "dtype": str(dtype).replace("torch.", ""),
            "batch": ids.shape[0], "prompt_tokens": ids.shape[1], "new_tokens": new_tokens,
            "cache": "static", "contenders": info, "rounds": rnd,
            "energy_source": timing.EnergyMeter(device).source or NO_COUNTER,
            "passlab_guard": (opt.record.get("guard") or {}).get("chosen") if opt is not None else None,
            "_model": model, "_ids": ids}


def as_timing(xs: list[float], rounds: list[int]) -> timing.Timing:
    med, lo, hi = timing.median_ci(xs)
    return timing.Timing(med, lo, hi, len(xs), "perf_counter (logits-processor stamps)",
                         torch.get_num_threads(), list(xs), list(rounds))


def numbers(ttft: list[float], decode: list[float], rounds: list[int], batch: int, steps: int) -> dict:
    t, d = as_timing(ttft, rounds), as_timing(decode, rounds)
    per_step = d.median_s / steps if steps else float("nan")
    return {"ttft_s": t.median_s, "ttft_ci_s": [t.ci_low_s, t.ci_high_s],
            "decode_s_per_step": per_step,
            "decode_tokens_per_s": batch * steps / d.median_s if d.median_s > 0 else None,
            "decode_tokens_per_s_ci": [batch * steps / d.ci_high_s, batch * steps / d.ci_low_s]
            if d.ci_low_s > 0 else None, "n": t.n}


def tokens_per_joule(energy: timing.EnergyMeter, run: Callable[[], object], tokens: int) -> float | str:
    """Tokens per joule over a few generate calls, read from the energy counter; never an estimate."""
    if not energy.available:
        return NO_COUNTER
    j = energy.joules(lambda: run(), (), reps=3)
    return tokens / j if j and j > 0 else f"n/a: the counter ({energy.source}) did not advance"


# ---------------------------------------------------------------- each pass on the decode step

def decode_sample(model, ids, *, new_tokens: int) -> Sample:
    """The decode step as a sample: one token per sequence against a
    StaticCache filled by an eager prefill of the prompt (our own copy of the
    model's state; the model's call writes the cache in place)."""
    from transformers import StaticCache
    from passlab.graphs.hf import register_caches
    register_caches(model)          # the cache is an input: a pytree node before the sample is flattened
    batch, prompt = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens + 8)
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    kwargs = dict(input_ids=tok, cache=cache, cache_position=torch.tensor([prompt], device=ids.device),
                  use_cache=True)
    vocab = model.config.vocab_size
    return Sample(f"{type(model).__name__} decode step", model, (), example_kwargs=kwargs, unit="tokens",
                  units_per_forward=batch, dtype=next(model.parameters()).dtype, device=str(ids.device),
                  preset="serve", vocab_size=None,
                  description=f"one decode step: {batch} sequences, {prompt} cached tokens (vocab {vocab})")


def pass_contributions(model, ids, *, new_tokens: int, pipeline=None, device: str = "cpu",
                       budget_s: float = 1.0, ablate: bool = False, say=None) -> dict:
    """The pipeline on the decode step with every pass measured (tools/runner.run):
    the run record, whose steps carry each pass's speedup over the one before."""
    from .runner import run
    sample = decode_sample(copy.deepcopy(model), ids, new_tokens=new_tokens)
    return run(sample, pipeline=pipeline, device=device, budget_s=budget_s, ablate=ablate, progress=say).record


# ---------------------------------------------------------------- the run mode

def run_generate(model_name: str, *, preset: str = "tiny", new_tokens: int = 8, peers: bool = False,
                 budget_s: float = 1.0, pipeline=None, device: str = "cpu", dtype=None, ablate: bool = False,
                 say=None) -> dict:
    """`passlab run hf:ARCH --generate N`: the serving record (contenders,
    and the decode step's per-pass record under "decode_step")."""
    from . import record as records
    arch = arch_of(model_name)
    rec = measure_generate(arch, preset, new_tokens=new_tokens, peers=peers, budget_s=budget_s, device=device,
                           dtype=dtype, pipeline=pipeline, say=say)
    model, ids = rec.pop("_model"), rec.pop("_ids")
    (say or (lambda m: None))("decode step: the pipeline, each pass measured")
    try:
        rec["decode_step"] = pass_contributions(model, ids, new_tokens=new_tokens, pipeline=pipeline,
                                                device=device, budget_s=budget_s, ablate=ablate, say=say)
    except Exception as e:  # the generate numbers stand; the per-pass part says why it is missing
        rec["decode_step"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    rec["machine"] = records.machine()
    return rec


def fmt_ratio(r) -> str:
    if not r or r[0] is None or not math.isfinite(r[0]):
        return "–"
    return f"{r[0]:.2f}x ({r[1]:.2f}–{r[2]:.2f})"


HEADERS = ["contender", "TTFT ms", "TTFT vs eager", "decode tok/s", "decode vs eager", "tokens/J",
           "same tokens", "setup s"]


def contender_rows(rec: dict) -> list[list[str]]:
    rows = []
    for name, c in rec["contenders"].items():
        if "error" in c:
            rows.append([name, f"failed: {c['error']}"] + ["–"] * (len(HEADERS) - 2))
            continue
        tpj = c.get("tokens_per_joule")
        rows.append([name, f"{c['ttft_s'] * 1e3:.1f}", fmt_ratio(c.get("ttft_speedup_vs_eager")),
                     f"{c['decode_tokens_per_s']:,.0f}", fmt_ratio(c.get("decode_speedup_vs_eager")),
                     f"{tpj:.1f}" if isinstance(tpj, float) else str(tpj),
                     "yes" if c.get("same_tokens_as_eager") else "NO", f"{c.get('setup_s', 0):.1f}"])
    return rows


def step_rows(rec: dict) -> list[list[str]]:
    """Each pass's measured contribution on the decode step: its speedup over the step before."""
    d = rec.get("decode_step") or {}
    if "error" in d or not d.get("steps"):
        return []
    rows = []
    for s in d["steps"]:
        rows.append([s["pass"], s["status"], "yes" if s.get("changed") else "no",
                     "–" if s.get("speedup_vs_prev") is None else f"{s['speedup_vs_prev']:.2f}x",
                     "–" if s.get("speedup_vs_eager") is None else f"{s['speedup_vs_eager']:.2f}x"])
    return rows


def text_report(rec: dict) -> str:
    from .table import render
    head = (f"{rec['model']} ({rec['preset']}, {rec['dtype']}): batch {rec['batch']}, prompt {rec['prompt_tokens']} "
            f"tokens, {rec['new_tokens']} decode steps, static cache; energy: {rec['energy_source']}")
    out = [head, render(HEADERS, contender_rows(rec))]
    d = rec.get("decode_step") or {}
    if "error" in d:
        out.append(f"decode step: per-pass measurement failed: {d['error']}")
    elif step_rows(rec):
        out += ["decode step, each pass (vs the step before, vs eager):",
                render(["pass", "status", "changed", "vs prev", "vs eager"], step_rows(rec))]
    return "\n".join(out)


# ---------------------------------------------------------------- the bench's serving rows

BENCH_STEPS = {"tiny": 4, "bench": 32}
START, END = "<!-- serve:start -->", "<!-- serve:end -->"


def bench_row(name: str, preset: str, *, budget_s: float, pipeline=None, ablate: bool = False, say=None) -> dict:
    """One serving row of `make bench` (in its own process, like every row)."""
    rec = run_generate(name, preset=preset, new_tokens=BENCH_STEPS[preset], peers=True, budget_s=budget_s,
                       pipeline=pipeline, ablate=ablate, say=say)
    rec.update(model=name, status="ok")
    return rec


def markdown(rows: list[dict], machine: dict | None = None, date: str = "") -> str:
    """The README's serving block: one line per model and contender, each
    pass's contribution on the decode step below."""
    from .table import md_table as md
    m = machine or next((r.get("machine") for r in rows if r.get("machine")), None) or {}
    parts = [f"Measured {date} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, {m.get('threads', '?')} "
             f"threads), torch {m.get('torch', '?')}. `model.generate(prompt, max_new_tokens=N + 1, "
             "do_sample=False)` with a static cache, every contender timed in one interleaved run (paired "
             "rounds); TTFT: prefill and first token; decode: N steps after it, batch x N tokens over their "
             "time; medians, ratios over eager's with a 95% CI (paired bootstrap). Setup: the first generate "
             "(compiles). tokens/J: an energy counter's reading, or n/a where the machine has none.", ""]
    body = []
    for r in rows:
        if r.get("status") != "ok":
            body.append([r["model"], f"failed: {r.get('error')}"] + [""] * len(HEADERS))
            continue
        shape = f"{r['dtype']}, batch {r['batch']}, prompt {r['prompt_tokens']}, N={r['new_tokens']}"
        for row in contender_rows(r):
            body.append([r["model"], shape] + row)
    parts.append(md(["model", "setting"] + HEADERS, body))
    for r in rows:
        steps = step_rows(r) if r.get("status") == "ok" else []
        if steps:
            parts += ["", f"**{r['model']}** decode step, each pass measured (vs the step before it, vs eager):",
                      "", md(["pass", "status", "changed", "vs prev", "vs eager"], steps)]
    return "\n".join(parts)

