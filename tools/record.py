"""The run record (schema version 1, see CONTRACT.md): one JSON document per run.

Eager is the reference. A measured run times PyTorch eager in the same
interleaved batch as every step; `eager` holds its numbers, the baseline (the
captured graph: capture is a step of its own, its cost can be negative) and
every step carry `speedup_vs_eager` with its 95% CI (`speedup_vs_eager_ci`,
paired bootstrap over timing rounds) and `speedup_vs_prev_ci`, and
`final_speedup_vs_eager` is the last step's. `final_speedup` stays the last
step over the captured baseline.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform

import torch

SCHEMA = 1


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from passlab.graphs import has_native_bf16
    m = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
         "bf16_matrix_units": has_native_bf16(), "torch": torch.__version__,
         "python": platform.python_version(), "platform": platform.platform(),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name()
    return m


def step_entry(rec, measured: dict | None, prev_tp: float | None, base_tp: float | None) -> dict:
    d = rec.as_dict()
    d.pop("options", None)
    d.pop("nodes", None)
    m = measured or {}
    tp = m.get("throughput")
    d.update({"throughput": tp, "ci_low": m.get("ci_low"), "ci_high": m.get("ci_high"), "unit": m.get("unit"),
              "speedup_vs_prev": (tp / prev_tp) if tp and prev_tp else None,
              "cumulative_speedup": (tp / base_tp) if tp and base_tp else None,
              "peak_memory_bytes": m.get("peak_memory_bytes"),
              "overlap_efficiency": m.get("overlap_efficiency"),
              "energy_j_per_unit": m.get("energy_j_per_unit"),
              "nodes": rec.nodes, "options": rec.options,
              "speedup_vs_eager": m.get("speedup_vs_eager"), "speedup_vs_eager_ci": m.get("speedup_vs_eager_ci"),
              "speedup_vs_prev_ci": m.get("speedup_vs_prev_ci")})
    for k in ("median_s", "n", "percent_of_bound", "bound_s", "time_s", "intermediate_bytes_saved"):
        if k in m:
            d[k] = m[k]
    return d


def build(*, model: str, preset: str, device: str, pipeline: list[str], baseline, steps,
          measured: dict | None = None, extra: dict | None = None, capture_seconds: float | None = None,
          setup_seconds: float | None = None) -> dict:
    """`measured` maps "eager", "baseline" and each step index to its timing dict;
    `setup_seconds`: wall time from the start of capture to the optimized graph
    (passes and their checks), what a user waits for."""
    measured = measured or {}
    mb = measured.get("baseline") or {}
    base_tp = mb.get("throughput")
    out_steps, prev = [], base_tp
    for i, rec in enumerate(steps):
        entry = step_entry(rec, measured.get(i), prev, base_tp)
        out_steps.append(entry)
        prev = entry["throughput"] or prev
    last = out_steps[-1]["throughput"] if out_steps else base_tp
    last_m = (measured.get(len(steps) - 1) if steps else mb) or {}
    record = {
        "schema": SCHEMA, "model": model, "preset": preset, "device": device, "machine": machine(),
        "pipeline": pipeline,
        "baseline": {"throughput": base_tp, "ci_low": mb.get("ci_low"), "ci_high": mb.get("ci_high"),
                     "launches": baseline.launches, "bytes": baseline.bytes, "flops": baseline.flops,
                     "nodes": baseline.nodes, "unit": mb.get("unit"), "max_error": baseline.max_error,
                     "speedup_vs_eager": mb.get("speedup_vs_eager"), "speedup_vs_eager_ci": mb.get("speedup_vs_eager_ci"),
                     **{k: mb[k] for k in ("median_s", "n", "peak_memory_bytes", "percent_of_bound", "bound_s")
                        if k in mb}},
        "eager": measured.get("eager"),
        "steps": out_steps,
        "final_speedup": (last / base_tp) if last and base_tp else None,
        "final_speedup_vs_eager": last_m.get("speedup_vs_eager"),
        "final_speedup_vs_eager_ci": last_m.get("speedup_vs_eager_ci"),
        "capture_seconds": capture_seconds,
        "setup_seconds": setup_seconds,
        "shapley": None, "interaction": None, "ablation": None, "peers": None,
    }
    record.update(extra or {})
    return record


def clean(x):
    """JSON-safe: NaN/inf become null, tuples lists, dtypes strings."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(record: dict, path: str) -> None:
    """Atomically: a reader (or a Ctrl-C) never sees half a record."""
    from passlab.runtime.codegen import atomic_write
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, json.dumps(clean(record), indent=1))


def write_csv(record: dict, path: str) -> None:
    """Atomically, like write_json."""
    import csv
    import io
    from passlab.runtime.codegen import atomic_write
    cols = ["pass", "status", "changed", "throughput", "ci_low", "ci_high", "unit", "speedup_vs_prev",
            "cumulative_speedup", "launches", "bytes", "flops", "peak_memory_bytes", "max_error",
            "numerics_ok", "pass_seconds", "error"]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(cols)
    b = record["baseline"]
    w.writerow(["baseline", "ok", "", b.get("throughput"), b.get("ci_low"), b.get("ci_high"), b.get("unit"),
                "", 1.0, b.get("launches"), b.get("bytes"), b.get("flops"), b.get("peak_memory_bytes"),
                b.get("max_error"), "", "", ""])
    for s in record["steps"]:
        w.writerow([clean(s.get(c)) for c in cols])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, f.getvalue())
