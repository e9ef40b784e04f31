"""The control API: change a running server's conditions on purpose (`--control-port`).

    GET    /conditions   the current set, as a JSON object of names (`{}`: none)
    PUT    /conditions   replace it with the JSON object sent (`{"latency": "200ms"}`)
    PATCH  /conditions   change only the names sent (null: unset that one)
    DELETE /conditions   no conditions

Every answer is JSON: the set now in force, or `{"error": "..."}` with a 4xx status
and one line of reason; a refused request changes nothing. A set that would change
nothing the server serves (`close_after` with UDP alone, `drop` without UDP) is refused
as the command line refuses it (`Conditions.check_served`). A change applies to new
connections at once and to open ones from their next chunk (`echoplex.lifecycle`), and
is logged with the address it came from. With `control_token`, every request needs
`Authorization: Bearer TOKEN` (401 otherwise); without one the API is on loopback only
(`ServerConfig` refuses anything else).

It is served by the project's one HTTP machinery (`echoplex._http`), bounded as the
metrics endpoint is. It listens once the server does: `serving` wraps the server's
events, and a model that must pass changes on (the `workers` supervisor, to its
processes) registers with `follow_conditions` before it reports listening, so no
change can come before it listens for them.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._http import HTTPEndpoint, listen
from ._net import format_address
from .conditions import ConditionError, Conditions, LiveConditions

if TYPE_CHECKING:
    from .events import ServerEvents
    from .plan import ServerPlan

log = logging.getLogger("echoplex.control")

PATH = "/conditions"
MAX_BODY_BYTES = 16384
"""A set of conditions is a few hundred bytes of JSON; a body above this is refused."""
VERSION_HEADER = "Echoplex-Conditions-Version"
"""How many times the conditions were changed (answered with every set)."""

Follower = Callable[[Conditions], None]


class _Refused(Exception):
    """A request refused: its status and one line of reason."""

    def __init__(self, status: str, reason: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.headers = list(headers)


def described(conditions: Conditions) -> str:
    """`latency=0.2s close-after=100`, or `none`: a change as its log line names it."""
    named = conditions.to_mapping()
    return " ".join(f"{name.replace('_', '-')}={value}" for name, value in named.items()) or "none"


class ConditionsControl:
    """What the API does to the server's `LiveConditions`, and who else must hear of it."""

    def __init__(
        self, live: LiveConditions, token: str | None, *, tcp: bool = True, udp: bool = False
    ) -> None:
        self.live = live
        self.served = {"tcp": tcp, "udp": udp}
        """What the server serves: a set that would change none of it is refused."""
        self._token = None if token is None else token.encode()
        self._followers: list[Follower] = []
        self._lock = threading.Lock()  # one change at a time, followers told in order

    def follow(self, follower: Follower) -> None:
        """Call `follower` with every change from now on, after it is made."""
        with self._lock:
            self._followers.append(follower)

    def change(self, method: str, body: bytes, source: str) -> Conditions:
        with self._lock:
            current = self.live.current
            if method == "GET":
                return current
            wanted = _wanted(method, body, current)
            try:
                wanted.check_served(**self.served)
            except ConditionError as exc:
                raise _Refused("400 Bad Request", _one_line(exc)) from None
            if wanted != current:
                self.live.set(wanted)
                for follower in self._followers:
                    follower(wanted)
            log.info("conditions set: %s (from %s)", described(wanted), source)
            return wanted

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The WSGI app the endpoint serves."""
        try:
            self._check_token(environ.get("HTTP_AUTHORIZATION", ""))
            if environ.get("PATH_INFO") != PATH:
                raise _Refused("404 Not Found", f"no such path: the API serves {PATH}")
            method = environ.get("REQUEST_METHOD", "")
            if method not in ("GET", "PUT", "PATCH", "DELETE"):
                allowed = [("Allow", "GET, PUT, PATCH, DELETE")]
                raise _Refused("405 Method Not Allowed", f"{method} is not served", allowed)
            body = environ["wsgi.input"].read()
            source = environ.get("REMOTE_ADDR", "?")
            status, document = "200 OK", self.change(method, body, source).to_mapping()
            headers = [(VERSION_HEADER, str(self.live.version))]
        except _Refused as refused:
            status, document, headers = refused.status, {"error": refused.args[0]}, refused.headers
        answer = json.dumps(document).encode() + b"\n"
        content = [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))]
        start_response(status, [*content, *headers])
        return [answer]

    def _check_token(self, authorization: str) -> None:
        if self._token is None:
            return
        scheme, _, given = authorization.partition(" ")
        # Compared in constant time, so the answer's timing does not spell the token out.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("latin-1"), self._token
        ):
            challenge = [("WWW-Authenticate", "Bearer")]
            raise _Refused("401 Unauthorized", "a valid Authorization: Bearer token", challenge)


def _wanted(method: str, body: bytes, current: Conditions) -> Conditions:
    """The conditions a PUT, PATCH or DELETE asks for; _Refused if it asks badly."""
    if method == "DELETE":
        return Conditions()
    try:
        asked = json.loads(body, object_pairs_hook=_no_repeats)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, too deep
        raise _Refused("400 Bad Request", f"the body is not JSON: {_one_line(exc)}") from None
    if not isinstance(asked, dict):
        raise _Refused("400 Bad Request", "the body must be a JSON object of conditions")
    if method == "PATCH":
        asked = {**current.to_mapping(), **{name.replace("-", "_"): v for name, v in asked.items()}}
    try:
        return Conditions.from_mapping(asked)
    except ConditionError as exc:
        raise _Refused("400 Bad Request", _one_line(exc)) from None


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise _Refused("400 Bad Request", f"given twice: {_one_line(', '.join(repeated))}")
    return dict(pairs)


def _one_line(what: object) -> str:
    """A reason that quotes what the client sent, with its control characters escaped."""
    text = str(what)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ControlEvents:
    """The server's events, with the control API started when the server listens (so
    a model has registered its followers by then) and `follow_conditions` for them."""

    def __init__(self, inner: ServerEvents, control: ConditionsControl, endpoint: HTTPEndpoint):
        self.inner = inner
        self.control = control
        self.endpoint = endpoint
        self.started = False

    def follow_conditions(self, follower: Follower) -> None:
        self.control.follow(follower)

    def listening(self, addresses: list[Any]) -> None:
        self._start()
        self.inner.listening(addresses)

    def udp_listening(self, addresses: list[Any]) -> None:
        # A server of UDP alone never reports TCP listeners: its UDP socket is the cue
        # (beside TCP, the TCP listeners stay the cue, once `workers` follows changes).
        if not self.control.served["tcp"]:
            self._start()
        getattr(self.inner, "udp_listening", self.inner.listening)(addresses)

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self.endpoint.start()
            where = format_address((self.endpoint.host, self.endpoint.port))
            log.info("control API on http://%s%s", where, PATH)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def serving(plan: ServerPlan, events: ServerEvents) -> Iterator[ServerEvents]:
    """The events to serve with (`control_port` set): the API is bound now (a
    StartupError if it cannot be), served once the server listens, stopped at the end."""
    config = plan.config
    assert config.control_port is not None
    listener = listen(config.control_host, config.control_port, "the control API")
    control = ConditionsControl(
        plan.conditions, config.control_token, tcp=config.tcp, udp=config.udp
    )
    endpoint = HTTPEndpoint(listener, control.app, "control", max_body_bytes=MAX_BODY_BYTES)
    try:
        yield ControlEvents(events, control, endpoint)
    finally:
        endpoint.stop()
