"""Timing: median and a 95% confidence interval of the median, adaptively.

CPU: `perf_counter_ns` around each call, a fixed, reported thread count.
GPU: CUDA events around each call, an L2 flush between repetitions, optional
CUDA-graph capture. Several callables are timed *interleaved* in paired
rounds: every round times every contender (a ~50 ms chunk each, the order
rotated from round to round), and no contender leaves the rotation before all
are done, so machine noise (a shared 2-core VM) hits them alike and any two of
them can be compared round by round. Rounds go on until every median's 95% CI
is within `target_ci` (or each contender's time budget is spent).

`speedup(new, ref)` is the ratio of medians with a 95% CI from a paired
bootstrap over rounds: a resampled round brings both contenders' samples of
that round, so what the two shared (a noisy second) stays shared.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

Z95 = 1.96
BOOTSTRAP = 400


@dataclass
class Timing:
    median_s: float
    ci_low_s: float
    ci_high_s: float
    n: int
    method: str
    threads: int
    samples_s: list[float] = field(default_factory=list, repr=False)
    rounds: list[int] = field(default_factory=list, repr=False)   # the round of each sample

    @property
    def ci_rel(self) -> float:
        return (self.ci_high_s - self.ci_low_s) / 2 / self.median_s if self.median_s else float("inf")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("samples_s")
        d.pop("rounds")
        return d


def median_ci(xs: list[float]) -> tuple[float, float, float]:
    """Median with a distribution-free 95% CI from order statistics."""
    s = sorted(xs)
    n = len(s)
    med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    if n < 3:
        return med, s[0], s[-1]
    half = Z95 * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)) - 1)
    hi = min(n - 1, int(math.ceil(n / 2 + half)))
    return med, s[lo], s[hi]


class CpuClock:
    method = "perf_counter_ns"

    def time(self, fn, inputs) -> float:
        t0 = time.perf_counter_ns()
        fn(*inputs)
        return (time.perf_counter_ns() - t0) * 1e-9


class CudaClock:
    """CUDA events; flushes L2 before each repetition so no run profits from
    the previous one's cache."""
    method = "cuda_events+l2_flush"

    def __init__(self):
        self.flush_buf = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def time(self, fn, inputs) -> float:
        self.flush_buf.zero_()
        self.start.record()
        fn(*inputs)
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e-3


def cuda_graph(fn, inputs):
    """Capture `fn(*inputs)` as one CUDA graph; returns a replaying callable
    that ignores its arguments (inputs are the captured static buffers)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*inputs)
    return lambda *_: g.replay()


def measure_many(fns: dict[str, Callable], input_sets: list[tuple], *, device: str = "cpu",
                 budget_s: float = 2.0, target_ci: float = 0.02, min_reps: int = 7,
                 max_reps: int = 10000, warmup: int = 2, writes: tuple = (),
                 progress: Callable[[str], None] | None = None,
                 drop_slower: float | None = None) -> dict[str, Timing]:
    """Time every callable on rotating input sets in paired rounds until each is
    done: its median's 95% CI within `target_ci`, or `budget_s` of its own time
    spent, or `max_reps` samples. A done contender stays in the rotation until
    all are done, so every round holds samples of every contender.

    `drop_slower` (for a caller that only wants the fastest): a contender whose
    fastest of DROP_AFTER samples is more than `drop_slower` times another's
    slowest leaves the rotation then (an MoE's eager step, seconds long, timed
    beside a graph 40x faster).

    `writes`: input positions the callables write in place (a cache, a
    counter): every call gets fresh copies of those, made outside the timed
    region, so no call sees another's writes and the input sets stay as given."""
    if writes:
        from passlab.graphs.state import fresh_copies

        def fresh(xs):
            return fresh_copies(xs, writes)
    else:
        def fresh(xs):
            return xs
    clock = CudaClock() if device.startswith("cuda") else CpuClock()
    threads = torch.get_num_threads()
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in names}
    rounds: dict[str, list[int]] = {k: [] for k in names}
    with torch.no_grad():
        for k, fn in fns.items():
            for i in range(warmup):
                fn(*fresh(input_sets[i % len(input_sets)]))
        spent = {k: 0.0 for k in names}
        done: set[str] = set()
        dropped: set[str] = set()
        rnd = 0
        while len(done) < len(names):
            shift = rnd % len(names)
            for k in names[shift:] + names[:shift]:
                if k in dropped:
                    continue
                fn = fns[k]
                # a chunk of ~50 ms per callable per round keeps the rounds fine-grained
                one = samples[k][-1] if samples[k] else 0.0
                reps = max(1, min(50, int(0.05 / one) if one > 0 else 1))
                for r in range(reps):
                    t = clock.time(fn, fresh(input_sets[(rnd + r) % len(input_sets)]))
                    samples[k].append(t)
                    rounds[k].append(rnd)
                    spent[k] += t
                n = len(samples[k])
                if k not in done and n >= min_reps:
                    med, lo, hi = median_ci(samples[k])
                    if (hi - lo) / 2 <= target_ci * med or spent[k] >= budget_s or n >= max_reps:
                        done.add(k)
            if drop_slower:
                for k in outpaced(samples, drop_slower) - dropped:
                    dropped.add(k)
                    done.add(k)
            rnd += 1
            if progress:
                progress(f"timing: {len(done)}/{len(names)} done")
    out = {}
    for k, xs in samples.items():
        med, lo, hi = median_ci(xs)
        out[k] = Timing(med, lo, hi, len(xs), clock.method, threads, xs, rounds[k])
    return out


