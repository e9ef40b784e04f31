"""Prometheus metrics and a health endpoint, fed by the server's events.

`MetricsEvents` wraps the reporter a server already has and counts what it hears;
counting happens per connection (opened, rejected, closed with its byte totals),
never per chunk, so the echo hot path pays nothing. Bytes are therefore counted
when a connection ends. `prometheus-client` is an optional extra, imported only
here. In `workers` mode its multiprocess mode sums the workers' files (each
series carries a `worker` label, so per-worker figures stay visible).

Besides the counts: `echoplex_build_info` (version, model, event loop), the state
/healthz answers from (`echoplex_accepting`), the connection limit, and the standard
`process_*` figures of every process of the server, each labelled with its `worker`
like the rest (in `workers` mode, the supervisor and each live worker: a sum over
`worker` is the whole server's CPU and memory; `echoplex_worker_up` says which
workers are alive).

The HTTP endpoint serves `/metrics` and `/healthz` (200 while accepting, 503 while
draining or before the server listens).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from ._http import HTTPEndpoint, listen
from ._net import format_address
from .config import ServerConfig
from .errors import StartupError
from .events import BuildInfo, ConnectionRecord, ServerEvents

log = logging.getLogger("echoplex.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Every echoplex series says which model and which process (`Metrics.where`).
LABELS = ("model", "worker")
# From a millisecond of jitter to a minute-long stall.
HELD_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _require_client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise StartupError(
            "metrics need prometheus-client: pip install 'echoplex[metrics]'"
        ) from None
    return prometheus_client


def prepare_multiprocess() -> Callable[[], None]:
    """Point prometheus-client at a fresh directory shared with forked workers (before
    prometheus_client is first imported); returns what removes it again."""
    if os.environ.get(MULTIPROC_ENV):
        return lambda: None  # the operator's own directory: theirs to manage
    directory = tempfile.mkdtemp(prefix="echoplex-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    return lambda: shutil.rmtree(directory, ignore_errors=True)


def forget_process(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters keep counting in the sums)."""
    if MULTIPROC_ENV in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class Metrics:
    """The server's series, each labelled with the `model` that runs (its registry name,
    or a model of one's own under its own name: never just the config's mode, which did
    not choose a model passed as an object) and the `worker`."""

    def __init__(self, config: ServerConfig, model: str) -> None:
        prom = _require_client()
        self.prom = prom
        self.multiprocess = MULTIPROC_ENV in os.environ
        self.registry = prom.CollectorRegistry()
        if self.multiprocess:
            from prometheus_client import multiprocess

            # Metrics live in per-process files; the collector sums them at scrape time.
            multiprocess.MultiProcessCollector(self.registry)
        target = None if self.multiprocess else self.registry
        self.model = model
        self.max_connections = config.max_connections
        self.build: BuildInfo | None = None  # once the server has resolved its loop

        def counter(name: str, text: str, extra: tuple[str, ...] = ()) -> Any:
            return prom.Counter(name, text, [*LABELS, *extra], registry=target)

        self.open = prom.Gauge(
            "echoplex_connections_open",
            "Connections being served.",
            LABELS,
            registry=target,
            multiprocess_mode="livesum",
        )
        self.accepted = counter("echoplex_connections_accepted", "Connections admitted.")
        self.rejected = counter(
            "echoplex_connections_rejected", "Connections turned away, by reason.", ("reason",)
        )
        self.closed = counter(
            "echoplex_connections_closed", "Connections ended, by outcome.", ("outcome",)
        )
        self.errors = counter(
            "echoplex_errors", "Connections ended by an error, by kind.", ("kind",)
        )
        self.bytes_received = counter("echoplex_bytes_received", "Bytes received from clients.")
        self.bytes_sent = counter("echoplex_bytes_sent", "Bytes echoed back to clients.")
        self.conditioned = counter(
            "echoplex_connections_conditioned",
            "Connections that got a condition on purpose (--latency, the control API), "
            "by condition.",
            ("condition",),
        )
        self.held = prom.Histogram(
            "echoplex_echo_held_seconds",
            "How long the conditions on purpose (--latency, --bandwidth, --slice, a stall) "
            "held each piece of TCP echo, from its first byte's arrival to its write.",
            LABELS,
            registry=target,
            buckets=HELD_BUCKETS_S,
        )
        self.udp_tallies: list[Any] = []
        self.worker_up: Any = None
        if self.multiprocess:
            # Written by each worker as it starts, so a worker that has served nobody yet
            # shows too; `liveall` drops a dead worker's series once the supervisor has
            # forgotten it (forget_process), and adds its pid.
            self.worker_up = prom.Gauge(
                "echoplex_worker_up",
                "1 for each live worker process (workers mode).",
                LABELS,
                registry=None,
                multiprocess_mode="liveall",
            )
            # multiprocessing runs this in each child it starts, once the child's name
            # (`worker-N`) is set; the registration lasts as long as this object.
            multiprocessing.util.register_after_fork(self, Metrics.worker_started)
        self.registry.register(_UdpCollector(self))
        self.registry.register(_ServerCollector(self))
        self.registry.register(_ProcessCollector(self))
        self.draining = True  # until the server listens

    def worker_started(self) -> None:
        self.label(self.worker_up).set(1)

    def processes(self) -> dict[int, str]:
        """The server's processes (pid: worker label): this one, and the live workers."""
        processes = {os.getpid(): self.worker()}
        if self.multiprocess:
            from prometheus_client import multiprocess

            for family in multiprocess.MultiProcessCollector(None).collect():
                if family.name == "echoplex_worker_up":
                    for sample in family.samples:
                        processes[int(sample.labels["pid"])] = sample.labels["worker"]
        return processes

    def worker(self) -> str:
        # "MainProcess" for single-process models, "worker-N" in the workers model.
        return multiprocessing.current_process().name

    def where(self) -> list[str]:
        """The values of LABELS for this process."""
        return [self.model, self.worker()]

    def label(self, metric: Any, **extra: str) -> Any:
        return metric.labels(model=self.model, worker=self.worker(), **extra)


