"""The lesson's four steps: each says what it will show and what the textbook expects,
runs real servers against real clients, and says what it measured.

A finding compares a measured figure with the textbook's claim from below or by
order only (a client served no sooner than another finished; one run well under
another): a busy machine makes a server late, so a finding that disagrees names
what it saw, with the load average, and never a figure that was not measured.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Sequence
from itertools import pairwise

from ..bench import proctree
from ..conditions import Work
from .clients import ClientTimes, Scene, holder, talker
from .config import LessonConfig
from .results import Finding, ModelRun, StepResult
from .servers import LessonServer, ServerFailed
from .view import PlainView

QUIET_SERVER = ["--drain-timeout", "0", "--idle-timeout", "0", "--max-connections", "0"]
HOLDER = "nc (holds its connection)"
HELLO = "ClientPython.py (Hello, world)"
POOL_THREADS = 4
MODEL_ARGS = {
    "simple": [],
    "pool": ["--threads", str(POOL_THREADS)],
    "threads": [],
    "asyncio": [],
    "workers": [],
}
ACCEPT_TIMEOUT_S = 60.0

TUTORIAL_CHANGE = """\
 def handle_new_connections_threads(sock):
     ...
     while True:
         conn, addr = sock.accept()
         print("Received new connection from ", addr)
-        handle_client(conn)
+        thread = threading.Thread(target=handle_client, args=(conn,))
+        thread.start()
"""


def cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


def busy_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} over the last minute ({five:.2f} over five), {cpus()} CPUs"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def server_args(model: str, work: Work | None = None, extra: Sequence[str] = ()) -> list[str]:
    args = ["--mode", model, *MODEL_ARGS[model], *QUIET_SERVER, *extra]
    return args + (["--work", str(work)] if work is not None else [])


def run_scene(
    view: PlainView,
    model: str,
    args: list[str],
    start_clients: Callable[[Scene], None],
) -> ModelRun:
    """One server, the clients `start_clients` starts, their times; a server that
    cannot run is the run's one-line error, and the step goes on."""
    run = ModelRun(model, args)
    server: LessonServer | None = None
    scene: Scene | None = None
    try:
        server = LessonServer(args)
        server.wait_listening()
        scene = Scene(server.address, server.accepted.get)
        cpu_before = server.cpu_s()
        with view.watching(model, lambda: _scene_status(scene)):
            start_clients(scene)
            scene.join()
        run.figures = _cpu_figures(cpu_before, server.cpu_s(), scene.whole_s())
        run.clients = scene.clients
        run.whole_s = scene.whole_s()
        failed = [client for client in scene.clients if client.error]
        if failed:
            run.error = f"{len(failed)} client(s) failed: {failed[0].error}"
    except ServerFailed as exc:
        run.error = str(exc)
    finally:
        if scene is not None:
            scene.close_all()
        if server is not None:
            server.stop()
    if run.error:
        view.say(f"  {model}: could not run: {run.error}")
    return run


def _cpu_figures(
    before: float | None, after: float | None, whole_s: float | None
) -> dict[str, object]:
    """The server's CPU time over the run, and how many cores that is on average."""
    if before is None or after is None:
        return {"server_cpu_s": None, "cores_used": None}
    used = after - before
    cores = round(used / whole_s, 2) if whole_s else None
    return {"server_cpu_s": round(used, 3), "cores_used": cores}


def _scene_status(scene: Scene | None) -> str:
    if scene is None:
        return ""
    scene.note_accepts()
    now = scene.now_s()
    states = [client.state(now) for client in scene.clients]
    counts = {name: states.count(name) for name in ("waiting", "connected", "answered", "done")}
    if all(state == "done" for state in states) and (whole := scene.whole_s()) is not None:
        return f"all {len(states)} served in {whole:.2f} s"
    shown = ", ".join(f"{count} {name}" for name, count in counts.items())
    return f"{now:5.1f} s: {shown}"


# ---------------------------------------------------------------- step 1: waiting


