"""The in-process gRPC (and HTTP) server over loopback with the tiny model, as the server tests,
the OpenAI API tests and the fuzz bench test start it."""

from specserve.scheduler.server.grpc_server import ServerConfig, ServerThread
from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.engine.step_planner import PlannerConfig
from specserve.workers.model.loader import LoadedModel, LoadOptions, load_engine
from specserve.workers.spec.methods import SpecConfig


def load_tiny(folder: str, spec: str = "ngram", max_num_seqs: int = 32, kv_cache_bytes: int = 1 << 24) -> LoadedModel:
    """The tiny model's engine: 4-token blocks, `spec` with at most 8 draft tokens."""
    config = EngineConfig(block_size=4, kv_cache_bytes=kv_cache_bytes, spec=SpecConfig(spec, 8),
                          planner=PlannerConfig(max_num_seqs=max_num_seqs))
    return load_engine(folder, LoadOptions(config=config, progress=False))


def start_server(folder: str, attach: bool = True, max_num_seqs: int = 32, kv_cache_bytes: int = 1 << 24,
                 **config) -> ServerThread:
    """A started server on free ports (ServerConfig fields in `config` override), serving the tiny
    model as "tiny" unless attach is False (then it reports loading until attached)."""
    server = ServerThread(ServerConfig(**{"port": 0, "metrics_port": 0, **config}))
    if attach:
        server.attach(load_tiny(folder, max_num_seqs=max_num_seqs, kv_cache_bytes=kv_cache_bytes), "tiny")
    return server
