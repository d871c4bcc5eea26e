"""The redis_server fixture talks to a real server: a SET/GET round trip in raw RESP."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def _resp_command(*args: bytes) -> bytes:
    # ("SET", "k", "v") -> b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def _read_reply(f) -> bytes | None:
    """Reads one simple-string or bulk-string reply; None for a nil bulk string."""
    line = f.readline()
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body
    if kind == b"$":
        n = int(body)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    raise AssertionError(f"unexpected reply {line!r}")


def test_set_get_round_trip(redis_server: str) -> None:
    url = urlparse(redis_server)
    assert url.scheme == "redis" and url.hostname == "127.0.0.1"
    value = bytes(range(256))  # binary-safe: every byte value, incl. \r\n
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        f = s.makefile("rb")
        s.sendall(_resp_command(b"SET", b"specserve:test", value))
        assert _read_reply(f) == b"OK"
        s.sendall(_resp_command(b"GET", b"specserve:test"))
        assert _read_reply(f) == value
        s.sendall(_resp_command(b"GET", b"specserve:absent"))
        assert _read_reply(f) is None
