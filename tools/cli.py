"""`passlab` command line: list, show, run, new-pass.

Exit codes: 0 done (also when a pass was rolled back, unless --strict);
1 the run failed (or an output could not be written); 2 bad arguments
(unknown model, pass or device, bad option, an output path that cannot be
written: all found before anything is measured); 130 interrupted (Ctrl-C),
after writing what was measured so far.
"""
from __future__ import annotations

import argparse
import os
import sys

from .exits import (BAD_ARGS, FAILED, INTERRUPTED, BadArguments, bad_args_errors,  # noqa: F401 (shared)
                    check_device, unwritable)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="passlab", description="compiler-pass playground for operation fusion")
    sub = p.add_subparsers(dest="cmd", required=True)

    ls = sub.add_parser("list", help="list models or passes")
    ls.add_argument("what", choices=["models", "passes", "switches"],
                    help="switches: Inductor's optimizations as --compiler inductor items, with the config each sets")

    sh = sub.add_parser("show", help="show a model's captured graph (after some passes)")
    sh.add_argument("model")
    sh.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    sh.add_argument("--dtype", default=None, help="fp32|bf16|fp16 (default: by preset and machine)")
    sh.add_argument("--after", default=None, help="run these passes first, e.g. cleanup,fuse")
    sh.add_argument("--kernels", action="store_true", help="print each fused group's ops and generated source")
    sh.add_argument("--graph", action="store_true", help="print every node: op, dtype, shape and users")
    sh.add_argument("--format", default="text", choices=["text", "svg", "png", "dot", "model-explorer"])
    sh.add_argument("--measure", action="store_true", help="measure each node's time (heat on drawings, node data)")
    sh.add_argument("--diff", default=None, metavar="PASS", help="what PASS removed, added and replaced")
    sh.add_argument("--device", default="cpu")
    sh.add_argument("--depth", type=int, default=None, help="collapse the drawing by module hierarchy")
    sh.add_argument("-o", "--output", default=None, help="file to write (drawings)")
    sh.add_argument("--mlir", action="store_true",
                    help="cross-check: MLIR's elementwise fusion group count beside ours (needs the mlir extra)")

    rn = sub.add_parser("run", help="run a pipeline on a model and measure each pass")
    rn.add_argument("model")
    rn.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    rn.add_argument("--dtype", default=None)
    rn.add_argument("--pipeline", default=None, help="comma-separated passes, e.g. cleanup,fuse(max_nodes=16)")
    rn.add_argument("--device", default="cpu")
    rn.add_argument("--strict", action="store_true", help="stop at the first failing pass (exit 1)")
    rn.add_argument("--tolerance", type=float, default=None, help="numerics tolerance (relative error)")
    rn.add_argument("--json", default=None, help="write the run record here")
    rn.add_argument("--csv", default=None)
    rn.add_argument("--report", default=None, help="write an HTML report into this folder")
    rn.add_argument("--no-measure", dest="measure", action="store_false", help="skip throughput measurement")
    rn.add_argument("--budget", type=float, default=None, help="seconds of timing per measured graph")
    rn.add_argument("--ablate", action="store_true", help="leave-one-out contribution of each pass")
    rn.add_argument("--shapley", action="store_true", help="Shapley values over subsets of passes")
    rn.add_argument("--peers", action="store_true", help="also measure eager and torch.compile")
    rn.add_argument("--node-times", action="store_true",
                    help="measure each node's time in every graph (report: heat, per-node table, per-pass diff)")
    rn.add_argument("--compiler", default="passlab", choices=["passlab", "inductor"],
                    help="inductor: the items are Inductor's own optimizations (passlab list switches) and passlab "
                         "passes run inside torch.compile; each is measured like a pass")
    rn.add_argument("--max-configs", type=int, default=None, metavar="N",
                    help="--compiler inductor: compile at most N attribution configurations (the baseline and "
                         "prefixes always compile); Shapley then uses the whole orders compiled")
    rn.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                    help="--compiler inductor: stop compiling attribution configurations after this many seconds")
    rn.add_argument("--generate", type=int, default=None, metavar="N",
                    help="serving: time model.generate, prefill + N decode steps (hf:ARCH decoders): time to "
                         "first token, decode tokens/s, tokens/J, each pass on the decode step; --peers adds "
                         "torch.compile (default, freezing) and HF's recipe")
    rn.add_argument("--world-size", type=int, default=1)
    rn.add_argument("--link", default=None, help="link preset or rate=..,latency=..")
    rn.add_argument("--timeline", default=None, help="Chrome-trace JSON of the distributed run")
    rn.add_argument("--timeout", type=float, default=None,
                    help="distributed run timeout (s; default 300, 1800 for --preset bench)")

    np_ = sub.add_parser("new-pass", help="scaffold a new pass and its test")
    np_.add_argument("name")
    np_.add_argument("--dir", default=None, help="the checkout to write into (default: the passlab checkout you stand in)")
    np_.add_argument("--plugin", action="store_true",
                     help="scaffold a separately installable package (entry point group passlab.passes) "
                          "in --dir (default: the current folder)")
    np_.add_argument("--rewrite", action="store_true",
                     help="write the pass as a pattern and a replacement (PyTorch functions) for register_rewrite")

    for extra in EXTRA_COMMANDS:
        extra(sub)
    return p


