"""The PROXY protocol, versions 1 and 2, as protocol logic with no I/O.

A TCP proxy in front of a server (HAProxy `send-proxy`/`send-proxy-v2`, nginx `stream`,
AWS NLB) opens its own connection, so the server sees the proxy's address. The proxy
therefore prepends one header naming the real client; the bytes after it are the
client's stream, untouched. This module follows HAProxy's specification,
`doc/proxy-protocol.txt` ("The PROXY protocol, Versions 1 & 2", 2020/03/05), and
is shared by every concurrency model, which owns the sockets and the clock:

- `parse_networks` turns `--trusted-proxy` CIDRs into networks; `is_trusted` says
  whether a peer is one of them. Only trusted peers are expected to send a header,
  and from them it is required: whether to read one is decided by the peer's address
  alone, never by looking at the bytes (spec section 5: a receiver that guesses lets
  any client spoof its address). A connection from any other peer is an ordinary
  one: its own address, and its bytes, a PROXY header included, are data to echo.
- `ProxyHeaderReader` is fed what a trusted peer sends, chunk by chunk, and answers
  "need more" (`None`), a `ProxyResult`, or raises `ProxyProtocolError`. What the
  caller does with each answer is spelled out on the class.
- `encode_v1` and `encode_v2` build headers, for tests and for clients that want to
  pose as a proxy (a load generator, say).

The reader decides which version it is reading from the first byte (`P` for the text
line, CR for the binary signature) and raises as soon as the bytes so far cannot begin
a valid header, so a client that speaks first (`GET /`) is turned away at once rather
than after 107 bytes or a timeout.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_V1_BYTES",
    "V2_SIGNATURE",
    "Address",
    "Command",
    "ErrorReason",
    "Family",
    "InetAddress",
    "Network",
    "ProxyHeaderReader",
    "ProxyProtocolError",
    "ProxyResult",
    "Tlv",
    "TlvType",
    "Transport",
    "crc32c",
    "encode_v1",
    "encode_v2",
    "is_trusted",
    "parse_networks",
]

V1_PREFIX = b"PROXY "
MAX_V1_BYTES = 107
"""The longest version 1 line, CRLF included: `PROXY UNKNOWN` with two full IPv6
addresses and two 5-digit ports (spec 2.1)."""

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES = 16  # signature, version/command, family/transport, 16-bit length
MAX_HEADER_BYTES = 4096
"""Default cap on a version 2 header, TLVs included. The format allows 16 + 65535
bytes, but the spec sizes headers to fit one 536-byte segment; real senders' TLVs
(ALPN, SNI, TLS details, a unique ID of at most 128 bytes) stay far below 4 KiB, and
a cap keeps a peer from making us buffer 64 KiB before we can say no."""

_V2_ADDRESS_BYTES = {1: 12, 2: 36, 3: 216}  # INET, INET6, UNIX
_UNIX_PATH_BYTES = 108


class Command(enum.IntEnum):
    """Version 2's command nibble. Version 1 headers are all `PROXY`."""

    LOCAL = 0
    """The proxy's own connection (a health check): use the real endpoints."""
    PROXY = 1
    """Relayed on behalf of a client the header names."""


class Family(enum.IntEnum):
    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class Transport(enum.IntEnum):
    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


class TlvType(enum.IntEnum):
    """Registered version 2 TLV types (spec 2.2)."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


class ErrorReason(enum.StrEnum):
    """Why a header was refused; also fit for log lines and metric labels."""

    NOT_PROXY_PROTOCOL = "not-proxy-protocol"
    """The first bytes are neither `PROXY ` nor the version 2 signature."""
    OVERSIZED = "oversized"
    """No CRLF within 107 bytes (v1), or a v2 length beyond the reader's cap."""
    MALFORMED = "malformed"
    """A version 1 line that does not match the grammar (fields, spaces, CR/LF)."""
    BAD_ADDRESS = "bad-address"
    BAD_PORT = "bad-port"
    UNSUPPORTED_VERSION = "unsupported-version"
    UNSUPPORTED_COMMAND = "unsupported-command"
    BAD_FAMILY = "bad-family"
    """A v2 address family or transport nibble the spec does not define."""
    SHORT_ADDRESS_BLOCK = "short-address-block"
    """A v2 length too small for the address block of the announced family."""
    BAD_TLV = "bad-tlv"
    BAD_CHECKSUM = "bad-checksum"
    TRUNCATED = "truncated"
    """The peer closed before the header was complete."""


