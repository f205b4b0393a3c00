"""Loud host-answer events get one structured JSON log line each (txn, STAN, reason, host code)."""

from __future__ import annotations

import json
import logging
import random
from typing import Any

from guard.core.engine import Engine
from guard.runtime.events import log_committed
from posguard.run import JsonFormatter
from tests.unit.test_engine import CFG, NOW, FakeCrypto, req, response


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(JsonFormatter().format(record)))


def committed(acts: list[Any]) -> list[Any]:
    return [r for a in acts if hasattr(a, "records") for r in a.records]


def test_each_loud_answer_logs_one_json_line_with_its_fields() -> None:
    cap = Capture()
    logger = logging.getLogger("posguard.events")
    logger.addHandler(cap)
    logger.setLevel(logging.INFO)
    try:
        e = Engine(CFG, FakeCrypto(), random.Random(1))
        e.on_host_up(NOW)
        s1 = e.submit(req(1), NOW)[1]
        log_committed(committed(e.host_message(response(s1, "Q7"), NOW + 1)))  # fail-safe reversal
        s2 = e.submit(req(2), NOW)[1]
        log_committed(committed(e.host_message(response(s2, "00", **{"41": "OTHER001"}), NOW + 1)))  # echo
        s3 = e.submit(req(3, amount=5000), NOW)[1]
        log_committed(committed(e.host_message(response(s3, "10", **{"4": "000000001000"}), NOW + 1)))
        log_committed(committed(e.host_message(response(s3, "00", t="0230"), NOW + 2)))  # wrong MTI
        s4 = e.submit(req(4), NOW)[1]
        log_committed(committed(e.host_message(response(s4, "94"), NOW + 1)))  # STAN collision
        log_committed(committed(e.host_message(response(s4, "00"), NOW + 3)))  # late answer
        log_committed(committed(e.submit(req(5), NOW)))  # an ordinary intent: no line
    finally:
        logger.removeHandler(cap)
    events = [line["event"] for line in cap.lines]
    assert events == ["fail_safe_reversal", "echo_mismatch", "partial_approval", "unmatched_answer",
                      "stan_collision", "late_answer"]
    first = cap.lines[0]
    assert first["txn"] == req(1).key and first["rc"] == "Q7" and first["reason"] == "UNCLASSIFIED_RESPONSE"
    assert first["stan"] and first["utc"].endswith("Z") and first["level"] == "WARNING"
    assert cap.lines[2]["approved_amount"] == 1000


def test_needs_manual_is_an_error_line_and_ordinary_records_are_silent() -> None:
    from guard.runtime.events import event_of

    assert event_of("needs_manual", "R1:x", {"reason": "REVERSAL_EXPIRED"}) == (logging.ERROR, "needs_manual")
    assert event_of("reversal_pending", "R1:x", {"reason": "HOST_TIMEOUT"}) == (logging.WARNING, "host_timeout")
    assert event_of("intent", "R1:x", {"stan": "000001"}) is None
    assert event_of("outcome", "R1:x", {"state": "APPROVED", "reason": ""}) is None


def test_host_timeout_queued_reversal_and_recovery_each_log_one_line_with_txn_and_stan() -> None:
    cap = Capture()
    logger = logging.getLogger("posguard.events")
    logger.addHandler(cap)
    logger.setLevel(logging.INFO)
    try:
        e = Engine(CFG, FakeCrypto(), random.Random(1))
        e.on_host_up(NOW)
        e.submit(req(1), NOW)
        log_committed(committed(e.tick(NOW + 60)))  # no answer within host_timeout_s
        e.submit(req(2), NOW + 61)
        log_committed(committed(e.on_host_down(NOW + 62)))  # sent, then the connection dropped
        e.on_host_up(NOW + 63)
        e.submit(req(3), NOW + 63)
        log_committed(committed(e.recover(NOW + 64)))  # as after a restart: an intent without an outcome
    finally:
        logger.removeHandler(cap)
    by_txn = {line["txn"]: line for line in cap.lines}
    assert [line["event"] for line in cap.lines] == ["host_timeout", "reversal_queued", "recovered"]
    assert by_txn[req(1).key]["reason"] == "HOST_TIMEOUT" and by_txn[req(1).key]["level"] == "WARNING"
    assert by_txn[req(2).key]["reason"] == "HOST_DISCONNECTED"
    assert by_txn[req(3).key]["reason"] == "RECOVERY"
    assert all(line["stan"] for line in cap.lines)
