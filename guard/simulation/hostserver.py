"""The host simulator's TCP/TLS adapter: ``HostServer`` runs ``HostCore`` behind a real listening
socket in a background thread (``selectors`` loop + timer heap) and executes its replies."""
from __future__ import annotations

import collections
import heapq
import itertools
import os
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from guard.core.errors import KeyFileError
from guard.hostlink.iso import CodecError, FrameDecoder, HostCodec, HostGarbage, HostMessage, swap_tpdu
from guard.simulation.hostsim import HostCore
from guard.simulation.hosttypes import ACTION_CLOSE_MID_FRAME, ACTION_DROP, ACTION_GARBAGE, Reply


@dataclass(eq=False)
class _Conn:
    id: int
    sock: socket.socket
    decoder: FrameDecoder
    handshaking: bool
    out: bytearray = field(default_factory=bytearray)
    close_after_flush: bool = False
    draining: bool = False
    drain_deadline: float = 0.0
    events: int = selectors.EVENT_READ
    closed: bool = False


class HostServer:
    """Runs ``HostCore`` behind a real listening socket in one background thread.

    Each decoded request is handled on arrival (``time.time()`` as ``now``); replies are written
    on the connection they came from, immediately or from a timer heap when delayed. Garbage
    from a client closes that connection. ``close_mid_frame`` sends half a frame, half-closes
    (FIN) and discards input until the client hangs up or ``linger`` seconds pass.
    """

    def __init__(
        self,
        core: HostCore,
        codec: HostCodec,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        linger: float = 2.0,
    ) -> None:
        self.core = core
        self.codec = codec
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.linger = linger
        self.counters: collections.Counter[str] = collections.Counter()
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._timers: list[tuple[float, int, int, Reply, bytes | None]] = []
        self._timer_seq = itertools.count()

    def start(self) -> int:
        """Bind, listen and start the loop thread; returns the bound port."""
        if self._thread is not None:
            return self.port
        lst = socket.create_server((self.host, self.port), reuse_port=False)
        lst.setblocking(False)
        self.port = lst.getsockname()[1]
        self._listener = lst
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(lst, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"hostsim:{self.port}", daemon=True)
        self._thread.start()
        return self.port

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the loop and close every socket; True if the thread ended within ``timeout``."""
        t = self._thread
        if t is None:
            return True
        self._stop.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        t.join(timeout)
        self._thread = None
        return not t.is_alive()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def write_settlement_csv(self, path: str | os.PathLike[str]) -> None:
        self.core.write_settlement_csv(path)

    def dump_ledger(self, path: str | os.PathLike[str]) -> None:
        self.core.dump_ledger(path)

    # --- loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stop.is_set():
                for key, mask in sel.select(self._next_timeout()):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._service(key.data, mask)
                self._run_timers()
                self._expire_drains()
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            for s in (self._listener, self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
            sel.close()

    def _next_timeout(self) -> float:
        now = time.monotonic()
        t = 0.5
        if self._timers:
            t = min(t, self._timers[0][0] - now)
        for c in self._conns.values():
            if c.draining:
                t = min(t, c.drain_deadline - now)
        return max(t, 0.0)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r is not None and self._wake_r.recv(512):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters["accept_errors"] += 1
                return
            tls = self.ssl_context is not None
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.ssl_context is not None:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:
                self.counters["accept_errors"] += 1
                sock.close()
                continue
            conn = _Conn(next(self._ids), sock, self.codec.decoder("host"), handshaking=tls)
            self._conns[conn.id] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self.counters["connections"] += 1
            if tls:
                self._handshake(conn)

    def _set_events(self, conn: _Conn, events: int) -> None:
        if conn.closed or events == conn.events or self._sel is None:
            return
        conn.events = events
        self._sel.modify(conn.sock, events, conn)

    def _handshake(self, conn: _Conn) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_events(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._set_events(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError):
            self.counters["tls_failures"] += 1
            self._close(conn)
            return
        conn.handshaking = False
        self._set_events(conn, selectors.EVENT_READ)
        self._read(conn)

    def _service(self, conn: _Conn, mask: int) -> None:
        if conn.closed:
            return
        try:
            if conn.handshaking:
                self._handshake(conn)
                return
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and not conn.closed:
                if conn.draining:
                    self._discard(conn)
                else:
                    self._read(conn)
        except Exception:  # noqa: BLE001 - one bad connection must not kill the simulator
            self.counters["internal_errors"] += 1
            self._close(conn)

    def _read(self, conn: _Conn) -> None:
        reads = 0
        while reads < 16 or (isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending() > 0):
            reads += 1
            try:
                chunk = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            except OSError:
                self._close(conn)
                return
            if not chunk:
                self._close(conn)
                return
            items = conn.decoder.feed(chunk)
            for n, item in enumerate(items):
                if conn.closed or conn.close_after_flush:
                    self.counters["requests_lost_at_close"] += len(items) - n
                    return
                if isinstance(item, HostGarbage):
                    self.counters["client_garbage"] += 1
                    self.counters[f"client_garbage.{item.code}"] += 1
                    self._close(conn)
                    return
                self._dispatch(conn, item)
            if conn.closed or conn.close_after_flush:
                return

    def _discard(self, conn: _Conn) -> None:
        try:
            data = socket.socket.recv(conn.sock, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)

    def _dispatch(self, conn: _Conn, msg: HostMessage) -> None:
        replies = self.core.handle(msg.fields, time.time())
        tpdu = swap_tpdu(msg.tpdu) if msg.tpdu is not None else None
        for r in replies:
            if r.delay > 0:
                due = time.monotonic() + r.delay
                heapq.heappush(self._timers, (due, next(self._timer_seq), conn.id, r, tpdu))
            else:
                self._perform(conn, r, tpdu)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, cid, r, tpdu = heapq.heappop(self._timers)
            conn = self._conns.get(cid)
            if conn is None:
                self.counters["delayed_reply_no_connection"] += 1
                continue
            try:
                self._perform(conn, r, tpdu)
            except Exception:  # noqa: BLE001
                self.counters["internal_errors"] += 1
                self._close(conn)

    def _perform(self, conn: _Conn, r: Reply, tpdu: bytes | None) -> None:
        if conn.closed or conn.close_after_flush or conn.draining:
            self.counters["reply_after_close"] += 1
            return
        if r.action == ACTION_DROP:
            self.counters["replies_dropped"] += 1
            return
        try:
            if r.action == ACTION_GARBAGE:
                data = self.codec.frame(r.garbage, tpdu=tpdu)
            else:
                assert r.fields is not None
                data = self.codec.encode(r.fields, tpdu=tpdu)
        except CodecError:
            self.counters["encode_errors"] += 1
            return
        if r.action == ACTION_CLOSE_MID_FRAME:
            data = data[: max(1, len(data) // 2)]
            conn.close_after_flush = True
        conn.out += data
        self.counters["replies_sent"] += 1
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._set_events(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
                return
            except OSError:
                self._close(conn)
                return
            del conn.out[:n]
        self._set_events(conn, selectors.EVENT_READ)
        if conn.close_after_flush and not conn.draining:
            try:
                socket.socket.shutdown(conn.sock, socket.SHUT_WR)
            except OSError:
                self._close(conn)
                return
            conn.draining = True
            conn.drain_deadline = time.monotonic() + self.linger
            self.counters["closed_mid_frame"] += 1

    def _expire_drains(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.draining and c.drain_deadline <= now]:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.id, None)
        if self._sel is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass


def make_server_context(certfile: str, keyfile: str | None = None, client_cafile: str | None = None) -> ssl.SSLContext:
    """TLS >= 1.2 server context; with ``client_cafile`` clients must present a certificate (mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile)
        if client_cafile:
            ctx.load_verify_locations(cafile=client_cafile)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError):
        raise KeyFileError("hostsim TLS certificate/key/CA cannot be loaded", code="KEY_FILE_INVALID") from None
    return ctx

