"""The reader-facing side of the guard daemon: link messages in, engine calls, results out.

`ReaderBridge` joins a `SerialLink` to the guard's reader facade (`GuardFacade`) and shares the
service's loop and clock. A delivered AUTH becomes an engine request (journaled before anything
goes to the host); every engine `Reply` for this reader is sent back as a RESULT; while a sale
waits for the host a PROGRESS keeps the reader's application timer alive. Bad input from the
reader (undecodable TLV, invalid values, reused txn id) is answered with an ERROR carrying the
stable code and, when it can be read, the request's TXN_ID; nothing the reader sends can stop the
daemon. A RESULT the link could not deliver (SendFailed at a resync) is pushed again, in its
then current state, once the link is up again (PROTOCOL.md 7.8).
"""

from __future__ import annotations

import logging

from guard.core.emv import CardDecision
from guard.core.errors import JournalError, PosguardError
from guard.core.model import Result, txn_key
from guard.runtime.service import GuardService

from firmware_bridge import messages as M
from firmware_bridge.constants import ERR_TXN_UNKNOWN, PROGRESS_INTERVAL_S, PROGRESS_WAIT_S, MsgType, Tag
from firmware_bridge.link import Delivered, LinkDown, LinkUp, SendFailed
from firmware_bridge.serial_port import SerialLink

log = logging.getLogger("posguard.reader")

_GUARD_TYPES = frozenset(int(t) for t in MsgType if t >= 0x80)  # guard -> reader: never a request


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
        self._repush: dict[str, None] = {}  # keys whose RESULT died with a link epoch, in order
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
                self._push_again()
            elif isinstance(ev, LinkDown):
                log.warning("reader link down: %s", ev.reason)
            elif isinstance(ev, SendFailed):
                self.stats["undeliverable"] += 1
                self._note_failed(ev.payload)
                log.warning("a message to the reader was not acknowledged (%s); a RESULT is pushed again after "
                            "the resync", ev.reason)
        now = self.clock()
        for key, due in list(self._waiting.items()):
            r = self.guard.status(key)
            if r is None or not r.in_progress:
                self._waiting.pop(key, None)
            elif now >= due:
                self._waiting[key] = now + PROGRESS_INTERVAL_S
                self._send(M.Progress(txn_id=bytes.fromhex(key.rpartition(":")[2]), display_text="PROCESSING",
                                      wait_s=PROGRESS_WAIT_S))

    def _note_failed(self, payload: bytes) -> None:
        """Remember the transaction of a RESULT the link gave up on. PROGRESS, PONG and ERROR are
        not sent again: the reader's application timer and re-sent request cover them."""
        try:
            msg = M.decode_message(payload)
        except PosguardError:
            return
        if isinstance(msg, M.ResultMessage):
            self._repush[f"{self._prefix}{msg.txn_id.hex()}"] = None

    def _push_again(self) -> None:
        """After a resync: each RESULT that died with the old epoch again, in its current state."""
        keys, self._repush = list(self._repush), {}
        for key in keys:
            r = self.guard.status(key)
            if r is not None:
                self._send_result(r)

    # ------------------------------------------------------------------ requests

    def _on_payload(self, payload: bytes) -> None:
        """One reader message, checked in the order of PROTOCOL.md 5.4 ("Order of checks"); the
        first failing check is the ERROR sent."""
        self.stats["requests"] += 1
        try:
            if payload and payload[0] in _GUARD_TYPES:
                raise M.MessageError(f"message type 0x{payload[0]:02x} is sent by the guard, not to it",
                                     code="MSG_NOT_A_REQUEST")
            msg = M.decode_message(payload)
        except PosguardError as e:
            self._error(e, M.readable_txn_id(payload))
            return
        txn_id = getattr(msg, "txn_id", None)
        try:
            sent_id = getattr(msg, "reader_id", None)
            if sent_id is not None and sent_id != self.reader_id:
                raise M.MessageError("READER_ID does not match this port's reader", code="MSG_READER_MISMATCH",
                                     tag=int(Tag.READER_ID))
            if isinstance(msg, (M.Auth, M.Refund, M.Void)):
                req = M.to_request(msg, self.reader_id)
                log.info("request %s %s", req.kind.value, req.key)
                self._waiting[req.key] = self.clock() + PROGRESS_INTERVAL_S
                self.guard.submit(req)
            elif isinstance(msg, M.Status):
                r = (self.guard.last_for_reader(self.reader_id) if msg.last
                     else self.guard.status(txn_key(self.reader_id, msg.txn_id or b"")))
                if r is None:
                    raise PosguardError("no transaction with this id on this terminal", code=ERR_TXN_UNKNOWN)
                self._send_result(r)
            elif isinstance(msg, M.Ping):
                self._send(M.Pong(txn_id=msg.txn_id))
            elif isinstance(msg, M.Confirm):
                key = txn_key(self.reader_id, msg.txn_id)
                self._waiting[key] = self.clock() + PROGRESS_INTERVAL_S  # until the released request's outcome
                self.guard.confirm(key)
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
        else:
            self._waiting.setdefault(r.key, self.clock() + PROGRESS_INTERVAL_S)
        self.stats["results"] += 1
        self._send(msg)

    def _send(self, msg: M.Message) -> None:
        try:
            self.link.send_message(M.encode_message(msg))
        except PosguardError as e:
            log.error("cannot queue a message to the reader: %s", e.code)
