"""Round trips between two lab hosts, run inside their namespaces:

    python -m tests.helpers.udp_echo serve ADDRESS          echoes UDP datagrams on ADDRESS:9000
                                                            (prints "up" once bound)
    python -m tests.helpers.udp_echo probe ADDRESS N        sends N numbered datagrams one at a time;
                                                            prints {"median_ms", "lost"} as JSON
"""

import json
import socket
import sys
import time

PORT = 9000
REPLY_TIMEOUT_S = 0.5  # a datagram not answered within this is lost


def serve(address: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, PORT))
    print("up", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)


def probe(address: str, n: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(REPLY_TIMEOUT_S)
    rtts, lost = [], 0
    for i in range(n):
        sent, payload = time.monotonic(), str(i).encode()
        s.sendto(payload, (address, PORT))
        try:
            while s.recv(2048) != payload:  # a late answer to an earlier datagram
                pass
            rtts.append((time.monotonic() - sent) * 1000)
        except TimeoutError:
            lost += 1
    rtts.sort()
    print(json.dumps({"median_ms": rtts[len(rtts) // 2] if rtts else None, "lost": lost}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        probe(sys.argv[2], int(sys.argv[3]))
