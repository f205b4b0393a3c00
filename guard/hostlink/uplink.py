"""Host link adapter: one TCP (optionally TLS / mTLS) connection to the acquirer.

Connect blocks (bounded by ``connect_timeout``, TLS handshake included); afterwards the socket is
non-blocking and the object is meant to be registered in the driver's ``selectors`` loop:

- register the ``Uplink`` object itself (it has ``fileno()``) for EVENT_READ and call ``poll()``
  when it is readable, and also after every ``send`` (TLS may buffer decrypted bytes);
- when ``connected`` turns False (``poll`` returned ``Disconnected``, or ``send`` failed),
  unregister it before reconnecting, because the new socket may reuse the descriptor number.

Framing loss (``HOST_BAD_LENGTH``) makes ``poll`` close the connection: the next byte boundary is
unknowable, so only a fresh connection can resynchronise.

``send`` is tri-state because "did the host maybe get it?" decides whether a reversal is owed:
``NOT_SENT`` means no byte of the message left this process; ``MAYBE_SENT`` must be treated as
sent (the engine reverses). Over TLS any write failure is ``MAYBE_SENT``: OpenSSL may have pushed
part of a record to the kernel before reporting "want write" or an error.
"""

from __future__ import annotations

import enum
import selectors
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Mapping

from guard.core.errors import KeyFileError
from guard.hostlink.iso import FrameDecoder, HostCodec, HostGarbage, HostMessage

RECV_CHUNK = 65536
MAX_READS_PER_POLL = 16  # bounds one poll() to ~1 MiB so a chatty host cannot starve the loop

# Stable reasons carried by Disconnected / Uplink.last_error.
DISC_EOF = "EOF"
DISC_RESET = "RESET"
DISC_TLS = "TLS_ERROR"
DISC_FRAMING = "FRAMING_LOST"
DISC_SEND_FAILED = "SEND_FAILED"
DISC_CLOSED = "CLOSED"
CONNECT_REFUSED = "CONNECT_REFUSED"
CONNECT_TIMEOUT = "CONNECT_TIMEOUT"
CONNECT_FAILED = "CONNECT_FAILED"
TLS_HANDSHAKE_FAILED = "TLS_HANDSHAKE_FAILED"


class SendOutcome(enum.Enum):
    """Result of ``Uplink.send``. Truthy unless NOT_SENT, so ``if not up.send(f)`` still reads well."""

    NOT_SENT = "NOT_SENT"  # nothing left the terminal: the sale can fail cleanly
    SENT = "SENT"  # every byte accepted by the kernel
    MAYBE_SENT = "MAYBE_SENT"  # failed part-way: treat as sent and reverse

    def __bool__(self) -> bool:
        return self is not SendOutcome.NOT_SENT


@dataclass(frozen=True)
class Disconnected:
    """The connection is gone (``reason`` is one of the DISC_* codes); reconnect to continue."""

    reason: str
    detail: str = ""


PollItem = HostMessage | HostGarbage | Disconnected


