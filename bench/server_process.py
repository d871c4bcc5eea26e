"""The server a benchmark loads, in a process of its own (multiprocessing, spawn).

Load clients in the server's own process share its GIL: every chunk a client parses (the
`openai` client's pydantic models cost more per chunk than gRPC's protobuf) takes interpreter
time from the engine loop and the server's event loop, which then counts as the front door's
overhead and inflates inter-token latency. In its own process the server is measured as users
reach it, over loopback. The child loads the model, starts gRPC (and HTTP), sends its ports and
serves until told to stop (or until the parent goes away).
"""

import multiprocessing
from dataclasses import dataclass

from specserve.workers.model.loader import LoadOptions

START_TIMEOUT_S = 900.0  # model load, kernel choice and latency profile on a slow machine


@dataclass(frozen=True)
class ServerSpec:
    model: str
    load: LoadOptions
    max_queued: int
    http: bool  # also serve the OpenAI HTTP API


def _serve(spec: ServerSpec, conn) -> None:
    from specserve.scheduler.server.grpc_server import ServerConfig, ServerThread
    from specserve.workers.model.loader import load_engine

    try:
        server = ServerThread(ServerConfig(port=0, metrics_port=None, max_queued=spec.max_queued,
                                           http_port=0 if spec.http else None))
        server.attach(load_engine(spec.model, spec.load), spec.model)
    except Exception as e:  # noqa: BLE001 - the parent reports it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ports", server.port, server.http_port))
    try:
        conn.recv()  # stop, or EOFError once the parent is gone
    except EOFError:
        pass
    server.stop()


class ServerProcess:
    """`with ServerProcess(spec) as server:` a server in a child process, on server.grpc_port
    (and server.http_port)."""

    def __init__(self, spec: ServerSpec):
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(spec, child), name="specserve-bench-server", daemon=True)
        self._process.start()
        child.close()

    def __enter__(self) -> "ServerProcess":
        if not self._conn.poll(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"the benchmark's server did not start in {START_TIMEOUT_S:.0f} s")
        try:
            reply = self._conn.recv()
        except EOFError:
            self._process.join(10)
            raise RuntimeError(f"the benchmark's server exited while starting (exit code {self._process.exitcode}; "
                               "a script that starts it needs an `if __name__ == '__main__':` guard)") from None
        if reply[0] == "error":
            self.stop()
            raise RuntimeError(f"the benchmark's server failed to start: {reply[1]}")
        self.grpc_port, self.http_port = reply[1], reply[2]
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (all its threads)."""
        import psutil

        times = psutil.Process(self._process.pid).cpu_times()
        return times.user + times.system

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self._process.join(60)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