DROP_AFTER = 3


def outpaced(samples: dict[str, list[float]], factor: float) -> set[str]:
    """Contenders whose fastest sample is more than `factor` times some other's slowest
    (each with DROP_AFTER samples at least): they cannot be the fastest."""
    ready = {k: xs for k, xs in samples.items() if len(xs) >= DROP_AFTER}
    if len(ready) < 2:
        return set()
    return {k for k, xs in ready.items() if any(min(xs) > factor * max(ys) for j, ys in ready.items() if j != k)}


def speedup(new: Timing, ref: Timing, *, reps: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """ref's median time over new's (> 1: `new` is faster) and its 95% CI.

    The CI is a paired bootstrap over the rounds both were timed in: each
    resample draws rounds with replacement and takes both contenders' samples
    of those rounds. Without round labels (timings from separate runs) the
    samples are resampled independently."""
    point = ref.median_s / new.median_s
    a, b = np.asarray(new.samples_s), np.asarray(ref.samples_s)
    if len(a) < 2 or len(b) < 2:
        return point, point, point
    rng = np.random.default_rng(seed)
    common = sorted(set(new.rounds) & set(ref.rounds)) if new.rounds and ref.rounds else []
    ratios = np.empty(reps)
    if len(common) >= 3:
        ra, rb = np.asarray(new.rounds), np.asarray(ref.rounds)
        by_a = [a[ra == r] for r in common]
        by_b = [b[rb == r] for r in common]
        for i in range(reps):
            pick = rng.integers(0, len(common), len(common))
            ratios[i] = np.median(np.concatenate([by_b[j] for j in pick])) / \
                np.median(np.concatenate([by_a[j] for j in pick]))
    else:
        for i in range(reps):
            ratios[i] = np.median(rng.choice(b, len(b))) / np.median(rng.choice(a, len(a)))
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    return point, float(min(lo, point)), float(max(hi, point))


def measure(fn: Callable, input_sets: list[tuple], **kw) -> Timing:
    return measure_many({"f": fn}, input_sets, **kw)["f"]


def measure_lockstep(fns: dict[str, Callable], input_sets: list[tuple], *, rounds: int, warmup: int = 1,
                     device: str = "cpu", before: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time every callable in exactly `rounds` paired rounds of one call each
    (the order rotated from round to round), after `warmup` calls each: the
    same sequence of calls wherever it runs, for callables that are collective
    (every rank of a distributed run must make the same calls; `measure_many`
    adapts its counts to each process's own timings). `before()` runs before
    every timed call, outside the timed region (e.g. a barrier)."""
    clock = CudaClock() if device.startswith("cuda") else CpuClock()
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for k in names:
            for i in range(warmup):
                fns[k](*input_sets[i % len(input_sets)])
        for rnd in range(rounds):
            shift = rnd % len(names)
            for k in names[shift:] + names[:shift]:
                if before is not None:
                    before()
                samples[k].append(clock.time(fns[k], input_sets[rnd % len(input_sets)]))
    return {k: Timing(*median_ci(xs), len(xs), clock.method, torch.get_num_threads(), xs, list(range(rounds)))
            for k, xs in samples.items()}


def peak_memory(fn: Callable, inputs: tuple, device: str = "cpu") -> tuple[int | None, str]:
    """Peak bytes allocated during one call, and how it was measured."""
    with torch.no_grad():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(*inputs)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
        from torch.profiler import ProfilerActivity, profile
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(*inputs)
        events = [e for e in prof.events() if getattr(e, "cpu_memory_usage", 0)]
        events.sort(key=lambda e: e.time_range.start)
        cur = peak = 0
        for e in events:
            cur += e.cpu_memory_usage
            peak = max(peak, cur)
        return peak, "torch.profiler memory tracking (CPU allocator)"


@contextlib.contextmanager
def quiet_stderr():
    """Silence native code's stderr (the profiler logs start/stop lines there)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class EnergyMeter:
    """Joules consumed around a region: NVML's total-energy counter on NVIDIA
    GPUs, Linux powercap (RAPL) where readable; otherwise unavailable."""

    def __init__(self, device: str):
        self.read, self.source = None, None
        if device.startswith("cuda"):
            try:
                import pynvml
                pynvml.nvmlInit()
                h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
                self.read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h) * 1e-3
                self.source = "nvml"
            except Exception:
                pass
        else:
            import glob
            for p in sorted(glob.glob("/sys/class/powercap/*/energy_uj")):
                try:
                    open(p).read()
                except OSError:
                    continue
                self.read = lambda p=p: int(open(p).read()) * 1e-6
                self.source = f"powercap {p}"
                break

    @property
    def available(self) -> bool:
        return self.read is not None

    def joules(self, fn: Callable, inputs: tuple, reps: int) -> float | None:
        if not self.available:
            return None
        with torch.no_grad():
            e0 = self.read()
            for _ in range(reps):
                fn(*inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return (self.read() - e0) / reps
