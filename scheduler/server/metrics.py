"""Prometheus metrics of the server, named the way vLLM users know them (`specserve:` prefix).

Latencies are histograms fed per request by the servicer; queue depth, running requests and
the cache and speculation counters are read from the engine loop at scrape time.
"""

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from collections.abc import Callable
from operator import attrgetter

from specserve.workers.engine.engine_loop import LoopStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0, 160.0)


class _LoopCollector:
    """Gauges and counters read from the engine loops' stats on every scrape."""

    GAUGES = {
        "num_requests_waiting": ("queued", "Requests admitted and waiting for their first step."),
        "num_requests_running": ("running", "Requests being prefilled or decoded."),
        "kv_cache_free_blocks": ("kv_blocks_free", "Free blocks in the paged KV pool."),
    }
    COUNTERS = {
        "request_success": ("finished", "Finished requests (aborted ones included)."),
        "request_rejected": ("rejected", "Requests refused with RESOURCE_EXHAUSTED."),
        "prompt_tokens": ("prompt_tokens", "Prompt tokens of finished requests."),
        "generation_tokens": ("generation_tokens", "Generated tokens of finished requests."),
        "prefix_cache_queries": ("prompt_tokens", "Prompt tokens looked up in the prefix cache."),
        "prefix_cache_hits": ("cached_tokens", "Prompt tokens found in the prefix cache."),
        "spec_decode_num_drafts": ("spec.spec_steps", "Verify steps over draft trees."),
        "spec_decode_num_draft_tokens": ("spec.drafted_tokens", "Draft tokens verified."),
        "spec_decode_num_accepted_tokens": ("spec.accepted_tokens", "Draft tokens accepted."),
    }

    def __init__(self, stats: Callable[[], LoopStats]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for name, (attr, doc) in self.GAUGES.items():
            yield GaugeMetricFamily(f"specserve:{name}", doc, value=getattr(stats, attr))
        for name, (attr, doc) in self.COUNTERS.items():
            yield CounterMetricFamily(f"specserve:{name}", doc, value=attrgetter(attr)(stats))


class ServerMetrics:
    def __init__(self, stats: Callable[[], LoopStats]):
        self.registry = CollectorRegistry()
        self.registry.register(_LoopCollector(stats))
        self.ttft = Histogram("specserve:time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("specserve:inter_token_latency_seconds", "Time between output tokens.",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("specserve:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self._http = None

    def serve_http(self, host: str, port: int) -> int:
        """Serves /metrics on host:port (0: a free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
