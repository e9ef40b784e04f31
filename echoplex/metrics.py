"""Prometheus metrics and a health endpoint, fed by the server's events.

`MetricsEvents` wraps the reporter a server already has and counts what it hears;
counting happens per connection (opened, rejected, closed with its byte totals),
never per chunk, so the echo hot path pays nothing. Bytes are therefore counted
when a connection ends. `prometheus-client` is an optional extra, imported only
here. In `workers` mode its multiprocess mode sums the workers' files (each
series carries a `worker` label, so per-worker figures stay visible).

The HTTP endpoint serves `/metrics` and `/healthz` (200 while accepting, 503 while
draining or before the server listens).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .config import ServerConfig
from .errors import StartupError
from .events import ConnectionRecord, ServerEvents

log = logging.getLogger("echoplex.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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
    def __init__(self, mode: str) -> None:
        prom = _require_client()
        self.prom = prom
        self.multiprocess = MULTIPROC_ENV in os.environ
        self.registry = prom.CollectorRegistry()
        if self.multiprocess:
            from prometheus_client import multiprocess

            # Metrics live in per-process files; the collector sums them at scrape time.
            multiprocess.MultiProcessCollector(self.registry)
        target = None if self.multiprocess else self.registry
        labels = ["model", "worker"]
        self.mode = mode

        def counter(name: str, text: str, extra: tuple[str, ...] = ()) -> Any:
            return prom.Counter(name, text, [*labels, *extra], registry=target)

        self.open = prom.Gauge(
            "echoplex_connections_open",
            "Connections being served.",
            labels,
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
        self.udp_tallies: list[Any] = []
        self.registry.register(_UdpCollector(self))
        self.draining = True  # until the server listens

    def worker(self) -> str:
        # "MainProcess" for single-process models, "worker-N" in the workers model.
        return multiprocessing.current_process().name

    def label(self, metric: Any, **extra: str) -> Any:
        return metric.labels(model=self.mode, worker=self.worker(), **extra)


class MetricsEvents:
    """Counts what the wrapped reporter is told, then passes it on."""

    def __init__(self, inner: ServerEvents, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

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
        outcome = record.outcome or "closed"
        if record.opened_reported:
            m.label(m.open).dec()
        m.label(m.closed, outcome=outcome).inc()
        if outcome == "reset" or outcome.startswith("error:"):
            m.label(m.errors, kind=outcome.removeprefix("error:")).inc()
        m.label(m.bytes_received).inc(record.bytes_in)
        m.label(m.bytes_sent).inc(record.bytes_out)
        self.inner.connection_closed(record)

    def connection_rejected(self, peer: Any, reason: str) -> None:
        m = self.metrics
        m.label(m.rejected, reason=reason).inc()
        self.inner.connection_rejected(peer, reason)

    def stopping(self) -> None:
        self.metrics.draining = True
        self.inner.stopping()

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

        labels = ["model", "worker"]
        answered = CounterMetricFamily(
            "echoplex_udp_datagrams_answered", "UDP datagrams echoed.", labels=labels
        )
        dropped = CounterMetricFamily(
            "echoplex_udp_datagrams_dropped",
            "UDP datagrams not answered, by reason.",
            labels=[*labels, "reason"],
        )
        where = [self.metrics.mode, self.metrics.worker()]
        if self.metrics.udp_tallies:
            answered.add_metric(where, sum(t.answered for t in self.metrics.udp_tallies))
            reasons: dict[str, int] = {}
            for tally in self.metrics.udp_tallies:
                for reason, count in tally.dropped.items():
                    reasons[reason] = reasons.get(reason, 0) + count
            for reason, count in reasons.items():
                dropped.add_metric([*where, reason], count)
        return [answered, dropped]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per scrape: a slow scraper must not hold up the health check.
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def serve_http(metrics: Metrics, host: str, port: int) -> tuple[Callable[[], None], int]:
    """Serve /metrics and /healthz in a background thread; returns (stop, bound port)."""
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

    try:
        server = make_server(
            host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    bound_port: int = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, bound_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop, bound_port


def metrics_events(
    config: ServerConfig, inner: ServerEvents
) -> tuple[ServerEvents, Callable[[], None]]:
    """Wrap `inner` with metrics and start the endpoint if the config asks for it."""
    if config.metrics_port is None:
        return inner, lambda: None
    remove_directory = prepare_multiprocess() if config.mode == "workers" else lambda: None
    metrics = Metrics(config.mode)
    stop_http, _ = serve_http(metrics, config.metrics_host, config.metrics_port)

    def stop() -> None:
        stop_http()
        remove_directory()

    return MetricsEvents(inner, metrics), stop
