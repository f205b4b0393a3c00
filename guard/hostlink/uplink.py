"""Host link adapter: one TCP (optionally TLS / mTLS) connection to the acquirer.

Nothing here blocks the driver's loop, which also serves the card reader (ACK within 100 ms):

- ``connect()`` starts a non-blocking TCP connect (then a non-blocking TLS handshake) and
  returns at once; while ``connecting`` is True each later call makes progress, and it returns
  True once the connection is fully established. The attempt fails after ``connect_timeout`` in
  total (``last_error`` says why). A host name is resolved on a daemon thread (guard.hostlink.connect).
- ``send()`` writes what the kernel takes and queues the rest in a bounded outbox, written by
  later ``send``/``flush``/``poll`` calls. A host that leaves the outbox over ``outbox_limit``
  bytes, or unread for ``send_timeout`` seconds, is not reading: the connection is dropped.

Register the ``Uplink`` object itself (it has ``fileno()``) for EVENT_READ once connected and call
``poll()`` when it is readable, and also after every ``send`` (TLS may buffer decrypted bytes);
call ``flush()`` every loop round. When ``connected`` turns False (``poll`` returned
``Disconnected``, ``send`` failed, ``flush`` returned False) unregister it before reconnecting,
because the new socket may reuse the descriptor number.

Framing loss (``HOST_BAD_LENGTH``) makes ``poll`` close the connection: the next byte boundary is
unknowable, so only a fresh connection can resynchronise.

``send`` is tri-state because "did the host maybe get it?" decides whether a reversal is owed:
``NOT_SENT`` means no byte of the message left this process and no earlier queued message was cut
by the same failure; ``MAYBE_SENT`` must be treated as sent (the engine reverses). Over TLS any
write failure is ``MAYBE_SENT`` once a write covering the message was attempted: OpenSSL may have
pushed part of a record to the kernel before reporting "want write" or an error.
"""

from __future__ import annotations

import enum
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Mapping

from guard.core.errors import KeyFileError
from guard.hostlink.connect import (
    CONNECT_FAILED,
    CONNECT_REFUSED,
    CONNECT_TIMEOUT,
    DNS_FAILED,
    TLS_HANDSHAKE_FAILED,
    Addresses,
    ConnectAttempt,
    ConnectFailed,
)
from guard.hostlink.iso import FrameDecoder, HostCodec, HostGarbage, HostMessage

RECV_CHUNK = 65536
MAX_READS_PER_POLL = 16  # bounds one poll() to ~1 MiB so a chatty host cannot starve the loop
MAX_ITEMS_PER_POLL = 64  # frames one poll() hands out; the rest wait in ``backlog`` for the next loop round
OUTBOX_LIMIT = 256 * 1024  # queued bytes beyond what the kernel took; ISO messages are < 2 KiB
TLS_WRITE_MAX = 16 * 1024  # one TLS record per write, so a "want write" retry repeats one slice

# Stable reasons carried by Disconnected / Uplink.last_error.
DISC_EOF = "EOF"
DISC_RESET = "RESET"
DISC_TLS = "TLS_ERROR"
DISC_FRAMING = "FRAMING_LOST"
DISC_SEND_FAILED = "SEND_FAILED"
DISC_CLOSED = "CLOSED"
# CONNECT_REFUSED, CONNECT_TIMEOUT, CONNECT_FAILED, DNS_FAILED, TLS_HANDSHAKE_FAILED: from guard.hostlink.connect.