class MetricsEvents:
    """Counts what the wrapped reporter is told, then passes it on."""

    def __init__(self, inner: ServerEvents, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def starting(self, build: BuildInfo) -> None:
        self.metrics.build = build
        starting = getattr(self.inner, "starting", None)
        if starting is not None:
            starting(build)

    def listening(self, addresses: list[Any]) -> None:
        self.metrics.draining = False
        self.inner.listening(addresses)

    def connection_opened(self, record: ConnectionRecord) -> None:
        m = self.metrics
        record.opened_reported = True
        m.label(m.accepted).inc()
        m.label(m.open).inc()
        self.inner.connection_opened(record)

    def data_received(self, record: ConnectionRecord, data: bytes) -> None:
        self.inner.data_received(record, data)

    def connection_closed(self, record: ConnectionRecord) -> None:
        m = self.metrics
        outcome = record.outcome_label
        if record.opened_reported:
            m.label(m.open).dec()
        m.label(m.closed, outcome=outcome).inc()
        if record.outcome is not None and record.outcome.is_error:
            m.label(m.errors, kind=record.detail or record.outcome).inc()
        m.label(m.bytes_received).inc(record.bytes_in)
        m.label(m.bytes_sent).inc(record.bytes_out)
        for condition in record.condition_names:  # a series per condition
            m.label(m.conditioned, condition=condition).inc()
        self.inner.connection_closed(record)

    def echo_held(self, seconds: float) -> None:
        """A piece of echo that conditions held `seconds` is being written."""
        m = self.metrics
        m.label(m.held).observe(seconds)

    def connection_rejected(self, peer: Any, reason: str) -> None:
        m = self.metrics
        m.label(m.rejected, reason=reason).inc()
        self.inner.connection_rejected(peer, reason)

    def stopping(self) -> None:
        self.metrics.draining = True
        self.inner.stopping()

    def worker_exited(self, pid: int) -> None:
        """A `workers` process is gone (told by its supervisor): forget its live gauges."""
        forget_process(pid)

    def udp_watch(self, tally: Any) -> None:
        """The UDP echo's live counts (`echoplex.udp.Tally`), read at each scrape."""
        self.metrics.udp_tallies.append(tally)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _UdpCollector:
    """UDP counts, read from the UDP echo's own tally when scraped: counting there costs
    one integer increment per datagram, and the figures are exact at any moment. UDP is
    served by one process (the supervisor in `workers` mode)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        answered = CounterMetricFamily(
            "echoplex_udp_datagrams_answered", "UDP datagrams echoed.", labels=LABELS
        )
        dropped = CounterMetricFamily(
            "echoplex_udp_datagrams_dropped",
            "UDP datagrams not answered, by reason.",
            labels=[*LABELS, "reason"],
        )
        where = self.metrics.where()
        if self.metrics.udp_tallies:
            answered.add_metric(where, sum(t.answered for t in self.metrics.udp_tallies))
            reasons: dict[str, int] = {}
            for tally in self.metrics.udp_tallies:
                for reason, count in tally.dropped.items():
                    reasons[reason] = reasons.get(reason, 0) + count
            for reason, count in reasons.items():
                dropped.add_metric([*where, reason], count)
        return [answered, dropped]


class _ServerCollector:
    """The server as a whole, read when scraped: what runs, whether it accepts (as
    /healthz says), and its connection limit (`--max-connections`, over every worker)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        m = self.metrics
        where = m.where()
        families: list[Any] = []
        if m.build is not None:
            build = InfoMetricFamily(
                "echoplex_build", "The version, concurrency model and event loop running."
            )
            info = {"version": m.build.version, "model": m.build.model, "loop": m.build.loop}
            build.add_metric([], info)
            families.append(build)
        accepting = GaugeMetricFamily(
            "echoplex_accepting",
            "1 while the server accepts connections (/healthz answers 200); 0 before it "
            "listens and while it drains (503).",
            labels=LABELS,
        )
        accepting.add_metric(where, 0 if m.draining else 1)
        limit = GaugeMetricFamily(
            "echoplex_connections_max",
            "Connections served at once at most (--max-connections, the whole server); "
            "0: no limit.",
            labels=LABELS,
        )
        limit.add_metric(where, m.max_connections)
        return [*families, accepting, limit]


class _ProcessCollector:
    """prometheus-client's standard `process_*` figures (CPU, memory, descriptors, start
    time) for each of the server's processes, labelled with `model` and `worker` like
    every other series: one process outside `workers` mode; in it the supervisor
    (`MainProcess`: metrics, UDP) and each live worker. The supervisor alone serves the
    scrape, so it reads the workers' figures from /proc by pid."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        from prometheus_client import ProcessCollector
        from prometheus_client.core import Metric

        merged: dict[str, Any] = {}
        for pid, worker in self.metrics.processes().items():
            labels = {"model": self.metrics.model, "worker": worker}
            for family in ProcessCollector(pid=_constant(pid), registry=None).collect():
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, **labels}, sample.value)
        return merged.values()


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def serve_http(metrics: Metrics, host: str, port: int) -> tuple[Callable[[], None], int]:
    """Serve /metrics and /healthz in background threads; returns (stop, bound port)."""
    metrics_app = metrics.prom.make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            status = "503 Service Unavailable" if metrics.draining else "200 OK"
            body = b"draining\n" if metrics.draining else b"ok\n"
            start_response(
                status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            )
            return [body]
        if path in ("/metrics", "/"):
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    endpoint = HTTPEndpoint(listen(host, port, "metrics"), app, "metrics")
    endpoint.start()
    # An IPv6 address is bracketed, as a URL needs it: http://[::1]:9812/metrics
    where = format_address((host, endpoint.port))
    log.info("metrics on http://%s/metrics, health on /healthz", where)
    return endpoint.stop, endpoint.port


def metrics_events(
    config: ServerConfig, inner: ServerEvents, model: str
) -> tuple[ServerEvents, Callable[[], None]]:
    """Wrap `inner` with metrics of `model` (the name of the model that runs, as
    `echoplex.server.model_name` gives it) and start the endpoint if the config asks
    for it."""
    if config.metrics_port is None:
        return inner, lambda: None
    remove_directory = prepare_multiprocess() if model == "workers" else lambda: None
    metrics = Metrics(config, model)
    stop_http, _ = serve_http(metrics, config.metrics_host, config.metrics_port)

    def stop() -> None:
        stop_http()
        remove_directory()

    return MetricsEvents(inner, metrics), stop
