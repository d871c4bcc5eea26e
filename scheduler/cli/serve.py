"""`specserve serve`: listen first, load the model, serve until SIGINT/SIGTERM, shut down gracefully."""

import asyncio
import os
import signal
import sys

from specserve.cluster.placement import RoleSpec
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.model.sequence_parallel import SequenceParallelMode

from specserve.scheduler.ray.config import RayBackendConfig
from specserve.scheduler.ray.start import RayServeOptions, served_model_from, start_backend, stop_backend
from specserve.scheduler.server.grpc_server import ServerConfig, SpecServer


def server_config(args) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=args.port, token=args.token or None, tls_cert=args.tls_cert, tls_key=args.tls_key,
        allow_unauthenticated=args.allow_unauthenticated, max_queued=args.max_queued, replicas=args.replicas,
        metrics_port=None if args.no_metrics else args.metrics_port, shutdown_grace_s=args.shutdown_grace_s,
        http_port=None if args.no_http else args.http_port,
    )


def ray_serve_options(args) -> RayServeOptions | None:
    """From `specserve serve` arguments; None with --no-ray (the engine runs in this process)."""
    if args.no_ray:
        if args.address is not None:
            raise ValueError("--address and --no-ray exclude each other")
        return None

    def role(prefix: str, replicas: int) -> RoleSpec:
        restarts = getattr(RayBackendConfig, prefix).max_restarts  # see RayBackendConfig
        return RoleSpec(replicas=replicas, num_cpus=getattr(args, f"{prefix}_cpus"),
                        num_gpus=getattr(args, f"{prefix}_gpus"), max_restarts=restarts)

    verify_replicas = args.verify_replicas if args.verify_replicas is not None else args.replicas
    backend = RayBackendConfig(
        name=args.deployment_name, verify=role("verify", verify_replicas),
        prefill=role("prefill", args.prefill_replicas), draft=role("draft", args.draft_replicas),
        prefill_threshold=args.prefill_threshold, max_queued=args.max_queued, keep_workers=args.keep_workers,
        ready_timeout_s=args.worker_ready_timeout,
        prefill_group_size=args.prefill_group_size, sequence_parallel=SequenceParallelMode(args.sequence_parallel),
        long_prompt_threshold=args.long_prompt_threshold,
    )
    return RayServeOptions(args.address, backend)


def serve(config: ServerConfig, model: str, load_options: LoadOptions,
          ray_options: RayServeOptions | None = None) -> None:
    """ray_options: run the engines in Ray worker actors (None: in this process). Does not return:
    after a graceful shutdown the process exits at once with status 0."""
    asyncio.run(_serve(config, model, load_options, ray_options))
    # Everything is closed by now. The interpreter's own teardown then races Ray's and gRPC's C++
    # threads and aborted (SIGABRT, 2 of 3 SIGTERMs on this machine) after a clean shutdown, so
    # a deployment would have seen a crash; leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _say(message: str) -> None:
    print(f"specserve: {message}", file=sys.stderr, flush=True)


async def _serve(config: ServerConfig, model: str, load_options: LoadOptions,
                 ray_options: RayServeOptions | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = SpecServer(config)
    port = await server.start()
    scheme = "TLS" if config.tls_cert else "plaintext"
    http = f", OpenAI HTTP API on {config.host}:{server.http_port}" if server.http_port else ""
    _say(f"listening on {config.host}:{port} ({scheme}, auth {'on' if config.token else 'off'}{http}); "
         f"loading {model}")
    try:
        if ray_options is None:
            loaded = await asyncio.to_thread(load_engine, model, load_options)
            await server.attach(loaded, model)
        else:
            where = ray_options.address or "an embedded local Ray"
            _say(f"starting workers on {where}")
            backend = await asyncio.to_thread(start_backend, ray_options, model, load_options)
            info = backend.info
            await server.attach_loops(backend.loops, served_model_from(info, model), info.fingerprint,
                                      info.block_size, on_shutdown=lambda: stop_backend(backend))
        metrics = f"; metrics on http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        _say(f"ready: serving {model} on {config.host}:{port}{metrics}")
        await stop.wait()
        _say(f"shutting down: requests in flight get {config.shutdown_grace_s:g} s to finish")
    finally:
        await server.shutdown()
