"""``fleet serve``: an HTTPS upload endpoint with per-terminal mutual TLS (aiohttp).

Each terminal holds a client certificate whose subject common name is its terminal id, issued by
the fleet's CA; the server requires it (TLS 1.2+, CERT_REQUIRED). Endpoints:

  PUT /v1/journal   body: the journal file or archive (SQLite bytes). Spooled to a temporary file,
                    then ``guard.fleet.ingest.ingest_file`` (the same witness, the same one
                    transaction per file, so the same idempotency: a retried or repeated upload is
                    "unchanged"). The file's terminal must be the certificate's (else 403,
                    FLEET_CERT_MISMATCH). 200 added/unchanged, 409 rejected by the witness, 400 not
                    a journal. The JSON body is the ``IngestResult``.
  GET /v1/receipt   the fleet's countersigned receipt of the caller's newest accepted checkpoint.

aiohttp because the terminal's identity is its client certificate: aiohttp hands the application
the verified peer certificate (``transport.get_extra_info("peercert")``), while uvicorn and
hypercorn do not yet pass it to ASGI applications (the ASGI TLS extension is unimplemented there).
Killing the server loses nothing committed: an upload in flight is rolled back and the terminal
retries it.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from guard.core.errors import PosguardError
from guard.fleet.ingest import ingest_file
from guard.fleet.report import load_fleet_key, receipt
from guard.fleet.schema import connect

MAX_UPLOAD = 1 << 30  # a terminal's journal between compactions stays far below this


def tls_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _terminal_of(request: web.Request) -> str:
    cert = request.transport.get_extra_info("peercert") if request.transport is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v)
    raise web.HTTPForbidden(text="a client certificate naming the terminal is required")


def make_app(dsn: str, spool: Path, receipt_key: Path | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_UPLOAD)
    key = load_fleet_key(receipt_key) if receipt_key is not None else None

    def _ingest(path: Path, terminal: str) -> Any:
        with connect(dsn) as conn:
            return ingest_file(conn, path, expect_terminal=terminal)

    async def put_journal(request: web.Request) -> web.Response:
        terminal = _terminal_of(request)
        fd, name = tempfile.mkstemp(dir=spool, prefix=f"{terminal}.", suffix=".db")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.content.iter_chunked(1 << 20):
                    f.write(chunk)
            res = await asyncio.get_running_loop().run_in_executor(None, _ingest, path, terminal)
        finally:
            path.unlink(missing_ok=True)
        status = 200 if res.status != "rejected" else {"FLEET_FILE_INVALID": 400,
                                                       "FLEET_CERT_MISMATCH": 403}.get(res.code, 409)
        body = dict(vars(res))
        body["file"] = f"upload from {terminal}"
        return web.json_response(body, status=status)

    async def get_receipt(request: web.Request) -> web.Response:
        terminal = _terminal_of(request)
        if key is None:
            raise web.HTTPNotFound(text="this server has no receipt key (fleet serve --receipt-key)")
        try:
            rec = await asyncio.get_running_loop().run_in_executor(
                None, lambda: receipt(dsn, terminal, key, now=time.time()))
        except PosguardError as e:
            return web.json_response({"code": e.code, "reason": str(e)}, status=404)
        return web.json_response(rec)

    app.router.add_put("/v1/journal", put_journal)
    app.router.add_get("/v1/receipt", get_receipt)
    return app


def serve(dsn: str, *, host: str, port: int, cert: Path, key: Path, ca: Path, spool: Path,
          receipt_key: Path | None = None) -> None:
    """Run until killed (SIGTERM/SIGINT stop it cleanly)."""
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    web.run_app(make_app(dsn, spool, receipt_key), host=host, port=port, ssl_context=tls_context(cert, key, ca),
                print=None, access_log=None)