def step_waiting(config: LessonConfig, view: PlainView) -> StepResult:
    hold = config.hold_s
    step = StepResult(
        1,
        "Waiting",
        f"the tutorial's scene: a client holds its connection for {hold:g} s, as nc does, "
        "and then the tutorial's Hello-world client connects; first to the one-at-a-time "
        "server (simple), then to the thread-per-connection one (threads).",
        f"with simple, Hello, world waits until nc lets go (about {hold:g} s); with "
        "threads it is answered at once, while nc still holds its connection.",
    )
    view.begin_step(step)
    view.say("The tutorial's change, from one client at a time to a thread per client:")
    view.code(TUTORIAL_CHANGE)
    for model in ("simple", "threads"):
        step.runs.append(run_scene(view, model, server_args(model), _nc_then_hello(hold)))
    view.table(
        f"Step 1, measured (nc held its connection {hold:g} s)",
        ["model", "nc's echo", "nc done", "Hello accepted", "Hello's echo", "Hello waited"],
        [_waiting_row(run) for run in step.runs],
    )
    step.findings = _waiting_findings(step)
    return step


def _nc_then_hello(hold_s: float) -> Callable[[Scene], None]:
    def start(scene: Scene) -> None:
        held = threading.Event()
        scene.start(ClientTimes(HOLDER, 1), holder(scene, hold_s, held))
        if held.wait(ACCEPT_TIMEOUT_S):  # the hello client comes once nc has its echo
            scene.start(ClientTimes(HELLO, 1), talker(scene, 1, b"Hello, world"))

    return start


def _waiting_row(run: ModelRun) -> list[str]:
    nc, hello = run.client(HOLDER), run.client(HELLO)
    if run.error or nc is None or hello is None:
        return [run.model, "failed", (run.error or "")[:40], "", "", ""]
    return [
        run.model,
        seconds(nc.first_echo_s),
        seconds(nc.done_s),
        seconds(hello.accepted_s),
        seconds(hello.first_echo_s),
        seconds(hello.waited_s),
    ]


def _waiting_findings(step: StepResult) -> list[Finding]:
    findings = []
    for model, served_at_once in (("simple", False), ("threads", True)):
        run = step.run_of(model)
        nc = run.client(HOLDER) if run else None
        hello = run.client(HELLO) if run else None
        if not (nc and hello and nc.done_s is not None and hello.first_echo_s is not None):
            findings.append(Finding(f"{model}: no figures (the run failed)", None))
            continue
        after_nc = hello.first_echo_s >= nc.done_s
        when = "after nc closed" if after_nc else "while nc still held its connection"
        findings.append(
            Finding(
                f"{model}: Hello, world waited {seconds(hello.waited_s)} for its echo, "
                f"answered {when}",
                after_nc != served_at_once,
            )
        )
    return findings


# ---------------------------------------------------------------- steps 2 and 3: work

WORK_MODELS = ("simple", "pool", "threads", "asyncio", "workers")


def step_work(config: LessonConfig, view: PlainView, kind: str) -> StepResult:
    work = config.work_of(kind)
    clients, messages = config.clients, config.messages
    each = f"{clients} clients at once, each sending {messages} messages one after another"
    if kind == "io":
        step = StepResult(
            2,
            "Work that waits",
            f"{each}, to a server whose handler waits {work.seconds * 1000:g} ms on a "
            "pretend backend before each echo (--work " + str(work) + ").",
            "simple serves one client at a time: the others wait their turn; pool serves "
            f"{POOL_THREADS} at a time; threads, asyncio and workers wait for every client "
            "at once, so the whole run takes about as long as one client's.",
        )
    else:
        step = StepResult(
            3,
            "Work that computes",
            f"{each}, to a server whose handler computes for {work.seconds * 1000:g} ms "
            "(the GIL held) before each echo (--work " + str(work) + ").",
            "in one process only one thread computes at a time (the GIL): threads, pool "
            "and asyncio take as long as simple; only workers, a process per CPU, uses "
            f"more than one core (this machine lets the lesson use {cpus()} CPUs).",
        )
    view.begin_step(step)
    for model in WORK_MODELS:
        args = server_args(model, work)
        step.runs.append(
            run_scene(view, model, args, _talkers(clients, messages)),
        )
    view.table(
        f"Step {step.number}, measured ({clients} clients x {messages} messages, {work})",
        ["model", "whole run", "slowest first echo", "mean first echo", "server CPU", "cores"],
        [_work_row(run) for run in step.runs],
    )
    step.findings = _io_findings(step, work) if kind == "io" else _cpu_findings(step, work)
    return step


def _talkers(clients: int, messages: int) -> Callable[[Scene], None]:
    def start(scene: Scene) -> None:
        for number in range(1, clients + 1):
            scene.start(ClientTimes(f"client {number}", messages), talker(scene, messages))

    return start


