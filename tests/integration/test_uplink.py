"""guard.hostlink.uplink: real loopback sockets, TLS and mTLS with throwaway certificates, send outcomes."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from guard.core.errors import KeyFileError
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer, make_server_context
from guard.hostlink.iso import HOST_BAD_LENGTH, HOST_FRAME_TRUNCATED, HostCodec, HostGarbage, HostMessage, echo_mismatches
from guard.hostlink.uplink import (
    CONNECT_REFUSED,
    DISC_EOF,
    DISC_FRAMING,
    TLS_HANDSHAKE_FAILED,
    TLS_WRITE_MAX,
    Disconnected,
    SendOutcome,
    Uplink,
    make_client_context,
)
from tests.support import collect, connected
from tests.support.pki import make_cert as _cert, write_pem as _write

PAN = "4111111111111111"
LOCAL = "127.0.0.1"


def sale(stan: str = "000001") -> dict[str, str]:
    return {
        "t": "0200", "2": PAN, "3": "000000", "4": "000000001000", "7": "1122153000", "11": stan,
        "41": "TERM0001", "42": "MERCHANT0000001", "49": "978",
    }


def has_message(items: list) -> bool:
    return any(isinstance(i, HostMessage) for i in items)


def has_disconnect(items: list) -> bool:
    return any(isinstance(i, Disconnected) for i in items)


# --- certificates ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("posguard test CA", ca_key, "posguard test CA", ca_key, ca=True)
    other = _cert("some other CA", other_key, "some other CA", other_key, ca=True)
    srv_key, cli_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    srv = _cert("hostsim", srv_key, "posguard test CA", ca_key, ca=False, eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                san=[x509.IPAddress(ipaddress.ip_address(LOCAL)), x509.DNSName("localhost")])
    cli = _cert("TERM0001", cli_key, "posguard test CA", ca_key, ca=False, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    paths = {k: str(d / f"{k}.pem") for k in ("ca", "other_ca", "server", "client")}
    _write(Path(paths["ca"]), ca)
    _write(Path(paths["other_ca"]), other)
    _write(Path(paths["server"]), srv, srv_key)
    _write(Path(paths["client"]), cli, cli_key)
    return paths


# --- servers --------------------------------------------------------------------------------------


@pytest.fixture()
def host(host_server: Callable[..., tuple[HostServer, int]]) -> Iterator[tuple[HostServer, int]]:
    server, port = host_server(HostCore(seed=7, dup_detection=True))
    yield server, port
    assert server.stop()


class RawServer:
    """Accepts one connection, sends ``payload`` after the first bytes arrive, optionally closes."""

    def __init__(self, payload: bytes, close: bool) -> None:
        self.lst = socket.create_server((LOCAL, 0))
        self.lst.settimeout(3.0)
        self.port = self.lst.getsockname()[1]
        self.payload, self.close = payload, close
        self.received = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.lst.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(3.0)
            try:
                self.received = conn.recv(65536)
                conn.sendall(self.payload)
                if not self.close:
                    conn.recv(1)
            except OSError:
                pass

    def join(self) -> None:
        self.thread.join(5.0)
        self.lst.close()


# --- plain TCP --------------------------------------------------------------------------------------


def test_send_not_sent_when_not_connected(host: tuple[HostServer, int]) -> None:
    server, port = host
    up = Uplink(LOCAL, port, HostCodec())
    assert up.send(sale()) is SendOutcome.NOT_SENT and not up.send(sale())
    assert up.fileno() == -1 and up.poll() == []
    assert connected(up) and up.connected
    up.close()
    assert up.send(sale()) is SendOutcome.NOT_SENT
    time.sleep(0.1)
    assert server.core.stats().get("requests", 0) == 0


def test_connect_refused() -> None:
    s = socket.create_server((LOCAL, 0))
    port = s.getsockname()[1]
    s.close()
    up = Uplink(LOCAL, port, HostCodec(), connect_timeout=1.0)
    assert not connected(up) and up.last_error == CONNECT_REFUSED and not up.connected


def test_round_trip_and_host_close(host: tuple[HostServer, int]) -> None:
    server, port = host
    up = Uplink(LOCAL, port, HostCodec())
    assert connected(up) and up.fileno() >= 0
    assert up.connect()
    req = sale()
    assert up.send(req) is SendOutcome.SENT
    items = collect(up, has_message)
    msg = next(i for i in items if isinstance(i, HostMessage))
    assert msg.fields["t"] == "0210" and msg.fields["39"] == "00" and echo_mismatches(req, msg.fields) == []
    server.stop()
    items = collect(up, has_disconnect)
    assert items and isinstance(items[-1], Disconnected) and items[-1].reason == DISC_EOF
    assert not up.connected and up.fileno() == -1
    assert up.poll() == []


def test_bad_length_from_host_closes_connection() -> None:
    raw = RawServer(struct.pack(">H", 0) + b"rest of the stream", close=False)
    up = Uplink(LOCAL, raw.port, HostCodec())
    assert connected(up)
    assert up.send(sale()) is SendOutcome.SENT
    items = collect(up, has_disconnect)
    raw.join()
    assert [type(i) for i in items] == [HostGarbage, Disconnected]
    assert items[0].code == HOST_BAD_LENGTH and items[1].reason == DISC_FRAMING
    assert not up.connected


def test_truncated_frame_at_close() -> None:
    codec = HostCodec(header="ascii4")
    raw = RawServer(b"0099" + b"0210", close=True)
    up = Uplink(LOCAL, raw.port, codec)
    assert connected(up) and up.send(sale())
    items = collect(up, has_disconnect)
    raw.join()
    assert isinstance(items[0], HostGarbage) and items[0].code == HOST_FRAME_TRUNCATED
    assert isinstance(items[-1], Disconnected)
    assert raw.received == codec.encode(sale())


def test_reconnect_gets_fresh_decoder(host: tuple[HostServer, int]) -> None:
    _, port = host
    up = Uplink(LOCAL, port, HostCodec())
    assert connected(up)
    up._decoder.feed(b"\x00")  # noqa: SLF001 - simulate a half-read header before a drop
    up.close()
    assert connected(up) and up.connections == 2
    assert up.send(sale()) is SendOutcome.SENT
    assert has_message(collect(up, has_message))
    up.close()


# --- send outcomes with an injected socket ----------------------------------------------------------


class FakeSock:
    """Accepts ``accept`` bytes, then raises ``error`` on the next write."""

    def __init__(self, accept: int, error: type[OSError] = BrokenPipeError) -> None:
        self.accept, self.error = accept, error
        self.written = b""
        self.closed = False

    def send(self, data: memoryview) -> int:
        if self.accept <= 0:
            raise self.error()
        n = min(self.accept, len(data))
        self.accept -= n
        self.written += bytes(data[:n])
        return n

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        self.closed = True


def _inject(up: Uplink, sock: FakeSock) -> None:
    up._sock = sock  # type: ignore[assignment]  # noqa: SLF001
    up._decoder = up.codec.decoder("terminal")  # noqa: SLF001


@pytest.mark.parametrize(
    ("accept", "tls", "expected"),
    [
        (0, False, SendOutcome.NOT_SENT),
        (7, False, SendOutcome.MAYBE_SENT),
        (0, True, SendOutcome.MAYBE_SENT),
        (10_000, False, SendOutcome.SENT),
    ],
    ids=["nothing-written", "partial", "tls-nothing-reported", "complete"],
)
def test_send_outcome(accept: int, tls: bool, expected: SendOutcome) -> None:
    ctx = ssl.create_default_context() if tls else None
    up = Uplink(LOCAL, 1, HostCodec(), ssl_context=ctx)
    fake = FakeSock(accept)
    _inject(up, fake)
    assert up.send(sale()) is expected
    if expected is SendOutcome.SENT:
        assert up.connected and fake.written == HostCodec().encode(sale())
        return
    assert not up.connected and fake.closed
    items = up.poll()
    assert isinstance(items[-1], Disconnected)


def _timed_connect(up: Uplink) -> tuple[bool, float]:
    t0 = time.monotonic()
    ok = up.connect()
    return ok, time.monotonic() - t0


# --- TLS ------------------------------------------------------------------------------------------------


@pytest.fixture()
def tls_host(pki: dict[str, str]) -> Iterator[tuple[HostServer, int]]:
    ctx = make_server_context(pki["server"], None, client_cafile=pki["ca"])
    server = HostServer(HostCore(seed=3, dup_detection=True), HostCodec(), ssl_context=ctx)
    port = server.start()
    yield server, port
    assert server.stop()


def test_tls_server_auth_round_trip(pki: dict[str, str]) -> None:
    server = HostServer(HostCore(seed=3, dup_detection=True), HostCodec(),
                        ssl_context=make_server_context(pki["server"]))
    port = server.start()
    try:
        up = Uplink(LOCAL, port, HostCodec(), ssl_context=make_client_context(pki["ca"], None, None))
        assert connected(up), up.last_error
        assert up.send(sale()) is SendOutcome.SENT
        assert has_message(collect(up, has_message))
        up.close()
    finally:
        assert server.stop()


def test_mtls_round_trip(tls_host: tuple[HostServer, int], pki: dict[str, str]) -> None:
    server, port = tls_host
    ctx = make_client_context(pki["ca"], pki["client"], None)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    up = Uplink(LOCAL, port, HostCodec(), ssl_context=ctx, server_hostname="localhost")
    assert connected(up), up.last_error
    for i in (1, 2):
        assert up.send(sale(stan=f"{i:06d}")) is SendOutcome.SENT
    items = collect(up, lambda xs: sum(isinstance(x, HostMessage) for x in xs) >= 2)
    assert [m.fields["11"] for m in items if isinstance(m, HostMessage)] == ["000001", "000002"]
    assert server.core.net_debits("TERM0001", "MERCHANT0000001", 2, "1122") == 1
    up.close()


def test_mtls_rejects_client_without_certificate(tls_host: tuple[HostServer, int], pki: dict[str, str]) -> None:
    server, port = tls_host
    up = Uplink(LOCAL, port, HostCodec(), ssl_context=make_client_context(pki["ca"], None, None))
    if connected(up):  # TLS 1.3: the client learns of the rejection only after its handshake ends
        up.send(sale())
        items = collect(up, has_disconnect)
        assert not has_message(items) and has_disconnect(items)
    else:
        assert up.last_error == TLS_HANDSHAKE_FAILED
    time.sleep(0.1)
    assert server.core.stats().get("requests", 0) == 0
    assert server.counters["tls_failures"] >= 1


def test_tls_rejects_untrusted_server(tls_host: tuple[HostServer, int], pki: dict[str, str]) -> None:
    _, port = tls_host
    up = Uplink(LOCAL, port, HostCodec(), ssl_context=make_client_context(pki["other_ca"], pki["client"], None))
    assert not connected(up) and up.last_error == TLS_HANDSHAKE_FAILED


def test_tls_close_mid_frame(tls_host: tuple[HostServer, int], pki: dict[str, str]) -> None:
    server, port = tls_host
    up = Uplink(LOCAL, port, HostCodec(), ssl_context=make_client_context(pki["ca"], pki["client"], None))
    assert connected(up)
    server.core.force("close_mid_frame")
    assert up.send(sale())
    items = collect(up, has_disconnect)
    assert isinstance(items[0], HostGarbage) and items[0].code == HOST_FRAME_TRUNCATED
    assert isinstance(items[-1], Disconnected) and not up.connected


def test_tls_handshake_advances_over_calls_without_blocking(tls_host: tuple[HostServer, int],
                                                            pki: dict[str, str]) -> None:
    _, port = tls_host
    up = Uplink(LOCAL, port, HostCodec(), ssl_context=make_client_context(pki["ca"], pki["client"], None),
                connect_timeout=5.0)
    ok, worst = _timed_connect(up)
    deadline = time.monotonic() + 5.0
    while not ok and time.monotonic() < deadline:
        assert up.connecting and not up.connected and up.fileno() == -1
        time.sleep(0.002)
        ok, took = _timed_connect(up)
        worst = max(worst, took)
    assert ok and up.connected and not up.connecting and worst < 0.2
    assert up.send(sale()) is SendOutcome.SENT and has_message(collect(up, has_message))
    up.close()


class SilentServer:
    """Accepts TCP connections and never answers: a TLS handshake against it hangs."""

    def __init__(self) -> None:
        self.lst = socket.create_server((LOCAL, 0))
        self.lst.settimeout(0.05)
        self.port = self.lst.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.conns.append(self.lst.accept()[0])
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5.0)
        for c in self.conns:
            c.close()
        self.lst.close()


def test_tls_handshake_that_hangs_fails_after_connect_timeout(pki: dict[str, str]) -> None:
    silent = SilentServer()
    try:
        up = Uplink(LOCAL, silent.port, HostCodec(), ssl_context=make_client_context(pki["ca"], None, None),
                    connect_timeout=0.5)
        t0 = time.monotonic()
        worst, calls = 0.0, 0
        while time.monotonic() - t0 < 3.0:
            ok, took = _timed_connect(up)
            worst, calls = max(worst, took), calls + 1
            if not up.connecting:
                break
            time.sleep(0.01)
        assert not ok and not up.connected and up.last_error == TLS_HANDSHAKE_FAILED
        assert 0.5 <= time.monotonic() - t0 < 2.0 and calls > 5 and worst < 0.1
        assert len(silent.conns) == 1, "TCP was up; the handshake is what hung"
    finally:
        silent.close()


def test_tls_outbox_survives_want_write_retries(pki: dict[str, str]) -> None:
    """Small socket buffers and a host that reads late: OpenSSL reports "want write" and the
    outbox retries the same record slice; the host then decrypts every message, in order, once."""
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lst.bind((LOCAL, 0))
    lst.listen(1)
    go, received = threading.Event(), bytearray()
    expected: list[int] = []
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            _serve()
        except BaseException as e:
            errors.append(e)

    def _serve() -> None:
        lst.settimeout(5.0)
        conn, _ = lst.accept()
        with make_server_context(pki["server"]).wrap_socket(conn, server_side=True) as tls:
            go.wait(10.0)
            tls.settimeout(0.2)
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and (not expected or len(received) < expected[0]):
                try:
                    chunk = tls.recv(65536)
                except (TimeoutError, socket.timeout):
                    continue
                if not chunk:
                    break
                received.extend(chunk)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    codec = HostCodec()
    up = Uplink(LOCAL, lst.getsockname()[1], codec, ssl_context=make_client_context(pki["ca"], None, None),
                send_timeout=30.0, outbox_limit=1 << 24)
    try:
        assert connected(up), up.last_error
        up._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]  # noqa: SLF001
        sent = b""
        for i in range(1, 20_000):
            msg = sale(stan=f"{i % 1_000_000:06d}")
            assert up.send(msg) is SendOutcome.SENT
            sent += codec.encode(msg)
            if up.queued > 2 * TLS_WRITE_MAX:
                break
        assert up.queued > 0 and up._tls_retry > 0  # noqa: SLF001 - a write is waiting for its retry
        for i in range(3):  # appended behind a pending retry
            msg = sale(stan=f"99999{i}")
            assert up.send(msg) is SendOutcome.SENT
            sent += codec.encode(msg)
        expected.append(len(sent))
        go.set()
        deadline = time.monotonic() + 10.0
        while up.queued and time.monotonic() < deadline:
            assert up.flush(), (errors, len(received), len(sent))
            time.sleep(0.002)
        assert up.queued == 0 and up.connected
        server.join(10.0)
        assert not errors and bytes(received) == sent
    finally:
        up.close()
        go.set()
        server.join(5.0)
        lst.close()


def test_context_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as ei:
        make_client_context(str(tmp_path / "missing.pem"), None, None)
    assert ei.value.code == "KEY_FILE_INVALID"
    with pytest.raises(KeyFileError):
        make_client_context(None, str(tmp_path / "missing.pem"), None, verify=False)
    with pytest.raises(KeyFileError):
        make_server_context(str(tmp_path / "missing.pem"))
    ctx = make_client_context(None, None, None, verify=False)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
