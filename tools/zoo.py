"""`passlab zoo`: every architecture of the model zoo (graphs/zoo.py) through
capture and a pipeline, one row per model: status, passes rolled back,
launches before and after; with `--measure`, speed against eager and
torch.compile, timed interleaved.

A model that cannot be built or captured is `failed` with the reason (for
capture: export's reason and the user's source line), never a traceback; the
command exits 0 when it ran, 2 for bad arguments.
"""
from __future__ import annotations

import sys
import time

from passlab.graphs import CaptureError, capture, load, parse_dtype, zoo


def add_command(sub) -> None:
    p = sub.add_parser("zoo", help="run the model zoo (real architectures, random weights) through a pipeline")
    p.add_argument("--models", default=None, help="comma-separated zoo names (default: all; see `passlab list models`)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--dtype", default=None, help="fp32|bf16|fp16 (default: by preset and machine)")
    p.add_argument("--pipeline", default=None, help="comma-separated passes (default: the default pipeline)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--measure", action="store_true", help="time each model against eager and torch.compile")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per callable (--measure)")
    p.add_argument("--json", default=None, help="write the zoo record here")


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def run_model(name: str, *, preset: str = "tiny", pipeline=None, device: str = "cpu", dtype=None,
              measure: bool = False, budget_s: float = 0.5, say=None) -> dict:
    """One zoo model through capture and `pipeline`: its row of the zoo record."""
    from passlab.passes import parse
    from passlab.passes.pipeline import available_default
    from .runner import context, make_manager
    say = say or (lambda msg: None)
    row = {"name": name, "family": zoo.MODELS[name].family, "status": "failed", "rolled_back": [],
           "error": None, "launches_before": None, "launches_after": None, "nodes_before": None,
           "nodes_after": None, "max_error": None, "build_s": None, "capture_s": None, "pipeline_s": None}
    t0 = time.perf_counter()
    try:
        sample = load(f"zoo:{name}", preset, dtype=dtype, device=device)
    except Exception as e:  # a model the installed libraries cannot build is reported, the zoo goes on
        row["error"] = f"could not build: {first_line(e)}"
        return row
    row["build_s"], row["description"] = time.perf_counter() - t0, sample.description
    t0 = time.perf_counter()
    try:
        gm = capture(sample.module, sample.example_inputs, sample.example_kwargs)
    except CaptureError as e:
        row["error"], row["capture_s"] = str(e), time.perf_counter() - t0
        return row
    except Exception as e:
        row["error"], row["capture_s"] = f"capture: {first_line(e)}", time.perf_counter() - t0
        return row
    row["capture_s"] = time.perf_counter() - t0
    steps = parse(pipeline if pipeline is not None else available_default())
    t0 = time.perf_counter()
    try:
        result = make_manager(steps, sample, device).run(gm, context(sample, device))
    except Exception as e:  # the manager rolls passes back; this is the reference or baseline failing
        row["error"], row["pipeline_s"] = f"pipeline: {first_line(e)}", time.perf_counter() - t0
        return row
    row["pipeline_s"] = time.perf_counter() - t0
    final = result.steps[-1] if result.steps else result.baseline
    row.update(status="ok", launches_before=result.baseline.launches, launches_after=final.launches,
               nodes_before=result.baseline.nodes, nodes_after=final.nodes, max_error=final.max_error,
               baseline_max_error=result.baseline.max_error,
               rolled_back=[s.name for s in result.steps if s.status != "ok"],
               passes=[{"pass": s.name, "status": s.status, "changed": s.changed, "launches": s.launches,
                        "max_error": s.max_error, "error": s.error,
                        "stats": {k: v for k, v in s.stats.items() if isinstance(v, (int, float, str, dict))
                                  and k != "traceback"}} for s in result.steps])
    if result.baseline.numerics_ok is False:
        row["status"], row["error"] = "failed", (f"the captured graph differs from eager: relative error "
                                                 f"{result.baseline.max_error:.3g}")
    elif row["rolled_back"]:
        bad = next(s for s in result.steps if s.status != "ok")
        row["error"] = f"{bad.name}: {bad.error}"
    if measure and row["status"] == "ok":
        say(f"{name}: timing eager, torch.compile and the pipeline's graph")
        try:
            row["timing"] = measure_model(sample, result.gm, device, budget_s, say)
        except Exception as e:
            row["timing"] = {"error": first_line(e)}
    return row


def measure_model(sample, gm, device: str, budget_s: float, say) -> dict:
    """Eager, the torch.compile peers (attribution.make_peers: defaults and
    freezing) and the pipeline's graph, timed in one interleaved batch, each
    called as the model is (its own `(args, kwargs)`); ratios over the
    pipeline's graph with their 95% CIs."""
    import torch.utils._pytree as pytree
    from passlab.runtime import timing
    from passlab.runtime.executor import compile_graph
    from .attribution import make_peers, model_call
    from .peers import COMPILE, EAGER, FREEZING
    inputs = [sample.make_inputs(seed) for seed in (11, 12, 13)]
    info, fns = make_peers(sample, inputs[0], device, say)
    graph = compile_graph(gm, device)
    fns["passlab"] = model_call(sample, lambda *a, **k: graph(*pytree.tree_leaves((a, k))))
    t = timing.measure_many(fns, inputs, device=device, budget_s=budget_s)
    out = {k: {"median_s": v.median_s, "ci_low_s": v.ci_low_s, "ci_high_s": v.ci_high_s, "n": v.n,
               **{f: info.get(k, {}).get(f) for f in ("compile_s", "error") if info.get(k, {}).get(f) is not None}}
           for k, v in t.items()}
    out.update({k: {"error": v["error"]} for k, v in info.items() if "error" in v})
    compiled = [k for k in (COMPILE, FREEZING) if k in t]
    best = min(compiled, key=lambda k: t[k].median_s) if compiled else None
    out["vs_eager"], *out["vs_eager_ci"] = timing.speedup(t["passlab"], t[EAGER])
    out["best_compile"] = best
    out["vs_compile"], *out["vs_compile_ci"] = timing.speedup(t["passlab"], t[best]) if best else (None, None, None)
    out["threads"] = t["passlab"].threads
    return out


