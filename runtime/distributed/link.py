"""The one link model: the table of target links, how a run emulates one on
this machine, and the link as it was really applied, which the overlap passes
and the simulator estimate with.

A preset names a target platform (per-direction link bytes/s, latency, and the
device FLOP/s it serves). What carries over from that platform to this one is
the ratio of link bandwidth to compute rate, so the emulated link is

    rate    = host matmul FLOP/s x (target link bytes/s / target device FLOP/s)
    latency = target latency x (target FLOP/s / host FLOP/s)

How the run emulates it (`Namespace`), best first:

1. TUN relay (`relay.py`): every rank in its own network namespace, the ranks
   joined by TUN devices through a userspace delay line that holds each real
   packet for the one-way latency and meters each rank's send rate. Rate and
   latency are both applied; a latency probe in every run measures the delay
   the packets really got.
2. tc tbf on a shared loopback (one namespace), where TUN is not available:
   the rate is applied (world_size x the per-rank rate, every rank sends at
   once), the latency is not, and the record says so.
3. Plain loopback where namespaces are not permitted (not root): nothing is
   applied, and the record says why.

`Namespace.applied()` is the link exactly as emulated (latency 0 where none was
applied); the run hands it to the overlap passes as their `link` option, and
`passlab simulate --compare` reads it back from the record.
"""
from __future__ import annotations

import atexit
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

from . import relay

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
    from ..profiles import matmul_flops
    return matmul_flops(dtype, threads=threads, budget_s=budget_s, best=True, target_ci=0.0, min_reps=3, warmup=1)


# ---------------------------------------------------------------- the namespaces

TUN_MTU = 9000            # jumbo frames: fewer packets through the relay; the rate is metered per byte
NAME = re.compile(r"passlab-(\d+)(?:-\d+)?$")


