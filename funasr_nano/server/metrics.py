"""Prometheus metrics (prometheus-client), one registry per app.

Requests and errors by code, requests in progress, audio seconds and tokens decoded (tokens per
second is `rate(funasr_tokens_total[1m])`), request latency, and the scheduler's state read at
scrape time: queue depth (callers waiting for a sequence), sequences in flight, rounds, rows,
rounds shared by several requests (cross-request batching at work) and the most rows in one round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from funasr_nano.decoding import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _SchedulerCollector(Collector):
    """The shared scheduler's counters, read when Prometheus scrapes (none before the models are loaded)."""

    def __init__(self, scheduler: Callable[[], Scheduler | None]) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        scheduler = self._scheduler()
        if scheduler is None:
            return
        stats = scheduler.stats
        yield GaugeMetricFamily("funasr_queue_depth", "Requests' segment streams waiting for a free sequence",
                                value=scheduler.waiting)
        yield GaugeMetricFamily("funasr_sequences_in_flight", "Sequences decoding now", value=scheduler.live)
        yield GaugeMetricFamily("funasr_batch_width", "Sequences one decoding round can hold (--max-batch)",
                                value=scheduler.width)
        yield GaugeMetricFamily("funasr_batch_max_rows", "Most sequences decoded in one round", value=stats.max_rows)
        yield CounterMetricFamily("funasr_decode_rounds", "llama_decode rounds", value=stats.rounds)
        yield CounterMetricFamily("funasr_decode_rows", "Sequence rows over all rounds", value=stats.rows)
        yield CounterMetricFamily("funasr_shared_rounds", "Rounds with rows of more than one request",
                                  value=stats.shared_rounds)
        yield CounterMetricFamily("funasr_sequences_cancelled", "Sequences freed because their request went away",
                                  value=stats.cancelled)


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    def __init__(self, scheduler: Callable[[], Scheduler | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("funasr_requests", "Transcription requests by response format and status",
                                ["format", "status"], registry=r)
        self.errors = Counter("funasr_errors", "Failed requests by error code", ["code"], registry=r)
        self.in_progress = Gauge("funasr_requests_in_progress", "Requests accepted and not yet answered", registry=r)
        self.audio_seconds = Counter("funasr_audio_seconds", "Seconds of audio transcribed", registry=r)
        self.tokens = Counter("funasr_tokens", "Tokens decoded", registry=r)
        self.latency = Histogram("funasr_request_seconds", "Time from upload received to response complete",
                                 buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320), registry=r)
        r.register(_SchedulerCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)
