"""A delay-and-loss line in user space for one lab host's link, for kernels without `sch_netem`
(`tc netem` is what `Host.impair` uses where the kernel has it).

The host's switch port is taken off the bridge and a process in the switch namespace relays
frames between it and a new veth whose other end joins the bridge in its place:

    host ns: lab0 <-veth-> p-<host> | wire process | x-<host> <-veth-> y-<host> on br0   (switch ns)

Like netem on the host's interface, frames the host sends are held `delay_ms` and dropped with
probability `loss_pct` / 100; frames to the host pass at once. Frames are read and written with
their virtio-net header (PACKET_VNET_HDR), so TCP segmentation and checksum offload survive the
relay (a 64 KB TSO frame goes through as one frame, as on the veth itself).

Run as `python -m specserve.cluster.netns_wire P X DELAY_MS LOSS_PCT SEED` inside the switch
namespace; it relays until killed.
"""

from __future__ import annotations

import heapq
import random
import socket
import sys
import threading
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4  # a frame this socket's interface sent (our own writes): not relayed back
MAX_FRAME = 65536 + 10 + 14  # a GSO frame, its virtio-net header and Ethernet header


def open_port(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.bind((ifname, 0))
    return s


class DelayLine:
    """Frames due at a time, sent in due order by one thread."""

    def __init__(self):
        self._heap: list[tuple[float, int, bytes, socket.socket]] = []
        self._cv = threading.Condition()
        self._count = 0

    def put(self, due: float, frame: bytes, out: socket.socket) -> None:
        with self._cv:
            self._count += 1
            heapq.heappush(self._heap, (due, self._count, frame, out))
            self._cv.notify()

    def run(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, frame, out = heapq.heappop(self._heap)
            try:
                out.send(frame)
            except OSError:  # the interface went down (the host's cable pulled): the frame is lost
                pass


def relay(src: socket.socket, dst: socket.socket, delay_s: float, loss: float, line: DelayLine,
          rng: random.Random) -> None:
    while True:
        frame, addr = src.recvfrom(MAX_FRAME)
        if addr[2] == PACKET_OUTGOING:
            continue
        if loss and rng.random() < loss:
            continue
        if delay_s:
            line.put(time.monotonic() + delay_s, frame, dst)
        else:
            try:
                dst.send(frame)
            except OSError:
                pass


def main(argv: list[str]) -> None:
    host_port, bridge_port, delay_ms, loss_pct, seed = argv
    host_side, bridge_side = open_port(host_port), open_port(bridge_port)
    line = DelayLine()
    threading.Thread(target=line.run, daemon=True).start()
    threading.Thread(target=relay, args=(bridge_side, host_side, 0.0, 0.0, line, random.Random()),
                     daemon=True).start()
    print("relaying", flush=True)  # the sockets are bound: frames from now on are relayed
    relay(host_side, bridge_side, float(delay_ms) / 1000, float(loss_pct) / 100, line, random.Random(int(seed)))


if __name__ == "__main__":
    main(sys.argv[1:])
