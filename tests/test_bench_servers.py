"""`echoplex bench --server`: any echo server, started on a free port, pinned, loaded and
measured like the built-in ones; one that echoes wrong bytes is named and never ranked."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

import pytest

from echoplex.bench import servers
from echoplex.bench.proctree import tree_affinity, tree_pids
from echoplex.bench.runner import unpinned_threads
from echoplex.bench.servers import (
    RunningServer,
    ServerStartError,
    WarmUpError,
    custom_server,
    warm_up,
)

from .procs import echoplex

# A whole echo server in a few lines, as a user might bring one. With `corrupt` it flips
# the byte at offset 100 of each connection's stream, with `drop` it leaves it out; with
# `affinity FILE` it writes the CPUs it may run on into FILE first; with `repin` it
# frees itself from the CPUs it was started on.
ECHO_SERVER = """\
import os, socket, sys, threading
port, mode = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "honest"
if mode == "affinity":
    Path = open(sys.argv[3], "w"); Path.write(repr(sorted(os.sched_getaffinity(0)))); Path.close()
if mode == "repin":
    os.sched_setaffinity(0, range(os.cpu_count()))
LIE_AT = 100

def serve(conn):
    seen = 0
    with conn:
        while data := conn.recv(65536):
            if seen <= LIE_AT < seen + len(data) and mode in ("corrupt", "drop"):
                at = LIE_AT - seen
                wrong = bytes([data[at] ^ 0xFF]) if mode == "corrupt" else b""
                data, seen = data[:at] + wrong + data[at + 1 :], seen + len(data)
            else:
                seen += len(data)
            conn.sendall(data)

with socket.create_server(("127.0.0.1", port)) as listener:
    while True:
        threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "echo_server.py"
    path.write_text(ECHO_SERVER)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(path))}"


def test_bench_runs_a_user_server_and_names_the_ones_that_echo_wrong_bytes(
    script: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = echoplex(
        *("bench", "--scenario", "smoke", "--models", "ref-socketserver"),
        *("--server", f"mine={script} {{port}}"),
        *("--server", f"corrupter={script} {{port}} corrupt"),
        *("--server", f"dropper={script} {{port}} drop"),
        *("--duration", "0.3", "--warmup", "0.1", "--quiet", "--out", str(out)),
        timeout_s=50,
    )
    # The report is written and printed, and the exit status says someone lied.
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "echoplex bench: error: wrong echoes from corrupter, dropper: not ranked"
    )
    data = json.loads((out / "results.json").read_text())
    (scenario,) = data["scenarios"]
    assert scenario["servers"] == ["ref-socketserver", "mine", "corrupter", "dropper"]
    rows = {row["server"]: row for row in scenario["rows"]}

    mine = rows["mine"]
    assert mine["kind"] == "custom" and mine["verified"] is True
    assert mine["errors_total"] == 0, mine
    # (CPU figures are left out of a run the bench could not time on a busy machine:
    # they are not asserted here.)
    assert isinstance(mine["vs_baseline"], float)
    for figure in ("requests_per_s", "peak_rss_bytes"):
        assert mine[figure] > 0, (figure, mine)
    assert mine["server_processes"] >= 2  # its shell and the server: the whole tree
    for liar in ("corrupter", "dropper"):
        row = rows[liar]
        assert row["verified"] is False
        assert row["vs_baseline"] is None and row["cpu_vs_baseline"] is None
        assert row["mismatches_total"] >= 1
        assert "offset 100:" in row["mismatch_samples"][0], row
    assert rows["ref-socketserver"]["vs_baseline"] == 1.0

    text = (out / "results.md").read_text()
    assert "| pingpong c=1 s=64B | corrupter |" in text
    assert text.count("| wrong echo | wrong echo |") == 2
    assert "- corrupter: 1 mismatched connection(s); connection 0 offset 100: expected" in text
    assert f"- mine: `{script} {{port}}`" in text
    assert "--server 'mine=" in data["command"]


def test_a_user_server_is_pinned_with_every_process_and_thread_it_starts(
    script: str, tmp_path: Path
) -> None:
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("pinning needs taskset and 2 CPUs")
    cpu = min(os.sched_getaffinity(0))
    seen = tmp_path / "affinity"
    # Debian's sh (dash) does not exec its command, and a subshell puts the server a
    # level deeper still: the pin must reach it all the same.
    spec = custom_server(f"mine=({script} {{port}} affinity {shlex.quote(str(seen))})")
    with RunningServer(spec, cpus=[cpu]) as server:
        assert len(tree_pids(server.pid)) >= 2, "the server runs under its shell"
        assert seen.read_text() == repr([cpu])  # as the server itself sees it
        threads = tree_affinity(server.pid)
        assert len(threads) >= 2 and all(cpus == {cpu} for cpus in threads.values())
        assert unpinned_threads(server.pid, [cpu]) is None
    assert tree_pids(server.pid) == []  # the whole group is gone


def test_a_server_that_leaves_its_cpus_is_caught(script: str) -> None:
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("pinning needs taskset and 2 CPUs")
    cpu = min(os.sched_getaffinity(0))
    with RunningServer(custom_server(f"mine={script} {{port}} repin"), cpus=[cpu]) as server:
        escaped = unpinned_threads(server.pid, [cpu])
    assert escaped is not None and f"not pinned to CPUs [{cpu}]" in escaped


def test_a_user_server_that_fails_to_start_says_why_with_its_last_words() -> None:
    spec = custom_server("broken=echo no such thing >&2; exit 3; {port}")
    with pytest.raises(ServerStartError) as caught:
        RunningServer(spec)
    message = str(caught.value)
    assert message.startswith("broken exited before listening on port ")
    assert "(exit status 3): no such thing" in message


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (["mine=./server"], "--server: server 'mine': the command must say where the port"),
        (["mine="], "--server: server 'mine' has an empty command"),
        (["./server {port}"], "--server: expected NAME='COMMAND {port}'"),
        (["=./server {port}"], "--server: expected NAME='COMMAND {port}'"),
        (["my server=./s {port}"], "--server: server name 'my server': use up to 40"),
        (["asyncio=./s {port}"], "--server: server name 'asyncio' is taken by a built-in"),
        (["a=./s {port}", "a=./t {port}"], "--server: server name 'a' is given twice"),
    ],
)
def test_bad_server_values_get_one_line(values: list[str], error: str) -> None:
    args = [arg for value in values for arg in ("--server", value)]
    result = echoplex("bench", "--scenario", "smoke", *args)
    assert result.returncode == 2
    assert error in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_the_warm_up_checks_its_echo_and_catches_a_liar_early(script: str) -> None:
    with RunningServer(custom_server(f"mine={script} {{port}}")) as server:
        warm_up(server.host, server.port, 3)  # an honest server: no complaint
    early_liar = ECHO_SERVER.replace("LIE_AT = 100", "LIE_AT = 5")
    with RunningServer(
        custom_server(f"liar={sys.executable} -c {shlex.quote(early_liar)} {{port}} corrupt")
    ) as server:
        with pytest.raises(WarmUpError) as caught:
            warm_up(server.host, server.port, 1)
    assert caught.value.wrong_echo
    assert str(caught.value).endswith(f"offset 5: expected byte 0x05, received 0x{5 ^ 0xFF:02x}")


def test_a_port_someone_else_listens_on_is_not_mistaken_for_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        monkeypatch.setattr(servers, "free_port", lambda: port)
        with pytest.raises(ServerStartError) as caught:
            RunningServer(custom_server("slow=sleep 30; echo {port}"))
    assert str(caught.value).startswith(f"slow lost port {port} to another program")