EXTRA_COMMANDS = []  # other tools modules add subcommands here: fn(subparsers)


def main(argv=None) -> int:
    try:
        load_extra_commands()
        parser = build_parser()
        args = parser.parse_args(argv)
        return COMMANDS[args.cmd](args)
    except BadArguments as e:
        print(f"passlab: error: {e}", file=sys.stderr)
        return BAD_ARGS
    except KeyboardInterrupt:   # a command with something measured writes it first (cmd_run)
        print("passlab: interrupted", file=sys.stderr)
        return INTERRUPTED


def cmd_list(args) -> int:
    from .table import render
    if args.what == "models":
        from passlab.graphs import list_models
        items = list_models()
    elif args.what == "switches":
        from .inductor import list_switches
        items = list_switches()
    else:
        from passlab.passes import list_passes
        items = list_passes()
    print(render(["name", "description"], [[k, v] for k, v in items.items()]))
    return 0


def check_outputs(args) -> None:
    """Every asked-for output path is writable, before anything is measured."""
    for flag, path, folder in (("--json", args.json, False), ("--csv", args.csv, False),
                               ("--report", args.report, True), ("--timeline", getattr(args, "timeline", None),
                                                                 False)):
        why = path and unwritable(path, folder)
        if why:
            raise BadArguments(f"cannot write {flag} {path}: {why}")


def cmd_show(args) -> int:
    from . import show
    check_device(args.device, present=False)
    try:
        return show.main(args)
    except bad_args_errors() as e:
        raise BadArguments(e) from e


