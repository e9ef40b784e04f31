"""TLS contexts, TLS 1.2 or newer: the server's, built from its config, and a client's.

Either side may prove who it is with a certificate and its key (`--tls-cert`/`--tls-key`
for the server, `--cert`/`--key` for a client), and the server may require a client's
(`--tls-client-ca`: mutual TLS). A file that cannot be used is one line naming it, not
OpenSSL's `[SSL] PEM lib (_ssl.c:...)`, which says neither which file nor what is wrong.
"""

from __future__ import annotations

import os
import re
import ssl

from .config import ServerConfig
from .errors import StartupError


def server_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None without `tls_cert_file`; with `tls_client_ca_file`,
    it requires a client certificate that CA signed. A StartupError naming the file that
    cannot be loaded."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        load_identity(context, config.tls_cert_file, config.tls_key_file)
    except ValueError as exc:
        raise StartupError(f"cannot load TLS certificate or key: {exc}") from None
    if config.tls_client_ca_file is not None:
        try:
            _require_client_certificates(context, config.tls_client_ca_file)
        except ValueError as exc:
            raise StartupError(f"cannot load the client CA: {exc}") from None
    return context


def _require_client_certificates(context: ssl.SSLContext, ca_file: str) -> None:
    """Make `context` require a client certificate signed by a CA in `ca_file`; a
    ValueError naming the file if it holds no CA certificate."""
    if problem := _missing(ca_file):
        raise ValueError(problem)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError:
        raise ValueError(
            f"{ca_file} holds no PEM certificate: {_holds_instead(ca_file, _CERTIFICATE)}"
        ) from None
    # A server context starts with an empty store, so these are the file's own.
    if context.cert_store_stats()["x509_ca"] == 0:
        raise ValueError(f"{ca_file} holds no CA certificate (one that may sign others)")
    context.verify_mode = ssl.CERT_REQUIRED


class _Encrypted(Exception):
    """The key asks for a passphrase: OpenSSL would otherwise prompt on the terminal."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def load_identity(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Load a certificate chain and its private key into `context`; a ValueError in one
    line naming the file at fault (missing, not PEM, the two swapped, or a key that is
    not the certificate's)."""
    for path in (cert_file, key_file):
        if problem := _missing(path):
            raise ValueError(problem)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _Encrypted:
        raise ValueError(f"{key_file} is an encrypted key: give one without a passphrase") from None
    except ssl.SSLError as exc:
        raise ValueError(_identity_problem(cert_file, key_file, exc)) from None
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename or cert_file}: {exc.strerror}") from None


def _identity_problem(cert_file: str, key_file: str, exc: ssl.SSLError) -> str:
    """What is wrong, in words: OpenSSL names neither file, and says `PEM lib` for both."""
    if not _holds_certificate(cert_file):
        swapped = _pem_kind(cert_file) == _KEY and _pem_kind(key_file) == _CERTIFICATE
        return (
            f"{cert_file} holds no PEM certificate: {_holds_instead(cert_file, _CERTIFICATE)}"
            + (" (the certificate and the key swapped?)" if swapped else "")
        )
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"{key_file} is not the private key of {cert_file}"
    if exc.reason is None:  # `PEM lib`: the key file is not a PEM private key
        return f"{key_file} holds no PEM private key: {_holds_instead(key_file, _KEY)}"
    return f"cannot use {cert_file} with {key_file}: {exc.reason}"


def _holds_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError):
        return False
    return True


_KEY, _CERTIFICATE = "a private key", "a certificate"
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_READ_BYTES = 1 << 20  # far more than any certificate chain; a huge file is not PEM


def _pem_kind(path: str) -> str | None:
    """What a PEM file holds, by its labels: a private key (with or without a
    certificate), a certificate, or None (not PEM, or unreadable)."""
    try:
        with open(path, "rb") as file:
            labels = _PEM_LABEL.findall(file.read(_PEM_READ_BYTES))
    except OSError:
        return None
    if any(label.endswith(b"PRIVATE KEY") for label in labels):
        return _KEY
    if any(label.endswith(b"CERTIFICATE") for label in labels):
        return _CERTIFICATE
    return None


