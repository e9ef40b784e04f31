"""deploy/ against the CLI it drives, and each file run the way its platform runs it.

Consistency: every `--flag` given to `echoplex serve` in deploy/ (and in
docs/operations.md) is an option of the real parser, every `ECHOPLEX_*` variable is
one that `echoplex serve` reads, and each file's command line and environment parse
together without error. Ports agree across the files, and each stop timeout is longer
than the drain it has to wait for.

What can run here runs: the Dockerfile's entrypoint with its environment, probed by its
HEALTHCHECK command; the Kubernetes container's args and env, probed as the kubelet
would; the systemd service's ExecStart handed a listening socket as the .socket unit
describes (LISTEN_FDS/LISTEN_PID, as systemd does); and deploy/haproxy.cfg, checked by
`haproxy -c`, then run on loopback in front of three instances started with the
command line its comments give. Docker, a cluster and systemd itself are not needed.

No YAML library is a dependency: the Kubernetes file is read by a small parser for the
subset it uses, which refuses anything outside that subset rather than guess.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from echoplex.cli import build_parser
from echoplex.commands.serve import ENVIRONMENT_PREFIX
from echoplex.models.workers import EXIT_GRACE_S

from .haproxy import HAProxy, frontend_socket, start, wait_until_open
from .procs import LISTENING, ROOT, Process, Server, require_tool
from .waiting import wait_for

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
SOCKET_UNIT = DEPLOY / "echoplex.socket"
SERVICE_UNIT = DEPLOY / "echoplex.service"
KUBERNETES = DEPLOY / "kubernetes.yaml"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
OPERATIONS = ROOT / "docs" / "operations.md"
# Files whose `echoplex serve` lines and ECHOPLEX_* names must match the CLI.
CHECKED = [DOCKERFILE, SOCKET_UNIT, SERVICE_UNIT, KUBERNETES, HAPROXY_CFG, OPERATIONS]

ECHO_PORT = 12345  # what clients connect to, whatever serves it
DEFAULT_DRAIN_S = 5.0
DOCKER_STOP_TIMEOUT_S = 10  # `docker stop` without -t
METRICS_LINE = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
VARIABLE = re.compile(rf"\b{ENVIRONMENT_PREFIX}[A-Z0-9_]+\b")
# `echoplex serve ...` (or `python -m echoplex serve ...`), and `docker run ... IMAGE ...`
# with the image's tag: what follows the image goes to its ENTRYPOINT, `echoplex serve`.
SERVE_LINE = re.compile(r"\bechoplex serve\b[^\n`]*|\bechoplex:[\w.-]+ --[^\n`]*")


# ---------------------------------------------------------------- the CLI


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser().parse_args(["serve"]).parser
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def serve_options() -> set[str]:
    return {option for action in serve_parser()._actions for option in action.option_strings}


def serve_variables() -> dict[str, str]:
    """`ECHOPLEX_MAX_PER_IP` -> `--max-per-ip`, for every option the environment can set
    (the rule of echoplex._cli_util.environment_variables)."""
    names = {}
    for action in serve_parser()._actions:
        long_options = [o for o in action.option_strings if o.startswith("--")]
        if long_options and action.dest not in ("help", "version"):
            option = long_options[0]
            names[ENVIRONMENT_PREFIX + option[2:].upper().replace("-", "_")] = option
    return names


def parse_serve(
    argv: Sequence[str], environment: Mapping[str, str], where: str
) -> argparse.Namespace:
    """`echoplex serve ARGV` with these variables set, parsed as the command parses it;
    a rejection fails the test, naming the file."""
    parser = serve_parser()
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith(ENVIRONMENT_PREFIX)]:
            patch.delenv(name)
        for name, value in environment.items():
            patch.setenv(name, value)
        try:
            args = parser.parse_args(list(argv))  # the environment read as it parses
        except SystemExit:
            pytest.fail(f"{where}: echoplex serve rejects {list(argv)} with {dict(environment)}")
    return args


def echoplex_variables(environment: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environment.items() if k.startswith(ENVIRONMENT_PREFIX)}


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_every_flag_and_variable_exists(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is not there")
    text = path.read_text().replace("\\\n", " ")
    options, variables = serve_options(), serve_variables()
    lines = SERVE_LINE.findall(text)
    assert lines or path in (OPERATIONS, SOCKET_UNIT), f"no echoplex serve in {path}"
    for line in lines:
        unknown = set(FLAG.findall(line)) - options
        assert not unknown, f"{path.name}: `{line.strip()}` uses {sorted(unknown)}"
    unknown_variables = set(VARIABLE.findall(text)) - set(variables)
    assert not unknown_variables, f"{path.name}: no such option for {sorted(unknown_variables)}"


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Dockerfile:
    stages: list[list[tuple[str, str]]]  # (INSTRUCTION, rest), one list per FROM

    @classmethod
    def read(cls, path: Path = DOCKERFILE) -> Dockerfile:
        stages: list[list[tuple[str, str]]] = []
        logical = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not logical and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical += line
            instruction, _, rest = logical.partition(" ")
            logical = ""
            if instruction.upper() == "FROM":
                stages.append([])
            elif stages:
                stages[-1].append((instruction.upper(), rest.strip()))
        return cls(stages)

    @property
    def final(self) -> list[tuple[str, str]]:
        return self.stages[-1]

    def last(self, instruction: str) -> str:
        values = [rest for name, rest in self.final if name == instruction]
        assert values, f"the Dockerfile's final stage has no {instruction}"
        return values[-1]

    def exec_form(self, instruction: str) -> list[str]:
        rest = self.last(instruction)
        if instruction == "HEALTHCHECK":
            rest = rest.split(" CMD ", 1)[1]
        value = json.loads(rest)  # shell form is not JSON: it fails here
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
        return value

    def environment(self) -> dict[str, str]:
        environment: dict[str, str] = {}
        for name, rest in self.final:
            if name == "ENV":
                for word in shlex.split(rest):
                    key, equals, value = word.partition("=")
                    assert equals, f"ENV {rest}: use KEY=VALUE"
                    environment[key] = value
        return environment


def test_dockerfile_runs_echoplex_as_pid_1_and_not_as_root() -> None:
    docker = Dockerfile.read()
    # Exec form: `echoplex` is PID 1 and gets `docker stop`'s SIGTERM itself; the shell
    # of a shell-form ENTRYPOINT would take it and never pass it on.
    assert docker.exec_form("ENTRYPOINT") == ["echoplex", "serve"]
    arguments = docker.exec_form("CMD")
    user = docker.last("USER").split(":")
    assert user[0] not in ("root", "0")
    assert all(part.isdigit() for part in user), "a numeric USER, so runAsNonRoot can check it"
    assert docker.last("STOPSIGNAL") == "SIGTERM"

    environment = docker.environment()
    args = parse_serve(arguments, echoplex_variables(environment), "Dockerfile")
    assert args.port == ECHO_PORT
    assert args.metrics_port is not None, "the HEALTHCHECK needs /healthz"
    assert args.hosts == ["0.0.0.0"] and args.metrics_host == "0.0.0.0"  # published ports
    exposed = {int(port.split("/")[0]) for port in docker.last("EXPOSE").split()}
    assert exposed == {args.port, args.metrics_port}
    assert args.drain_timeout_s < DOCKER_STOP_TIMEOUT_S

    health = docker.last("HEALTHCHECK")
    command = docker.exec_form("HEALTHCHECK")
    assert command[0] == "python", "slim images have no curl or wget: the stdlib asks"
    assert "/healthz" in command[-1] and "urllib.request" in command[-1]
    assert "ECHOPLEX_METRICS_PORT" in command[-1]
    check_timeout = re.search(r"--timeout=(\d+)s", health)
    request_timeout = re.search(r"timeout=(\d+)\)", command[-1])
    assert check_timeout and request_timeout
    assert int(request_timeout.group(1)) < int(check_timeout.group(1))


def test_dockerfile_copies_what_the_package_build_needs(tmp_path: Path) -> None:
    """The build stage COPYs only some files: build a wheel from exactly those."""
    docker = Dockerfile.read()
    build = docker.stages[0]
    copies = [shlex.split(rest) for name, rest in build if name == "COPY"]
    assert copies
    for *sources, destination in copies:
        target = tmp_path / destination.removeprefix("./")
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                subprocess.run(["cp", "-r", str(origin), str(target)], check=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", str(origin), str(target)], check=True)
    installs = [rest for name, rest in build if name == "RUN" and "pip wheel" in rest]
    assert installs, "the build stage builds wheels"
    extras = re.search(r"'\.\[([a-z,]+)\]'", installs[0])
    assert extras, installs[0]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(extras.group(1).split(",")) <= set(declared["optional-dependencies"])
    # Offline: the package itself only, with the setuptools already here.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("--no-index", "--wheel-dir", str(tmp_path / "wheels"), "."),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "wheels").glob("echoplex-*.whl"))


# ---------------------------------------------------------------- running and probing


@dataclass
class Running:
    process: Process
    echo: tuple[str, int]
    metrics: tuple[str, int] | None


@contextlib.contextmanager
def running(
    argv: Sequence[str], environment: Mapping[str, str], *, pass_fds: Sequence[int] = ()
) -> Iterator[Running]:
    """Start a server command line, wait until it listens, kill it in the end."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENVIRONMENT_PREFIX)}
    process = Process(argv, env={**clean, **environment}, pass_fds=pass_fds)
    with process:
        listening = process.wait_for_stderr(LISTENING)
        echo = (listening.group(1), int(listening.group(2)))
        metrics = None
        if any(METRICS_LINE.search(line) for line in process.stderr_seen):
            found = process.wait_for_stderr(METRICS_LINE)
            metrics = (found.group(1), int(found.group(2)))
        yield Running(process, echo, metrics)