class Namespace:
    """The emulated link of one run (see the module docstring), removed on exit.

    `prefix(rank)` is the command prefix that runs rank `rank` inside its
    namespace (empty when nothing is emulated); `master_addr` and `ifname` are
    where the ranks meet; `info` is the run record's "link" entry.
    """

    def __init__(self, link: Link | None, world_size: int):
        self.link, self.world_size = link, world_size
        self.name = f"passlab-{os.getpid()}"
        self.names: list[str] = []              # the namespaces this run created
        self.relay: subprocess.Popen | None = None
        self.master_addr, self.ifname = "127.0.0.1", "lo"
        self.removed_stale = remove_stale()
        self.info: dict = {"emulated": False, "latency_emulated": False,
                           "reason": "no --link given: plain loopback"}
        self._prefix: list[list[str]] = []
        self._old_handlers: dict = {}

    @property
    def created(self) -> bool:
        return bool(self.names)

    def prefix(self, rank: int) -> list[str]:
        return self._prefix[rank % len(self._prefix)] if self._prefix else []

    def applied(self) -> Link | None:
        """The link exactly as emulated: its rate where a rate was applied,
        latency 0 where no latency was; None where nothing was."""
        if not self.info.get("emulated"):
            return None
        lat = self.link.latency_s if self.info.get("latency_emulated") else 0.0
        return replace(self.link, name=f"{self.link.name} as emulated", latency_s=lat, device_flops_per_s=None,
                       source=self.info.get("method", ""))

    def __enter__(self) -> "Namespace":
        if self.link is None:
            return self
        why = unavailable()
        if why:
            self.info = {"emulated": False, "latency_emulated": False, "reason": why, **self.describe()}
            return self
        self.guard()
        try:
            self.info = {"emulated": True, **self.describe(), **self.tun_relay()}
            return self
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            self.remove()
            self.guard()
            tun_failed = f"TUN relay unavailable: {failure(e)}"
        try:
            self.info = {"emulated": True, **self.describe(), **self.tbf_loopback(),
                         "latency_emulated": False, "latency_reason": tun_failed}
        except (OSError, subprocess.SubprocessError) as e:
            self.remove()
            self.info = {"emulated": False, "latency_emulated": False,
                         "reason": f"could not set up the namespace: {failure(e)} ({tun_failed})",
                         **self.describe()}
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def describe(self) -> dict:
        return {"name": self.link.name, "rate_bytes_per_s": self.link.bytes_per_s,
                "latency_s": self.link.latency_s, "world_size": self.world_size, **self.link.derivation}

    def add(self, name: str) -> list[str]:
        ip("netns", "add", name)
        self.names.append(name)
        inside = ["ip", "netns", "exec", name]
        run(inside + ["ip", "link", "set", "lo", "up"])
        return inside

    def tun_relay(self) -> dict:
        """One namespace per rank, a TUN device in each, the relay between them."""
        if not os.path.exists("/dev/net/tun"):
            raise RuntimeError("/dev/net/tun does not exist")
        for r in range(self.world_size):
            inside = self.add(f"{self.name}-{r}")
            dev, addr = relay.TUN_NAME, relay.address(r)
            run(inside + ["ip", "tuntap", "add", "dev", dev, "mode", "tun"])
            run(inside + ["ip", "link", "set", dev, "mtu", str(TUN_MTU), "txqueuelen", "10000", "up"])
            run(inside + ["ip", "addr", "add", f"{addr}/24", "dev", dev])
            # a warm TCP window survives idle gaps between collectives, and starts large
            run(inside + ["ip", "route", "replace", f"{relay.SUBNET}.0/24", "dev", dev, "src", addr,
                          "initcwnd", "256", "initrwnd", "256"])
            run(inside + ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/tcp_slow_start_after_idle"])
            # socket buffers that hold the link's bandwidth-delay product from the first byte: with
            # the 128 KB default, TCP's receive window grows one round trip at a time and a large
            # message crawls for several of them, which the link being emulated (RDMA) never does
            buf = socket_buffer_bytes(self.link)
            for knob in ("tcp_rmem", "tcp_wmem"):
                run(inside + ["sh", "-c", f"echo '4096 {buf} {max(buf, 32 << 20)}' > /proc/sys/net/ipv4/{knob}"])
            self._prefix.append(inside)
        self.relay = subprocess.Popen(
            [sys.executable, relay.__file__, repr(self.link.bytes_per_s), repr(self.link.latency_s), *self.names],
            env=dict(os.environ, PASSLAB_PARENT_PID=str(os.getpid())), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([self.relay.stdout], [], [], 20.0)
        line = self.relay.stdout.readline().decode().strip() if ready else ""
        if line != "ready":
            self.relay.kill()
            err = self.relay.stderr.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"the relay did not start: {err[-1] if err else line or 'no answer in 20 s'}")
        self.master_addr, self.ifname = relay.address(0), relay.TUN_NAME
        return {"method": "tun-relay", "namespaces": list(self.names), "latency_emulated": True,
                "mtu": TUN_MTU, "relay_pid": self.relay.pid, "socket_buffer_bytes": buf,
                "shaping": f"userspace delay line: each rank's uplink metered at {self.link.bytes_per_s:.6g} B/s, "
                           f"every packet held {self.link.latency_s * 1e6:.6g} us"}

    def tbf_loopback(self) -> dict:
        """tbf at world_size x the per-rank rate on one namespace's loopback (no latency)."""
        inside = self.add(self.name)
        run(inside + ["ip", "link", "set", "lo", "mtu", "1500"])
        total = self.link.bytes_per_s * self.world_size
        bits = max(int(total * 8), 8000)
        burst = max(int(total * 1e-3), 4 * 1514)            # 1 ms of tokens, at least a few packets
        limit = max(int(total * 2.0), 4 << 20)              # deep queue: drops would stall TCP for 200 ms
        run(inside + ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{bits}bit",
                      "burst", str(burst), "limit", str(limit)])
        self._prefix = [inside]
        self.master_addr, self.ifname = "127.0.0.1", "lo"
        return {"method": "tc-tbf", "namespace": self.name, "shaped_bytes_per_s": total,
                "qdisc": f"tbf rate {bits}bit burst {burst} limit {limit}"}

    def remove(self) -> None:
        if self.relay is not None:
            if self.relay.poll() is None:
                self.relay.kill()
            self.relay.wait()
            self.relay = None
        for name in self.names:
            ip("netns", "del", name, check=False)
        self.names, self._prefix = [], []
        self.unguard()

    def guard(self) -> None:
        """atexit + SIGTERM/SIGHUP: the namespaces go even when the run is killed
        (after SIGKILL, `remove_stale` at the next start removes them)."""
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


