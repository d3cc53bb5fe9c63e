"""The GPU check: one command that runs passlab's GPU path end to end and
writes what it measured (JSON plus a README-ready markdown table) into one folder.

    python -m passlab.tools.gpu_check --out DIR [--quick]     # on a CUDA machine (make gpu-check)
    python -m passlab.tools.gpu_check --out DIR --cpu-dry-run  # rehearsal here: CPU, tiny presets,
                                                               # Triton printer under TRITON_INTERPRET=1

Parts, each in its own process with its own time budget, so that a failure or
a sticky CUDA error in one still leaves the others' results:

- `env`:     device, driver, torch / triton versions, NVML energy counter.
- `tests`:   `pytest -m gpu` (real Triton compiles, the GEMM-epilogue template
             autotuned with `triton.testing.do_bench`, the fusion and pattern
             pipelines on cuda: tests/test_gpu.py and the other `gpu` tests).
- `kernels`: generated pointwise / reduction kernels' bandwidth as % of the
             device's measured copy bandwidth (`tools/bench_kernels.py`).
- `bench`:   per model (`llama_decode` where it exists, then the bench samples),
             bf16: eager, torch.compile (default settings), the captured graph,
             the optimized graph with and without CUDA-graph capture, in one
             interleaved batch, tokens (units) per joule from NVML for each; then,
             where its share of the budget allows, the per-pass steps
             (`tools/runner.py` `run`).
- `compat`:  (full mode) the CPU-side codegen / fusion / pattern tests under the
             machine's torch and triton, interpreter on.

Time a part leaves unused goes to the next. After every part `gpu_check.json`
and `results.md` in DIR are rewritten, so a run cut short keeps what it had.
Exit 0 when every part finished (tests may have failed: see the report), 1
when a part failed or timed out, 2 for bad arguments or no CUDA device.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

PARTS = ("env", "tests", "kernels", "bench", "compat")
# seconds per part; full mode must end within 8 minutes on an H200
BUDGETS = {"full": {"env": 20, "tests": 120, "kernels": 40, "bench": 240, "compat": 30},
           "quick": {"env": 20, "tests": 75, "kernels": 25, "bench": 120, "compat": 0},
           "dry": {"env": 60, "tests": 120, "kernels": 120, "bench": 240, "compat": 0}}
TEST_TIMEOUT_S = 90      # per test (pytest-timeout), so one hanging test cannot take the part's budget
MIN_MODEL_S = {"full": 35, "quick": 30, "dry": 20}
COMPAT_TESTS = ["tests/test_codegen.py", "tests/test_fuse.py", "tests/test_patterns.py", "tests/test_layout.py"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def models_in_order() -> list[str]:
    """`llama_decode` (where it exists) and llama first: the floors are measured on them."""
    from .bench import MODELS
    first = ["llama_decode", "llama"]
    return first + [m for m in MODELS if m not in first]


# ---------------------------------------------------------------- the parent: parts in child processes

class Log:
    """Everything printed, also kept in DIR/gpu_check.log."""

    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, text: str) -> None:
        line = f"[gpu-check {time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.f.write(line + "\n")

    def raw(self, line: str) -> None:
        sys.stdout.write(line)
        sys.stdout.flush()
        self.f.write(line)


def spawn(cmd: list[str], env: dict, timeout: float, log: Log) -> tuple[int | None, float]:
    """Run `cmd` in its own process group, its output streamed into the log;
    on timeout the whole group (compile workers too) is killed. Returns (rc | None, seconds)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    reader = threading.Thread(target=lambda: [log.raw("    " + line) for line in p.stdout], daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = None
    reader.join(timeout=5)
    return rc, time.time() - t0


def child_env(args, interpret: bool) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1" if interpret else "0")


def run_child(args, work: str, part: str, timeout: float, log: Log, model: str | None = None,
              extra: list[str] = ()) -> dict:
    out = os.path.join(work, f"{part}{'_' + model if model else ''}.json")
    cmd = [sys.executable, "-m", "passlab.tools.gpu_check", "--child", part, "--work", work,
           "--deadline", str(time.time() + timeout), *(["--model", model] if model else []), *extra,
           *(["--cpu-dry-run"] if args.cpu_dry_run else []), *(["--quick"] if args.quick else []),
           *(["--no-compile-peer"] if args.no_compile_peer else [])]
    rc, secs = spawn(cmd, child_env(args, interpret=args.cpu_dry_run), timeout, log)
    res = read_json(out) or {}
    res["seconds"] = round(secs, 1)
    if rc is None:
        res["status"] = "timeout"
        res.setdefault("error", f"timed out after {timeout:.0f}s (budget); what it wrote before is kept")
    elif rc != 0:
        res["status"] = "failed"
        res.setdefault("error", f"exit code {rc} (see gpu_check.log)")
    else:
        res.setdefault("status", "ok")
    return res


def run_pytest(args, out_dir: str, name: str, selection: list[str], interpret: bool, timeout: float,
               log: Log) -> dict:
    if not os.path.isdir(os.path.join(ROOT, "tests")):
        return {"status": "failed", "error": f"no tests folder under {ROOT} (install with pip install -e .)"}
    xml = os.path.join(out_dir, f"{name}.xml")
    import importlib.util
    per_test = [f"--timeout={TEST_TIMEOUT_S}"] if importlib.util.find_spec("pytest_timeout") else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "-o", "junit_family=xunit1", "--continue-on-collection-errors", *per_test, *selection]
    log(f"{name}: {' '.join(cmd[3:])} (TRITON_INTERPRET={'1' if interpret else '0'}, budget {timeout:.0f}s)")
    rc, secs = spawn(cmd, child_env(args, interpret), timeout, log)
    res = junit_summary(xml)
    res.update(command="pytest " + " ".join(selection), seconds=round(secs, 1), exit_code=rc)
    if rc is None:
        res.update(status="timeout", error=f"timed out after {timeout:.0f}s")
    else:
        res["status"] = "ok" if rc in (0, 5) else "tests_failed" if rc == 1 else "failed"   # 5: none collected
    return res


