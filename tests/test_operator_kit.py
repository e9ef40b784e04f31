"""The operator's kit against a real server: deploy/grafana/echoplex.json and
deploy/prometheus/alerts.yml, and what the metrics say about the server itself.

The dashboard's and the rules' PromQL may name only metrics that a real server
exports, and only labels those metrics carry (or the target's `job` and `instance`):
both are checked against a scrape of `echoplex serve --mode workers` driven until every
labelled series exists (a rejection, a reset, UDP answered and dropped). promtool
checks the rules, and evaluates them (`promtool test rules`) on series whose names and
labels come from that same scrape: a healthy server raises no alert; a server in
trouble gives each rule the series it is meant to find.

Also here: `echoplex_build_info`, the `process_*` figures of every process of the
server (each worker's, in `workers` mode), and `--metrics-host` on IPv6.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import echoplex
from echoplex.client import round_trip

from .procs import ROOT, Server, needs_ipv6, require_tool
from .test_deploy import serve_options
from .test_metrics import METRICS_LINE, health, metrics_url
from .test_metrics_hostile import reset
from .waiting import wait_for

DASHBOARD = ROOT / "deploy" / "grafana" / "echoplex.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Labels Prometheus gives every series of a target, and the one metric it adds itself.
TARGET_LABELS = {"job", "instance"}
STANDARD_METRICS = frozenset({"up"})
INSTANCE = "echoplex-1:9812"  # the target the promtool scenarios pretend to scrape


# ---------------------------------------------------------------- scraping


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Scrape:
    samples: list[Sample]
    labels: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    """Label names seen on each sample name (`echoplex_errors_total`: model, worker, kind)."""

    @classmethod
    def of(cls, text: str) -> Scrape:
        samples = [
            Sample(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
        scrape = cls(samples)
        for sample in samples:
            scrape.labels[sample.name] |= set(sample.labels)
        return scrape

    def named(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.named(name, **labels))


def scrape_url(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        return Scrape.of(response.read().decode())


def scrape(server: Server) -> Scrape:
    return scrape_url(metrics_url(server, "/metrics"))


def scrape_until(server: Server, done: Any, what: str, timeout_s: float = 15.0) -> Scrape:
    """Scrape until `done(scrape)`; fail naming `what` if it never is."""

    def showing() -> Scrape | None:
        result = scrape(server)
        return result if done(result) else None

    return wait_for(showing, timeout_s, f"a scrape showing {what}")


def echo(address: tuple[str, int], data: bytes = b"kit") -> socket.socket:
    """A connection that has had `data` echoed."""
    sock = socket.create_connection(address, timeout=10)
    round_trip(sock, data)
    return sock


@pytest.fixture(scope="module")
def busy_scrape() -> Iterator[Scrape]:
    """A `workers` server (UDP beside TCP) after traffic that creates every labelled
    series: an echo (held a millisecond on purpose), a rejection over --max-connections,
    a reset, UDP datagrams answered and dropped over --udp-rate."""
    with Server(
        "--metrics-port", "0", "--workers", "2", "--udp", "--tcp",
        "--max-connections", "1", "--udp-rate", "1", "--latency", "1ms",
        mode="workers",
    ) as server:  # fmt: skip
        with echo(server.address):
            with socket.create_connection(server.address, timeout=10) as extra:
                assert extra.recv(1) == b""  # rejected: over --max-connections 1
        scrape_until(
            server, lambda s: s.total("echoplex_connections_open") == 0, "the slot given back"
        )
        reset(echo(server.address))  # an error: closed with a RST (SO_LINGER 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            for index in range(5):  # a burst of 2 is answered, then the source's rate
                client.sendto(b"d%d" % index, server.address)
            assert client.recv(100) == b"d0"
        result = scrape_until(
            server,
            lambda s: (
                all(
                    s.total(name) > 0
                    for name in (
                        "echoplex_echo_held_seconds_count",
                        "echoplex_connections_rejected_total",
                        "echoplex_errors_total",
                        "echoplex_udp_datagrams_answered_total",
                        "echoplex_udp_datagrams_dropped_total",
                    )
                )
                and s.total("echoplex_connections_open") == 0
            ),
            "a rejection, an error, UDP answered and dropped",
        )
        assert server.stop() == 0
    yield result


# ---------------------------------------------------------------- reading PromQL

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
MATCHERS = re.compile(r"\{([^{}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
RANGE = re.compile(r"\[[^\]]*\]")
IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?")
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$")
TEMPLATE_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")  # Grafana's legendFormat
ANNOTATION_LABEL = re.compile(r"\$labels\.(\w+)")  # an alert's annotations


@dataclass
class Query:
    metrics: set[str]
    labels: set[str]


def read_promql(expr: str) -> Query:
    """The metric names and the label names a PromQL expression uses (Grafana's
    `label_values(QUERY, LABEL)` and `$variables` too): enough PromQL to check names,
    not a parser."""
    labels: set[str] = set()
    if variable_query := LABEL_VALUES.match(expr):
        expr = variable_query.group(1)
        labels.add(variable_query.group(2))
    rest = STRING.sub('""', expr)
    for matchers in MATCHERS.findall(rest):
        labels |= set(MATCHER_LABEL.findall(matchers))
    rest = MATCHERS.sub(" ", rest)
    for names in GROUPING.findall(rest):
        labels |= {name.strip() for name in names.split(",") if name.strip()}
    rest = RANGE.sub(" ", GROUPING.sub(" ", rest))
    metrics = {
        name for name, call in IDENTIFIER.findall(rest) if not call and name.lower() not in KEYWORDS
    }
    return Query(metrics, labels)


def test_the_promql_reader() -> None:
    query = read_promql(
        'sum by (reason) (rate(a_total{x="y}{", z!~"$w"}[$__rate_interval])) / on (job) '
        "max without(pid) (b:ratio) > 0.5e3 and c unless absent(d{q='1'}) or time() - 2"
    )
    assert query.metrics == {"a_total", "b:ratio", "c", "d"}
    assert query.labels == {"reason", "x", "z", "job", "pid", "q"}
    variable = read_promql('label_values(m{job=~"$job"}, instance)')
    assert (variable.metrics, variable.labels) == ({"m"}, {"job", "instance"})


def check_names(
    where: str, query: Query, scrape: Scrape, allowed: frozenset[str] = frozenset()
) -> None:
    unknown = query.metrics - set(scrape.labels) - allowed
    assert not unknown, f"{where}: not exported: {sorted(unknown)}"
    carried = set(TARGET_LABELS).union(*(scrape.labels[m] for m in query.metrics - allowed))
    assert query.labels <= carried, f"{where}: no such label: {sorted(query.labels - carried)}"


# ---------------------------------------------------------------- the dashboard


def dashboard_queries() -> Iterator[tuple[str, str, set[str]]]:
    """(where, expression, labels its legend names) for each panel target and variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            legend = set(TEMPLATE_LABEL.findall(target.get("legendFormat", "")))
            yield f"panel {panel['title']!r}", target["expr"], legend
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable ${variable['name']}", variable["query"]["query"], set()