class Uplink:
    """Client side of the host link. Not thread-safe: use it from the driver's loop only."""

    def __init__(
        self,
        host: str,
        port: int,
        codec: HostCodec,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 3.0,
        send_timeout: float | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.codec = codec
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.send_timeout = connect_timeout if send_timeout is None else send_timeout
        self._sock: socket.socket | None = None
        self._decoder: FrameDecoder | None = None
        self._pending: list[PollItem] = []
        self.last_error = ""
        self.connections = 0

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    def fileno(self) -> int:
        """The socket's descriptor, or -1 when not connected."""
        return self._sock.fileno() if self._sock is not None else -1

    def connect(self) -> bool:
        """Open TCP (+ TLS handshake) within ``connect_timeout``; True if connected afterwards."""
        if self._sock is not None:
            return True
        self._pending.clear()
        deadline = time.monotonic() + self.connect_timeout
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except ConnectionRefusedError:
            self.last_error = CONNECT_REFUSED
            return False
        except (socket.timeout, TimeoutError):
            self.last_error = CONNECT_TIMEOUT
            return False
        except OSError:
            self.last_error = CONNECT_FAILED
            return False
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass
        sock: socket.socket = raw
        if self.ssl_context is not None:
            try:
                raw.settimeout(max(deadline - time.monotonic(), 0.05))
                sock = self.ssl_context.wrap_socket(
                    raw, server_hostname=self.server_hostname or self.host, do_handshake_on_connect=True
                )
            except (ssl.SSLError, ssl.CertificateError, OSError):
                raw.close()
                self.last_error = TLS_HANDSHAKE_FAILED
                return False
        sock.setblocking(False)
        self._sock = sock
        self._decoder = self.codec.decoder("terminal")
        self.last_error = ""
        self.connections += 1
        return True

    def send(self, fields: Mapping[str, str]) -> SendOutcome:
        """Encode and write one message. Raises ``CodecError`` (nothing sent) on bad fields."""
        data = self.codec.encode(fields)
        sock = self._sock
        if sock is None:
            return SendOutcome.NOT_SENT
        view = memoryview(data)
        sent = 0
        attempted = False
        deadline = time.monotonic() + self.send_timeout
        reason = DISC_SEND_FAILED
        while sent < len(data):
            try:
                attempted = True
                n = sock.send(view[sent:])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError) as e:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                _wait(sock, want_read=isinstance(e, ssl.SSLWantReadError), timeout=min(remaining, 0.05))
                continue
            except ssl.SSLError:
                reason = DISC_TLS
                break
            except OSError:
                reason = DISC_RESET
                break
            if n <= 0:
                break
            sent += n
        if sent == len(data):
            return SendOutcome.SENT
        self._drop(reason, f"write failed after {sent} of {len(data)} bytes")
        if sent == 0 and not (self.tls and attempted):
            return SendOutcome.NOT_SENT
        return SendOutcome.MAYBE_SENT

    def poll(self) -> list[PollItem]:
        """Everything readable now, without blocking: messages, garbage, then Disconnected if any.

        Reads at most MAX_READS_PER_POLL chunks (plus whatever TLS already decrypted), so a
        flooding host leaves the descriptor readable for the next loop turn instead of starving it.
        """
        out: list[PollItem] = self._pending
        self._pending = []
        sock, dec = self._sock, self._decoder
        if sock is None or dec is None:
            return out
        reads = 0
        while reads < MAX_READS_PER_POLL or _tls_pending(sock):
            reads += 1
            try:
                chunk = sock.recv(RECV_CHUNK)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            except ssl.SSLError:
                out.extend(self._eof(dec))
                self._close_socket()
                out.append(Disconnected(DISC_TLS, "TLS error while reading"))
                return out
            except OSError:
                out.extend(self._eof(dec))
                self._close_socket()
                out.append(Disconnected(DISC_RESET, "connection reset while reading"))
                return out
            if not chunk:
                out.extend(self._eof(dec))
                self._close_socket()
                out.append(Disconnected(DISC_EOF, "host closed the connection"))
                return out
            out.extend(dec.feed(chunk))
            if dec.broken:
                self._close_socket()
                out.append(Disconnected(DISC_FRAMING, "length header unusable; reconnect to resynchronise"))
                return out
        return out

    def close(self) -> None:
        """Close the connection (idempotent). A partial inbound frame is discarded silently."""
        self._close_socket()
        self._pending.clear()

    @staticmethod
    def _eof(dec: FrameDecoder) -> list[PollItem]:
        g = dec.eof()
        return [g] if g is not None else []

    def _drop(self, reason: str, detail: str) -> None:
        dec = self._decoder
        pending: list[PollItem] = self._eof(dec) if dec is not None else []
        self._close_socket()
        self._pending.extend(pending)
        self._pending.append(Disconnected(reason, detail))
        self.last_error = reason

    def _close_socket(self) -> None:
        sock, self._sock, self._decoder = self._sock, None, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _tls_pending(sock: socket.socket) -> bool:
    """Decrypted bytes buffered inside OpenSSL do not make the descriptor readable: drain them."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def _wait(sock: socket.socket, *, want_read: bool, timeout: float) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ if want_read else selectors.EVENT_WRITE)
        sel.select(timeout)


def make_client_context(
    cafile: str | None,
    certfile: str | None,
    keyfile: str | None,
    verify: bool = True,
) -> ssl.SSLContext:
    """TLS >= 1.2 client context; presents ``certfile``/``keyfile`` for mTLS when given.

    ``verify=False`` disables server verification (lab use only). Raises ``KeyFileError``
    naming the setting (not the contents) when a file cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        try:
            if cafile:
                ctx.load_verify_locations(cafile=cafile)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError):
            raise KeyFileError("host.tls.cafile cannot be loaded", code="KEY_FILE_INVALID") from None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certfile:
        try:
            ctx.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError):
            raise KeyFileError("host.tls.certfile/keyfile cannot be loaded", code="KEY_FILE_INVALID") from None
    return ctx


__all__ = [
    "Disconnected",
    "SendOutcome",
    "Uplink",
    "make_client_context",
]