def cmd_run(args) -> int:
    from .runner import RunFailed, RunInterrupted, run
    from .table import pass_table
    check_device(args.device)
    check_outputs(args)
    if args.generate is not None:
        return cmd_generate(args)
    if args.compiler == "inductor":
        return cmd_inductor(args)
    if args.world_size > 1:
        from . import distributed_run
        return distributed_run.main(args, write_outputs)
    from passlab.passes.pipeline import missing_default
    from .progress import Progress
    missing = missing_default() if args.pipeline is None else {}
    if missing:
        print(f"passlab: warning: the default pipeline runs without {', '.join(missing)}: "
              f"{next(iter(missing.values()))}", file=sys.stderr)
    prog = Progress()
    say = prog.message
    budget = args.budget if args.budget is not None else (1.0 if args.preset == "tiny" else 3.0)
    try:
        r = run(args.model, preset=args.preset, pipeline=args.pipeline, device=args.device, dtype=args.dtype,
                strict=args.strict, tolerance=args.tolerance, measure=args.measure, budget_s=budget,
                ablate=args.ablate, shapley=args.shapley, peers=args.peers, progress=say, bar=prog.bar,
                node_times=args.node_times)
    except bad_args_errors() as e:
        raise BadArguments(e) from e
    except (RunFailed, RunInterrupted) as e:
        if e.record is None:
            raise
        e.record.setdefault("missing_default_passes", missing)
        print(pass_table(e.record))
        failed = write_outputs(args, e.record, e.run)
        if isinstance(e, RunInterrupted):
            print(f"passlab: interrupted {e.record['interrupted']}; the outputs hold what was measured",
                  file=sys.stderr)
            return INTERRUPTED
        print(f"passlab: error: {e} (--strict)", file=sys.stderr)
        return FAILED
    except Exception as e:
        print(f"passlab: error: {type(e).__name__}: {e}", file=sys.stderr)
        return FAILED
    print(pass_table(r.record))
    for node, what in (r.record.get("aten_fallbacks") or {}).items():
        print(f"passlab: note: {node} runs the {what}", file=sys.stderr)
    return FAILED if write_outputs(args, r.record, r) else 0


def cmd_inductor(args) -> int:
    """`passlab run MODEL --compiler inductor`: Inductor's optimizations as items (tools/inductor.py)."""
    from . import inductor
    from .progress import Progress
    from .table import pass_table
    for flag, on in (("--world-size", args.world_size > 1), ("--peers", args.peers), ("--timeline", args.timeline),
                     ("--no-measure", not args.measure), ("--strict", args.strict)):
        if on:
            raise BadArguments(f"{flag} does not apply to --compiler inductor (every configuration there is a "
                               "torch.compile, timed against eager)")
    for flag, v in (("--max-configs", args.max_configs), ("--compile-budget", args.compile_budget)):
        if v is not None and v <= 0:
            raise BadArguments(f"{flag} {v}: give a positive number")
    try:
        inductor.parse_items(args.pipeline, args.device)
        from passlab.graphs import load
        sample = load(args.model, args.preset, dtype=args.dtype, device=args.device)
    except bad_args_errors() as e:
        raise BadArguments(e) from e
    prog = Progress()
    budget = args.budget if args.budget is not None else (0.5 if args.preset == "tiny" else 3.0)
    try:
        rec = inductor.run(sample, preset=args.preset, pipeline=args.pipeline, device=args.device,
                           dtype=args.dtype, ablate=args.ablate, shapley=args.shapley, budget_s=budget,
                           max_configs=args.max_configs, compile_budget_s=args.compile_budget,
                           tolerance=args.tolerance, say=prog.message, bar=prog.bar)
    except Exception as e:
        print(f"passlab: error: {type(e).__name__}: {e}", file=sys.stderr)
        return FAILED
    print(pass_table(rec))
    if rec.get("shapley"):
        inter = rec.get("interaction")
        print("Shapley (log-throughput): " + ", ".join(f"{k} {v:+.3f}" for k, v in rec["shapley"].items())
              + ("" if inter is None else f"; interaction {inter:+.3f}"))
    ind = rec["inductor"]
    print(f"{ind['configs_compiled']} configurations compiled in {ind['compile_seconds_total']:.0f} s"
          + (f" (budget reached: {ind['budget']['reached']})" if ind["budget"]["reached"] else ""))
    return FAILED if write_outputs(args, rec, None) else 0


