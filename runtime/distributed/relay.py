"""The delay line: a userspace relay between the ranks' TUN devices that holds
every packet for the one-way latency and meters each rank's send rate, as
Mahimahi's delay and link shells do (no netem needed).

Each rank runs in its own network namespace `passlab-<pid>-<rank>` whose only
route to the others is a TUN device `pl0` with address 10.77.0.<rank+1>. The
relay (this module, one process, started by `namespaces.Namespace`) holds the TUN
file descriptor of every namespace. A packet read from rank i's TUN is given
its departure time on rank i's uplink (serialized at the link rate after the
packets before it) and delivered to the destination rank's TUN one latency
after it left. TCP segments without payload (acknowledgements) are delayed
but not queued behind data on the uplink: the links emulated (InfiniBand,
NVLink) acknowledge at the link level, and a TCP ack stuck behind a rank's own
megabytes would stall the other direction's window for a whole message.
Packets whose IP TOS byte is `PROBE_TOS` skip the delay (not the rate): the
latency probe times a delayed and an undelayed round trip over the same path,
so their difference is the delay the relay really applied.

`python -m passlab.runtime.distributed.relay RATE LATENCY NS0 NS1 ...` prints
"ready" once it holds every device; it ends when its parent dies.
"""
from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import select
import signal
import struct
import sys
import time

TUN_NAME = "pl0"
SUBNET = "10.77.0"
PROBE_TOS = 0x04
IFF_TUN, IFF_NO_PI, TUNSETIFF = 0x0001, 0x1000, 0x400454CA
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG, PR_SET_TIMERSLACK = 1, 29


def address(rank: int) -> str:
    return f"{SUBNET}.{rank + 1}"


def libc():
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """PR_SET_PDEATHSIG: this process gets `sig` when its parent ends; exits
    now if the parent already did (the race between fork and prctl)."""
    libc().prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def open_tun(netns: str) -> int:
    """Attach to the persistent TUN device `pl0` of network namespace `netns`."""
    lib = libc()
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    there = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if lib.setns(there, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TUN_NAME.encode(), IFF_TUN | IFF_NO_PI))
    finally:
        lib.setns(home, CLONE_NEWNET)
        os.close(there)
        os.close(home)
    return fd


def pure_ack(pkt: bytes) -> bool:
    """A TCP segment without payload (an acknowledgement, a window update)."""
    ihl = (pkt[0] & 0x0F) * 4
    if pkt[9] != 6 or len(pkt) < ihl + 20:
        return False
    total = int.from_bytes(pkt[2:4], "big")
    return total - ihl - (pkt[ihl + 12] >> 4) * 4 == 0


class DelayLine:
    """Per-source uplinks at `rate` bytes/s, then `latency` s of propagation."""

    def __init__(self, fds: list[int], rate: float, latency: float):
        self.fds, self.rate, self.latency = fds, rate, latency
        self.uplink_free = [0.0] * len(fds)
        self.queue: list = []
        self.seq = 0
        self.index = {address(r): r for r in range(len(fds))}

    def receive(self, src: int, pkt: bytes, now: float) -> None:
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            return                                        # IPv4 only (the ranks have no IPv6 route)
        dst = self.index.get(".".join(map(str, pkt[16:20])))
        if dst is None:
            return
        if pure_ack(pkt):
            depart = now                  # not queued behind data: the emulated link's acks are link-level
        else:
            depart = max(now, self.uplink_free[src]) + (len(pkt) / self.rate if self.rate > 0 else 0.0)
            self.uplink_free[src] = depart
        due = depart + (0.0 if pkt[1] == PROBE_TOS else self.latency)
        heapq.heappush(self.queue, (due, self.seq, dst, pkt))
        self.seq += 1

    def deliver(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, _, dst, pkt = heapq.heappop(self.queue)
            try:
                os.write(self.fds[dst], pkt)
            except (BlockingIOError, OSError):
                pass                                      # a full device queue drops, as a router would

    def serve(self) -> None:
        by_fd = {fd: r for r, fd in enumerate(self.fds)}
        while True:
            now = time.monotonic()
            timeout = max(0.0, self.queue[0][0] - now) if self.queue else 1.0
            ready, _, _ = select.select(self.fds, [], [], timeout)
            now = time.monotonic()
            for fd in ready:
                for _ in range(256):
                    try:
                        pkt = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    self.receive(by_fd[fd], pkt, now)
            self.deliver(time.monotonic())


def realtime() -> str:
    """Run the relay ahead of ordinary processes, so a packet leaves when it is
    due even on a loaded machine: SCHED_FIFO (it sleeps in select between
    packets, and the kernel's RT throttling bounds it), else the highest nice."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "SCHED_FIFO 10"
    except (AttributeError, OSError):
        try:
            os.nice(-20)
            return "nice -20"
        except OSError:
            return "default"


def main(argv: list[str]) -> None:
    rate, latency, names = float(argv[0]), float(argv[1]), argv[2:]
    die_with_parent(int(os.environ.get("PASSLAB_PARENT_PID", "0")) or None)
    libc().prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)          # 1 ns timer slack: wake-ups on time
    realtime()
    fds = [open_tun(n) for n in names]
    print("ready", flush=True)
    DelayLine(fds, rate, latency).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
