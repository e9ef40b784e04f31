"""The README's "Testing a client against a misbehaving server", run as written: each
recipe's commands are read from the README and run against real servers (their fixed
ports swapped for the ones the test servers got), with a real HAProxy and a real
promtool where the recipe names them."""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .haproxy import haproxy
from .procs import ROOT, Server, echoplex, require_tool
from .test_control import control_address
from .test_operator_kit import as_scraped, promtool_test_rules, scrape, series

SECTION = "### Testing a client against a misbehaving server"
README_PORT = "12345"


def recipe_blocks() -> list[list[str]]:
    """The section's bash blocks, each a list of its command lines (comments cut)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [
        [line.split("   #", 1)[0].strip() for line in block.splitlines() if line.strip()]
        for block in blocks
    ]


BLOCKS = recipe_blocks()


def serve_args(line: str) -> list[str]:
    """An `echoplex serve ...` line's options, without its port (the test picks one)."""
    words = shlex.split(line)
    assert words[:2] == ["echoplex", "serve"], line
    rest = words[2:]
    index = rest.index("--port")
    del rest[index : index + 2]
    return rest


def on_port(line: str, port: int, readme_port: str = README_PORT) -> str:
    """A README command pointed at `port` instead of the README's."""
    assert readme_port in line, line
    return line.replace(readme_port, str(port))


# Where a command starts in a README line: `echoplex` is then this checkout's.
COMMAND_START = re.compile(r"(?:^|(?<=do )|(?<=; ))echoplex ")
ECHOPLEX = shlex.join([sys.executable, "-m", "echoplex"]) + " "


def bash(command: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    command = COMMAND_START.sub(lambda _: ECHOPLEX, command)
    assert ECHOPLEX in command, command
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=timeout_s, check=False
    )


def test_the_section_has_its_four_recipes() -> None:
    assert len(BLOCKS) == 4, BLOCKS
    assert all(BLOCKS)


def test_a_read_timeout() -> None:
    serve, client = BLOCKS[0]
    with Server(*serve_args(serve), mode="threads") as server:
        said = bash(on_port(client, server.port))
        assert said.returncode == 1, said
        assert "did not answer within 2s" in said.stderr, said.stderr
        assert "Traceback" not in said.stderr
        assert server.stop() == 0


def test_a_retry_on_reset() -> None:
    serve, loop = BLOCKS[1]
    with Server(*serve_args(serve)) as server:
        tried = bash(on_port(loop, server.port))
        assert server.stop() == 0
    assert tried.returncode == 0, tried
    assert tried.stdout.splitlines() == [
        "attempt 1 failed: retrying",
        "attempt 2 failed: retrying",
    ]
    assert server.stderr.count("outcome=reset-after") == 2, server.stderr
    assert len(re.findall(r"in=200 out=200 .*outcome=closed", server.stderr)) == 1


@pytest.mark.timeout(90)
def test_a_slow_backend_is_taken_out_by_the_health_check() -> None:
    require_tool("haproxy")
    slow_down, clear = BLOCKS[2]
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(Server("--control-port", "0", mode="asyncio")) for _ in range(2)
        ]
        proxy = stack.enter_context(
            haproxy([s.address for s in servers], health_check=True, check_payload=b"echoplex")
        )
        proxy.wait_for_status("UP")
        slow_port = control_address(servers[0])[1]
        said = bash(on_port(slow_down, slow_port, "9900"))
        assert said.returncode == 0, said
        proxy.wait_for_status({"s1": "DOWN", "s2": "UP"}, timeout_s=30)
        # Clients go to the one left.
        answered = echoplex("client", "--timeout", "10", "127.0.0.1", str(proxy.port), "-m", "hi")
        assert answered.returncode == 0 and "hi" in answered.stdout, answered
        said = bash(on_port(clear, slow_port, "9900"))
        assert said.returncode == 0, said
        proxy.wait_for_status("UP", timeout_s=30)
        for server in servers:
            assert server.stop() == 0


def test_the_alert_fires_on_what_a_real_server_exports(tmp_path: Path) -> None:
    require_tool("promtool")
    serve, load = BLOCKS[3]
    args = [word for word in serve_args(serve) if word != "9812"]
    args[args.index("--metrics-port") + 1 : args.index("--metrics-port") + 1] = ["0"]
    with Server(*args, mode="asyncio") as server:
        short = on_port(load, server.port).replace("-d 3m", "-d 2s")
        ran = bash(short)
        assert ran.returncode == 0, ran
        scraped = scrape(server)
        assert server.stop() == 0
    buckets = scraped.named("echoplex_echo_held_seconds_bucket")
    assert buckets and all(b.value == 0 for b in buckets if float(b.labels["le"]) <= 1)
    assert all(b.value > 0 for b in buckets if float(b.labels["le"]) >= 2.5)
    # Each minute, another batch like the one measured: the rule is pending at 1 minute
    # (its rate window filled), firing from 3 (2 minutes on).
    input_series = [
        {"series": series(b.name, as_scraped(b)), "values": f"0+{b.value:g}x10"} for b in buckets
    ]
    firing = 'ALERTS{alertname="EchoplexEchoDelayed", alertstate="firing"}'
    promtool_test_rules(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": input_series,
                "promql_expr_test": [
                    {
                        "expr": f"count({firing})",
                        "eval_time": "5m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    },
                    {"expr": f"count({firing})", "eval_time": "1m", "exp_samples": []},
                ],
            }
        ],
    )
