"""The reader-facing side of the guard daemon: link messages in, engine calls, results out.

`ReaderBridge` joins a `SerialLink` to the guard's reader facade (`GuardFacade`) and shares the
service's loop and clock. A delivered AUTH becomes an engine request (journaled before anything
goes to the host); every engine `Reply` for this reader is sent back as a RESULT; while a sale
waits for the host a PROGRESS keeps the reader's application timer alive. Bad input from the
reader (undecodable TLV, invalid values, reused txn id) is answered with an ERROR carrying the
stable code; nothing the reader sends can stop the daemon.
"""

from __future__ import annotations

import logging

from guard.core.emv import CardDecision
from guard.core.errors import JournalError, PosguardError
from guard.core.model import Result, txn_key
from guard.runtime.service import GuardService

from firmware_bridge import messages as M
from firmware_bridge.constants import ERR_TXN_UNKNOWN
from firmware_bridge.link import Delivered, LinkDown, LinkUp, SendFailed
from firmware_bridge.serial_port import SerialLink

log = logging.getLogger("posguard.reader")

PROGRESS_EVERY_S = 10.0  # well inside the reader's 30 s application timer (reader-link.md)
PROGRESS_WAIT_S = 30


class ReaderBridge:
    """Serves one reader port. Register with the service loop via ``attach``."""

    def __init__(self, svc: GuardService, link: SerialLink, reader_id: str) -> None:
        self.svc = svc
        self.guard = svc.guard
        self.link = link
        self.reader_id = reader_id
        self.clock = svc.clock  # the one clock of the service and its executor
        self._prefix = reader_id + ":"
        self._waiting: dict[str, float] = {}  # key -> next PROGRESS time
        self.stats = {"requests": 0, "errors": 0, "results": 0, "undeliverable": 0}
        self._unsubscribe = self.guard.subscribe(self._prefix, self._send_result)

    def attach(self) -> None:
        """Share the service's select loop: the port's fd wakes us, timers run every step."""
        self.link.start()
        try:
            self.svc.register(self.link.port, self.pump)
        except (ValueError, OSError):
            log.info("reader port has no file descriptor; polled every loop round")
        self.svc.tickers.append(self.pump)
        self.svc.wait_hints.append(lambda: self.link.seconds_until_deadline(cap=0.05))

    def pump(self) -> None:
        for ev in self.link.pump():
            if isinstance(ev, Delivered):
                self._on_payload(ev.payload)
            elif isinstance(ev, LinkUp):
                log.info("reader link up, epoch %d", ev.epoch)
            elif isinstance(ev, LinkDown):
                log.warning("reader link down: %s", ev.reason)
            elif isinstance(ev, SendFailed):
                self.stats["undeliverable"] += 1
                log.warning("a message to the reader was not acknowledged (%s); the reader can ask STATUS", ev.reason)
        now = self.clock()
        for key, due in list(self._waiting.items()):
            r = self.guard.status(key)
            if r is None or not r.in_progress:
                self._waiting.pop(key, None)
            elif now >= due:
                self._waiting[key] = now + PROGRESS_EVERY_S
                self._send(M.Progress(txn_id=bytes.fromhex(key.rpartition(":")[2]), display_text="PROCESSING",
                                      wait_s=PROGRESS_WAIT_S))

    # ------------------------------------------------------------------ requests

    def _on_payload(self, payload: bytes) -> None:
        self.stats["requests"] += 1
        try:
            msg = M.decode_message(payload)
        except PosguardError as e:
            self._error(e, None)
            return
        txn_id = getattr(msg, "txn_id", None)
        try:
            if isinstance(msg, (M.Auth, M.Refund, M.Void)):
                req = M.to_request(msg, self.reader_id)
                log.info("request %s %s", req.kind.value, req.key)
                self._waiting[req.key] = self.clock() + PROGRESS_EVERY_S
                self.guard.submit(req)
            elif isinstance(msg, M.Status):
                if msg.reader_id is not None and msg.reader_id != self.reader_id:
                    raise M.MessageError("READER_ID does not match this port's reader", code="MSG_READER_MISMATCH")
                r = (self.guard.last_for_reader(self.reader_id) if msg.last
                     else self.guard.status(txn_key(self.reader_id, msg.txn_id or b"")))
                if r is None:
                    raise PosguardError("no transaction with this id on this terminal", code=ERR_TXN_UNKNOWN)
                self._send_result(r)
            elif isinstance(msg, M.Ping):
                self._send(M.Pong(txn_id=msg.txn_id))
            elif isinstance(msg, M.Confirm):
                self.guard.confirm(txn_key(self.reader_id, msg.txn_id))
            elif isinstance(msg, M.Cancel):
                self.guard.cancel(txn_key(self.reader_id, msg.txn_id))
            elif isinstance(msg, M.Signed):
                self.guard.signed(txn_key(self.reader_id, msg.txn_id))
            elif isinstance(msg, M.Complete):
                if msg.reader_id is not None and msg.reader_id != self.reader_id:
                    raise M.MessageError("READER_ID does not match this port's reader", code="MSG_READER_MISMATCH")
                self.guard.complete(txn_key(self.reader_id, msg.txn_id), CardDecision(msg.decision), msg.icc or b"")
            else:
                raise M.MessageError(f"{type(msg).__name__} is not a request a reader may send", code="MSG_NOT_A_REQUEST")
        except JournalError:
            raise  # fail-stop: the journal decides what happened, restart recovers from it
        except PosguardError as e:
            self._error(e, txn_id)

    def _error(self, e: PosguardError, txn_id: bytes | None) -> None:
        self.stats["errors"] += 1
        log.warning("reader request refused: %s", e.code)
        self._send(M.error_message(e, txn_id))

    def _send_result(self, r: Result) -> None:
        try:
            msg = M.result_message(r)
        except PosguardError as e:
            log.error("result for %s could not be encoded (%s); sending the state only", r.key, e.code)
            msg = M.result_message(Result(r.key, r.state, stan=r.stan, reason=r.reason, in_progress=r.in_progress))
        if not r.in_progress:
            self._waiting.pop(r.key, None)
        self.stats["results"] += 1
        self._send(msg)

    def _send(self, msg: M.Message) -> None:
        try:
            self.link.send_message(M.encode_message(msg))
        except PosguardError as e:
            log.error("cannot queue a message to the reader: %s", e.code)
