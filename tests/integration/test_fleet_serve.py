"""`posguard fleet serve` on 127.0.0.1 with a test CA: per-terminal mTLS, the witness behind it,
idempotent uploads, and a server SIGKILLed in the middle of an upload loses and duplicates nothing."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.fleet_sim import SimTerminal, clone, edit, run_terminal
from tests.support.pki import make_cert, write_pem

psycopg = pytest.importorskip("psycopg")
pytest.importorskip("aiohttp")

from guard.fleet.ingest import enroll  # noqa: E402
from guard.fleet.report import generate_fleet_key, receipt_ok  # noqa: E402
from guard.fleet.schema import init  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _pki(d: Path, terminals: list[str]) -> dict[str, Path]:
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = make_cert("fleet test CA", ca_key, "fleet test CA", ca_key, ca=True)
    write_pem(d / "ca.pem", ca)
    sk = ec.generate_private_key(ec.SECP256R1())
    write_pem(d / "server.pem", make_cert("fleet", sk, "fleet test CA", ca_key, ca=False,
                                          eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                                          san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    (d / "server.key").write_bytes(sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    out = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    for t in terminals:
        k = ec.generate_private_key(ec.SECP256R1())
        write_pem(d / f"{t}.pem", make_cert(t, k, "fleet test CA", ca_key, ca=False,
                                            eku=[ExtendedKeyUsageOID.CLIENT_AUTH]), k)
        out[t] = d / f"{t}.pem"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, dsn: str, pki: dict[str, Path], spool: Path, receipt_key: Path) -> None:
        self.port = _free_port()
        self.cmd = [sys.executable, "-m", "posguard.cli", "fleet", "serve", "--dsn", dsn, "--port", str(self.port),
                    "--cert", str(pki["cert"]), "--key", str(pki["key"]), "--ca", str(pki["ca"]),
                    "--spool", str(spool), "--receipt-key", str(receipt_key)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(300):  # bounded: 30 s
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else b""
                time.sleep(0.1)
        raise AssertionError("fleet serve did not start listening")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def _ctx(pki: dict[str, Path], who: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if who is not None:
        ctx.load_cert_chain(str(pki[who]))
    return ctx


def _put(port: int, ctx: ssl.SSLContext, body: bytes) -> tuple[int, dict[str, Any]]:
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
    try:
        c.request("PUT", "/v1/journal", body=body, headers={"Content-Type": "application/octet-stream"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


@pytest.fixture(scope="module")
def terminals(tmp_path_factory: pytest.TempPathFactory) -> list[SimTerminal]:
    root = tmp_path_factory.mktemp("serve")
    return [run_terminal(20_000 + s, root, sales=40) for s in range(3)]


@pytest.fixture
def server(terminals: list[SimTerminal], pg_server: Any, tmp_path: Path) -> Iterator[tuple[Server, dict[str, Path], str]]:
    dsn = pg_server.fresh_dsn(f"fleet_serve_{tmp_path.name[-20:].lower().replace('-', '_')}")
    init(dsn, hash_parts=2)
    for t in terminals:
        enroll(dsn, t.tid, t.keys)
    pki = _pki(tmp_path / "pki", [t.tid for t in terminals])
    key = tmp_path / "fleet.key"
    generate_fleet_key(key)
    srv = Server(dsn, pki, tmp_path / "spool", key)
    srv.start()
    try:
        yield srv, pki, dsn
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.proc.terminate()
            srv.proc.wait(timeout=30)


def _bytes(path: Path, tmp: Path) -> bytes:
    return clone(path, tmp).read_bytes()


def test_uploads_over_mtls_go_through_the_witness(terminals: list[SimTerminal], server: Any, tmp_path: Path) -> None:
    srv, pki, dsn = server
    a, b = terminals[0], terminals[1]
    body = _bytes(a.journal, tmp_path / "a.db")
    status, res = _put(srv.port, _ctx(pki, a.tid), body)
    assert (status, res["status"], res["terminal"]) == (200, "added", a.tid), res
    status, res = _put(srv.port, _ctx(pki, a.tid), body)
    assert (status, res["status"]) == (200, "unchanged")
    # another terminal's certificate cannot upload a's journal
    status, res = _put(srv.port, _ctx(pki, b.tid), body)
    assert (status, res["code"]) == (403, "FLEET_CERT_MISMATCH")
    # no client certificate: the handshake fails
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _put(srv.port, _ctx(pki, None), body)
    # a tampered upload is rejected with the seq and reason
    bad = clone(b.journal, tmp_path / "bad.db")
    edit(bad, ("UPDATE entries SET mac = zeroblob(32) WHERE seq = 5", ()))
    status, res = _put(srv.port, _ctx(pki, b.tid), bad.read_bytes())
    assert (status, res["code"], res["seq"]) == (409, "FLEET_ENTRY_INVALID", 5) and "MAC_INVALID" in res["reason"]
    # the receipt of the newest accepted checkpoint, countersigned by the fleet
    c = http.client.HTTPSConnection("127.0.0.1", srv.port, context=_ctx(pki, a.tid), timeout=30)
    c.request("GET", "/v1/receipt")
    rec = json.loads(c.getresponse().read())
    c.close()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    assert rec["terminal"] == a.tid and receipt_ok(rec, Ed25519PublicKey.from_public_bytes(bytes.fromhex(rec["fleet_pub"])))


def test_killing_serve_mid_upload_loses_and_duplicates_nothing(terminals: list[SimTerminal], server: Any,
                                                                 tmp_path: Path) -> None:
    srv, pki, dsn = server
    a, b = terminals[0], terminals[2]
    body_a, body_b = _bytes(a.journal, tmp_path / "a.db"), _bytes(b.journal, tmp_path / "b.db")
    assert _put(srv.port, _ctx(pki, a.tid), body_a)[1]["status"] == "added"
    # half of b's upload is on the wire when the server dies
    raw = _ctx(pki, b.tid).wrap_socket(socket.create_connection(("127.0.0.1", srv.port)), server_hostname="127.0.0.1")
    raw.sendall(f"PUT /v1/journal HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body_b)}\r\n\r\n".encode()
                + body_b[: len(body_b) // 2])
    srv.kill()
    raw.close()
    srv.start()
    for _ in range(2):  # the terminals retry everything: nothing is lost, nothing doubles
        assert _put(srv.port, _ctx(pki, a.tid), body_a)[1]["status"] == "unchanged"
    st, res = _put(srv.port, _ctx(pki, b.tid), body_b)
    assert (st, res["status"]) == (200, "added")
    assert _put(srv.port, _ctx(pki, b.tid), body_b)[1]["status"] == "unchanged"
    with psycopg.connect(dsn) as c:
        n = dict(c.execute("SELECT terminal, count(*) FROM entries GROUP BY terminal").fetchall())
        dup = c.execute("SELECT count(*) FROM (SELECT terminal, seq FROM entries GROUP BY 1, 2 HAVING count(*) > 1) d"
                        ).fetchone()[0]
    assert dup == 0 and n == {a.tid: _count(a.journal), b.tid: _count(b.journal)}


def _count(path: Path) -> int:
    import sqlite3

    c = sqlite3.connect(path)
    try:
        return int(c.execute("SELECT count(*) FROM entries").fetchone()[0])
    finally:
        c.close()
