"""How a run emulates a link (`link.Link`) on this machine, best first:

1. TUN relay (`relay.py`): every rank in its own network namespace, the ranks
   joined by TUN devices through a userspace delay line that holds each real
   packet for the one-way latency and meters each rank's send rate. Rate and
   latency are both applied; a latency probe in every run (`latency.py`)
   measures the delay the packets really got.
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
import subprocess
import sys
from dataclasses import replace

from . import relay
from .link import Link

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