def _work_row(run: ModelRun) -> list[str]:
    if run.error:
        return [run.model, "failed", run.error[:40], "", "", ""]
    waits = [c.waited_s for c in run.clients if c.waited_s is not None]
    mean = sum(waits) / len(waits) if waits else None
    cores = run.figures.get("cores_used")
    return [
        run.model,
        seconds(run.whole_s),
        seconds(max(waits, default=None)),
        seconds(mean),
        seconds(run.figures.get("server_cpu_s")),
        "-" if cores is None else f"{cores:.2f}",
    ]


def served_split(run: ModelRun) -> list[int]:
    """How many clients each of the server's processes accepted, most first: the
    kernel spreads `workers`' connections by a hash of each one's ports."""
    served = [client.served_by for client in run.clients if client.served_by]
    return sorted((served.count(name) for name in set(served)), reverse=True)


def _whole(step: StepResult, model: str) -> float | None:
    run = step.run_of(model)
    return run.whole_s if run else None


def _io_findings(step: StepResult, work: Work) -> list[Finding]:
    findings = [_one_after_another(step)]
    simple, loop = _whole(step, "simple"), _whole(step, "asyncio")
    if simple is not None and loop is not None:
        findings.append(
            Finding(
                f"asyncio's whole run took {loop:.2f} s, simple's {simple:.2f} s "
                f"({simple / loop:.1f} times as long)",
                loop < simple / 2,
            )
        )
    for model in ("threads", "workers", "pool"):
        whole = _whole(step, model)
        if whole is not None and simple is not None:
            findings.append(
                Finding(f"{model}: the whole run took {whole:.2f} s", whole < simple / 1.5)
            )
    return _noted(findings)


def _one_after_another(step: StepResult) -> Finding:
    """simple's clients: each first answered no sooner than the one before was done."""
    run = step.run_of("simple")
    if run is None:
        return Finding("simple: no figures (the run failed)", None)
    served = sorted(
        (c for c in run.clients if c.first_echo_s is not None and c.done_s is not None),
        key=lambda c: c.first_echo_s or 0.0,
    )
    in_turn = all(b.first_echo_s >= a.done_s for a, b in pairwise(served))  # type: ignore[operator]
    return Finding(
        "simple served its clients "
        + (
            "one after another: none was answered before the one before it was done"
            if in_turn
            else "with some overlapping"
        ),
        in_turn,
    )


def _cpu_findings(step: StepResult, work: Work) -> list[Finding]:
    findings = []
    total = step.runs[0].clients and len(step.runs[0].clients) * step.runs[0].clients[0].messages
    serial = (total or 0) * work.seconds
    for model in ("simple", "pool", "threads", "asyncio"):
        whole = _whole(step, model)
        if whole is not None:
            findings.append(
                Finding(
                    f"{model}: the whole run took {whole:.2f} s (the work alone, one message "
                    f"at a time, is {total} x {work} = {serial:.2f} s)",
                    whole >= serial * 0.9,
                )
            )
    threads, workers = _whole(step, "threads"), _whole(step, "workers")
    if threads is not None and workers is not None:
        beat = workers < threads * 0.85
        text = f"workers took {workers:.2f} s, threads {threads:.2f} s{_split_note(step)}"
        if cpus() < 2:
            text += ": this machine lets the lesson use one CPU, so workers cannot beat threads"
            findings.append(Finding(text, None))
        else:
            findings.append(Finding(text, beat))
    return _noted(findings)


def _split_note(step: StepResult) -> str:
    run = step.run_of("workers")
    split = served_split(run) if run else []
    if len(split) < 2:
        return "; one worker accepted every client (the kernel's hash), so one core did the work"
    shares = " and ".join(str(count) for count in split)
    cores = run.figures.get("cores_used") if run else None
    used = "" if cores is None else f", {cores:.2f} cores busy on average"
    return f" (its {len(split)} workers accepted {shares} clients{used})"


def _noted(findings: list[Finding]) -> list[Finding]:
    """Where a figure disagrees, say how busy the machine was while it ran."""
    if any(finding.agrees is False for finding in findings):
        findings.append(Finding(f"the machine while this ran: {busy_note()}", None))
    return findings


# ---------------------------------------------------------------- step 4: idle clients

IDLE_MODELS = ("threads", "pool", "asyncio")
DESCRIPTOR_MARGIN = 64