class ProxyProtocolError(ValueError):
    """The peer did not send a valid PROXY header: abort the connection."""

    def __init__(self, reason: ErrorReason, detail: str = "") -> None:
        super().__init__(reason, detail)  # both in args, so it pickles (workers)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else str(self.reason)


InetAddress = tuple[str, int]
"""(host, port); the host is in Python's canonical text form (`str(ip_address(...))`)."""
Address = InetAddress | str
"""An INET/INET6 (host, port), or an AF_UNIX path (`\\0`-prefixed for abstract names)."""


class Tlv(NamedTuple):
    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class ProxyResult:
    """A complete, valid header, and the application bytes that came after it."""

    version: Literal[1, 2]
    command: Command
    family: Family
    """v1: `INET` for TCP4, `INET6` for TCP6, `UNSPEC` for UNKNOWN. For a v2 LOCAL
    header, what the header said (the spec says to ignore it)."""
    transport: Transport
    source: Address | None
    """The real client, or None: use the connection's own peer address (v2 LOCAL, v1
    UNKNOWN, v2 UNSPEC family or transport). For v2 AF_UNIX, a path: the empty string
    for an unnamed socket, as `getpeername()` gives for one."""
    destination: Address | None
    """The address the client connected to (the proxy's frontend), or None likewise."""
    remainder: bytes
    """Bytes received after the header: the start of the application stream, to be
    served (echoed) before anything read later."""
    header_bytes: int
    """The header's length on the wire."""
    tlvs: tuple[Tlv, ...] = field(default=())
    """Version 2 TLVs in wire order, raw (NOOP and CRC32C included; the checksum has been
    verified). Empty for version 1, LOCAL and UNSPEC headers: their blocks are skipped
    uninterpreted, as the spec says (HAProxy's LOCAL health checks carry its CRC32C
    TLV all the same)."""

    def tlv(self, type_: int) -> bytes | None:
        """The value of the first TLV of this type, if any."""
        for tlv in self.tlvs:
            if tlv.type == type_:
                return tlv.value
        return None

    def client_address(self, connection_peer: Any) -> Any:
        """The address logs, limits and metrics should use for this connection."""
        return connection_peer if self.source is None else self.source


