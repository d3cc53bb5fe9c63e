"""The emulated interconnect: ranks run inside a private network namespace whose
loopback is shaped with Linux `tc`, so a collective takes the time a real link
of the chosen kind would take *relative to this machine's compute*.

A preset names a target platform (device FLOP/s and per-direction link bytes/s).
What carries over from that platform to this one is the ratio of link
bandwidth to compute rate, so the emulated rate is

    rate = host matmul FLOP/s x (target link bytes/s / target device FLOP/s)

and the latency is stretched by the same factor (target FLOP/s / host FLOP/s).
Every rank sends at once in the collectives used here (rings, pairwise
all_to_all), and they share one loopback, so the loopback is shaped to
world_size x the per-rank rate.

The rate uses a token bucket (`tbf`), with the loopback MTU lowered to 1500 so
that the bucket meters real packet sizes; the latency uses `netem` where the
kernel has it (many VM kernels do not: then the record says latency was not
emulated). Where namespaces or tc are not permitted the run goes on over plain
loopback and the record says so, with the reason.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

from ..simulator import parse_rate, parse_time

H100_BF16_DENSE = 989e12


@dataclass(frozen=True)
class LinkPreset:
    """A target platform: per-direction link bytes/s and latency, device FLOP/s."""
    name: str
    rate_bytes_per_s: float
    latency_s: float
    device_flops_per_s: float
    source: str = ""


PRESETS = {
    "nvlink-h100": LinkPreset("nvlink-h100", 450e9, 2e-6, H100_BF16_DENSE,
                              "H100 SXM bf16 dense 989 TFLOP/s; NVLink 4, 450 GB/s per direction"),
    "ib-400g": LinkPreset("ib-400g", 50e9, 5e-6, H100_BF16_DENSE,
                          "H100 bf16 dense; InfiniBand NDR 400 Gbit/s = 50 GB/s per direction"),
    "pcie4": LinkPreset("pcie4", 25e9, 5e-6, H100_BF16_DENSE,
                        "H100 bf16 dense; PCIe 4.0 x16, ~25 GB/s achievable per direction"),
    "eth-10g": LinkPreset("eth-10g", 1.25e9, 50e-6, H100_BF16_DENSE,
                          "H100 bf16 dense; 10 Gbit/s Ethernet = 1.25 GB/s"),
}

@dataclass
class LinkConfig:
    """What to emulate for one run: per-rank bytes/s and one-way latency."""
    name: str
    rate_bytes_per_s: float
    latency_s: float = 0.0
    derivation: dict = field(default_factory=dict)


def resolve(spec: str, host_flops_per_s: float | None = None) -> LinkConfig:
    """A preset name (scaled to `host_flops_per_s`) or explicit 'rate=1gbit,latency=50us'."""
    if spec in PRESETS:
        p = PRESETS[spec]
        if not host_flops_per_s:
            raise ValueError(f"link preset {spec!r} needs this machine's compute rate")
        scale = host_flops_per_s / p.device_flops_per_s
        return LinkConfig(spec, p.rate_bytes_per_s * scale, p.latency_s / scale, {
            "target_bytes_per_s": p.rate_bytes_per_s, "target_latency_s": p.latency_s,
            "target_flops_per_s": p.device_flops_per_s, "host_flops_per_s": host_flops_per_s,
            "bytes_per_flop": p.rate_bytes_per_s / p.device_flops_per_s, "source": p.source})
    if "=" in spec:
        kv = dict(part.split("=", 1) for part in spec.split(",") if part.strip())
        unknown = set(kv) - {"rate", "latency"}
        if unknown or "rate" not in kv:
            raise ValueError(f"link {spec!r}: give rate=..[,latency=..], e.g. rate=1gbit,latency=50us")
        return LinkConfig(spec, parse_rate(kv["rate"]), parse_time(kv.get("latency", "0")), {"given": True})
    raise ValueError(f"unknown link {spec!r}; presets: {', '.join(PRESETS)}, or rate=..,latency=..")


def host_flops(dtype="float32", threads: int = 1, budget_s: float = 0.3) -> float:
    """This machine's matmul FLOP/s at one rank's thread count: the median of
    512x512 products for `budget_s` (quick; the link rate needs the ratio, not
    a benchmark)."""
    import time
    import torch
    dt = getattr(torch, str(dtype).replace("torch.", ""))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = 512
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        torch.mm(a, b)
        times, end = [], time.perf_counter() + budget_s
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- the namespace

class Namespace:
    """A network namespace `passlab-<pid>` with a shaped loopback, removed on exit.

    `prefix` is the command prefix that runs a process inside it (empty when
    emulation is off); `info` is the run record's "link" entry.
    """

    def __init__(self, link: LinkConfig | None, world_size: int):
        self.link, self.world_size = link, world_size
        self.name = f"passlab-{os.getpid()}"
        self.prefix: list[str] = []
        self.created = False
        self.info: dict = {"emulated": False, "reason": "no --link given: plain loopback"}
        self._old_handlers: dict = {}

    def __enter__(self) -> "Namespace":
        if self.link is None:
            return self
        why = unavailable()
        if why:
            self.info = {"emulated": False, "reason": why, **self.describe()}
            return self
        self.guard()
        try:
            ip("netns", "add", self.name)
            self.created = True
            inside = ["ip", "netns", "exec", self.name]
            run(inside + ["ip", "link", "set", "lo", "up", "mtu", "1500"])
            self.info = {"emulated": True, "namespace": self.name, **self.describe(), **self.shape(inside)}
            self.prefix = inside
        except (OSError, subprocess.CalledProcessError) as e:
            self.remove()
            self.info = {"emulated": False, "reason": f"could not set up the namespace: {failure(e)}",
                         **self.describe()}
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def describe(self) -> dict:
        return {"name": self.link.name, "rate_bytes_per_s": self.link.rate_bytes_per_s,
                "latency_s": self.link.latency_s, "world_size": self.world_size, **self.link.derivation}

    def shape(self, inside: list[str]) -> dict:
        """tbf at world_size x the per-rank rate; netem for latency where the kernel has it."""
        total = self.link.rate_bytes_per_s * self.world_size
        bits = max(int(total * 8), 8000)
        burst = max(int(total * 1e-3), 4 * 1514)            # 1 ms of tokens, at least a few packets
        limit = max(int(total * 2.0), 4 << 20)              # deep queue: drops would stall TCP for 200 ms
        out = {"shaped_bytes_per_s": total, "qdisc": f"tbf rate {bits}bit burst {burst} limit {limit}",
               "latency_emulated": False}
        lat_us = int(round(self.link.latency_s * 1e6))
        if lat_us > 0:
            try:
                run(inside + ["tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "netem",
                              "delay", f"{lat_us}us", "limit", "100000"])
                run(inside + ["tc", "qdisc", "add", "dev", "lo", "parent", "1:1", "handle", "10:", "tbf",
                              "rate", f"{bits}bit", "burst", str(burst), "limit", str(limit)])
                out.update(latency_emulated=True, qdisc=f"netem delay {lat_us}us + " + out["qdisc"])
                return out
            except subprocess.CalledProcessError as e:
                run(inside + ["tc", "qdisc", "del", "dev", "lo", "root"], check=False)
                out["latency_reason"] = f"netem unavailable: {failure(e)}"
        run(inside + ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{bits}bit",
                      "burst", str(burst), "limit", str(limit)])
        return out

    def remove(self) -> None:
        if self.created:
            ip("netns", "del", self.name, check=False)
            self.created = False
        self.unguard()

    def guard(self) -> None:
        """atexit + SIGTERM/SIGHUP: the namespace goes even when the run is killed."""
        atexit.register(self.remove)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, self.on_signal)
            except ValueError:     # not the main thread
                pass

    def unguard(self) -> None:
        atexit.unregister(self.remove)
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def on_signal(self, signum, frame):
        self.remove()
        raise SystemExit(128 + signum)


def unavailable() -> str | None:
    """Why a namespace with tc cannot be made here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root: network namespaces and tc need CAP_NET_ADMIN; ran on plain loopback"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (iproute2); ran on plain loopback"
    return None


def ip(*args, check=True):
    return run(["ip", *args], check=check)


def run(cmd: list[str], check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def failure(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        return f"`{' '.join(e.cmd)}`: {(e.stderr or '').strip() or f'exit {e.returncode}'}"
    return f"{type(e).__name__}: {e}"