class SendOutcome(enum.Enum):
    """Result of ``Uplink.send``. Truthy unless NOT_SENT, so ``if not up.send(f)`` still reads well."""

    NOT_SENT = "NOT_SENT"  # nothing left the terminal: the sale can fail cleanly
    SENT = "SENT"  # every byte accepted by the kernel or queued in the outbox
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
        outbox_limit: int = OUTBOX_LIMIT,
    ) -> None:
        self.host = host
        self.port = port
        self.codec = codec
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.send_timeout = connect_timeout if send_timeout is None else send_timeout
        self.outbox_limit = outbox_limit
        self._sock: socket.socket | None = None
        self._decoder: FrameDecoder | None = None
        self._pending: list[PollItem] = []
        self._attempt: ConnectAttempt | None = None
        self._addresses = Addresses(host, port)
        self._outbox = bytearray()
        self._out_total = 0  # bytes ever queued on this connection
        self._out_done = 0  # of them, handed to the kernel (or to OpenSSL, which wrote the record)
        self._out_tried = 0  # end of the furthest write attempted (TLS: may have left part-way)
        self._tls_retry = 0  # length of a TLS write that wants a retry with the same bytes
        self._progress_at = 0.0  # last time the outbox was empty or shrank
        self.last_error = ""
        self.connections = 0

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def connecting(self) -> bool:
        """An attempt is in progress: call ``connect()`` again soon (it does not block)."""
        return self._attempt is not None

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    @property
    def queued(self) -> int:
        """Bytes in the outbox, not yet taken by the kernel."""
        return len(self._outbox)

    @property
    def backlog(self) -> bool:
        """Input is waiting that the descriptor may not signal (items held back by ``poll``'s
        bound, or bytes TLS already decrypted): call ``poll()`` again without waiting."""
        return bool(self._pending) or (self._sock is not None and _tls_pending(self._sock))

    def fileno(self) -> int:
        """The socket's descriptor, or -1 when not connected."""
        return self._sock.fileno() if self._sock is not None else -1

    # ------------------------------------------------------------------ connecting

    def connect(self) -> bool:
        """Start or advance a connection attempt without blocking; True once fully connected.

        False while in progress (``connecting``) or after a failure (``last_error``: one of the
        CONNECT_* codes or TLS_HANDSHAKE_FAILED; the next call starts a new attempt).
        """
        if self._sock is not None:
            return True
        now = time.monotonic()
        a = self._attempt
        if a is None:
            self._pending.clear()
            a = self._attempt = ConnectAttempt(self._addresses, self.ssl_context, self.server_hostname or self.host,
                                               now + self.connect_timeout)
        try:
            sock = a.advance(now)
        except ConnectFailed as e:
            self._attempt = None
            self.last_error = e.code
            return False
        if sock is None:
            return False
        self._attempt = None
        self._sock = sock
        self._decoder = self.codec.decoder("terminal")
        self._reset_outbox()
        self.last_error = ""
        self.connections += 1
        return True

    # ------------------------------------------------------------------ sending

    def send(self, fields: Mapping[str, str]) -> SendOutcome:
        """Encode one message, write what the kernel takes, queue the rest; never blocks.

        Raises ``CodecError`` (nothing sent) on bad fields.
        """
        data = self.codec.encode(fields)
        if self._sock is None:
            return SendOutcome.NOT_SENT
        now = time.monotonic()
        start = self._out_total
        cuts_earlier = bool(self._outbox)  # a failure now also cuts messages already queued
        if not cuts_earlier:
            self._progress_at = now
        self._outbox += data
        self._out_total += len(data)
        failure = self._write(now)
        if failure is None and len(self._outbox) > self.outbox_limit:
            failure = DISC_SEND_FAILED, f"host not reading: {len(self._outbox)} bytes queued"
            cuts_earlier = True  # the host is not reading: whatever is in flight is reversed
        if failure is None:
            return SendOutcome.SENT
        left = (self._out_tried if self.tls else self._out_done) > start
        self._drop(*failure)
        return SendOutcome.MAYBE_SENT if left or cuts_earlier else SendOutcome.NOT_SENT

    def flush(self) -> bool:
        """Write queued bytes the kernel now takes; False if this dropped the connection (the
        host stopped reading for ``send_timeout``, or the socket failed): ``poll()`` reports it."""
        if self._sock is None or not self._outbox:
            return True
        failure = self._write(time.monotonic())
        if failure is None:
            return True
        self._drop(*failure)
        return False

    def _write(self, now: float) -> tuple[str, str] | None:
        """Move outbox bytes to the socket until it would block; the failure, if any."""
        sock = self._sock
        assert sock is not None
        tls = self.tls
        while self._outbox:
            size = (self._tls_retry or min(len(self._outbox), TLS_WRITE_MAX)) if tls else len(self._outbox)
            chunk = bytes(self._outbox[:size])
            self._out_tried = max(self._out_tried, self._out_done + size)
            try:
                n = sock.send(chunk)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._tls_retry = size if tls else 0
                break
            except ssl.SSLError:
                return DISC_TLS, self._lost_detail()
            except OSError:
                return DISC_RESET, self._lost_detail()
            if n <= 0:
                return DISC_SEND_FAILED, self._lost_detail()
            self._tls_retry = 0
            del self._outbox[:n]
            self._out_done += n
            self._progress_at = now
        if self._outbox and now - self._progress_at > self.send_timeout:
            return DISC_SEND_FAILED, f"host took no bytes for {self.send_timeout:g} s; " + self._lost_detail()
        return None

    def _lost_detail(self) -> str:
        return f"write failed with {len(self._outbox)} of {self._out_total} queued bytes unwritten"

    def _reset_outbox(self) -> None:
        self._outbox.clear()
        self._out_total = self._out_done = self._out_tried = self._tls_retry = 0

    # ------------------------------------------------------------------ receiving

    def poll(self) -> list[PollItem]:
        """Everything readable now, without blocking: messages, garbage, then Disconnected if any.

        Flushes the outbox first. Reads at most MAX_READS_PER_POLL chunks, and stops reading once
        MAX_ITEMS_PER_POLL frames are decoded; at most that many are returned (a ``Disconnected``
        ends the list and is never held back), the rest wait in ``backlog``. So a flooding host
        (many tiny frames) costs the loop a bounded amount of work per round instead of starving it.
        """
        self.flush()
        out: list[PollItem] = self._pending
        self._pending = []
        sock, dec = self._sock, self._decoder
        if sock is None or dec is None:
            return out
        reads = 0
        while len(out) < MAX_ITEMS_PER_POLL and (reads < MAX_READS_PER_POLL or _tls_pending(sock)):
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
        if len(out) > MAX_ITEMS_PER_POLL:
            out, self._pending = out[:MAX_ITEMS_PER_POLL], out[MAX_ITEMS_PER_POLL:]
        return out

    def close(self) -> None:
        """Close the connection or abandon the attempt (idempotent). Queued and partial inbound
        bytes are discarded silently."""
        if self._attempt is not None:
            self._attempt.close()
            self._attempt = None
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
        self._reset_outbox()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _tls_pending(sock: socket.socket) -> bool:
    """Decrypted bytes buffered inside OpenSSL do not make the descriptor readable: drain them."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def system_trust_store() -> tuple[str | None, str | None]:
    """(CA file, CA directory) of the system store OpenSSL was compiled with, each None if absent.
    Unlike ``load_default_certs``, never the ``SSL_CERT_FILE``/``SSL_CERT_DIR`` environment variables."""
    paths = ssl.get_default_verify_paths()
    return (paths.openssl_cafile if os.path.isfile(paths.openssl_cafile) else None,
            paths.openssl_capath if os.path.isdir(paths.openssl_capath) else None)


def make_client_context(
    cafile: str | None,
    certfile: str | None,
    keyfile: str | None,
    verify: bool = True,
) -> ssl.SSLContext:
    """TLS >= 1.2 client context; presents ``certfile``/``keyfile`` for mTLS when given.

    Trust store: ``cafile`` alone when given; otherwise the system store OpenSSL was built with
    (``system_trust_store``), loaded explicitly so that ``SSL_CERT_FILE``/``SSL_CERT_DIR`` in the
    environment cannot replace the CAs a (signed) config relies on. ``verify=False`` disables
    server verification (lab use only). Raises ``KeyFileError`` naming the setting (not the
    contents) when a file cannot be loaded or no trust store exists.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        store = (cafile, None) if cafile else system_trust_store()
        if store == (None, None):
            raise KeyFileError("host.tls: no host.cafile and no system CA store: set host.cafile", code="KEY_FILE_INVALID")
        try:
            ctx.load_verify_locations(cafile=store[0], capath=store[1])
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
    "CONNECT_FAILED",
    "CONNECT_REFUSED",
    "CONNECT_TIMEOUT",
    "DNS_FAILED",
    "TLS_HANDSHAKE_FAILED",
    "Disconnected",
    "SendOutcome",
    "Uplink",
    "make_client_context",
]