def _holds_instead(path: str, expected: str) -> str:
    """What `path`, which failed to load as `expected`, holds instead."""
    kind = _pem_kind(path)
    if kind is None:
        return "it is not a PEM file"
    if kind == expected:
        return f"its {expected.removeprefix('a ')} is damaged"
    return f"it is {kind}"


def _missing(path: str) -> str | None:
    """Why `path` cannot be opened as a file, or None if it can be tried."""
    if os.path.isdir(path):
        return f"{path} is a directory, not a file"
    if not os.path.isfile(path):
        return f"no such file: {path}"
    return None


def client_context(
    ca_file: str | None = None,
    *,
    insecure: bool = False,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> ssl.SSLContext:
    """A client context: verifies the server against `ca_file` (or the system's CAs),
    or verifies nothing with `insecure`; presents `cert_file` (with `key_file`) if the
    server asks for a client certificate. A ValueError for a certificate or key that
    cannot be loaded (see `load_identity`)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        load_identity(context, cert_file, key_file or cert_file)
    return context


def checked_client_context(
    ca_file: str | None,
    *,
    insecure: bool = False,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> ssl.SSLContext:
    """`client_context`, built once, with a file that cannot be used as one ValueError
    naming it: a bad argument of the command given it."""
    if ca_file is not None and os.path.isdir(ca_file):
        raise ValueError(f"CA file {ca_file} is a directory, not a file")
    if ca_file is not None and not os.path.isfile(ca_file):
        raise ValueError(f"no such CA file: {ca_file}")
    try:
        return client_context(ca_file, insecure=insecure, cert_file=cert_file, key_file=key_file)
    except ssl.SSLError:
        assert ca_file is not None  # the one file loaded before the identity's
        reason = f"it holds no PEM certificate: {_holds_instead(ca_file, _CERTIFICATE)}"
        raise ValueError(f"cannot load CA file {ca_file}: {reason}") from None
    except OSError as exc:
        raise ValueError(f"cannot load CA file {ca_file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"cannot load client certificate: {exc}") from None


# What an echoplex TLS server does with plaintext, in every model (measured with a real
# socket, `echoplex serve --tls-cert`, the message `hi\n` and longer ones): OpenSSL reads
# a 5-byte record header first, so a shorter message gets silence until the handshake
# timeout and then a close; a longer one is refused at once, with a FIN (pool, asyncio,
# workers) or a reset (simple, threads: the unread bytes make the close a reset), and
# never an alert. Other TLS stacks (Go's crypto/tls) answer with an alert record.
TLS_RECORD_HEADER_BYTES = 5
_ALERT, _HANDSHAKE = 0x15, 0x16


def looks_like_tls_record(data: bytes) -> bool:
    """Whether `data` starts as a TLS record does: an alert or a handshake, in a version
    from SSL 3.0 (3.0) to TLS 1.3 (which says 3.1 to 3.3 in its records)."""
    return len(data) >= 3 and data[0] in (_ALERT, _HANDSHAKE) and data[1] == 3 and data[2] <= 4


def plaintext_answer(answer: bytes, *, ended: bool) -> str | None:
    """What a server's answer to our first plaintext message says, when it says the
    server speaks TLS: `answer` is what came back (not an echo of what was sent), and
    `ended` whether the server then closed or reset the connection. None when it does
    not say so (an echo server that closes at once, by a limit or a condition, looks the
    same as a TLS server, hence "seems")."""
    if looks_like_tls_record(answer):
        kind = "an alert" if answer[0] == _ALERT else "a handshake record"
        return f"the server answered with TLS ({kind}), not an echo: it speaks TLS (try --tls)"
    if ended and not answer:
        return (
            "the server closed the connection before echoing a byte: "
            "it seems to speak TLS (try --tls)"
        )
    return None


def silence_hint(message_bytes: int) -> str:
    """Words to add when a plain first message got no answer at all: a TLS server waits
    silently for a whole record header, so a message shorter than one says nothing."""
    if message_bytes >= TLS_RECORD_HEADER_BYTES:
        return ""
    return (
        f"; a TLS server, too, waits silently for a message under "
        f"{TLS_RECORD_HEADER_BYTES} bytes (try --tls if it speaks TLS)"
    )