def run(names=None, *, preset: str = "tiny", pipeline=None, device: str = "cpu", dtype=None,
        measure: bool = False, budget_s: float | None = None, say=None) -> dict:
    """The zoo record: {"models": [row, ...], "summary": {...}, ...}."""
    from passlab.passes.pipeline import available_default
    from . import record as records
    say = say or (lambda msg: None)
    names = zoo.check_names(names) if names else zoo.names()
    budget = budget_s if budget_s is not None else (0.5 if preset == "tiny" else 1.5)
    rows, interrupted = [], None
    for i, name in enumerate(names, 1):
        say(f"[{i}/{len(names)}] {name}")
        t0 = time.perf_counter()
        try:
            row = run_model(name, preset=preset, pipeline=pipeline, device=device, dtype=dtype, measure=measure,
                            budget_s=budget, say=say)
        except KeyboardInterrupt:   # Ctrl-C: the models done so far are kept
            interrupted = f"during {name}, after {i - 1} of {len(names)} models"
            break
        row["total_s"] = time.perf_counter() - t0
        rows.append(row)
        say(f"[{i}/{len(names)}] {name}: {outcome(row)} ({row['total_s']:.1f}s)")
    ok = [r for r in rows if r["status"] == "ok"]
    from passlab.graphs.sample import preset_dtype
    dt = str(preset_dtype(preset, device, dtype)).replace("torch.", "")
    return {"schema": 1, "kind": "zoo", "preset": preset, "device": device, "dtype": dt,
            "pipeline": pipeline if pipeline is not None else available_default(),
            "machine": records.machine(), "models": rows,
            "summary": {"models": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
                        "clean": sum(1 for r in ok if not r["rolled_back"])},
            "interrupted": interrupted}


def outcome(row: dict) -> str:
    if row["status"] != "ok":
        return "failed: " + (row["error"] or "").splitlines()[0]
    text = f"ok, launches {row['launches_before']} -> {row['launches_after']}"
    if row["rolled_back"]:
        text += f", rolled back: {', '.join(row['rolled_back'])}"
    return text


def table(rec: dict) -> str:
    from .table import fmt, render
    measured = any("timing" in r for r in rec["models"])
    headers = ["model", "family", "status", "launches", "after", "attention", "rolled back", "capture s",
               "max err"]
    if measured:
        headers += ["eager ms", "passlab ms", "compile ms", "vs eager", "vs compile"]   # compile: the faster peer
    rows = []
    for r in rec["models"]:
        row = [r["name"], r["family"], r["status"], fmt(r["launches_before"]), fmt(r["launches_after"]),
               attention(r), short_list(r["rolled_back"]), fmt(r["capture_s"], ".1f"), fmt(r["max_error"], ".0e")]
        if measured:
            t = r.get("timing") or {}
            ms = lambda k: fmt(t[k]["median_s"] * 1e3, ".2f") if k and "median_s" in t.get(k, {}) else "-"
            x = lambda k: "-" if t.get(k) is None else f"{t[k]:.2f}x"
            row += [ms("eager"), ms("passlab"), ms(t.get("best_compile")), x("vs_eager"), x("vs_compile")]
        rows.append(row)
    s = rec["summary"]
    out = render(headers, rows)
    out += (f"\n{s['ok']}/{s['models']} ok, {s['clean']}/{s['models']} with nothing rolled back "
            f"({rec['preset']}, {rec['dtype']}, pipeline {rec['pipeline']})")
    notes = [f"  {r['name']}: {r['error']}" for r in rec["models"] if r.get("error")]
    if notes:
        out += "\nfailed or rolled back:\n" + "\n".join(notes)
    return out


def attention(row: dict) -> str:
    """fuse_attention's count: attention chains rewritten / matched ("-" where it did not run)."""
    st = next((p["stats"] for p in row.get("passes") or [] if p["pass"] == "fuse_attention"), None)
    return "-" if not st or "matched" not in st else f"{st.get('rewritten', 0)}/{st['matched']}"


def short_list(names: list[str], limit: int = 3) -> str:
    if not names:
        return "-"
    return ",".join(names) if len(names) <= limit else ",".join(names[:limit - 1]) + f",+{len(names) - limit + 1}"


def command(args) -> int:
    from . import record as records
    from .exits import INTERRUPTED, BadArguments, bad_args_errors, check_device, unwritable
    from .progress import Progress
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
    check_device(args.device)
    why = args.json and unwritable(args.json)
    if why:
        raise BadArguments(f"cannot write --json {args.json}: {why}")
    try:
        if names:
            zoo.check_names(names)
        if args.pipeline:
            from passlab.passes import parse
            parse(args.pipeline)
        if args.dtype:
            parse_dtype(args.dtype)
    except (ValueError, *bad_args_errors()) as e:
        raise BadArguments(e) from e
    rec = run(names, preset=args.preset, pipeline=args.pipeline, device=args.device, dtype=args.dtype,
              measure=args.measure, budget_s=args.budget, say=Progress().message)
    print(table(rec))
    if args.json:
        records.write_json(rec, args.json)
        print(f"passlab: wrote {args.json}", file=sys.stderr)
    if rec["interrupted"]:
        print(f"passlab: interrupted {rec['interrupted']}", file=sys.stderr)
        return INTERRUPTED
    return 0
