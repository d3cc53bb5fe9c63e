"""The benchmark: eager, torch.compile (default and freezing), the captured
graph and `passlab.optimize` on the bench samples, `llama_decode` and the model
zoo, each model timed in one interleaved run in its own process; the README's
results table is regenerated from it.

    python -m passlab.tools.bench [--models transformer,llama_decode,zoo:vit] [--no-zoo]
                                  [--quick] [--budget 3] [--ablate] [--out out/bench] [--write-readme]

Eager is the reference: every ratio is over eager's median in the same run,
with a 95% CI from a paired bootstrap over timing rounds. "passlab" is what
`passlab.optimize(model, args)` returns (its measured guard may hand back the
captured graph or eager; the row says which). Setup is what the user waits
for: passlab's optimize() call, each torch.compile's first call, after the
compiler stack both stand on (torch._dynamo, torch.export, Inductor's modules)
was imported and used once (`warm_compiler_stack`, its seconds in the row's
`warmup_seconds`). A model that fails shows as failed with its reason; a
missing roofline bound is "n/a".
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

from . import record as records
from .peers import COMPILE, EAGER, FREEZING
from .progress import Progress
from .table import md_table, render
from .zoo import first_line

MODELS = ["transformer", "llama", "moe", "convnet", "mlp", "llama_decode"]
SERVING = ["serve:llama", "serve:mixtral"]     # serving rows: generate, prefill + decode (tools/serve.py)
# the zoo rows of the default run: the MoE and decoder models the serving story is about, plus an
# encoder and a ViT (`--models zoo` runs every zoo model: about an hour)
ZOO_DEFAULT = ["zoo:mixtral", "zoo:qwen2-moe", "zoo:qwen3-moe", "zoo:mixtral-grouped", "zoo:llama", "zoo:gpt2",
               "zoo:bert", "zoo:vit"]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
MODEL_TIMEOUT_S = 1800
CONTENDERS = [EAGER, COMPILE, FREEZING, "captured", "passlab"]


def zoo_names() -> list[str] | None:
    """The zoo's models as `zoo:NAME`, or None where the zoo is not there."""
    try:
        from passlab.graphs import zoo
    except ImportError:
        return None
    return [f"zoo:{n}" for n in zoo.names()]


# ---------------------------------------------------------------- one model (in its own process)

