"""guard.hostlink.uplink: real loopback sockets, TLS and mTLS with throwaway certificates, send outcomes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from guard.core.errors import KeyFileError
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer, make_server_context
from guard.hostlink.iso import HOST_BAD_LENGTH, HOST_FRAME_TRUNCATED, HostCodec, HostGarbage, HostMessage, echo_mismatches
from guard.hostlink.uplink import (
    CONNECT_REFUSED,
    DISC_EOF,
    DISC_FRAMING,
    TLS_HANDSHAKE_FAILED,
    Disconnected,
    SendOutcome,
    Uplink,
    make_client_context,
)

PAN = "4111111111111111"
LOCAL = "127.0.0.1"


def sale(stan: str = "000001") -> dict[str, str]:
    return {
        "t": "0200", "2": PAN, "3": "000000", "4": "000000001000", "7": "1122153000", "11": stan,
        "41": "TERM0001", "42": "MERCHANT0000001", "49": "978",
    }


def collect(up: Uplink, done: Callable[[list], bool], timeout: float = 3.0) -> list:
    """Poll until ``done(items)`` or the deadline; never loops unbounded."""
    items: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items += up.poll()
        if done(items):
            break
        time.sleep(0.005)
    return items


def has_message(items: list) -> bool:
    return any(isinstance(i, HostMessage) for i in items)


def has_disconnect(items: list) -> bool:
    return any(isinstance(i, Disconnected) for i in items)


# --- certificates ------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
    *, ca: bool, eku: list | None = None, san: list | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    data = cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    path.write_bytes(data)


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
def host() -> Iterator[tuple[HostServer, int]]:
    server = HostServer(HostCore(seed=7, dup_detection=True), HostCodec())
    port = server.start()
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
    assert up.connect() and up.connected
    up.close()
    assert up.send(sale()) is SendOutcome.NOT_SENT
    time.sleep(0.1)
    assert server.core.stats().get("requests", 0) == 0


def test_connect_refused() -> None:
    s = socket.create_server((LOCAL, 0))
    port = s.getsockname()[1]
    s.close()
    up = Uplink(LOCAL, port, HostCodec(), connect_timeout=1.0)
    assert not up.connect() and up.last_error == CONNECT_REFUSED and not up.connected


def test_round_trip_and_host_close(host: tuple[HostServer, int]) -> None:
    server, port = host
    up = Uplink(LOCAL, port, HostCodec())
    assert up.connect() and up.fileno() >= 0
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
    assert up.connect()
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
    assert up.connect() and up.send(sale())
    items = collect(up, has_disconnect)
    raw.join()
    assert isinstance(items[0], HostGarbage) and items[0].code == HOST_FRAME_TRUNCATED
    assert isinstance(items[-1], Disconnected)
    assert raw.received == codec.encode(sale())


def test_reconnect_gets_fresh_decoder(host: tuple[HostServer, int]) -> None:
    _, port = host
    up = Uplink(LOCAL, port, HostCodec())
    assert up.connect()
    up._decoder.feed(b"\x00")  # noqa: SLF001 - simulate a half-read header before a drop
    up.close()
    assert up.connect() and up.connections == 2
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


def test_send_times_out_when_buffer_stays_full() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        try:
            while True:
                a.send(b"x" * 65536)
        except BlockingIOError:
            pass
        up = Uplink(LOCAL, 1, HostCodec(), send_timeout=0.2)
        _inject(up, a)  # type: ignore[arg-type]
        t0 = time.monotonic()
        assert up.send(sale()) is SendOutcome.NOT_SENT
        assert time.monotonic() - t0 < 2.0 and not up.connected


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
        assert up.connect(), up.last_error
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
    assert up.connect(), up.last_error
    for i in (1, 2):
        assert up.send(sale(stan=f"{i:06d}")) is SendOutcome.SENT
    items = collect(up, lambda xs: sum(isinstance(x, HostMessage) for x in xs) >= 2)
    assert [m.fields["11"] for m in items if isinstance(m, HostMessage)] == ["000001", "000002"]
    assert server.core.net_debits("TERM0001", "MERCHANT0000001", 2, "1122") == 1
    up.close()


def test_mtls_rejects_client_without_certificate(tls_host: tuple[HostServer, int], pki: dict[str, str]) -> None:
    server, port = tls_host
    up = Uplink(LOCAL, port, HostCodec(), ssl_context=make_client_context(pki["ca"], None, None))
    if up.connect():  # TLS 1.3: the client learns of the rejection only after its handshake ends
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
    assert not up.connect() and up.last_error == TLS_HANDSHAKE_FAILED


def test_tls_close_mid_frame(tls_host: tuple[HostServer, int], pki: dict[str, str]) -> None:
    server, port = tls_host
    up = Uplink(LOCAL, port, HostCodec(), ssl_context=make_client_context(pki["ca"], pki["client"], None))
    assert up.connect()
    server.core.force("close_mid_frame")
    assert up.send(sale())
    items = collect(up, has_disconnect)
    assert isinstance(items[0], HostGarbage) and items[0].code == HOST_FRAME_TRUNCATED
    assert isinstance(items[-1], Disconnected) and not up.connected


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