def test_the_dashboard_is_an_export_with_a_datasource_input() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    datasources = [
        item["datasource"]
        for panel in dashboard["panels"]
        for item in [panel, *panel.get("targets", [])]
        if "datasource" in item
    ] + [v["datasource"] for v in dashboard["templating"]["list"]]
    assert datasources and all(
        d == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for d in datasources
    )
    assert dashboard["id"] is None and dashboard["uid"] == "echoplex"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_dashboard_queries_name_what_the_server_exports(busy_scrape: Scrape) -> None:
    used: set[str] = set()
    for where, expr, legend in dashboard_queries():
        query = read_promql(expr)
        query.labels |= legend
        check_names(where, query, busy_scrape)
        used |= query.metrics
    # ... and it shows every echoplex metric there is.
    exported = {name for name in busy_scrape.labels if name.startswith("echoplex_")}
    assert exported - used == set()


def test_the_dashboard_and_the_rules_name_real_flags() -> None:
    options = serve_options()
    for path in (DASHBOARD, ALERTS):
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", path.read_text()))
        assert flags - options == set(), f"{path.name}: no such option"


# ---------------------------------------------------------------- the alert rules


@dataclass
class Rule:
    alert: str
    expr: str
    labels_used: set[str]
    """Labels the annotations name (`$labels.reason`)."""