def measure_model(name: str, preset: str = "bench", *, budget_s: float = 3.0, pipeline: str | None = None,
                  device: str = "cpu", ablate: bool = False, say=None) -> dict:
    """Every contender on one model, timed in one interleaved batch: the row's numbers.
    Where passlab.optimize fails, the row is failed with its reason and still
    holds eager's and torch.compile's numbers."""
    import passlab
    from passlab.graphs import load
    from passlab.runtime import costmodel, timing
    from passlab.runtime.profiles import get_profile
    from .attribution import make_peers, model_call, throughput
    from .optimize import graph_runner

    say = say or (lambda m: None)
    row = {"model": name, "preset": preset, "status": "failed", "error": None, "contenders": {}}
    sample = load(name, preset, device=device)
    row.update(dtype=str(sample.dtype).replace("torch.", ""), unit=f"{sample.unit}/s",
               description=sample.description)
    say(f"{name}: warming torch's compiler stack (shared by passlab and torch.compile)")
    row["warmup_seconds"] = warm_compiler_stack()
    say(f"{name}: passlab.optimize")
    t0 = time.perf_counter()
    try:
        opt = passlab.optimize(sample.module, sample.example_inputs, pipeline=pipeline, device=device,
                               example_kwargs=sample.example_kwargs)
    except Exception as e:  # passlab failing is the row's reason; eager and torch.compile are still measured
        opt, row["error"] = None, f"passlab.optimize: {first_line(e)}"
    inputs = [sample.make_inputs(seed) for seed in (11, 12, 13)]
    info, fns = make_peers(sample, inputs[0], device, say)
    if opt is not None:
        prec = opt.record
        row["setup_seconds"] = prec.get("setup_seconds") or time.perf_counter() - t0
        row["guard"] = (prec.get("guard") or {}).get("chosen")
        row["rolled_back"] = [f"{s['pass']}: {s.get('error')}" for s in prec.get("steps") or []
                              if s.get("status") != "ok"]
        row["launches"] = [prec["baseline"].get("launches"),
                           (prec["steps"][-1] if prec.get("steps") else prec["baseline"]).get("launches")]
        info["captured"] = {"settings": "the captured core-aten graph, op by op (no passes)"}
        info["passlab"] = {"settings": "passlab.optimize(model, args"
                                       + (f", pipeline={pipeline!r})" if pipeline else ")"),
                           "setup_s": row["setup_seconds"]}
        snap = opt.result.baseline.snapshot       # state it writes (a KV cache) is lifted: the model's own passed in
        fns["captured"] = graph_runner(snap, device, None, sample.module, snap.meta.get("lifted_state") or [])
        fns["passlab"] = model_call(sample, opt)
    say(f"{name}: timing {len(fns)} contenders interleaved (budget {budget_s:g}s each)")
    t = timing.measure_many(fns, inputs, device=device, budget_s=budget_s)
    for k in CONTENDERS:
        if k not in info:
            continue
        c = dict(info[k])
        if k in t:
            c.update(throughput(t[k], sample))
            c["speedup_vs_eager"], *c["speedup_vs_eager_ci"] = timing.speedup(t[k], t[EAGER])
        row["contenders"][k] = c
    if opt is None:
        return row
    compiled = [k for k in (COMPILE, FREEZING) if k in t]
    if compiled:
        best = min(compiled, key=lambda k: t[k].median_s)
        row["best_compile"] = best
        row["passlab_vs_best_compile"] = list(timing.speedup(t["passlab"], t[best]))
    try:
        bound = costmodel.roofline_bound_s(opt.gm, get_profile(device), sample.dtype)
        row["bound_s"] = bound
        row["percent_of_bound"] = 100 * bound / t["passlab"].median_s if bound else None
    except Exception as e:  # an estimate we cannot make is "n/a", never 0%
        row["bound_s"], row["percent_of_bound"], row["bound_error"] = None, None, first_line(e)
    if ablate:
        from .runner import run
        say(f"{name}: per-pass contributions (--ablate)")
        r = run(name, preset=preset, pipeline=pipeline, device=device, budget_s=budget_s, ablate=True, progress=say)
        row.update(solo=r.record.get("solo"), ablation=r.record.get("ablation"), players=r.record.get("players"))
    row["status"] = "ok"
    return row


def warm_compiler_stack() -> float:
    """Import and first use of what passlab.optimize and torch.compile both stand on
    (torch._dynamo, torch.export, Inductor's modules): a fresh process pays it once, for
    whichever compiles first. Paid here, before either's setup is timed, so neither
    setup carries it (it went to passlab alone, which the bench runs first). Seconds."""
    import torch
    t0 = time.perf_counter()
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    import torch.export
    torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).run_decompositions()
    return time.perf_counter() - t0


def child(args) -> int:
    """`--one MODEL`: measure one model, write its row as JSON (also on failure)."""
    prog = Progress()
    try:
        if args.one.startswith("serve:"):       # serving rows: generate, prefill + decode (tools/serve.py)
            from . import serve
            row = serve.bench_row(args.one, args.preset, budget_s=args.budget, pipeline=args.pipeline,
                                  ablate=args.ablate, say=prog.message)
        else:
            row = measure_model(args.one, args.preset, budget_s=args.budget, pipeline=args.pipeline,
                                ablate=args.ablate, say=prog.message)
    except Exception as e:  # the row says why; the parent goes on with the next model
        row = {"model": args.one, "preset": args.preset, "status": "failed", "error": first_line(e)}
    row["machine"] = records.machine()
    records.write_json(row, args.row_json)
    return 0


