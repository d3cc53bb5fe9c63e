"""Benchmark of the pattern passes: each one's contribution alone and inside the full pipeline.

    python -m passlab.tools.bench_patterns [--models transformer,llama,moe,convnet]
                                           [--preset bench] [--budget 3] [--json out/patterns.json]

Per model, one capture and these graphs, timed interleaved in one run
(`runtime.timing.measure_many`, median and 95% CI), so that their ratios are
honest on a noisy shared machine:

- `cleanup`            the reference every other row is compared with
- `cleanup,P`          pattern pass P alone                -> "alone" speedup
- full pipeline        the default pipeline                -> "full" speedup
- full pipeline - P    leave P out                         -> P's "in pipeline" share (full / full-P)

Every graph is checked against eager on fresh inputs before it is timed; the
table prints the pass's own statistics (rewritten count) beside the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

from passlab.graphs import capture, clone, load
from passlab.passes import PassContext, PassManager, TOLERANCE, relative_error
from passlab.passes.manager import VerifyGraph
from passlab.passes.pipeline import available_default, split_items
from passlab.runtime.executor import compile_graph
from passlab.runtime.timing import measure_many

from .record import machine

PATTERNS = ["fold_batchnorm", "fuse_attention", "merge_projections", "fuse_epilogue"]
MODELS = ["transformer", "llama", "moe", "convnet"]


def configurations(full: str) -> dict[str, str]:
    items = split_items(full)
    out = {"cleanup": "cleanup"}
    out.update({f"+{p}": f"cleanup,{p}" for p in PATTERNS})
    out["full"] = full
    out.update({f"full-{p}": ",".join(i for i in items if i.strip() != p) for p in PATTERNS if p in items})
    return out


def bench_model(model: str, preset: str, budget: float, device: str, say) -> dict:
    sample = load(model, preset, device=device)
    say(f"{model}: capturing ({sample.description})")
    gm = capture(sample.module, sample.example_inputs)
    ctx = PassContext(device=device, dtype=sample.dtype, example_inputs=sample.example_inputs, sample=sample)
    check = sample.make_inputs(7)
    with torch.no_grad():
        expected = sample.module(*check)
    fns, info = {}, {}
    for key, pipe in configurations(available_default()).items():
        res = PassManager(pipe, instruments=[VerifyGraph()]).run(clone(gm), ctx)
        fn = compile_graph(res.gm, device)
        with torch.no_grad():
            err = relative_error(fn(*check), expected)
        info[key] = {"pipeline": pipe, "max_error": err, "numerics_ok": err <= TOLERANCE[sample.dtype],
                     "rolled_back": [s.name for s in res.steps if s.status != "ok"],
                     "stats": {s.name: s.stats for s in res.steps if s.name in PATTERNS}}
        fns[key] = fn
    say(f"{model}: timing {len(fns)} graphs, {budget:g} s each at most")
    inputs = [sample.make_inputs(s) for s in (11, 12, 13)]
    times = measure_many(fns, inputs, device=device, budget_s=budget)
    per_s = sample.units_per_forward
    for key, t in times.items():
        info[key].update(t.as_dict(), throughput=per_s / t.median_s, unit=f"{sample.unit}/s")
    base, full = times["cleanup"].median_s, times["full"].median_s
    rows = []
    for p in PATTERNS:
        alone = info.get(f"+{p}")
        rewritten = alone["stats"].get(p, {}).get("rewritten", 0) if alone else 0
        loo = times.get(f"full-{p}")
        rows.append({"pass": p, "rewritten": rewritten,
                     "alone_speedup": base / times[f"+{p}"].median_s,
                     "in_pipeline_speedup": loo.median_s / full if loo else None})
    return {"model": model, "preset": preset, "dtype": str(sample.dtype).replace("torch.", ""),
            "device": device, "unit": f"{sample.unit}/s", "full_speedup": base / full,
            "rows": rows, "graphs": info}


def markdown(results: list[dict]) -> str:
    lines = ["| model | pass | rewritten | alone (vs cleanup) | in full pipeline (full / full minus pass) |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        for row in r["rows"]:
            loo = f"{row['in_pipeline_speedup']:.3f}x" if row["in_pipeline_speedup"] else "-"
            lines.append(f"| {r['model']} ({r['dtype']}) | {row['pass']} | {row['rewritten']} | "
                         f"{row['alone_speedup']:.3f}x | {loo} |")
        lines.append(f"| {r['model']} ({r['dtype']}) | **full pipeline** | | {r['full_speedup']:.3f}x | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m passlab.tools.bench_patterns", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--preset", default="bench", choices=["tiny", "bench"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per graph at most")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    say = lambda m: print(m, flush=True)
    results = [bench_model(m, a.preset, a.budget, a.device, say) for m in a.models.split(",")]
    m = machine()
    print(f"\n{datetime.date.today()}  {m.get('cpu', m)}  threads={torch.get_num_threads()}\n")
    print(markdown(results))
    bad = [(r["model"], k) for r in results for k, g in r["graphs"].items() if not g["numerics_ok"]]
    if bad:
        print(f"\nnumerics outside tolerance: {bad}")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"machine": m, "date": str(datetime.date.today()), "results": results}, f, indent=1,
                      default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