class ProxyHeaderReader:
    """Reads one PROXY header (v1 or v2) from the start of a trusted peer's stream.

    Feed it every chunk the peer sends, before serving anything:

    - `feed()` returns None: the header is incomplete; read more. Serve nothing yet
      (spec: the receiver "MUST NOT start processing the connection before it receives
      a complete and valid PROXY protocol header").
    - `feed()` returns a `ProxyResult`: use `result.client_address(peer)` as the
      connection's address from now on (logs, per-IP limits, metrics); serve
      `result.remainder` first, then carry on as for any connection. A v2 `LOCAL`
      header (a proxy's health check), v1 `UNKNOWN` and a v2 UNSPEC family are valid
      connections that keep the real endpoints (`source` is None).
    - `feed()` raises `ProxyProtocolError`: abort the connection at once, echoing
      nothing (spec: "Any sequence which does not exactly match the protocol must be
      discarded and cause the receiver to abort the connection ... as soon as
      possible"). `reason` is the kind, for the log line and metrics.
    - The peer closes first: call `feed_eof()`, which raises `ProxyProtocolError`
      (`truncated`): the spec says to reject partial headers.
    - No complete header within the header timeout of the accept (a clock the caller
      owns, counted from accept, not from the last byte, so a trickle cannot hold
      the connection): abort the connection, echoing nothing.

    The reader never reads past the header: everything after it is in `remainder`.
    A reader parses one header; after a result, `feed()` is a programming error
    (`RuntimeError`), and after an error it raises the same error again.
    """

    def __init__(self, *, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        smallest = V2_FIXED_BYTES + _V2_ADDRESS_BYTES[Family.UNIX]
        if max_header_bytes < smallest:
            raise ValueError(f"max_header_bytes must be at least {smallest} (a v2 UNIX header)")
        self.max_header_bytes = max_header_bytes
        self._buffer = bytearray()
        self._result: ProxyResult | None = None
        self._error: ProxyProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held while the header is incomplete."""
        return len(self._buffer)

    @property
    def done(self) -> bool:
        return self._result is not None

    def feed(self, data: bytes) -> ProxyResult | None:
        if self._result is not None:
            raise RuntimeError("the PROXY header was already read; serve the stream")
        if self._error is not None:
            raise self._error
        self._buffer += data
        try:
            result = _parse(self._buffer, self.max_header_bytes)
        except ProxyProtocolError as exc:
            self._error = exc
            self._buffer.clear()
            raise
        if result is not None:
            self._result = result
            self._buffer.clear()
        return result

    def feed_eof(self) -> None:
        """The peer closed its side; raises unless the header was already complete."""
        if self._result is not None:
            return
        if self._error is not None:
            raise self._error
        got = len(self._buffer)
        self._error = ProxyProtocolError(
            ErrorReason.TRUNCATED,
            f"connection closed after {got} bytes of header" if got else "no header",
        )
        self._buffer.clear()
        raise self._error


def _parse(buf: bytearray, max_header_bytes: int) -> ProxyResult | None:
    if not buf:
        return None
    if buf[: len(V1_PREFIX)] == V1_PREFIX[: len(buf)]:
        return _parse_v1(buf)
    if buf[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(buf)]:
        return _parse_v2(buf, max_header_bytes)
    raise ProxyProtocolError(
        ErrorReason.NOT_PROXY_PROTOCOL,
        f"stream starts with {bytes(buf[:16])!r}, neither 'PROXY ' nor the v2 signature",
    )


# ---------------------------------------------------------------------------- version 1

_V1_PROTOCOLS = {b"TCP4": Family.INET, b"TCP6": Family.INET6}
_UNKNOWN = b"UNKNOWN"
# Bytes an address or port may contain, by family: early rejection of a line that
# cannot become valid, without waiting for its CRLF.
_V1_FIELD_BYTES = {
    Family.INET: frozenset(b"0123456789. "),
    Family.INET6: frozenset(b"0123456789abcdefABCDEF:. "),
}
# Decimal without heading zeroes (spec 2.1: "to avoid any possible confusion with octal").
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4_TEXT = re.compile(rb"(?:" + _OCTET + rb"\.){3}" + _OCTET)
_PORT_TEXT = re.compile(rb"0|[1-9][0-9]{0,4}")


def _parse_v1(buf: bytearray) -> ProxyResult | None:
    if len(buf) < len(V1_PREFIX):
        return None
    window = min(len(buf), MAX_V1_BYTES)
    cr = buf.find(b"\r", 0, window)
    lf = buf.find(b"\n", 0, window)
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyProtocolError(ErrorReason.MALFORMED, "LF without CR in the v1 line")
    if cr == -1:
        if len(buf) >= MAX_V1_BYTES:
            raise ProxyProtocolError(
                ErrorReason.OVERSIZED, f"no CRLF within {MAX_V1_BYTES} bytes of the v1 line"
            )
        _check_v1_prefix(bytes(buf[len(V1_PREFIX) :]))
        return None
    end = cr + 2
    if end > MAX_V1_BYTES:
        raise ProxyProtocolError(
            ErrorReason.OVERSIZED, f"v1 line longer than {MAX_V1_BYTES} bytes with its CRLF"
        )
    if len(buf) == cr + 1:  # the LF may be in the next chunk
        _check_v1_prefix(bytes(buf[len(V1_PREFIX) : cr]))
        return None
    if buf[cr + 1] != ord("\n"):
        raise ProxyProtocolError(ErrorReason.MALFORMED, "CR without LF in the v1 line")
    source, destination, family = _parse_v1_fields(bytes(buf[len(V1_PREFIX) : cr]))
    return ProxyResult(
        version=1,
        command=Command.PROXY,
        family=family,
        transport=Transport.STREAM if family != Family.UNSPEC else Transport.UNSPEC,
        source=source,
        destination=destination,
        remainder=bytes(buf[end:]),
        header_bytes=end,
    )


def _check_v1_prefix(partial: bytes) -> None:
    """Raise if an incomplete v1 line (after `PROXY `) cannot become a valid one."""
    protocol, space, rest = partial.partition(b" ")
    if protocol.startswith(_UNKNOWN):
        return  # anything may follow UNKNOWN up to the CRLF
    if not space:  # the protocol name may still be arriving
        if not any(name.startswith(protocol) for name in (b"TCP4", b"TCP6", _UNKNOWN)):
            raise ProxyProtocolError(ErrorReason.MALFORMED, f"unknown protocol {protocol!r}")
        return
    family = _V1_PROTOCOLS.get(protocol)
    if family is None:
        raise ProxyProtocolError(ErrorReason.MALFORMED, f"unknown protocol {protocol!r}")
    fields = rest.split(b" ")
    if len(fields) > 4 or any(not f for f in fields[:-1]):
        raise ProxyProtocolError(ErrorReason.MALFORMED, "v1 fields must be 4, one space apart")
    if not _V1_FIELD_BYTES[family].issuperset(rest):
        raise ProxyProtocolError(
            ErrorReason.MALFORMED, f"unexpected characters in a {protocol.decode()} line"
        )


def _parse_v1_fields(line: bytes) -> tuple[InetAddress | None, InetAddress | None, Family]:
    """The line between `PROXY ` and CRLF."""
    if line.startswith(_UNKNOWN):
        # Spec 2.1: "the receiver must ignore anything presented before the CRLF".
        return None, None, Family.UNSPEC
    fields = line.split(b" ")
    family = _V1_PROTOCOLS.get(fields[0])
    if family is None:
        raise ProxyProtocolError(ErrorReason.MALFORMED, f"unknown protocol {fields[0]!r}")
    if len(fields) != 5:
        raise ProxyProtocolError(
            ErrorReason.MALFORMED,
            f"expected protocol and 4 fields one space apart, got {len(fields) - 1} fields",
        )
    _, src, dst, sport, dport = fields
    return (
        (_v1_host(src, family), _v1_port(sport)),
        (_v1_host(dst, family), _v1_port(dport)),
        family,
    )


def _v1_host(text: bytes, family: Family) -> str:
    if family == Family.INET:
        if _IPV4_TEXT.fullmatch(text) is None:
            raise ProxyProtocolError(ErrorReason.BAD_ADDRESS, f"not a TCP4 address: {text!r}")
        return text.decode("ascii")
    # IPv6: hex digits, colons, an optional embedded IPv4; no scope (`%eth0`), which
    # Python would accept but the spec's grammar has no room for.
    if not _V1_FIELD_BYTES[Family.INET6].issuperset(text) or b" " in text:
        raise ProxyProtocolError(ErrorReason.BAD_ADDRESS, f"not a TCP6 address: {text!r}")
    try:
        return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        raise ProxyProtocolError(ErrorReason.BAD_ADDRESS, f"not a TCP6 address: {text!r}") from None


def _v1_port(text: bytes) -> int:
    if _PORT_TEXT.fullmatch(text) is None or int(text) > 0xFFFF:
        raise ProxyProtocolError(ErrorReason.BAD_PORT, f"not a port in 0..65535: {text!r}")
    return int(text)


# ---------------------------------------------------------------------------- version 2


def _parse_v2(buf: bytearray, max_header_bytes: int) -> ProxyResult | None:
    n = len(buf)
    if n <= len(V2_SIGNATURE):
        return None
    version, command_code = buf[12] >> 4, buf[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(ErrorReason.UNSUPPORTED_VERSION, f"version {version}")
    if command_code not in (Command.LOCAL, Command.PROXY):
        # "Receivers must drop connections presenting unexpected values here."
        raise ProxyProtocolError(ErrorReason.UNSUPPORTED_COMMAND, f"command {command_code}")
    command = Command(command_code)
    if n < 14:
        return None
    family_code, transport_code = buf[13] >> 4, buf[13] & 0x0F
    # LOCAL: "discard the protocol block including the family which is ignored".
    if command == Command.PROXY and (family_code > Family.UNIX or transport_code > 2):
        raise ProxyProtocolError(
            ErrorReason.BAD_FAMILY, f"family/transport byte 0x{buf[13]:02x} is not defined"
        )
    if n < V2_FIXED_BYTES:
        return None
    length = int.from_bytes(buf[14:16], "big")
    total = V2_FIXED_BYTES + length
    if total > max_header_bytes:
        raise ProxyProtocolError(
            ErrorReason.OVERSIZED, f"v2 header of {total} bytes, over the {max_header_bytes} cap"
        )
    addressed = (
        command == Command.PROXY
        and family_code != Family.UNSPEC
        and transport_code != Transport.UNSPEC
    )
    if addressed and length < _V2_ADDRESS_BYTES[family_code]:
        raise ProxyProtocolError(
            ErrorReason.SHORT_ADDRESS_BLOCK,
            f"length {length} is under the {_V2_ADDRESS_BYTES[family_code]}-byte "
            f"address block of {Family(family_code).name}",
        )
    if n < total:
        return None
    family = Family(family_code) if family_code <= Family.UNIX else Family.UNSPEC
    transport = Transport(transport_code) if transport_code <= 2 else Transport.UNSPEC
    source: Address | None = None
    destination: Address | None = None
    tlvs: tuple[Tlv, ...] = ()
    if addressed:
        block = bytes(buf[V2_FIXED_BYTES:total])
        source, destination, used = _v2_addresses(family, block)
        tlvs = _parse_tlvs(block[used:])
        _verify_checksum(bytes(buf[:total]), tlvs)
    # An UNSPEC family or transport carries nothing we can read: "The receiver should
    # ignore address information", and keep the real endpoints.
    return ProxyResult(
        version=2,
        command=command,
        family=family,
        transport=transport,
        source=source,
        destination=destination,
        remainder=bytes(buf[total:]),
        header_bytes=total,
        tlvs=tlvs,
    )


def _v2_addresses(family: Family, block: bytes) -> tuple[Address, Address, int]:
    if family == Family.INET:
        src4, dst4 = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
        sport, dport = struct.unpack_from("!HH", block, 8)
        return (str(src4), sport), (str(dst4), dport), 12
    if family == Family.INET6:
        src6, dst6 = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        sport, dport = struct.unpack_from("!HH", block, 32)
        return (str(src6), sport), (str(dst6), dport), 36
    size = _UNIX_PATH_BYTES
    return _unix_path(block[:size]), _unix_path(block[size : 2 * size]), 2 * size


def _unix_path(raw: bytes) -> str:
    """A 108-byte sun_path: up to its NUL, or for an abstract name (leading NUL) the
    name with its zero padding removed. An unnamed socket is the empty string."""
    if raw[:1] == b"\0":
        name = raw[1:].rstrip(b"\0")
        return "\0" + os.fsdecode(name) if name else ""
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _parse_tlvs(data: bytes) -> tuple[Tlv, ...]:
    tlvs = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyProtocolError(
                ErrorReason.BAD_TLV, f"{len(data) - offset} stray bytes after the last TLV"
            )
        type_, length = data[offset], int.from_bytes(data[offset + 1 : offset + 3], "big")
        start = offset + 3
        if start + length > len(data):
            raise ProxyProtocolError(
                ErrorReason.BAD_TLV,
                f"TLV 0x{type_:02x} of {length} bytes overruns the header by "
                f"{start + length - len(data)}",
            )
        tlvs.append(Tlv(type_, data[start : start + length]))
        offset = start + length
    return tuple(tlvs)


def _verify_checksum(header: bytes, tlvs: tuple[Tlv, ...]) -> None:
    """Spec 2.2.3: a receiver that supports PP2_TYPE_CRC32C must drop a header whose
    checksum (computed with the checksum field zeroed) does not match."""
    sums = [tlv for tlv in tlvs if tlv.type == TlvType.CRC32C]
    if not sums:
        return
    if len(sums) > 1 or len(sums[0].value) != 4:
        raise ProxyProtocolError(ErrorReason.BAD_TLV, "CRC32C must be one 4-byte TLV")
    # Find the field: walk the TLVs again to learn its offset in the header.
    offset = _crc_value_offset(header)
    zeroed = header[:offset] + b"\0\0\0\0" + header[offset + 4 :]
    expected = int.from_bytes(sums[0].value, "big")
    if crc32c(zeroed) != expected:
        raise ProxyProtocolError(ErrorReason.BAD_CHECKSUM, "CRC32C of the header does not match")


def _crc_value_offset(header: bytes) -> int:
    offset = V2_FIXED_BYTES + _V2_ADDRESS_BYTES[header[13] >> 4]
    while header[offset] != TlvType.CRC32C:
        offset += 3 + int.from_bytes(header[offset + 1 : offset + 3], "big")
    return offset + 3


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B), as version 2's checksum TLV uses.

    Pure Python, table-driven: a header is at most a few KiB.
    """
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------- encoding


def encode_v1(source: InetAddress | None = None, destination: InetAddress | None = None) -> bytes:
    """A version 1 line: TCP4 or TCP6 from the addresses, `PROXY UNKNOWN` without them."""
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        raise ValueError("give both addresses, or neither for UNKNOWN")
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be the same IP version")
    for port in (source[1], destination[1]):
        _check_port(port)
    protocol = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {protocol} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(
    source: Address | None = None,
    destination: Address | None = None,
    *,
    command: Command = Command.PROXY,
    transport: Transport = Transport.STREAM,
    tlvs: Iterable[tuple[int, bytes]] = (),
    checksum: bool = False,
) -> bytes:
    """A version 2 header.

    Addresses are (host, port) for INET/INET6 or a path for UNIX; neither gives the
    UNSPEC family and transport (byte 0x00), as for `command=Command.LOCAL`, a
    proxy's health check. `checksum` appends a CRC32C TLV over the whole header.
    """
    block, family = _encode_v2_addresses(source, destination)
    if family == Family.UNSPEC:
        transport = Transport.UNSPEC
    extensions = bytearray()
    for type_, value in tlvs:
        extensions += struct.pack("!BH", type_, len(value)) + value
    if checksum:
        extensions += struct.pack("!BH", TlvType.CRC32C, 4) + b"\0\0\0\0"
    length = len(block) + len(extensions)
    if length > 0xFFFF:
        raise ValueError(f"a v2 header carries at most 65535 bytes after its 16, not {length}")
    header = bytearray(V2_SIGNATURE)
    header += struct.pack("!BBH", 0x20 | command, family << 4 | transport, length)
    header += block + extensions
    if checksum:
        header[-4:] = crc32c(bytes(header)).to_bytes(4, "big")
    return bytes(header)


def _encode_v2_addresses(
    source: Address | None, destination: Address | None
) -> tuple[bytes, Family]:
    if source is None and destination is None:
        return b"", Family.UNSPEC
    if isinstance(source, str) and isinstance(destination, str):
        return _unix_bytes(source) + _unix_bytes(destination), Family.UNIX
    if not isinstance(source, tuple) or not isinstance(destination, tuple):
        raise ValueError("give two (host, port) addresses, two UNIX paths, or neither")
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be the same IP version")
    for port in (source[1], destination[1]):
        _check_port(port)
    ports = struct.pack("!HH", source[1], destination[1])
    return src.packed + dst.packed + ports, Family.INET if src.version == 4 else Family.INET6


def _unix_bytes(path: str) -> bytes:
    raw = os.fsencode(path)
    if len(raw) > _UNIX_PATH_BYTES:
        raise ValueError(f"a UNIX path is at most {_UNIX_PATH_BYTES} bytes: {path!r}")
    return raw.ljust(_UNIX_PATH_BYTES, b"\0")


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is not in 0..65535")


# ---------------------------------------------------------------------------- trust

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(specs: Iterable[str]) -> list[Network]:
    """`--trusted-proxy` values: CIDRs or single addresses, each item possibly a
    comma-separated list (`["127.0.0.0/8", "::1", "10.0.0.0/8,192.168.0.0/16"]`).

    Raises one ValueError naming the bad entry. A network with host bits set
    (`10.0.0.1/8`) is refused rather than widened: it is more likely a typo.
    """
    networks: list[Network] = []
    for spec in specs:
        for item in spec.split(","):
            text = item.strip()
            try:
                networks.append(ipaddress.ip_network(text))
            except ValueError as exc:
                hint = ""
                if "host bits set" in str(exc):
                    widened = ipaddress.ip_network(text, strict=False)
                    hint = f" (host bits set: did you mean {widened}?)"
                raise ValueError(
                    f"invalid trusted proxy {text!r}: expected an IP address or CIDR "
                    f"network such as 10.0.0.0/8 or ::1{hint}"
                ) from None
    return networks


def is_trusted(
    peer_ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Iterable[Network]
) -> bool:
    """Whether a peer's address is in one of the trusted networks.

    An IPv4-mapped IPv6 peer (`::ffff:10.0.0.1`, what a dual-stack `::` listener
    reports for IPv4 clients) is checked as the IPv4 address too. A peer that is not
    an IP address at all (a UNIX socket's empty name) is not trusted.
    """
    if not isinstance(peer_ip, str | ipaddress.IPv4Address | ipaddress.IPv6Address):
        # A (host, port) tuple passed by mistake would otherwise be "not trusted" forever.
        raise TypeError(f"is_trusted wants the peer's IP address, not {peer_ip!r}")
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            # Scoped (link-local) peers: networks have no scope; compare the bare address.
            address = ipaddress.IPv6Address(str(address).split("%", 1)[0])
            candidates = [address]
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
    else:
        candidates.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    return any(
        candidate.version == network.version and candidate in network
        for network in networks
        for candidate in candidates
    )