def socket_buffer_bytes(link: Link) -> int:
    """Default socket buffer of a rank: four round trips of the link's bytes, at least 4 MB."""
    return int(max(4 << 20, 4 * link.bytes_per_s * 2 * link.latency_s))


def remove_stale() -> list[str]:
    """Remove the passlab-<pid>[-<rank>] namespaces of runs whose process is
    gone (killed with SIGKILL, no chance to clean up). Returns their names."""
    if unavailable():
        return []
    try:
        out = ip("netns", "list", check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gone = []
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = NAME.match(name)
        if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
            ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


# ---------------------------------------------------------------- the latency probe

PROBE_PORT = 29411


def probe_latency(rank: int, peer: str, configured_s: float, barrier, n: int = 12,
                  timeout_s: float = 2.0) -> dict | None:
    """Run on ranks 0 and 1 of an emulated run (`barrier` syncs them): rank 1
    echoes UDP datagrams; rank 0 times round trips to it, alternating packets
    the relay delays and packets marked to skip the delay (same path, same
    stacks). One-way latency = half the difference of the median round trips.
    Returns the measurement on rank 0, None elsewhere."""
    if rank == 1:
        socks = []
        for port, tos in ((PROBE_PORT, 0), (PROBE_PORT + 1, relay.PROBE_TOS)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
            s.bind(("0.0.0.0", port))
            socks.append(s)
        barrier()
        end = time.monotonic() + 2 * n * (2 * configured_s + timeout_s) + 10
        try:
            while time.monotonic() < end:
                ready, _, _ = select.select(socks, [], [], 0.5)
                for s in ready:
                    data, addr = s.recvfrom(64)
                    if data == b"stop":
                        return None
                    s.sendto(data, addr)
        finally:
            for s in socks:
                s.close()
        return None
    if rank != 0:
        return None
    barrier()
    rtt = {"delayed": [], "undelayed": []}
    socks = {}
    for key, port, tos in (("delayed", PROBE_PORT, 0), ("undelayed", PROBE_PORT + 1, relay.PROBE_TOS)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        s.settimeout(timeout_s)
        s.connect((peer, port))
        socks[key] = s
    try:
        for i in range(n):
            for key, s in socks.items():
                t0 = time.perf_counter()
                s.send(b"%d" % i)
                try:
                    while s.recv(64) != b"%d" % i:
                        pass
                except socket.timeout:
                    continue
                rtt[key].append(time.perf_counter() - t0)
        socks["delayed"].send(b"stop")
    finally:
        for s in socks.values():
            s.close()
    if not rtt["delayed"] or not rtt["undelayed"]:
        return {"configured_one_way_s": configured_s, "measured_one_way_s": None,
                "error": "no echo came back within the timeout"}
    d, u = statistics.median(rtt["delayed"]), statistics.median(rtt["undelayed"])
    measured = max(0.0, (d - u) / 2)
    return {"configured_one_way_s": configured_s, "measured_one_way_s": measured,
            "rtt_delayed_s": d, "rtt_undelayed_s": u, "samples": len(rtt["delayed"]),
            "relative_error": (measured - configured_s) / configured_s if configured_s > 0 else None,
            "method": "UDP echo between ranks 0 and 1 through the relay; delayed minus undelayed round trip, / 2"}