def run_one(model: str, args, out_dir: str, say) -> dict:
    """One model in a fresh process (no compile cache or allocator state shared
    between models; a crash or a hang fails that row only)."""
    path = os.path.join(out_dir, f"{model.replace(':', '_').replace('/', '_')}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, "-m", "passlab.tools.bench", "--one", model, "--row-json", path,
           "--preset", args.preset, "--budget", str(args.budget)]
    if args.pipeline:
        cmd += ["--pipeline", args.pipeline]
    if args.ablate:
        cmd += ["--ablate"]
    try:
        p = subprocess.run(cmd, timeout=args.timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        return {"model": model, "status": "failed", "error": f"timed out after {args.timeout:g} s"}
    if not os.path.exists(path):
        return {"model": model, "status": "failed", "error": f"the measuring process died (exit {rc})"}
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- tables

def tp_cell(c: dict | None, with_ratio: bool = True) -> str:
    if not c:
        return "–"
    if c.get("error"):
        return "failed"
    tp = c.get("throughput")
    if not tp:
        return "–"
    r = c.get("speedup_vs_eager")
    return f"{tp:,.0f}" + (f" ({r:.2f}x)" if with_ratio and r is not None else "")


def ratio_cell(r: list | None) -> str:
    if not r or r[0] is None:
        return "–"
    return f"{r[0]:.2f}x ({r[1]:.2f}–{r[2]:.2f})"


def setup_cell(row: dict) -> str:
    c = row.get("contenders") or {}
    parts = [row.get("setup_seconds"), (c.get(COMPILE) or {}).get("compile_s"),
             (c.get(FREEZING) or {}).get("compile_s")]
    return " / ".join("–" if v is None else f"{v:.1f}" for v in parts)


def bound_cell(row: dict) -> str:
    v = row.get("percent_of_bound")
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.0f}%"