def junit_summary(path: str) -> dict:
    """Counts and failures from pytest's junit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append({"test": name, "message": msg[0][:300] if msg else ""})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            why = (case.find("skipped").get("message") or "").strip()[:120]
            skips[why] = skips.get(why, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skips}


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(obj, path: str) -> None:
    from .record import clean
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(obj), f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    mode = "dry" if args.cpu_dry_run else "quick" if args.quick else "full"
    if not args.cpu_dry_run and not cuda_present():
        print("gpu_check: no CUDA device here. On a CPU machine rehearse with --cpu-dry-run "
              "(CPU tensors, Triton printer under TRITON_INTERPRET=1, tiny presets).", file=sys.stderr)
        return 2
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(unknown)}; parts are {', '.join(PARTS)}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="passlab-gpu-check-")
    log = Log(os.path.join(args.out, "gpu_check.log"))
    budgets = dict(BUDGETS[mode])
    if args.budget:
        budgets = {k: v * args.budget / sum(budgets.values()) for k, v in budgets.items()}
    report = {"mode": mode, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m passlab.tools.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
              "budgets_s": dict(budgets), "parts": {}}
    t_start = time.time()

    def save():
        report["seconds"] = round(time.time() - t_start, 1)
        write_json(report, os.path.join(args.out, "gpu_check.json"))
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(report) + "\n")

    log(f"mode {mode}, parts {','.join(parts)}, budgets {budgets}, output {args.out}")
    todo = [p for p in PARTS if p in parts and budgets.get(p, 0) > 0]
    deadline = time.time()
    for part in todo:
        deadline += budgets[part]
        budgets[part] = deadline - time.time()     # with what earlier parts left unused
        log(f"== part {part} (budget {budgets[part]:.0f}s)")
        if part == "tests":
            sel = ["-m", "gpu", "tests"] if not args.tests else args.tests.split()
            report["parts"]["tests"] = run_pytest(args, args.out, "pytest_gpu", sel, interpret=args.cpu_dry_run,
                                                  timeout=budgets[part], log=log)
        elif part == "compat":
            report["parts"]["compat"] = run_pytest(args, args.out, "pytest_compat",
                                                   ["-m", "not slow and not gpu", *COMPAT_TESTS], interpret=True,
                                                   timeout=budgets[part], log=log)
        elif part == "bench":
            report["parts"]["bench"] = bench_parent(args, work, budgets[part], mode, log, save, report)
        else:
            report["parts"][part] = run_child(args, work, part, budgets[part], log)
        res = report["parts"][part]
        log(f"== part {part}: {res.get('status')} in {res.get('seconds', '?')}s"
            + (f" ({res['error']})" if res.get("error") else ""))
        save()
    bad = [p for p, r in report["parts"].items() if r.get("status") in ("failed", "timeout")]
    log(f"done in {time.time() - t_start:.0f}s; results in {args.out}/results.md and gpu_check.json"
        + (f"; parts not finished: {', '.join(bad)}" if bad else ""))
    print(markdown(report))
    return 1 if bad else 0


def bench_parent(args, work, budget, mode, log, save, report) -> dict:
    """One child per model, each with a share of the part's budget; models that
    no longer fit are listed as skipped."""
    models = args.models.split(",") if args.models else models_in_order()
    out = {"status": "ok", "models": {}, "seconds": 0.0}
    report["parts"]["bench"] = out
    deadline = time.time() + budget
    for i, m in enumerate(models):
        left = deadline - time.time()
        share = max(MIN_MODEL_S[mode], left / (len(models) - i) * (1.6 if m.startswith("llama") else 1.0))
        share = min(share, left)
        if share < MIN_MODEL_S[mode]:
            out["models"][m] = {"status": "skipped", "error": f"bench budget spent ({left:.0f}s left)"}
            continue
        log(f"-- bench {m} ({share:.0f}s)")
        out["models"][m] = run_child(args, work, "bench", share, log, model=m)
        st = out["models"][m]
        log(f"-- bench {m}: {st.get('status')} in {st.get('seconds')}s" + (f" ({st['error']})" if st.get("error") else ""))
        save()
    out["seconds"] = round(budget - max(0.0, deadline - time.time()), 1)
    if any(r.get("status") in ("failed", "timeout") for r in out["models"].values()):
        out["status"] = "partial"
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m passlab.tools.gpu_check",
                                 description="Run passlab's GPU path end to end and record what it measures.")
    ap.add_argument("--out", default="out/gpu-check", help="output folder (JSON, results.md, log, junit XML)")
    ap.add_argument("--quick", action="store_true", help="smaller budgets, no compat tests (about 4 minutes)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="rehearse on CPU: tiny presets, Triton printer on CPU tensors under TRITON_INTERPRET=1")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--models", default=None, help="bench models (default: llama_decode where it exists, "
                                                    "then the bench samples)")
    ap.add_argument("--tests", default=None, help="pytest arguments for the tests part (default: -m gpu tests)")
    ap.add_argument("--budget", type=float, default=None, help="total seconds, shared out over the parts")
    ap.add_argument("--no-compile-peer", action="store_true", help="leave torch.compile out (its compile is slow)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return args


def cuda_present() -> bool:
    import torch
    return torch.cuda.is_available()


# ---------------------------------------------------------------- the children: one part each

def child(args) -> int:
    path = os.path.join(args.work, f"{args.child}{'_' + args.model if args.model else ''}.json")
    res: dict = {}
    try:
        if args.child == "env":
            res = environment(args)
        elif args.child == "kernels":
            res = kernels(args)
        elif args.child == "bench":
            bench_model(args, res, lambda: write_json(res, path))
        else:
            raise ValueError(f"unknown child part {args.child!r}")
    except Exception as e:   # recorded, and the exit code tells the parent
        import traceback
        traceback.print_exc()
        res.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        write_json(res, path)
        return 1
    res.setdefault("status", "ok")
    write_json(res, path)
    return 0


def device_of(args) -> str:
    return "cpu" if args.cpu_dry_run else "cuda"


def environment(args) -> dict:
    import torch
    from . import record
    env = {"machine": record.machine(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "python": platform.python_version(), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError as e:
        env["triton"] = f"missing: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1))
    else:
        env["device"] = f"cpu: {env['machine']['cpu']}"
    from passlab.runtime.timing import EnergyMeter
    meter = EnergyMeter(device_of(args))
    env["energy_counter"] = meter.source
    try:
        import pynvml
        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as e:
        env["driver"] = "-" if not torch.cuda.is_available() else f"unknown ({type(e).__name__}: {e})"
    return env


def kernels(args) -> dict:
    from . import bench_kernels
    if args.cpu_dry_run:
        return bench_kernels.measure("triton", scale=1 / 4096, budget_s=0.01)
    return bench_kernels.measure("cuda", scale=4.0 if not args.quick else 2.0, budget_s=1.0 if not args.quick else 0.5)


def time_left(args) -> float:
    return (args.deadline or math.inf) - time.time()


def bench_model(args, res: dict, save) -> None:
    """One model: (1) the pipeline; (2) eager, torch.compile, the captured graph,
    the optimized graph and the optimized graph under a CUDA graph, timed in one
    interleaved batch, with units per joule; (3) where time is left, the runner's
    record with the per-pass steps. Each part is saved as it lands."""
    import torch
    from passlab.graphs import UnknownModelError, load
    from .runner import run
    device = device_of(args)
    preset, dtype = ("tiny", "bf16") if args.cpu_dry_run else ("bench", "bf16")
    budget = 0.05 if args.cpu_dry_run else 0.5 if args.quick else 1.0
    say = lambda msg: print(f"[{args.model}] {msg}", flush=True)   # noqa: E731
    t0 = time.time()
    try:
        sample = load(args.model, preset, dtype=dtype, device=device)
    except UnknownModelError as e:
        res.update(status="skipped", error=f"not available: {str(e).splitlines()[0][:120]}")
        return
    res.update(model=args.model, preset=preset, dtype=dtype, device=device, unit=sample.unit,
               units_per_forward=sample.units_per_forward, description=sample.description)
    r = run(sample, device=device, measure=False, progress=say)
    res["pipeline"] = {"passes": r.record["pipeline"], "seconds": round(time.time() - t0, 1),
                       "steps": [{k: s.get(k) for k in ("pass", "status", "changed", "numerics_ok", "max_error",
                                                        "launches", "error")} for s in r.record["steps"]]}
    save()
    res["graph"] = graph_numbers(args, sample, r.result.baseline.snapshot, r.gm, budget, say)
    save()
    spent = time.time() - t0
    if time_left(args) < max(5.0, 0.8 * spent):
        res["steps_record"] = {"status": "skipped", "error": f"{time_left(args):.0f}s left in this model's budget, "
                                                             f"the first two steps took {spent:.0f}s"}
        return
    say("per-pass steps (tools/runner.py run; the peers are in the batch above)")
    res["record"] = run(sample, device=device, measure=True, budget_s=budget, progress=say).record
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def executable(gm, device: str):
    """The optimized graph as a callable for `device`. In the dry run the fused
    kernels run the Triton printer's code on the CPU tensors (interpreter)."""
    from passlab.runtime import codegen
    from passlab.runtime.executor import compile_graph, fused_kernels
    if device == "cuda":
        return compile_graph(gm, "cuda")
    for fk in fused_kernels(gm):
        fk._compiled["cpu"] = codegen.runner(fk, "triton")
    return gm


