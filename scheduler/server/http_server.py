"""uvicorn serving an ASGI app on the caller's asyncio loop (the gRPC server's), inside specserve.

The socket is bound here, so a port in use is a ValueError naming the address rather than
uvicorn's exit of the whole process. Signals stay with specserve: its shutdown stops this server
after the gRPC one, when the requests in flight have finished or been aborted.
"""

import asyncio
import contextlib
import socket
from pathlib import Path

import uvicorn

STOP_GRACE_S = 2.0  # connections still open when the server stops get this long to close


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn would take SIGINT/SIGTERM from specserve's own handlers; leave them be."""
        yield


class HttpServer:
    def __init__(self, app, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None):
        self.host, self.requested_port = host.strip("[]"), port
        self._config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                      ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                      timeout_graceful_shutdown=STOP_GRACE_S)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Listens; returns the port (the free one chosen for port 0)."""
        sock = self._bind()
        self._server = _EmbeddedServer(self._config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # uvicorn sets it once the socket accepts
            if self._task.done():
                self._task.result()  # raises what failed
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    def _bind(self) -> socket.socket:
        address = f"{self.host}:{self.requested_port}"
        sock = None
        try:
            family, kind, proto, _, where = socket.getaddrinfo(self.host, self.requested_port,
                                                               type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
        except OSError as e:
            if sock is not None:
                sock.close()
            raise ValueError(f"cannot listen on {address} for HTTP (in use, or not an address of this machine): "
                             f"{e}") from None
        return sock

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task
