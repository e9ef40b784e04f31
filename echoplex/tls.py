"""TLS contexts, TLS 1.2 or newer: the server's, built from its config, and a client's."""

from __future__ import annotations

import os
import ssl

from .config import ServerConfig
from .errors import StartupError


def server_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None without `tls_cert_file`; a StartupError if the
    certificate or key cannot be loaded."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    for path in (config.tls_cert_file, config.tls_key_file):
        if not os.path.isfile(path):
            raise StartupError(f"cannot load TLS certificate: no such file: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise StartupError(f"cannot load TLS certificate or key: {reason}") from exc
    return context


def client_context(ca_file: str | None = None, *, insecure: bool = False) -> ssl.SSLContext:
    """A client context: verifies the server against `ca_file` (or the system's CAs),
    or verifies nothing with `insecure`."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def checked_client_context(ca_file: str | None, *, insecure: bool = False) -> ssl.SSLContext:
    """`client_context`, built once, with a CA file that is missing or not PEM
    certificates as one ValueError naming it: a bad argument of the command given it."""
    if ca_file is not None and not os.path.isfile(ca_file):
        raise ValueError(f"no such CA file: {ca_file}")
    try:
        return client_context(ca_file, insecure=insecure)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise ValueError(f"cannot load CA file {ca_file}: {reason}") from None