def graph_numbers(args, sample, captured, gm, budget: float, say) -> dict:
    """eager, torch.compile, the captured graph (op by op), the optimized graph and
    the optimized graph under a CUDA graph: timed in one interleaved batch, then
    units per joule for each."""
    import torch
    from passlab.runtime import timing
    device = device_of(args)
    inputs = [sample.make_inputs(seed) for seed in (11, 12, 13)]
    fns, notes = {"eager": sample.module}, {}
    with torch.no_grad():
        ref = sample.module(*inputs[0])
        fns["captured"] = captured
        fns["passlab"] = executable(gm, device)
        err = relative_error(fns["passlab"](*inputs[0]), ref)
        notes["passlab"] = {"max_rel_error_vs_eager": err}
        if not args.no_compile_peer:
            # at most half of what is left: a slow compile must not cost the other numbers of this model
            limit = int(max(10, time_left(args) / 2)) if math.isfinite(time_left(args)) else 0
            previous = signal.signal(signal.SIGALRM, out_of_time)
            signal.alarm(limit)
            try:
                say(f"compiling torch.compile (default settings; at most {limit or 'unlimited'}s)")
                t0 = time.time()
                comp = torch.compile(sample.module)
                comp(*inputs[0])
                fns["torch.compile"] = comp
                notes["torch.compile"] = {"compile_s": round(time.time() - t0, 1)}
            except OutOfTime:
                notes["torch.compile"] = {"error": f"compiling took more than {limit}s of this model's budget"}
            except Exception as e:
                notes["torch.compile"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
        if device == "cuda":
            try:
                g = timing.cuda_graph(fns["passlab"], inputs[0])
                fns["passlab+cuda_graph"] = g
                g()
                torch.cuda.synchronize()
            except Exception as e:
                notes["passlab+cuda_graph"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        else:
            notes["passlab+cuda_graph"] = {"skipped": "no CUDA device: capture needs one"}
    say(f"timing {', '.join(fns)} interleaved")
    # a captured graph replays on its static inputs: everyone gets the same input set here
    t = timing.measure_many(fns, inputs[:1], device=device, budget_s=max(budget, 0.05) * 2)
    meter = timing.EnergyMeter(device)
    out = {"energy_source": meter.source, "timing_method": next(iter(t.values())).method}
    for name, fn in fns.items():
        tm = t[name]
        d = {"median_s": tm.median_s, "ci_low_s": tm.ci_low_s, "ci_high_s": tm.ci_high_s, "n": tm.n,
             "throughput": sample.units_per_forward / tm.median_s, "unit": f"{sample.unit}/s"}
        if meter.available:
            reps = max(5, int(math.ceil((0.2 if args.cpu_dry_run or args.quick else 1.0) / tm.median_s)))
            j = meter.joules(fn, inputs[0], reps)
            d["joules_per_forward"] = j
            d["units_per_joule"] = sample.units_per_forward / j if j else None
        out[name] = {**d, **notes.get(name, {})}
    for name, note in notes.items():
        out.setdefault(name, note)
    return out


class OutOfTime(Exception):
    """A step ran past the share of the budget it was given."""


def out_of_time(signum, frame):
    raise OutOfTime()


def relative_error(out, ref) -> float:
    import torch
    import torch.utils._pytree as pytree
    worst = 0.0
    for o, r in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            o, r = o.double(), r.double()
            worst = max(worst, float((o - r).abs().max()) / max(float(r.abs().max()), 1e-6))
    return worst


# ---------------------------------------------------------------- the report

def markdown(report: dict) -> str:
    parts = report["parts"]
    env = parts.get("env", {})
    lines = [f"GPU check ({report['mode']}), {report['started']}: "
             f"{env.get('device', '?')}, driver {env.get('driver', '?')}, torch {env.get('torch', '?')} "
             f"(CUDA {env.get('cuda_runtime', '-')}), triton {env.get('triton', '?')}, "
             f"energy counter {env.get('energy_counter') or 'none'}; {report.get('seconds', '?')}s in all.", ""]
    for name in ("tests", "compat"):
        t = parts.get(name)
        if t:
            lines.append(f"- `{t.get('command', name)}`: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                         f"{t.get('skipped', 0)} skipped ({t.get('status')}, {t.get('seconds', '?')}s)"
                         + (f"; {t['error']}" if t.get("error") else ""))
            lines += [f"  - FAILED `{f['test']}`: {f['message']}" for f in t.get("failures", [])[:20]]
    bench = (parts.get("bench") or {}).get("models", {})
    rows, steps = [], []
    for m, r in bench.items():
        g = r.get("graph") or {}
        e = g.get("eager") or {}
        cells = [m, r.get("dtype", "-"), (r.get("unit") or "-") + "/s"]
        for k in ("eager", "torch.compile", "captured", "passlab", "passlab+cuda_graph"):
            cells.append(cell(g.get(k), e))
        cells.append(" / ".join(per_joule(g.get(k)) for k in ("eager", "torch.compile", "passlab",
                                                            "passlab+cuda_graph")))
        cells.append(r.get("status", "?") + (f": {r['error'][:60]}" if r.get("error") else ""))
        rows.append(cells)
        rec = r.get("record")
        if rec:
            base = rec["baseline"]
            srows = [["captured (unfused)", f"{base.get('throughput', 0):,.0f}", "-", str(base.get("launches")), "ok"]]
            srows += [[s["pass"], f"{s.get('throughput') or 0:,.0f}", f"{s.get('speedup_vs_prev') or 0:.2f}x",
                       str(s.get("launches")), s.get("status", "?")] for s in rec["steps"]]
            steps += ["", f"**{m}** per pass ({base.get('unit', '')}):", "",
                      md_table(["step", "throughput", "vs previous", "launches", "status"], srows)]
    if rows:
        lines += ["", md_table(["model", "dtype", "unit", "eager", "torch.compile", "captured", "passlab", "passlab + CUDA graph",
                                 "units/J (eager / compile / passlab / +graph)", "status"], rows)]
    lines += steps
    k = parts.get("kernels") or {}
    if k.get("kernels"):
        krows = [[r["kernel"], f"{r['median_s'] * 1e6:.1f}", f"{r['gb_per_s']:.0f}", f"{r['percent_of_copy']:.0f}%",
                  f"{r['vs_eager']:.2f}x"] for r in k["kernels"]]
        lines += ["", f"Generated kernels on {k.get('device')}: device copy bandwidth {k['copy_gb_per_s']:.0f} GB/s "
                  f"(read + write, {k.get('timing_method')}).", "",
                  md_table(["kernel", "µs", "GB/s", "% of copy", "vs eager"], krows)]
    floors = floor_notes(bench, k)
    if floors:
        lines += ["", "Floors (measured against, not asserted):"] + [f"- {f}" for f in floors]
    failed = [(p, r) for p, r in parts.items() if r.get("status") in ("failed", "timeout")]
    failed += [(f"bench {m}", r) for m, r in bench.items() if r.get("status") in ("failed", "timeout")]
    if failed:
        lines += ["", "Did not finish:"] + [f"- {p}: {r.get('status')}: {r.get('error', '')}" for p, r in failed]
    return "\n".join(lines)


def cell(d, eager) -> str:
    if not d:
        return "-"
    if d.get("error") or d.get("skipped"):
        return "n/a"
    tp = d.get("throughput")
    if not tp:
        return "-"
    rel = f" ({tp / eager['throughput']:.2f}x)" if eager.get("throughput") and d is not eager else ""
    return f"{tp:,.0f}{rel}"


def per_joule(d) -> str:
    return f"{d['units_per_joule']:,.0f}" if d and d.get("units_per_joule") else "-"


def floor_notes(bench: dict, k: dict) -> list[str]:
    out = []
    for m in ("llama_decode", "llama"):
        g = (bench.get(m) or {}).get("graph") or {}
        p, c = (g.get("passlab") or {}).get("throughput"), (g.get("torch.compile") or {}).get("throughput")
        cg = (g.get("passlab+cuda_graph") or {}).get("throughput")
        if p and c:
            out.append(f"{m} bf16: passlab {p / c:.2f}x torch.compile (floor 1.00x): {'met' if p >= c else 'NOT met'}"
                       + (f"; under a CUDA graph {cg / c:.2f}x" if cg else ""))
    for r in k.get("kernels", []):
        out.append(f"{r['kernel']}: {r['percent_of_copy']:.0f}% of copy bandwidth (floor 80%): "
                   f"{'met' if r['percent_of_copy'] >= 80 else 'NOT met'}")
    return out


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


if __name__ == "__main__":
    raise SystemExit(main())