HEADERS = ["model", "dtype", "unit", EAGER, COMPILE, FREEZING, "captured", "passlab",
           "passlab/eager", "passlab/best compile", "setup s (passlab / compile / freezing)", "% of bound"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for row in rows:
        c = row.get("contenders") or {}
        if row.get("status") != "ok":
            if c.get("eager", {}).get("throughput"):       # passlab failed; the peers ran
                out.append([row["model"], row.get("dtype", "–"), row.get("unit", "–"), tp_cell(c.get("eager"), False),
                            tp_cell(c.get(COMPILE)), tp_cell(c.get(FREEZING)), "–",
                            f"failed: {row.get('error')}"] + ["–"] * (len(HEADERS) - 8))
            else:
                out.append([row["model"], row.get("dtype", "–"), row.get("unit", "–"),
                            f"failed: {row.get('error')}"] + ["–"] * (len(HEADERS) - 4))
            continue
        p = c.get("passlab") or {}
        passlab = tp_cell(p, with_ratio=False) + (f" [guard: {row['guard']}]" if row.get("guard") not in
                                                   (None, "passlab", "final") else "")
        out.append([row["model"], row.get("dtype", "?"), row.get("unit", ""), tp_cell(c.get("eager"), False),
                    tp_cell(c.get(COMPILE)), tp_cell(c.get(FREEZING)),
                    tp_cell(c.get("captured")), passlab,
                    ratio_cell([p.get("speedup_vs_eager")] + list(p.get("speedup_vs_eager_ci") or [None, None])),
                    ratio_cell(row.get("passlab_vs_best_compile")), setup_cell(row), bound_cell(row)])
    return out


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def zoo_summary(rows: list[dict]) -> list[list[str]]:
    """Geomean and worst over the zoo's models that ran; failures counted."""
    zoo = [r for r in rows if r["model"].startswith("zoo:")]
    if not zoo:
        return []
    ok = [r for r in zoo if r.get("status") == "ok"]
    label = f"zoo ({len(ok)}/{len(zoo)} ran)"
    if not ok:
        return [[label, "all failed"] + ["–"] * (len(HEADERS) - 2)]
    cols = {"captured/eager": [r["contenders"]["captured"]["speedup_vs_eager"] for r in ok],
            "passlab/eager": [r["contenders"]["passlab"]["speedup_vs_eager"] for r in ok],
            "passlab/best compile": [r["passlab_vs_best_compile"][0] for r in ok if r.get("passlab_vs_best_compile")]}
    comp = {k: [r["contenders"][k]["speedup_vs_eager"] for r in ok if r["contenders"].get(k, {}).get("throughput")]
            for k in (COMPILE, FREEZING)}
    out = []
    for what, f in (("geomean", geomean), ("worst", min)):
        def cell(xs):
            return f"{f(xs):.2f}x" if xs else "–"
        worst_name = ""
        if what == "worst":
            w = min(ok, key=lambda r: r["contenders"]["passlab"]["speedup_vs_eager"])
            worst_name = f" ({w['model']})"
        out.append([f"{label} {what}", "", "", "1.00x", cell(comp[COMPILE]),
                    cell(comp[FREEZING]), cell(cols["captured/eager"]), "",
                    cell(cols["passlab/eager"]) + worst_name, cell(cols["passlab/best compile"]), "", ""])
    return out


def summary_table(rows: list[dict]) -> str:
    return render(HEADERS, table_rows(rows) + zoo_summary(rows))


def contribution_table(row: dict) -> str:
    solo, abl = row.get("solo") or {}, row.get("ablation") or {}
    body = [[p, f"{solo.get(p, float('nan')):.2f}x", f"{abl.get(p, float('nan')):.2f}x"]
            for p in row.get("players") or []]
    return render(["pass", "alone (vs captured)", "in full pipeline (leave-one-out)"], body)


def warmups(rows: list[dict]) -> str:
    w = sorted(r["warmup_seconds"] for r in rows if r.get("warmup_seconds") is not None)
    return f"{w[len(w) // 2]:.1f} s (median)" if w else "n/a"


def markdown(rows: list[dict], machine: dict, date: str, note: str = "") -> str:
    samples = [r for r in rows if not r["model"].startswith("zoo:")]
    zoo = [r for r in rows if r["model"].startswith("zoo:")]
    m = machine or {}
    parts = [f"Measured {date} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, {m.get('threads', '?')} "
             f"threads), torch {m.get('torch', '?')}; bf16 matrix units: {m.get('bf16_matrix_units', '?')}. "
             "Each model ran in its own process, all its contenders timed in one interleaved run (paired "
             "rounds); throughput is the median, ratios are over eager's median in the same run, with the "
             "95% CI of the ratio (paired bootstrap over rounds) in brackets. torch.compile: default "
             "settings (inductor) and `options={\"freezing\": True}`. passlab: what `passlab.optimize(model, "
             "args)` returns (default pipeline, its measured guard; `[guard: ...]` when it handed back the "
             "captured graph or eager). Setup: seconds until the model is ready (passlab.optimize; each "
             "torch.compile's first call), after one warm-up of the compiler stack both use (importing "
             "torch._dynamo, torch.export and Inductor, one tiny export: "
             f"{warmups(rows)} here), which a fresh process pays once for whichever compiles first. "
             "% of bound: the roofline estimate over passlab's measured time."
             + (f" {note}" if note else ""), "", md_table(HEADERS, table_rows(samples))]
    if zoo:
        parts += ["", f"**Model zoo** ({len(zoo)} architectures with random weights, not tuned on):", "",
                  md_table(HEADERS, zoo_summary(zoo)), "", "<details><summary>every zoo model</summary>", "",
                  md_table(HEADERS, table_rows(zoo)), "", "</details>"]
    rolled = [(r["model"], x) for r in rows for x in r.get("rolled_back") or []]
    if rolled:
        parts += ["", "Passes rolled back inside passlab.optimize: "
                  + "; ".join(f"{mdl}: {x.splitlines()[0][:120]}" for mdl, x in rolled)]
    for r in rows:
        if r.get("players"):
            lines = contribution_table(r).splitlines()
            cells = [[c.strip() for c in l.split("  ") if c.strip()] for l in lines[2:]]
            parts += ["", f"**{r['model']}** — each pass alone and in the full pipeline:", "",
                      md_table(["pass", "alone (vs captured)", "in full pipeline (leave-one-out)"], cells)]
    return "\n".join(parts)


def write_readme(text: str, path: str = "README.md", *, start: str = START, end: str = END,
                 heading: str = "## Results") -> None:
    """Replace the README's block between `start` and `end` (appended under `heading` if absent)."""
    with open(path) as f:
        readme = f.read()
    block = f"{start}\n{text}\n{end}"
    if start in readme and end in readme:
        readme = readme[:readme.index(start)] + block + readme[readme.index(end) + len(end):]
    else:
        readme += f"\n{heading}\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(readme)
    os.replace(tmp, path)


# ---------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m passlab.tools.bench",
                                 description="eager, torch.compile (default, freezing), captured and passlab, "
                                             "timed interleaved, one process per model")
    ap.add_argument("--models", default=None,
                    help="comma-separated models (samples, zoo:NAME, or 'zoo' for every zoo model); "
                         f"default: {','.join(MODELS)}, the serving rows and {len(ZOO_DEFAULT)} zoo models")
    ap.add_argument("--no-zoo", action="store_true", help="leave the zoo out of the default set")
    ap.add_argument("--quick", action="store_true", help="a quick look: tiny preset, 0.3 s timing budget")
    ap.add_argument("--preset", default=None, choices=["tiny", "bench"], help="default: bench (tiny with --quick)")
    ap.add_argument("--pipeline", default=None, help="passlab's pipeline (default: the default pipeline)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per contender (default 3)")
    ap.add_argument("--ablate", action="store_true", help="also each pass alone and leave-one-out (slow)")
    ap.add_argument("--timeout", type=float, default=MODEL_TIMEOUT_S, help="seconds per model before it fails")
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--write-readme", action="store_true", help="rewrite README.md's results block")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "bench")
    args.budget = args.budget if args.budget is not None else (0.3 if args.quick else 3.0)
    if args.budget <= 0 or args.timeout <= 0:
        ap.error("--budget and --timeout must be positive")
    return ap, args


