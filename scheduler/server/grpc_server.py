"""The gRPC server: Generation service, health, reflection, auth, TLS, metrics, graceful shutdown.

The server listens before the model is loaded: health answers NOT_SERVING and Generate
UNAVAILABLE until `attach` hands it a ready engine. Once serving, health follows the engine
loops (polled every health_poll_s): SERVING while at least one is healthy (e.g. a Ray verify
worker answers), NOT_SERVING while none is. Shutdown stops admitting, lets requests in flight
finish for a grace period, aborts the rest, then stops the server. With http_port set, the
OpenAI-compatible HTTP API (openai_api.py) listens beside gRPC on the same asyncio loop, with
the same servicer, auth token and TLS files, and follows the same health.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc
from specserve.workers.engine.engine_loop import DEFAULT_STALL_TIMEOUT_S, EngineLoop, EngineLoopLike
from specserve.workers.model.loader import LoadedModel
from specserve.workers.spec.methods import SpecMethod

from specserve.scheduler.server.auth import BearerTokenInterceptor, is_loopback
from specserve.scheduler.server.http_server import HttpServer
from specserve.scheduler.server.metrics import ServerMetrics
from specserve.scheduler.server.openai_api import create_app
from specserve.scheduler.server.router import Router
from specserve.scheduler.server.servicer import GenerationServicer
from specserve.scheduler.server.validation import ServedModel

log = logging.getLogger("specserve.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "specserve.v1.Generation"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: a free port
    token: str | None = None  # bearer token required on every call but health
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the server speaks TLS only
    tls_key: Path | None = None
    allow_unauthenticated: bool = False  # needed to listen beyond loopback without a token
    max_queued: int = 64  # per replica: requests in flight beyond the engine's batch; more are RESOURCE_EXHAUSTED
    replicas: int = 1  # engines in this process sharing the weights, each with its own KV pool
    metrics_port: int | None = 9464  # Prometheus /metrics (0: a free port, None: off)
    shutdown_grace_s: float = 30.0  # how long requests in flight may finish on shutdown
    health_poll_s: float = 0.5  # how often health is recomputed from the engine loops
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # an engine loop with requests and no progress this long is unhealthy
    http_port: int | None = None  # the OpenAI-compatible HTTP API (0: a free port, None: off; the CLI's default 8000)

    def __post_init__(self):
        for name, port in (("port", self.port), ("http_port", self.http_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if not self.token and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(f"listening on {self.host} (not loopback) needs --token (or SPECSERVE_TOKEN), "
                             "or --allow-unauthenticated to run without authentication")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.health_poll_s <= 0:
            raise ValueError(f"health_poll_s must be > 0, got {self.health_poll_s}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")


def served_model(loaded: LoadedModel, name: str) -> ServedModel:
    engine = loaded.engine
    speculating = engine.speculator is not None
    return ServedModel(
        name=name, tokenizer=engine.tokenizer, context_length=engine.max_model_len,
        vocab_size=engine.model.config.vocab_size,
        spec_method=engine.config.spec.method if speculating else "none",
        known_spec_methods=tuple(m.value for m in SpecMethod),
        max_draft_tokens=engine.speculator.max_draft_tokens if speculating else 0,
    )


class SpecServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self._server: grpc.aio.Server | None = None  # made in start(), on the serving event loop
        self._health = health_aio.HealthServicer()
        self._servicer = GenerationServicer()
        self.loops: list[EngineLoopLike] = []
        self._on_shutdown: Callable[[], None] | None = None
        self._health_watch: asyncio.Task | None = None
        self.metrics: ServerMetrics | None = None
        self.port = self.metrics_port = self.http_port = None
        self._http: HttpServer | None = None
        self.serving = False  # health is SERVING

    async def start(self) -> int:
        """Listens (health NOT_SERVING until attach); returns the port."""
        interceptors = [BearerTokenInterceptor(self.config.token)] if self.config.token else []
        self._server = grpc.aio.server(interceptors=interceptors)
        pb_grpc.add_GenerationServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(self.config.tls_key).read_bytes(),
                                                      Path(self.config.tls_cert).read_bytes())])
                self.port = self._server.add_secure_port(address, creds)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as e:
            raise ValueError(f"cannot listen on {address} (in use, or not an address of this machine): {e}") from None
        await self._server.start()
        if self.config.http_port is not None:
            await self._start_http()
        return self.port

    async def _start_http(self) -> None:
        app = create_app(self._servicer, lambda: self.serving, self.config.token)
        self._http = HttpServer(app, self.config.host, self.config.http_port, self.config.tls_cert, self.config.tls_key)
        try:
            self.http_port = await self._http.start()
        except Exception:
            await self._server.stop(grace=None)
            raise

    async def attach(self, loaded: LoadedModel, name: str) -> None:
        """Starts serving `loaded` (and config.replicas - 1 more engines over its weights): the
        engine loops run, health turns SERVING."""
        engine = loaded.engine
        engines = [engine] + [engine.replica() for _ in range(self.config.replicas - 1)]
        loops = [EngineLoop(e, self.config.max_queued, self.config.stall_timeout_s).start() for e in engines]
        await self.attach_loops(loops, served_model(loaded, name), loaded.source.fingerprint, engine.config.block_size)

    async def attach_loops(self, loops: list[EngineLoopLike], model: ServedModel, fingerprint: str, block_size: int,
                           on_shutdown: Callable[[], None] | None = None) -> None:
        """Starts serving engine loops that are already running (in-process EngineLoops, or
        RemoteEngineLoops of Ray verify workers); health turns SERVING and then follows the loops.
        on_shutdown runs (on a thread) after the loops stopped."""
        self.loops, self._on_shutdown = loops, on_shutdown
        self.metrics = ServerMetrics(self._servicer.stats)
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.host, self.config.metrics_port)
        router = Router(len(self.loops), block_size=block_size)
        self._servicer.attach(self.loops, model, fingerprint, self.metrics, router)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._health_watch = asyncio.create_task(self._watch_health())

    async def _watch_health(self) -> None:
        serving = True
        while True:
            await asyncio.sleep(self.config.health_poll_s)
            healthy = any(loop.healthy() for loop in self.loops)
            if healthy != serving:
                serving = healthy
                log.warning("health: %s (%d of %d engine loops healthy)", "SERVING" if healthy else "NOT_SERVING",
                            sum(loop.healthy() for loop in self.loops), len(self.loops))
                await self._set_health(health_pb2.HealthCheckResponse.SERVING if healthy
                                       else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def shutdown(self) -> None:
        """Graceful: stop admitting, wait up to shutdown_grace_s for requests in flight, abort the rest."""
        if self._health_watch is not None:
            self._health_watch.cancel()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for loop in self.loops:
            loop.close()
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while any(loop.in_flight() for loop in self.loops) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for loop in self.loops:
            loop.stop(timeout=10)
        # Front doors first, the backend last: an RPC handler freed after Ray's shutdown would drop
        # Ray references into a destroyed core worker (the process aborted, SIGABRT, on SIGTERM).
        await self._server.stop(grace=1.0)
        if self._http is not None:
            await self._http.stop()
        if self._on_shutdown is not None:
            await asyncio.to_thread(self._on_shutdown)
        if self.metrics is not None:
            self.metrics.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def _set_health(self, status) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for service in ("", SERVICE):
            await self._health.set(service, status)


class ServerThread:
    """A SpecServer on its own asyncio loop in a daemon thread (embedding and tests)."""

    def __init__(self, config: ServerConfig):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)
        self._thread.start()
        self.server = SpecServer(config)
        self.port = self._call(self.server.start())
        self.http_port = self.server.http_port

    def attach(self, loaded: LoadedModel, name: str) -> None:
        self._call(self.server.attach(loaded, name))

    def attach_loops(self, loops: list[EngineLoopLike], model: ServedModel, fingerprint: str, block_size: int,
                     on_shutdown: Callable[[], None] | None = None) -> None:
        self._call(self.server.attach_loops(loops, model, fingerprint, block_size, on_shutdown))

    def stop(self) -> None:
        self._call(self.server.shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