def alert_rules() -> list[Rule]:
    """The rules of alerts.yml: each `- alert:` item's `expr` (inline, or a folded block)
    and the labels its annotations name. (No YAML library is a dependency.)"""
    rules: list[Rule] = []
    lines = ALERTS.read_text().splitlines()
    for number, line in enumerate(lines):
        if found := re.match(r"\s*- alert: (\w+)\s*$", line):
            rules.append(Rule(found.group(1), "", set()))
        elif rules and (found := re.match(r"(\s*)expr: (.*)$", line)):
            indent, value = len(found.group(1)), found.group(2).strip()
            if value in (">-", ">", "|", "|-"):
                block = []
                for following in lines[number + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) <= indent:
                        break
                    block.append(following.strip())
                value = " ".join(part for part in block if part)
            rules[-1].expr = value
        elif rules:
            rules[-1].labels_used |= set(ANNOTATION_LABEL.findall(line))
    return rules


def promtool(*args: str) -> str:
    """promtool's output; the test fails with it if promtool fails (skipped without
    promtool, except under CI, whose .ci/run installs it)."""
    result = subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_checks_the_rules() -> None:
    output = promtool("check", "rules", str(ALERTS))
    # The reader below saw every rule promtool saw.
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_the_rules_name_what_the_server_exports(busy_scrape: Scrape) -> None:
    rules = alert_rules()
    assert len({rule.alert for rule in rules}) == len(rules) >= 10
    for rule in rules:
        assert rule.expr, f"{rule.alert}: no expr"
        query = read_promql(rule.expr)
        query.labels |= rule.labels_used
        check_names(rule.alert, query, busy_scrape, allowed=STANDARD_METRICS)


def series(name: str, labels: dict[str, str]) -> str:
    text = ", ".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return f"{name}{{{text}}}"


def as_scraped(sample: Sample) -> dict[str, str]:
    """A sample's labels as Prometheus stores them: with the target's."""
    return {**sample.labels, "job": "echoplex", "instance": INSTANCE}


def flat_input(samples: Iterable[Sample]) -> list[dict[str, str]]:
    """Each sample as a promtool input series holding its scraped value for 40 minutes."""
    return [{"series": series(s.name, as_scraped(s)), "values": f"{s.value:f}x40"} for s in samples]


def promtool_test_rules(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    spec = tmp_path / "alerts_test.yml"  # JSON is YAML
    spec.write_text(
        json.dumps({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests})
    )
    promtool("test", "rules", str(spec))


def test_a_healthy_server_raises_no_alert(busy_scrape: Scrape, tmp_path: Path) -> None:
    # Every series the busy server exported, holding still (no new rejection, error or
    # drop), and its target up.
    scraped = [s for s in busy_scrape.samples if not s.name.endswith("_created")]
    up = {"series": series("up", {"job": "echoplex", "instance": INSTANCE}), "values": "1x40"}
    promtool_test_rules(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [*flat_input(scraped), up],
                "alert_rule_test": [
                    {"eval_time": "35m", "alertname": rule.alert, "exp_alerts": []}
                    for rule in alert_rules()
                ],
            }
        ],
    )


def expr_test(rule: str, input_series: list[dict[str, str]], expected: list[Any]) -> Any:
    """A promtool test: the rule's expression at 30 minutes gives exactly `expected`,
    a list of (series, value)."""
    (found,) = [r for r in alert_rules() if r.alert == rule]
    return {
        "interval": "1m",
        "input_series": input_series,
        "promql_expr_test": [
            {
                "expr": found.expr,
                "eval_time": "30m",
                "exp_samples": [{"labels": labels, "value": value} for labels, value in expected],
            }
        ],
    }


