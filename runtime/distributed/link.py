"""The one link model: the table of target links and the link a run
emulates on this machine, which the overlap passes and the simulator
estimate with.

A preset names a target platform (per-direction link bytes/s, latency, and the
device FLOP/s it serves). What carries over from that platform to this one is
the ratio of link bandwidth to compute rate, so the emulated link is

    rate    = host matmul FLOP/s x (target link bytes/s / target device FLOP/s)
    latency = target latency x (target FLOP/s / host FLOP/s)

with the host's rate measured by `host_flops` (`profiles.matmul_flops`).
How a run emulates a link is `namespaces.Namespace`; the delay the packets
really got is measured by `latency.probe_latency`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

H100_BF16_DENSE = 989e12
UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class Link:
    """One direction of a rank's link: bytes/s and one-way latency per message.
    `device_flops_per_s` is the compute rate of the platform the link serves
    (None: not a target platform, e.g. a given or measured link)."""
    name: str
    bytes_per_s: float
    latency_s: float = 0.0
    source: str = ""
    device_flops_per_s: float | None = None
    derivation: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def rate_bytes_per_s(self) -> float:
        return self.bytes_per_s

    def spec(self) -> str:
        """The pass-option form: 'rate=..B;latency=..s' (';' keeps pipeline strings parseable)."""
        return f"rate={self.bytes_per_s:.6g}B;latency={self.latency_s:.6g}s"

    def scaled(self, host_flops_per_s: float) -> "Link":
        """The same bandwidth-to-compute ratio on a machine of `host_flops_per_s`."""
        if not self.device_flops_per_s:
            return self
        s = host_flops_per_s / self.device_flops_per_s
        return Link(self.name, self.bytes_per_s * s, self.latency_s / s, self.source, None, {
            "target_bytes_per_s": self.bytes_per_s, "target_latency_s": self.latency_s,
            "target_flops_per_s": self.device_flops_per_s, "host_flops_per_s": host_flops_per_s,
            "bytes_per_flop": self.bytes_per_s / self.device_flops_per_s, "source": self.source})

    def __str__(self):
        return f"{self.name} ({self.bytes_per_s / 1e9:.3g} GB/s, {self.latency_s * 1e6:.3g} us)"


LINKS = {
    "nvlink-h100": Link("nvlink-h100", 450e9, 2e-6, "H100 SXM bf16 dense 989 TFLOP/s; NVLink 4, 450 GB/s "
                        "per direction (900 GB/s bidirectional)", H100_BF16_DENSE),
    "ib-400g": Link("ib-400g", 50e9, 5e-6, "H100 bf16 dense; InfiniBand NDR 400 Gbit/s = 50 GB/s per direction",
                    H100_BF16_DENSE),
    "pcie4": Link("pcie4", 25e9, 5e-6, "H100 bf16 dense; PCIe 4.0 x16, ~25 GB/s achievable per direction",
                  H100_BF16_DENSE),
    "eth-10g": Link("eth-10g", 1.25e9, 50e-6, "H100 bf16 dense; 10 Gbit/s Ethernet = 1.25 GB/s", H100_BF16_DENSE),
    "loopback": Link("loopback", 2e9, 0.0, "gloo over localhost TCP on a 2-core VM (rough; no latency modelled)"),
}
PRESETS = {k: v for k, v in LINKS.items() if v.device_flops_per_s}


def parse_rate(text: str) -> float:
    """'10gbit', '1.25GB', '400mbit', '5e9' -> bytes/s."""
    m = re.fullmatch(r"\s*([\d.eE+-]+)\s*([kmgtKMGT]?)(bit|b|B|bps|Bps)?(/s)?\s*", text)
    if not m:
        raise ValueError(f"cannot read a rate from {text!r} (e.g. 10gbit, 1.25GB)")
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    unit = m.group(3) or "B"
    return value / 8 if unit in ("bit", "b", "bps") else value


def parse_time(text: str) -> float:
    m = re.fullmatch(r"\s*([\d.eE+-]+)\s*(s|ms|us|ns)?\s*", text)
    if not m:
        raise ValueError(f"cannot read a time from {text!r} (e.g. 50us, 1ms)")
    return float(m.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[m.group(2) or "s"]


def get_link(spec: "str | Link") -> Link:
    """A table entry (nominal, unscaled) or 'rate=10gbit,latency=50us' (';' also
    separates, for pipeline options: `overlap_chunk(link=rate=20MB;latency=0)`)."""
    if isinstance(spec, Link):
        return spec
    if spec in LINKS:
        return LINKS[spec]
    if "=" in spec:
        kv = dict(part.split("=", 1) for part in re.split(r"[,;]", spec) if part.strip())
        unknown = set(kv) - {"rate", "latency"}
        if unknown or "rate" not in kv:
            raise ValueError(f"link {spec!r}: give rate=..[,latency=..], e.g. rate=1gbit,latency=50us")
        return Link(spec, parse_rate(kv["rate"]), parse_time(kv.get("latency", "0")), "given", None,
                    {"given": True})
    raise ValueError(f"unknown link {spec!r} (known: {', '.join(sorted(LINKS))}, or rate=..,latency=..)")


def resolve(spec: str, host_flops_per_s: float | None = None) -> Link:
    """What a run emulates: a preset scaled to `host_flops_per_s`, or a given link as it is."""
    link = get_link(spec)
    if link.device_flops_per_s:
        if not host_flops_per_s:
            raise ValueError(f"link preset {spec!r} needs this machine's compute rate")
        return link.scaled(host_flops_per_s)
    return link


def host_flops(dtype="float32", threads: int = 1, budget_s: float = 0.3) -> float:
    """This machine's matmul FLOP/s at one rank's thread count: the fastest of
    512x512 products for `budget_s` (quick; the link rate needs the ratio, not
    a benchmark; the fastest, since a shared machine only ever slows one down)."""
    from ..profiles import QUICK, matmul_flops
    return matmul_flops(dtype, threads=threads, budget_s=budget_s, best=True, **QUICK)