def cmd_generate(args) -> int:
    """`passlab run hf:ARCH --generate N`: the serving measurement (tools/serve.py)."""
    from . import record as records
    from . import serve
    from .progress import Progress
    if args.generate < 1:
        raise BadArguments(f"--generate {args.generate}: give the number of decode steps, at least 1")
    if args.csv or args.report or args.shapley:
        raise BadArguments("--generate writes --json only (no --csv, --report or --shapley)")
    try:
        serve.arch_of(args.model)
        if args.pipeline:
            from passlab.passes import parse
            parse(args.pipeline)
    except bad_args_errors() as e:
        raise BadArguments(e) from e
    budget = args.budget if args.budget is not None else (0.5 if args.preset == "tiny" else 3.0)
    try:
        rec = serve.run_generate(args.model, preset=args.preset, new_tokens=args.generate, peers=args.peers,
                                 budget_s=budget, pipeline=args.pipeline, device=args.device, dtype=args.dtype,
                                 ablate=args.ablate, say=Progress().message)
    except Exception as e:
        print(f"passlab: error: {type(e).__name__}: {e}", file=sys.stderr)
        return FAILED
    print(serve.text_report(rec))
    if args.json:
        try:
            records.write_json(rec, args.json)
        except Exception as e:
            print(f"passlab: error: could not write {os.path.abspath(args.json)}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            return FAILED
        print(f"passlab: wrote {os.path.abspath(args.json)}", file=sys.stderr)
    return 0


def write_outputs(args, rec: dict, run) -> list[str]:
    """Write every asked-for output (each atomically); one that fails does not
    stop the others. Returns the paths that could not be written."""
    from . import record as records

    def report(path):
        from . import report
        return report.write(rec, run, path)

    failed = []
    for path, write in ((args.json, lambda p: records.write_json(rec, p)),
                        (args.csv, lambda p: records.write_csv(rec, p)), (args.report, report)):
        if not path:
            continue
        try:
            out = write(path) or path
        except Exception as e:   # the others must still be written
            print(f"passlab: error: could not write {os.path.abspath(path)}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            failed.append(path)
            continue
        print(f"passlab: wrote {os.path.abspath(out)}", file=sys.stderr)
    return failed


def cmd_new_pass(args) -> int:
    from . import scaffold
    try:
        for path in scaffold.new_pass(args.name, args.dir, plugin=args.plugin, rewrite=args.rewrite):
            print(f"created {path}")
    except ValueError as e:
        raise BadArguments(e) from e
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "run": cmd_run, "new-pass": cmd_new_pass}


OPTIONAL_COMMANDS = ("simulate", "zoo", "explain")
UNAVAILABLE: dict[str, str] = {}   # subcommand -> why its module did not import


def load_extra_commands():
    """Subcommands from other tools modules (e.g. simulate). One whose module
    does not import is still listed (`passlab --help` says it is unavailable)
    and, when run, says why instead of vanishing."""
    import importlib
    for mod in OPTIONAL_COMMANDS:
        try:
            m = importlib.import_module(f"passlab.tools.{mod}")
        except Exception as e:  # a broken optional command must not take the others down
            UNAVAILABLE[mod] = f"{type(e).__name__}: {e}"
            COMMANDS[mod] = cmd_unavailable
            if add_unavailable not in EXTRA_COMMANDS:
                EXTRA_COMMANDS.append(add_unavailable)
            continue
        if hasattr(m, "add_command") and m.add_command not in EXTRA_COMMANDS:
            EXTRA_COMMANDS.append(m.add_command)
            COMMANDS[mod] = m.command


def add_unavailable(sub) -> None:
    for name, why in UNAVAILABLE.items():
        p = sub.add_parser(name, add_help=False, help=f"(unavailable: {why})")
        p.add_argument("rest", nargs=argparse.REMAINDER)


def cmd_unavailable(args) -> int:
    print(f"passlab: error: `passlab {args.cmd}` is unavailable: importing passlab.tools.{args.cmd} failed "
          f"({UNAVAILABLE[args.cmd]}). Install what it names (an optional dependency) or fix that module, "
          "then run it again", file=sys.stderr)
    return FAILED


if __name__ == "__main__":
    sys.exit(main())
