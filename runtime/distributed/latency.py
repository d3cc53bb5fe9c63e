"""The latency probe of an emulated run: the one-way delay the packets really
got between ranks 0 and 1, through the relay."""
from __future__ import annotations

import select
import socket
import statistics
import time

from . import relay

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