def test_each_rule_finds_the_trouble_it_is_for(busy_scrape: Scrape, tmp_path: Path) -> None:
    """Series named and labelled as the real server exports them, in trouble."""
    target = {"job": "echoplex", "instance": INSTANCE}

    def one(name: str, **labels: str) -> Sample:
        found = busy_scrape.named(name, **labels)
        assert found, f"the scrape has no {name} {labels}"
        return found[0]

    def rising(sample: Sample, per_minute: int) -> dict[str, str]:
        return {"series": series(sample.name, as_scraped(sample)), "values": f"0+{per_minute}x40"}

    def holding(sample: Sample, value: float) -> dict[str, str]:
        return {"series": series(sample.name, as_scraped(sample)), "values": f"{value:f}x40"}

    rejected = one("echoplex_connections_rejected_total")
    build = one("echoplex_build_info")
    worker_up = one("echoplex_worker_up")
    start = one("process_start_time_seconds", worker="worker-0")
    open_ = one("echoplex_connections_open")
    limit = one("echoplex_connections_max")
    errors = one("echoplex_errors_total")
    closes = busy_scrape.named("echoplex_connections_closed_total")
    dropped = one("echoplex_udp_datagrams_dropped_total", reason="rate-source")
    assert limit.value == 1  # --max-connections 1

    restarted = {  # at 20 minutes
        "series": series(start.name, as_scraped(start)),
        "values": f"{start.value:f}x20 {start.value + 600:f}x20",
    }
    promtool_test_rules(
        tmp_path,
        [
            expr_test(
                "EchoplexRejectingConnections",
                [rising(rejected, 60)],  # one a second
                [(series("", {**target, "reason": rejected.labels["reason"]}), 1)],
            ),
            # The supervisor answers (build info) but no worker says it is up...
            expr_test(
                "EchoplexNoWorkerUp",
                [holding(build, 1)],
                [(series(build.name, as_scraped(build)), 1)],
            ),
            # ... and not while one does.
            expr_test("EchoplexNoWorkerUp", [holding(build, 1), holding(worker_up, 1)], []),
            expr_test(
                "EchoplexNotAccepting",
                [holding(one("echoplex_accepting"), 0)],
                [(series("echoplex_accepting", as_scraped(one("echoplex_accepting"))), 0)],
            ),
            expr_test(
                "EchoplexNearConnectionLimit",
                [holding(open_, 1), holding(limit, limit.value)],
                [(series("", target), 1)],
            ),
            expr_test(
                "EchoplexConnectionErrors",  # every close an error
                [rising(errors, 60), *(rising(close, 60) for close in closes)],
                [(series("", target), 1 / len(closes))],
            ),
            expr_test(
                "EchoplexWorkerRestarting",
                [restarted],
                [(series("", as_scraped(start)), 1)],
            ),
            expr_test(
                "EchoplexUdpDropping",
                [rising(dropped, 600)],  # ten a second
                [(series("", {**target, "reason": "rate-source"}), 10)],
            ),
            expr_test(
                "EchoplexTargetDown",
                [{"series": series("up", target), "values": "0x40"}],
                [(series("up", target), 0)],
            ),
            expr_test(
                "EchoplexEchoDelayed",  # every piece held between 1 and 2.5 s
                held_between(busy_scrape, 1.0, 2.5),
                [(series("", target), 1 + 0.9 * 1.5)],  # interpolated in that bucket
            ),
        ],
    )


def held_between(scrape: Scrape, above_s: float, upto_s: float) -> list[dict[str, str]]:
    """The histogram's bucket series of one process, as the server labels them, when
    every piece of echo (one a second) was held more than `above_s` and up to `upto_s`,
    a bucket's bounds."""
    buckets = scrape.named("echoplex_echo_held_seconds_bucket")
    worker = buckets[0].labels["worker"]
    series_of_one = [b for b in buckets if b.labels["worker"] == worker]
    bounds = {float(b.labels["le"]) for b in series_of_one}
    assert {above_s, upto_s} <= bounds, bounds
    return [
        {
            "series": series(b.name, as_scraped(b)),
            "values": "0+60x40" if float(b.labels["le"]) >= upto_s else "0x40",
        }
        for b in series_of_one
    ]


# ---------------------------------------------------------------- what the metrics say


def loops() -> list[tuple[str, str, str]]:
    """(mode, --loop, the loop build info names)."""
    cases = [("threads", "auto", "none"), ("asyncio", "asyncio", "asyncio")]
    try:
        import uvloop  # noqa: F401

        cases.append(("workers", "uvloop", "uvloop"))
    except ImportError:
        cases.append(("workers", "asyncio", "asyncio"))
    return cases


