"""Prometheus metrics of a worker process, served on DEEPBATCH_METRICS_PORT (README: Metrics).

Counters and histograms are updated where requests finish (worker/feeder.py); engine gauges are read
from the engine's optional `stats()` by the maintenance thread, so the engine stays free of this module.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (0.1, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)

requests_finished = Counter("deepbatch_requests_total", "Requests this worker finished, by outcome", ["outcome"])
generated_tokens = Counter("deepbatch_generated_tokens_total", "Completion tokens generated (rate() gives tokens/s)")
prompt_tokens = Counter("deepbatch_prompt_tokens_total", "Prompt tokens processed")
cache_hits = Counter("deepbatch_cache_hits_total", "Greedy requests answered from an identical earlier result")
retries = Counter("deepbatch_retries_total", "Attempts that failed transiently and were retried")
dead_letters = Counter("deepbatch_dead_letters_total", "Requests this worker dead-lettered")
request_latency = Histogram("deepbatch_request_latency_seconds", "From claim to recorded result",
                            buckets=LATENCY_BUCKETS)
queue_wait = Histogram("deepbatch_queue_wait_seconds", "From submission to the first claim", buckets=WAIT_BUCKETS)
in_flight = Gauge("deepbatch_requests_in_flight", "Requests this worker is running now")
circuit_open = Gauge("deepbatch_circuit_open", "1 once this worker's engine failed too often (it then exits)")
given_back = Counter("deepbatch_requests_given_back_total",
                     "Requests given back, their attempts not counted, when this worker's circuit opened")
batch_size = Gauge("deepbatch_engine_batch_size", "Sequences in the engine's latest step")
kv_cache_usage = Gauge("deepbatch_engine_kv_cache_usage", "Fraction of the engine's KV-cache blocks in use")


def serve(port: int) -> None:
    """Serve /metrics; a port already taken (two workers on one host, one setting) costs the metrics, not the work."""
    if not port:
        return
    try:
        start_http_server(port)
    except OSError as error:
        log.error("metrics not served: port %d (DEEPBATCH_METRICS_PORT) is unavailable: %s", port, error)


def record_engine_stats(engine: Any) -> None:
    stats = getattr(engine, "stats", None)
    if stats is None:
        return
    values = stats()
    batch_size.set(values.get("batch_size", 0))
    kv_cache_usage.set(values.get("kv_cache_usage", 0.0))
