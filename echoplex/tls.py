"""TLS contexts, TLS 1.2 or newer: the server's, built from its config, and a client's.

Either side may prove who it is with a certificate and its key (`--tls-cert`/`--tls-key`
for the server, `--cert`/`--key` for a client), and the server may require a client's
(`--tls-client-ca`: mutual TLS). A file that cannot be used is one line naming it, not
OpenSSL's `[SSL] PEM lib (_ssl.c:...)`, which says neither which file nor what is wrong.
"""

from __future__ import annotations

import os
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
    if not os.path.isfile(ca_file):
        raise ValueError(f"no such file: {ca_file}")
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError:
        raise ValueError(f"{ca_file} holds no PEM certificate") from None
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
        if not os.path.isfile(path):
            raise ValueError(f"no such file: {path}")
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
        return f"{cert_file} holds no PEM certificate"
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"{key_file} is not the private key of {cert_file}"
    if exc.reason is None:  # `PEM lib`: the key file is not a PEM private key
        return f"{key_file} holds no PEM private key"
    return f"cannot use {cert_file} with {key_file}: {exc.reason}"


def _holds_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError):
        return False
    return True


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
    if ca_file is not None and not os.path.isfile(ca_file):
        raise ValueError(f"no such CA file: {ca_file}")
    try:
        return client_context(ca_file, insecure=insecure, cert_file=cert_file, key_file=key_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise ValueError(f"cannot load CA file {ca_file}: {reason}") from None
    except ValueError as exc:
        raise ValueError(f"cannot load client certificate: {exc}") from None