@pytest.mark.parametrize(("mode", "loop", "named"), loops())
def test_build_info_names_the_version_model_and_loop(mode: str, loop: str, named: str) -> None:
    with Server("--metrics-port", "0", "--loop", loop, "--workers", "1", mode=mode) as server:
        (build,) = scrape(server).named("echoplex_build_info")
        assert build.labels == {"version": echoplex.__version__, "model": mode, "loop": named}
        assert build.value == 1
        assert server.stop() == 0


def test_a_single_process_server_exports_its_process_figures() -> None:
    with Server("--metrics-port", "0", mode="asyncio") as server:
        result = scrape(server)
        assert server.stop() == 0
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        (sample,) = result.named(name)
        assert sample.labels == {"model": "asyncio", "worker": "MainProcess"}
        assert sample.value > 0
    assert result.named("echoplex_worker_up") == []  # workers mode only
    assert result.total("echoplex_accepting") == 1


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            found |= {int(child) for child in listing.read().split()}
    return found


def test_workers_export_every_process_and_which_workers_are_up() -> None:
    with Server("--metrics-port", "0", "--workers", "2", mode="workers") as server:
        result = scrape(server)
        up = {int(s.labels["pid"]): s.labels["worker"] for s in result.named("echoplex_worker_up")}
        assert set(up.values()) == {"worker-0", "worker-1"}
        assert set(up) == children(server.proc.pid)  # the server's real worker processes
        cpu = {s.labels["worker"] for s in result.named("process_cpu_seconds_total")}
        assert cpu == {"MainProcess", "worker-0", "worker-1"}
        (started,) = result.named("process_start_time_seconds", worker="worker-0")

        # A worker killed is restarted: its series comes back with the new process's figures.
        killed = next(pid for pid, worker in up.items() if worker == "worker-0")
        os.kill(killed, signal.SIGKILL)

        def restarted(scrape: Scrape) -> bool:
            pids = {s.labels["pid"] for s in scrape.named("echoplex_worker_up", worker="worker-0")}
            return bool(pids) and str(killed) not in pids

        after = scrape_until(server, restarted, "worker-0 restarted")
        (again,) = after.named("process_start_time_seconds", worker="worker-0")
        assert again.value > started.value
        assert len(after.named("echoplex_worker_up")) == 2
        assert server.stop() == 0


def metrics_address(server: Server) -> str:
    match = server.wait_for_stderr(METRICS_LINE)
    return f"{match.group(1)}:{match.group(2)}"


@needs_ipv6
def test_metrics_host_takes_ipv6_like_host() -> None:
    with Server("--metrics-port", "0", "--metrics-host", "::1", mode="asyncio") as server:
        where = metrics_address(server)
        assert re.fullmatch(r"\[::1\]:\d+", where)  # a URL one can paste
        assert scrape_url(f"http://{where}/metrics").total("echoplex_accepting") == 1
        assert health(server) == 200
        port = int(where.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):  # IPv6 only, as --host ::1
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        assert server.stop() == 0


@needs_ipv6
def test_metrics_host_all_ipv6_serves_ipv4_too() -> None:
    with Server("--metrics-port", "0", "--metrics-host", "::", mode="asyncio") as server:
        port = metrics_address(server).rsplit(":", 1)[1]
        for host in ("[::1]", "127.0.0.1"):  # dual stack, as --host ::
            assert scrape_url(f"http://{host}:{port}/metrics").total("echoplex_accepting") == 1
        assert server.stop() == 0


def test_the_connection_limit_is_exported() -> None:
    with Server("--metrics-port", "0", "--max-connections", "7", mode="threads") as server:
        assert scrape(server).total("echoplex_connections_max") == 7
        assert server.stop() == 0


def test_accepting_turns_to_0_while_draining() -> None:
    with Server("--metrics-port", "0", mode="asyncio") as server:
        assert scrape(server).total("echoplex_accepting") == 1
        with echo(server.address):
            server.signal()
            server.wait_for_stderr("stopping")
            assert scrape(server).total("echoplex_accepting") == 0
        assert server.wait() == 0