def model_list(args, ap) -> tuple[list[str], str]:
    """The models to run and a note for the table (e.g. the zoo missing)."""
    zoo = zoo_names()
    note = ""
    if args.models is None:
        models = list(MODELS) + SERVING
        if not args.no_zoo:
            if zoo is None:
                note = "The model zoo (graphs/zoo.py) is not installed here: no zoo rows."
            else:
                models += [m for m in ZOO_DEFAULT if m in zoo]
        return models, note
    models = []
    for m in (x.strip() for x in args.models.split(",") if x.strip()):
        if m == "zoo":
            if zoo is None:
                note = "The model zoo (graphs/zoo.py) is not installed here: no zoo rows."
            else:
                models += zoo
        else:
            models.append(m)
    if not models and not note:
        ap.error("--models names no model")
    from passlab.graphs import load
    from passlab.graphs import UnknownModelError
    for m in models:      # fail fast on a typo, before minutes of measuring
        if not m.startswith(("zoo:", "hf:")) and ":" not in m:
            try:
                load(m, "tiny")
            except UnknownModelError as e:
                ap.error(str(e))
    return models, note


def publish(rows: list[dict], args, note: str, models: list[str]) -> str:
    """Write bench.json, results.md and (--write-readme) the README block from
    the rows so far: an interrupted benchmark keeps every model it measured."""
    machine = next((r["machine"] for r in rows if r.get("machine")), None) or records.machine()
    date = datetime.date.today().isoformat()
    if args.preset != "bench":
        note = (note + f" Preset {args.preset} (a quick look, not the benchmark).").strip()
    if len(rows) < len(models):
        note = (note + f" Partial: {len(rows)} of {len(models)} models measured so far.").strip()
    serving = [r for r in rows if r["model"].startswith("serve:")]
    text = markdown([r for r in rows if r not in serving], machine, date, note)
    serve_text = ""
    if serving:
        from . import serve
        serve_text = serve.markdown(serving, machine, date)
    records.write_json({"rows": rows, "machine": machine, "date": date, "args": vars(args)},
                       os.path.join(args.out, "bench.json"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + (f"\n\n## Serving\n\n{serve_text}" if serve_text else "") + "\n")
    if args.write_readme:
        if len(serving) < len(rows):             # a serving-only run leaves the main table as it is
            write_readme(text)
        if serve_text:
            write_readme(serve_text, start=serve.START, end=serve.END, heading="## Serving results")
    return text


def main(argv=None) -> int:
    ap, args = parse_args(argv)
    if args.one:
        return child(args)
    models, note = model_list(args, ap)
    os.makedirs(args.out, exist_ok=True)
    prog = Progress()
    rows = []
    t_start = time.perf_counter()
    for i, m in enumerate(models):
        prog.message(f"=== {m} ({i + 1}/{len(models)}, {time.perf_counter() - t_start:.0f} s so far)")
        row = run_one(m, args, args.out, prog.message)
        rows.append(row)
        if m.startswith("serve:") and row.get("status") == "ok":
            from . import serve
            print(serve.text_report(row), flush=True)
        else:
            print(summary_table([row]) if row.get("status") == "ok" else f"{m}: failed: {row.get('error')}",
                  flush=True)
        publish(rows, args, note, models)
    if not rows:
        print(note or "no models", file=sys.stderr)
        return 1
    print(publish(rows, args, note, models))
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