def http_status(address: tuple[str, int], path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def echo_once(address: tuple[str, int], data: bytes = b"deploy check\n") -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while len(received) < len(data) and (chunk := sock.recv(65536)):
            received += chunk
        return received


def stop_while_holding_a_connection(server: Running, probe: Any) -> None:
    """SIGTERM with a client still connected: `probe()` must turn unhealthy while the
    server drains; once the client leaves, it exits 0."""
    with socket.create_connection(server.echo, timeout=10) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        server.process.signal(signal.SIGTERM)
        server.process.wait_for_stderr("stopping")
        probe()
    assert server.process.wait() == 0


def on_loopback(environment: Mapping[str, str]) -> dict[str, str]:
    """The same environment, listening on loopback ports picked by the system."""
    return {
        **environment,
        "ECHOPLEX_HOST": "127.0.0.1",
        "ECHOPLEX_PORT": "0",
        "ECHOPLEX_METRICS_HOST": "127.0.0.1",
        "ECHOPLEX_METRICS_PORT": "0",
    }


def python_command(argv: Sequence[str]) -> list[str]:
    """`echoplex ...` or `python ...` with this interpreter."""
    if Path(argv[0]).name == "echoplex":
        return [sys.executable, "-m", "echoplex", *argv[1:]]
    if Path(argv[0]).name.startswith("python"):
        return [sys.executable, *argv[1:]]
    raise AssertionError(f"not an echoplex or python command: {argv}")


def test_dockerfile_entrypoint_runs_and_its_healthcheck_tells_draining_apart() -> None:
    docker = Dockerfile.read()
    environment = on_loopback(echoplex_variables(docker.environment()))
    argv = python_command([*docker.exec_form("ENTRYPOINT"), *docker.exec_form("CMD")])
    health_argv = python_command(docker.exec_form("HEALTHCHECK"))

    def healthcheck(server: Running) -> int:
        assert server.metrics is not None
        env = {**os.environ, "ECHOPLEX_METRICS_PORT": str(server.metrics[1])}
        return subprocess.run(health_argv, env=env, capture_output=True, timeout=30).returncode

    with running(argv, environment) as server:
        assert '"level": "info"' in server.process.stderr  # ECHOPLEX_LOG_FORMAT=json
        assert echo_once(server.echo) == b"deploy check\n"
        assert healthcheck(server) == 0

        def unhealthy() -> None:
            assert healthcheck(server) == 1  # Docker's "unhealthy"

        stop_while_holding_a_connection(server, unhealthy)


# ---------------------------------------------------------------- Kubernetes


def parse_yaml_subset(text: str) -> list[Any]:
    """The documents of a YAML file written in a plain subset: block mappings and
    sequences by indentation, `- key: value` items, scalars (quoted strings, integers,
    true/false, plain words) and JSON-style flow lists. Anything else raises."""
    documents: list[Any] = []
    for chunk in re.split(r"^---\s*$", text, flags=re.MULTILINE):
        lines = []
        for raw in chunk.splitlines():
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            # Anchors, aliases, tags, block scalars and trailing comments are not read.
            if re.search(r"(^\s*|:\s+|-\s+)[&*!]|:\s*[|>][-+]?\s*$|\s#", raw):
                raise ValueError(f"outside the YAML subset: {raw!r}")
            lines.append((len(raw) - len(raw.lstrip(" ")), stripped))
        if lines:
            value, end = _yaml_block(lines, 0, lines[0][0])
            if end != len(lines):
                raise ValueError(f"unexpected indentation at {lines[end][1]!r}")
            documents.append(value)
    return documents


def _yaml_block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- "):
        items = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            item = lines[i][1][2:]
            if re.match(r"[\w./-]+:(\s|$)", item):  # `- key: value` opens a mapping
                lines[i] = (indent + 2, item)
                value, i = _yaml_block(lines, i, indent + 2)
            else:
                value, i = _yaml_scalar(item), i + 1
            items.append(value)
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
        match = re.fullmatch(r"([\w./-]+):(?:\s+(.*))?", lines[i][1])
        if match is None:
            raise ValueError(f"not a `key: value` line: {lines[i][1]!r}")
        key, rest = match.groups()
        if key in mapping:
            raise ValueError(f"duplicate key {key!r}")
        if rest is not None:
            mapping[key], i = _yaml_scalar(rest), i + 1
        elif i + 1 < len(lines) and lines[i + 1][0] > indent:
            mapping[key], i = _yaml_block(lines, i + 1, lines[i + 1][0])
        else:
            raise ValueError(f"{key!r} has no value")
    return mapping, i


def _yaml_scalar(text: str) -> Any:
    if text.startswith("["):
        return json.loads(text)
    if text.startswith('"'):
        return json.loads(text)
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text.startswith(("'", "{")):
        raise ValueError(f"outside the YAML subset: {text!r}")
    return text


def test_the_yaml_subset_parser() -> None:
    text = 'a:\n  b: 1\n  c: "2"\n  d: [ "x", "y" ]\n  e:\n    - name: n\n      v: true\n    - w\n'
    assert parse_yaml_subset(text + "---\nf: g\n") == [
        {"a": {"b": 1, "c": "2", "d": ["x", "y"], "e": [{"name": "n", "v": True}, "w"]}},
        {"f": "g"},
    ]
    for bad in ("a: &x 1\n", "a: |\n  text\n", "a:\n  b: 1\n c: 2\n", "a: 1 # note\n"):
        with pytest.raises(ValueError):
            parse_yaml_subset(bad)


@dataclass
class Kubernetes:
    deployment: dict[str, Any]
    service: dict[str, Any]

    @classmethod
    def read(cls) -> Kubernetes:
        documents = {doc["kind"]: doc for doc in parse_yaml_subset(KUBERNETES.read_text())}
        assert set(documents) == {"Deployment", "Service"}
        return cls(documents["Deployment"], documents["Service"])

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert len(containers) == 1
        container: dict[str, Any] = containers[0]
        return container

    def environment(self) -> dict[str, str]:
        return {item["name"]: str(item["value"]) for item in self.container.get("env", [])}

    def ports(self) -> dict[str, int]:
        return {port["name"]: port["containerPort"] for port in self.container["ports"]}


def test_kubernetes_probes_ports_and_grace_period_fit_the_server() -> None:
    kube = Kubernetes.read()
    container, pod = kube.container, kube.pod
    args = parse_serve(container["args"], kube.environment(), "kubernetes.yaml")
    ports = kube.ports()

    # Probes come from the kubelet, to the pod's address: nothing may listen on loopback.
    assert args.hosts == ["0.0.0.0"] and args.metrics_host == "0.0.0.0"
    assert ports == {"echo": args.port, "metrics": args.metrics_port}
    assert args.port == ECHO_PORT
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/healthz" and readiness["port"] == "metrics"
    assert container["livenessProbe"]["tcpSocket"]["port"] == "echo"

    # SIGKILL comes terminationGracePeriodSeconds after the stop begins, preStop included.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = args.drain_timeout_s
    assert drain > DEFAULT_DRAIN_S, "a drain as long as the grace period allows"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain
    liveness = container["livenessProbe"]
    # The listener is closed while draining: liveness must not restart a draining pod.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    docker_user = Dockerfile.read().last("USER").split(":")
    assert [str(security["runAsUser"]), str(security["runAsGroup"])] == docker_user
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    if container["securityContext"].get("readOnlyRootFilesystem"):
        # --mode workers with metrics keeps files in a temporary directory.
        mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
        assert "/tmp" in mounts

    annotations = kube.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"

    labels = kube.deployment["spec"]["template"]["metadata"]["labels"]
    assert kube.deployment["spec"]["selector"]["matchLabels"] == labels
    service = kube.service["spec"]
    assert service["selector"] == labels
    service_ports = {port["name"]: port for port in service["ports"]}
    assert service_ports["echo"]["port"] == ECHO_PORT
    assert {port["targetPort"] for port in service["ports"]} <= set(ports)


def test_kubernetes_container_answers_its_probes() -> None:
    kube = Kubernetes.read()
    docker = Dockerfile.read()
    # The image's ENTRYPOINT with the container's args; its ENV under the pod's env.
    environment = on_loopback(
        {**echoplex_variables(docker.environment()), **echoplex_variables(kube.environment())}
    )
    args = [*kube.container["args"]]
    drain = args.index("--drain-timeout")
    args[drain + 1] = "3"  # the probes are the point here, not a 20 s wait
    argv = python_command([*docker.exec_form("ENTRYPOINT"), *args])
    with running(argv, environment) as server:
        assert server.metrics is not None
        metrics = server.metrics
        assert http_status(metrics, "/healthz") == 200  # readinessProbe
        socket.create_connection(server.echo, timeout=10).close()  # livenessProbe
        assert echo_once(server.echo) == b"deploy check\n"

        def not_ready() -> None:
            assert http_status(metrics, "/healthz") == 503

        stop_while_holding_a_connection(server, not_ready)


# ---------------------------------------------------------------- systemd


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file: section -> [(key, value)], in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, equals, value = line.partition("=")
        assert equals and current is not None, f"{path.name}: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in unit.get(section, []) if k == key]
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def service_command() -> tuple[list[str], dict[str, str]]:
    service = read_unit(SERVICE_UNIT)
    argv = shlex.split(unit_value(service, "Service", "ExecStart"))
    environment = {}
    for key, value in service["Service"]:
        if key == "Environment":
            for word in shlex.split(value):
                name, _, text = word.partition("=")
                environment[name] = text
    return argv, environment


def seconds(text: str) -> float:
    """A systemd time span: `30`, `30s`, `1min 30s`."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    spans = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert spans and "".join(n + u for n, u in spans) == text.replace(" ", ""), text
    return sum(float(number) * units[unit] for number, unit in spans)


def test_systemd_units_fit_together_and_the_server() -> None:
    socket_unit, service = read_unit(SOCKET_UNIT), read_unit(SERVICE_UNIT)
    listen = unit_value(socket_unit, "Socket", "ListenStream")
    assert int(listen.rsplit(":", 1)[-1]) == ECHO_PORT
    # Accept=yes would pass each connection, not the listener, and start one service per
    # connection: echoplex wants one listening socket.
    assert unit_value(socket_unit, "Socket", "Accept") == "no"
    assert unit_value(socket_unit, "Socket", "Service") == SERVICE_UNIT.name
    assert SOCKET_UNIT.name in unit_value(service, "Unit", "Requires").split()

    argv, environment = service_command()
    assert Path(argv[0]).name == "echoplex" and argv[1] == "serve"
    assert Path(argv[0]).is_absolute(), "systemd wants an absolute ExecStart path"
    # The socket comes from systemd: --host/--port would be ignored, and so misleading.
    assert not {"--host", "--port"} & set(argv)
    args = parse_serve(argv[2:], environment, "echoplex.service")
    stop_timeout = seconds(unit_value(service, "Service", "TimeoutStopSec"))
    grace = EXIT_GRACE_S if args.mode == "workers" else 0
    assert stop_timeout > args.drain_timeout_s + grace
    assert unit_value(service, "Service", "KillSignal") in ("SIGTERM", "SIGINT")
    if args.mode == "workers":
        # Otherwise systemd signals every worker too, and the supervisor's own SIGTERM
        # is then each worker's second one, which skips the drain.
        assert unit_value(service, "Service", "KillMode") == "mixed"


def test_systemd_socket_activation_runs_the_service_command() -> None:
    socket_unit = read_unit(SOCKET_UNIT)
    argv, environment = service_command()
    # The socket as the .socket unit describes it, on a loopback port of our own (the
    # unit's port may be taken here): a listening TCP socket with its Backlog.
    backlog = int(unit_value(socket_unit, "Socket", "Backlog"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(backlog)
    port = listener.getsockname()[1]
    command = python_command(argv)
    if "--metrics-port" in command:  # a port of our own for metrics too
        command[command.index("--metrics-port") + 1] = "0"
    if "--metrics-host" in command:
        command[command.index("--metrics-host") + 1] = "127.0.0.1"
    # As systemd execs the service: the socket as descriptor 3, LISTEN_PID the server's
    # own pid (the shell execs the server, which keeps the shell's pid).
    fd = listener.fileno()
    move_to_3 = "" if fd == 3 else f"3<&{fd} {fd}<&-"
    shell = (
        f"LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={SOCKET_UNIT.name} exec "
        f"{shlex.join(command)} {move_to_3}"
    )
    # Two workers if the service runs --mode workers (its default is one per CPU).
    environment = {**environment, "ECHOPLEX_WORKERS": "2"}
    with listener, running(["bash", "-c", shell], environment, pass_fds=[fd]) as server:
        assert server.echo == ("127.0.0.1", port)
        assert "passed by systemd" in server.process.stderr
        for _ in range(3):
            assert echo_once(server.echo) == b"deploy check\n"
        if server.metrics is not None:
            assert http_status(server.metrics, "/healthz") == 200
        server.process.signal(signal.SIGTERM)  # KillSignal
        assert server.process.wait() == 0


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    tool = require_tool_softly("systemd-analyze")
    installed = Path(sys.executable).parent / "echoplex"
    if not installed.exists():
        pytest.skip(f"no echoplex script beside {sys.executable}")
    argv, _ = service_command()
    for unit in (SOCKET_UNIT, SERVICE_UNIT):
        text = unit.read_text().replace(argv[0], str(installed))
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        [tool, "verify", str(tmp_path / SOCKET_UNIT.name), str(tmp_path / SERVICE_UNIT.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def require_tool_softly(name: str) -> str:
    """A tool CI does not install (systemd-analyze): skip without it, even under CI."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


# ---------------------------------------------------------------- HAProxy


def haproxy_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line[0].isspace():
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(line.strip())
    return sections


def instance_command() -> list[str]:
    """The `echoplex serve` command line the config's comments give for each instance."""
    lines = [m for m in SERVE_LINE.findall(HAPROXY_CFG.read_text()) if "--proxy-protocol" in m]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_haproxy_config_is_valid() -> None:
    binary = require_tool("haproxy")
    result = subprocess.run(
        [binary, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_config_fits_its_instances() -> None:
    sections = haproxy_sections()
    frontends = [name for name in sections if name.startswith("frontend ")]
    backends = [name for name in sections if name.startswith("backend ")]
    assert len(frontends) == 1 and len(backends) == 1
    binds = [line.split()[1] for line in sections[frontends[0]] if line.startswith("bind ")]
    assert [int(bind.rsplit(":", 1)[1]) for bind in binds] == [ECHO_PORT]

    backend = sections[backends[0]]
    defaults = " ".join(line for line in backend if line.startswith("default-server "))
    servers = [line.split() for line in backend if line.startswith("server ")]
    assert len(servers) >= 2, "several instances"
    command = instance_command()
    args = parse_serve(command[2:], {}, "haproxy.cfg")
    assert args.proxy_protocol and args.trusted_proxies
    for server in servers:
        options = set(server[3:]) | set(defaults.split())
        assert {"send-proxy-v2", "check"} <= options, server
        assert int(server[2].rsplit(":", 1)[1]) == args.port
    timeouts = {
        line.split()[1]: line.split()[2]
        for line in sections["defaults"]
        if line.startswith("timeout ")
    }
    assert seconds(timeouts["client"]) > args.idle_timeout_s  # the server decides idleness
    assert seconds(timeouts["server"]) > args.idle_timeout_s


def test_haproxy_config_runs_in_front_of_three_instances() -> None:
    binary = require_tool("haproxy")
    command = instance_command()
    sections = haproxy_sections()
    backend_name = next(name for name in sections if name.startswith("backend ")).split()[1]
    frontend_name = next(name for name in sections if name.startswith("frontend ")).split()[1]
    names = [
        line.split()[1] for line in sections[f"backend {backend_name}"] if line.startswith("server")
    ]
    overrides = {
        "--host": "127.0.0.1",
        "--port": "0",
        "--metrics-host": "127.0.0.1",
        "--metrics-port": "0",
        "--trusted-proxy": "127.0.0.1/32",
        "--drain-timeout": "1",
    }
    argv = command[2:]
    for option, value in overrides.items():
        if option in argv:
            argv[argv.index(option) + 1] = value
    if "workers" in argv:
        argv += ["--workers", "1"]
    with contextlib.ExitStack() as stack:
        # A short directory: the stats socket's path must fit in sun_path (108 bytes).
        tmp_path = Path(tempfile.mkdtemp(prefix="echoplex-deploy-", dir="/tmp"))
        stack.callback(shutil.rmtree, tmp_path, ignore_errors=True)
        servers = [stack.enter_context(Server(*argv, mode="asyncio")) for _ in names]
        # The same config, on loopback: a frontend socket HAProxy inherits, our
        # instances, our stats socket.
        stats_socket = tmp_path / "admin.sock"
        frontend = stack.enter_context(frontend_socket())
        text = HAPROXY_CFG.read_text()
        text = re.sub(r"^(\s*bind )\S+", rf"\g<1>fd@{frontend.fileno()}", text, flags=re.M)
        text = re.sub(r"^(\s*stats socket )\S+", rf"\g<1>{stats_socket}", text, flags=re.M)
        for name, server in zip(names, servers, strict=True):
            text = re.sub(
                rf"^(\s*server {name} )\S+",
                rf"\g<1>127.0.0.1:{server.port}",
                text,
                flags=re.MULTILINE,
            )
        config = tmp_path / "haproxy.cfg"
        config.write_text(text)
        proxy = start(
            binary,
            config,
            frontend,
            stats_socket,
            names,
            backend=backend_name,
            frontend_name=frontend_name,
        )
        stack.callback(proxy.stop)
        wait_until_open(proxy)
        # Checks passed: the echo check (send, expect) came back from every instance.
        wait_for_checks(proxy, "L7OK")
        held = [
            stack.enter_context(socket.create_connection(proxy.address, timeout=10)) for _ in names
        ]
        for index, sock in enumerate(held):
            sock.sendall(b"hello %d" % index)
            assert sock.recv(100) == b"hello %d" % index
        # PROXY v2: each instance saw its client's address, via HAProxy.
        for server in servers:
            server.wait_for_stderr(r"open 127\.0\.0\.1:\d+ via 127\.0\.0\.1:\d+")
        for sock in held:
            sock.close()
        assert servers[0].stop() == 0
        proxy.wait_for_status({names[0]: "DOWN"}, timeout_s=15)
        for _ in range(3):
            assert echo_once(proxy.address) == b"deploy check\n"


def wait_for_checks(proxy: HAProxy, status: str, timeout_s: float = 15.0) -> None:
    checks: dict[str, str] = {}

    def all_reached() -> bool:
        nonlocal checks
        checks = {name: row["check_status"] for name, row in proxy.server_stats().items()}
        return len(checks) == len(proxy.server_names) and set(checks.values()) == {status}

    wait_for(
        all_reached, timeout_s, lambda: f"checks {checks}, not all {status}: {proxy.output[-2000:]}"
    )


# ---------------------------------------------------------------- docs/operations.md


def test_the_metrics_table_lists_what_a_scrape_has() -> None:
    if not OPERATIONS.exists():
        pytest.skip("docs/operations.md is not there")
    documented = set(re.findall(r"`(echoplex_[a-z_]+)`", OPERATIONS.read_text()))
    families: set[str] = set()
    # One process, whose every family is declared (# TYPE) even before its first labelled
    # sample; and `workers`, which has one family more (echoplex_worker_up).
    for mode in ("asyncio", "workers"):
        with Server("--metrics-port", "0", "--udp", "--tcp", mode=mode) as server:
            assert echo_once(server.address) == b"deploy check\n"
            metrics = server.wait_for_stderr(METRICS_LINE)
            url = f"http://{metrics.group(1)}:{metrics.group(2)}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            assert server.stop() == 0
        declared = set(re.findall(r"^# TYPE (echoplex_\w+) ", text, flags=re.MULTILINE))
        families |= {name for name in declared if not name.endswith("_created")}
    assert documented == families
