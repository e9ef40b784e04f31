"""Every way a connection can end, in one place: the `Outcome` enum, whose values are
the labels logs and metrics use, and the one mapping from an exception to an outcome.

A connection's first recorded outcome wins (`ConnectionRecord.finish`): a drain that
cuts a connection off is not overwritten by the error the cut then causes. Some
outcomes carry a detail (the errno's name, the PROXY error, the limit): the label is
then `outcome:detail`, as in `error:EPIPE` or `rejected:max-per-ip`.
"""

from __future__ import annotations

import errno
import ssl
from enum import StrEnum


class Outcome(StrEnum):
    CLOSED = "closed"
    """The client finished (it closed, or half-closed and took all its echo)."""
    RESET = "reset"
    """The client reset the connection or vanished mid-send."""
    IDLE_TIMEOUT = "idle-timeout"
    """No byte from the client for `--idle-timeout` while nothing was owed to it."""
    SEND_TIMEOUT = "send-timeout"
    """The client took none of its echo for `--send-timeout`."""
    LIFETIME = "max-lifetime"
    """The connection reached `--max-lifetime`, however busy."""
    DRAINED = "drained"
    """Still open at the drain deadline (or at a second stop signal): cut off."""
    TLS_HANDSHAKE_TIMEOUT = "tls-handshake-timeout"
    """No TLS handshake within `--tls-handshake-timeout`."""
    TLS_HANDSHAKE_FAILED = "tls-handshake-failed"
    """The TLS handshake failed; the detail says why (OpenSSL's reason, or `closed`)."""
    TLS_CLIENT_CERT = "tls-client-cert"
    """Mutual TLS (`--tls-client-ca`) refused the client's certificate: the detail says
    `missing` (it sent none) or `untrusted` (not signed by that CA, or expired)."""
    PROXY_HEADER_TIMEOUT = "proxy-header-timeout"
    """A trusted proxy sent no complete PROXY header within `--proxy-header-timeout`."""
    PROXY_ERROR = "proxy-error"
    """A trusted proxy sent a bad PROXY header; the detail says how it was bad."""
    CLOSE_AFTER = "close-after"
    """Closed on purpose (a FIN) after `--close-after` bytes of echo."""
    RESET_AFTER = "reset-after"
    """Reset on purpose (an RST) after `--reset-after` bytes of echo."""
    REJECTED = "rejected"
    """The client a PROXY header named is over a limit, the detail naming the limit; or
    (`no thread`) `threads` could not start a thread for it: the system's limit."""
    ERROR = "error"
    """Anything else: the detail is the errno's name, `tls`, or `handler` (a bug)."""

    @property
    def is_error(self) -> bool:
        """Counted as an error in metrics: the connection failed, not the client's choice."""
        return self in (Outcome.RESET, Outcome.ERROR)


def label(outcome: Outcome, detail: str | None = None) -> str:
    return f"{outcome}:{detail}" if detail else str(outcome)


def outcome_of(exc: BaseException | None) -> tuple[Outcome, str | None]:
    """How a connection ended that failed with `exc` (None: it closed cleanly); its
    time limits aside, which the models know better than the exception."""
    if exc is None or isinstance(exc, ssl.SSLEOFError):
        return Outcome.CLOSED, None  # SSLEOFError: a TLS client that skipped close_notify
    if isinstance(exc, ssl.SSLError):
        return Outcome.ERROR, "tls"  # its errno is OpenSSL's, not the system's
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return Outcome.RESET, None
    code = getattr(exc, "errno", None)
    return Outcome.ERROR, errno.errorcode.get(code, str(code)) if code else type(exc).__name__


# OpenSSL's reasons when a server that requires a client certificate (mutual TLS) got
# none, or one its CA did not sign (or that has expired): in words that say so.
_CLIENT_CERTIFICATE_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "missing",
    "CERTIFICATE_VERIFY_FAILED": "untrusted",
}


NOT_TLS = "NOT_TLS"
_HANDSHAKE_RECORD = 0x16  # the content type of the record every TLS handshake opens with


def not_a_client_hello(first: bytes) -> tuple[Outcome, str] | None:
    """How the TLS step ends when the client's first byte cannot begin a handshake: at
    once, as `tls-handshake-failed:NOT_TLS`, where OpenSSL would wait for a whole record
    header (5 bytes), which a short plaintext message never completes, until the
    handshake timeout. None when it may be TLS, or when nothing came (the client left:
    the handshake says so)."""
    if first and first[0] != _HANDSHAKE_RECORD:
        return Outcome.TLS_HANDSHAKE_FAILED, NOT_TLS
    return None


def handshake_outcome(exc: BaseException) -> tuple[Outcome, str | None]:
    """How a failed TLS handshake ended, and why, the same in every model: OpenSSL's
    reason (`tls-handshake-failed:UNSUPPORTED_PROTOCOL`), `tls-client-cert:missing` or
    `tls-client-cert:untrusted` under mutual TLS, or `closed` when the client went away
    during it (closed or reset: an event loop cannot tell which)."""
    if isinstance(exc, TimeoutError):
        return Outcome.TLS_HANDSHAKE_TIMEOUT, None
    gone = (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError, EOFError)
    # CPython's own SSLErrors (no OpenSSL library) say in a sentence that the peer left.
    if isinstance(exc, gone) or (isinstance(exc, ssl.SSLError) and exc.library is None):
        return Outcome.TLS_HANDSHAKE_FAILED, "closed"
    if isinstance(exc, ssl.SSLError) and exc.reason in _CLIENT_CERTIFICATE_REASONS:
        return Outcome.TLS_CLIENT_CERT, _CLIENT_CERTIFICATE_REASONS[exc.reason]
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return Outcome.TLS_HANDSHAKE_FAILED, exc.reason
    return Outcome.TLS_HANDSHAKE_FAILED, type(exc).__name__