def step_idle(config: LessonConfig, view: PlainView) -> StepResult:
    count = config.idle
    step = StepResult(
        4,
        "Many idle clients",
        f"{count} connections that send nothing, held against threads, pool (a "
        f"{POOL_THREADS}-thread pool) and asyncio; the server's memory and threads are "
        "read from its process (/proc) before and after.",
        "threads spends a thread (and its stack) on every connection, idle or not; "
        "pool and asyncio spend no thread on an idle connection, only its socket and "
        "a little bookkeeping.",
    )
    view.begin_step(step)
    soft, _ = proctree.raise_nofile_limit()
    if soft < count + DESCRIPTOR_MARGIN:
        step.skipped = (
            f"too few descriptors: {count} connections need about {count + DESCRIPTOR_MARGIN}, "
            f"this process may open {soft} (ulimit -n; or --idle {soft - DESCRIPTOR_MARGIN})"
        )
        view.say(f"  step 4 cannot run: {step.skipped}")
        return step
    for model in IDLE_MODELS:
        step.runs.append(_idle_run(view, model, count))
    view.table(
        f"Step 4, measured ({count} idle connections)",
        ["model", "threads before", "threads after", "threads/conn", "KiB/conn"],
        [_idle_row(run) for run in step.runs],
    )
    step.findings = _idle_findings(step)
    return step


def _idle_run(view: PlainView, model: str, count: int) -> ModelRun:
    run = ModelRun(model, server_args(model))
    socks: list[socket.socket] = []
    server = LessonServer(run.server_args)
    try:
        server.wait_listening()
        before = (server.rss_bytes(), server.threads())
        with view.watching(model, lambda: f"{server.accepted_count()} of {count} accepted"):
            for _ in range(count):
                socks.append(socket.create_connection(server.address, timeout=30))
            server.wait_until(lambda: server.accepted_count() >= count, ACCEPT_TIMEOUT_S, "accept")
        after = (server.rss_bytes(), server.threads())
        run.figures = _idle_figures(count, before, after)
    except (ServerFailed, OSError) as exc:
        run.error = str(exc) if isinstance(exc, ServerFailed) else (exc.strerror or str(exc))
        view.say(f"  {model}: could not run: {run.error}")
    finally:
        for sock in socks:
            sock.close()
        server.stop()
    return run


def _idle_figures(
    count: int, before: tuple[int | None, int | None], after: tuple[int | None, int | None]
) -> dict[str, object]:
    (rss0, threads0), (rss1, threads1) = before, after
    figures: dict[str, object] = {
        "connections": count,
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "threads_before": threads0,
        "threads_after": threads1,
        "bytes_per_connection": None,
        "threads_per_connection": None,
    }
    if rss0 is not None and rss1 is not None:
        figures["bytes_per_connection"] = round((rss1 - rss0) / count, 1)
    if threads0 is not None and threads1 is not None:
        figures["threads_per_connection"] = round((threads1 - threads0) / count, 4)
    return figures


def _idle_row(run: ModelRun) -> list[str]:
    if run.error:
        return [run.model, "failed", run.error[:40], "", ""]
    f = run.figures
    per_conn = f["bytes_per_connection"]
    kib = "-" if per_conn is None else f"{float(per_conn) / 1024:.1f}"
    per_thread = f["threads_per_connection"]
    return [
        run.model,
        str(f["threads_before"]),
        str(f["threads_after"]),
        "-" if per_thread is None else f"{per_thread:.2f}",
        kib,
    ]


def _idle_findings(step: StepResult) -> list[Finding]:
    findings = []
    for run in step.runs:
        per_thread = run.figures.get("threads_per_connection")
        per_conn = run.figures.get("bytes_per_connection")
        if run.error or per_thread is None:
            continue
        wants_thread = run.model == "threads"
        memory = "" if per_conn is None else f", {float(per_conn) / 1024:.1f} KiB of memory"
        findings.append(
            Finding(
                f"{run.model}: {per_thread:.2f} threads per idle connection{memory}",
                (per_thread >= 0.9) if wants_thread else (per_thread < 0.1),
            )
        )
    threads, loop = step.run_of("threads"), step.run_of("asyncio")
    if threads and loop:
        a, b = threads.figures.get("bytes_per_connection"), loop.figures.get("bytes_per_connection")
        if a is not None and b is not None:
            findings.append(
                Finding(
                    f"a connection cost threads {float(a) / 1024:.1f} KiB, "
                    f"asyncio {float(b) / 1024:.1f} KiB",
                    float(a) > float(b),
                )
            )
    return _noted(findings)


def run_step(number: int, config: LessonConfig, view: PlainView) -> StepResult:
    if number == 1:
        return step_waiting(config, view)
    if number == 2:
        return step_work(config, view, "io")
    if number == 3:
        return step_work(config, view, "cpu")
    return step_idle(config, view)
