"""Non-blocking connection set-up for the host link: address lookup, TCP connect, TLS handshake.

``ConnectAttempt.advance`` never blocks: each call does what the kernel or the peer allows now
and returns the connected socket once TCP (and TLS, when configured) is fully up. It raises
``ConnectFailed`` with one of the CONNECT_* / TLS_HANDSHAKE_FAILED codes, at the latest when
the attempt's deadline passes.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import threading
from typing import Any

CONNECT_REFUSED = "CONNECT_REFUSED"
CONNECT_TIMEOUT = "CONNECT_TIMEOUT"
CONNECT_FAILED = "CONNECT_FAILED"
DNS_FAILED = "DNS_FAILED"  # the host name resolved to no address (no such name, no DNS server)
TLS_HANDSHAKE_FAILED = "TLS_HANDSHAKE_FAILED"

_IN_PROGRESS = frozenset({0, errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR})
AddrInfo = tuple[int, int, int, tuple[Any, ...]]  # family, type, proto, sockaddr


class ConnectFailed(Exception):
    """The attempt is over; ``code`` is the stable reason (``Uplink.last_error``)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _Lookup:
    """One ``getaddrinfo`` on a daemon thread (it cannot be cancelled, only abandoned)."""

    def __init__(self, host: str, port: int) -> None:
        self.result: list[AddrInfo] = []
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(host, port), name="uplink-resolve", daemon=True).start()

    def _run(self, host: str, port: int) -> None:
        try:
            self.result = [(f, t, p, sa) for f, t, p, _, sa in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        except (OSError, UnicodeError):
            pass
        finally:
            self.done.set()


class Addresses:
    """Where ``host:port`` is. A literal IP is used as is (no lookup); a name is looked up afresh
    for each attempt on a daemon thread, so a slow DNS server never blocks the loop and a DNS
    change is honoured. A lookup still running when its attempt timed out serves the next one
    instead of starting another, so at most one lookup thread exists per host link."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.literal = _numeric(host, port)
        self._lookup: _Lookup | None = None

    def get(self) -> list[AddrInfo] | None:
        """The addresses to try, None while the lookup runs; ConnectFailed if it found none."""
        if self.literal:
            return list(self.literal)
        lookup = self._lookup
        if lookup is None:
            lookup = self._lookup = _Lookup(self.host, self.port)
        if not lookup.done.is_set():
            return None
        self._lookup = None
        if not lookup.result:
            raise ConnectFailed(DNS_FAILED)
        return list(lookup.result)


class ConnectAttempt:
    """One attempt: each address in turn (as ``socket.create_connection``), then TLS."""

    def __init__(self, addresses: Addresses, ssl_context: ssl.SSLContext | None, server_hostname: str,
                 deadline: float) -> None:
        self.addresses = addresses
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.deadline = deadline
        self._addrs: list[AddrInfo] | None = None
        self._raw: socket.socket | None = None
        self._tls: ssl.SSLSocket | None = None
        self._tcp_up = False
        self._errors: list[str] = []

    def advance(self, now: float) -> socket.socket | None:
        """Progress without blocking; the connected socket (non-blocking) when done, else None."""
        try:
            sock = self._step()
            if sock is None and now >= self.deadline:
                raise ConnectFailed(TLS_HANDSHAKE_FAILED if self._tcp_up else CONNECT_TIMEOUT)
        except ConnectFailed:
            self.close()
            raise
        if sock is not None:
            self._raw = self._tls = None  # the caller owns it now
        return sock

    def close(self) -> None:
        sock = self._tls if self._tls is not None else self._raw
        self._tls = self._raw = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _step(self) -> socket.socket | None:
        if self._addrs is None:
            self._addrs = self.addresses.get()
            if self._addrs is None:
                return None
        if not self._tcp_up:
            raw = self._tcp_step()
            if raw is None:
                return None
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
            if self.ssl_context is None:
                return raw
            try:
                self._tls = self.ssl_context.wrap_socket(
                    raw, server_hostname=self.server_hostname, do_handshake_on_connect=False)
            except (ssl.SSLError, ssl.CertificateError, OSError, ValueError):
                raise ConnectFailed(TLS_HANDSHAKE_FAILED) from None
            self._raw = None
        if self._tls is None:
            return self._raw
        try:
            self._tls.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ssl.SSLError, ssl.CertificateError, OSError, ValueError):
            raise ConnectFailed(TLS_HANDSHAKE_FAILED) from None
        return self._tls

    def _tcp_step(self) -> socket.socket | None:
        """Advance the TCP connect; the socket once established. Moves on to the next address
        after a failure; ConnectFailed (the last address's reason) when none is left."""
        assert self._addrs is not None
        while True:
            if self._raw is None:
                if not self._addrs:
                    raise ConnectFailed(self._errors[-1] if self._errors else CONNECT_FAILED)
                family, type_, proto, sa = self._addrs.pop(0)
                try:
                    self._raw = socket.socket(family, type_, proto)
                    self._raw.setblocking(False)
                    err = self._raw.connect_ex(sa)
                except OSError as e:
                    err = e.errno or -1
                if err not in _IN_PROGRESS:
                    self._tcp_failed(err)
                    continue
                if err == 0:
                    self._tcp_up = True
                    return self._raw
            raw = self._raw
            assert raw is not None
            if not _writable(raw):
                return None
            err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                self._tcp_up = True
                return raw
            self._tcp_failed(err)

    def _tcp_failed(self, err: int) -> None:
        self.close()
        self._errors.append(
            CONNECT_REFUSED if err == errno.ECONNREFUSED
            else CONNECT_TIMEOUT if err == errno.ETIMEDOUT
            else CONNECT_FAILED)


def _numeric(host: str, port: int) -> list[AddrInfo]:
    """``host`` as a literal IP address (AI_NUMERICHOST: no lookup, never blocks), or [] for a name."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return []
    return [(f, t, p, sa) for f, t, p, _, sa in infos]


def _writable(sock: socket.socket) -> bool:
    """Zero-timeout readiness check (poll(2) where available: no FD_SETSIZE limit)."""
    if hasattr(select, "poll"):
        p = select.poll()
        p.register(sock, select.POLLOUT)
        return bool(p.poll(0))
    return bool(select.select([], [sock], [], 0)[1])
