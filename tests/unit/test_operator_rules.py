"""Operator-error remedies and offline sales through the engine, a real journal and the host
simulator: REFUND against an original, amount confirmation and CANCEL, missing signatures, and
deferred (offline) authorization forwarded as 0220 advices."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest

from guard.core import constants as C
from guard.runtime import restore
from guard.core.engine import Engine, EngineConfig
from guard.core.errors import IdempotencyConflict, PosguardError
from guard.ops.export import load_view
from guard.simulation.hostsim import HostCore
from guard.hostlink.iso import parse_field90
from guard.journal.store import Journal
from guard.journal.keys import init_keys
from guard.core.model import CardData, Request, TxnKind, TxnState
from guard.core.policies import OFF, OfflineConfig, PolicyConfig
from guard.runtime.service import JournalCrypto
from guard.journal.verify import verify_journal

from tests.support.executor_support import CoreHost, Shown, executor

TID, MID = "OPRULES1", "OPRULESMERCHANT"
NOW = 1_760_000_000.0
PAN_A, PAN_B = "4761739001010119", "5413330089020011"


class World:
    """Engine + real journal + HostCore in-process, explicit time, a host that can be down."""

    def __init__(self, tmp: Path, policy: PolicyConfig = OFF, offline: OfflineConfig | None = None,
                 dup_detection: bool = True, keep_final: int = 5000) -> None:
        self.keys = init_keys(tmp / "keys")
        self.path = tmp / "j.db"
        self.journal = Journal.create(self.path, self.keys, terminal_id=TID, now=NOW)
        self.cfg = EngineConfig(TID, MID, host_timeout_s=5, reversal_timeout_s=5, backoff_base_s=1, backoff_max_s=2,
                                policy=policy, offline=offline or OfflineConfig(), keep_final=keep_final)
        self.host = HostCore(seed=1, dup_detection=dup_detection)
        self.now = NOW
        self.reader = Shown()
        self.shown: dict[str, Any] = self.reader.results
        self.link = CoreHost(self.host, lambda: self.now)
        self.sent: list[dict[str, str]] = self.link.sent
        self.engine = self._engine(Engine)
        self.ex.call(self.engine.on_host_up)

    def _engine(self, factory: Any) -> Engine:
        """A fresh engine (``Engine``) or one restored from the journal, with its executor."""
        crypto = JournalCrypto(self.journal, self.keys.token_key)
        if factory is Engine:
            e = Engine(self.cfg, crypto, random.Random(1))
        else:
            e = restore.restore_engine(self.cfg, crypto, self.journal, random.Random(2))
        self.ex = executor(e, self.journal, self.link, self.reader, lambda: self.now)
        return e

    def run(self, acts: list[Any]) -> None:
        self.ex.run(acts)

    def request(self, i: int, amount: int = 1000, pan: str = PAN_A, kind: TxnKind = TxnKind.SALE,
                original: int | None = None) -> Request:
        return Request("R1", i.to_bytes(16, "big"), kind, amount, "978", CardData(pan, "2912"),
                       original.to_bytes(16, "big") if original is not None else None)

    def submit(self, req: Request, dt: float = 1.0) -> Any:
        self.now += dt
        self.ex.call(self.engine.submit, req)
        return self.shown.get(req.key)

    def sale(self, i: int, amount: int = 1000, pan: str = PAN_A, dt: float = 1.0) -> Any:
        return self.submit(self.request(i, amount, pan), dt)

    def refund(self, i: int, original: int, amount: int = 1000, pan: str = PAN_A) -> Any:
        return self.submit(self.request(i, amount, pan, TxnKind.REFUND, original))

    def advance(self, seconds: float, step: float = 0.5) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            self.ex.call(self.engine.tick)

    def down(self) -> None:
        self.ex.call(self.engine.on_host_down)

    def back_up(self) -> None:
        self.ex.call(self.engine.on_host_up)

    def restart(self) -> None:
        self.engine = self._engine(None)
        self.ex.call(self.engine.recover)
        self.ex.call(self.engine.on_host_up)

    def records(self, kind: str, txn: str | None = None) -> list[Any]:
        return [e for e in self.journal.entries() if e.kind == kind and (txn is None or e.txn == txn)]

    def key(self, i: int) -> str:
        return self.request(i).key


def _code(fn: Any) -> str:
    with pytest.raises(PosguardError) as ei:
        fn()
    return ei.value.code


# ---------------------------------------------------------------------------------------- REFUND


def test_refund_credits_the_card_of_an_approved_sale_up_to_its_amount(tmp_path: Path) -> None:
    w = World(tmp_path)
    assert w.sale(1, amount=5000).state is TxnState.APPROVED
    r = w.refund(2, original=1, amount=2000)
    assert r.state is TxnState.APPROVED
    assert w.sent[-1]["3"] == C.PROC_REFUND and w.sent[-1]["t"] == "0200"
    led = w.host.ledger()
    assert [d["type"] for d in led["debits"]] == ["SALE", "REFUND"] and led["totals"]["net_amount"] == 3000
    link = w.records("refund_of", w.key(1))
    assert link and link[0].payload == {"refund": w.key(2), "amount": 2000}, "the original's history names its refund"
    assert w.refund(3, original=1, amount=3000).state is TxnState.APPROVED, "partial refunds up to the sale"
    assert _code(lambda: w.refund(4, original=1, amount=1)) == "REFUND_EXCEEDS_ORIGINAL"
    assert w.host.ledger()["totals"]["net_amount"] == 0
    assert w.records("intent", w.key(4)) == [], "a refused refund leaves nothing in the journal"


def test_refund_refusals_each_have_their_own_code(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.sale(1, amount=5000)
    assert _code(lambda: w.refund(2, original=1, pan=PAN_B)) == "REFUND_CARD_MISMATCH"
    assert _code(lambda: w.refund(3, original=99)) == "REFUND_ORIGINAL_UNKNOWN"
    assert _code(lambda: w.submit(w.request(4, kind=TxnKind.REFUND))) == "REFUND_NEEDS_ORIGINAL"
    w.sale(5, amount=2051)  # the host declines amounts ending in 51
    assert _code(lambda: w.refund(6, original=5, amount=100)) == "REFUND_NOT_ALLOWED"
    assert w.host.ledger()["totals"]["refunds"] == 0


def test_refund_refused_while_the_original_has_a_pending_reversal(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.host.force("debit_drop_response")
    w.sale(1, amount=5000)
    w.host.force("drop_request")  # the 0400 is lost too: the reversal stays pending
    w.advance(5.5)
    assert w.engine.txns[w.key(1)].state is TxnState.REVERSAL_PENDING
    assert _code(lambda: w.refund(2, original=1)) == "REFUND_ORIGINAL_PENDING_REVERSAL"
    w.advance(30)
    assert w.engine.txns[w.key(1)].state is TxnState.REVERSED
    assert w.host.ledger()["totals"]["net_debits"] == 0, "the reversal, not a refund, gave the money back"


def test_refund_is_idempotent_and_a_refunded_sale_cannot_be_voided(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.sale(1, amount=5000)
    first = w.refund(2, original=1, amount=1000)
    again = w.refund(2, original=1, amount=1000)
    assert again == first and w.host.ledger()["totals"]["refunds"] == 1, "a re-sent refund is answered, not re-sent"
    with pytest.raises(IdempotencyConflict):
        w.refund(2, original=1, amount=999)
    void = Request("R1", (3).to_bytes(16, "big"), TxnKind.VOID, 5000, "978", None, (1).to_bytes(16, "big"))  # type: ignore[arg-type]
    assert _code(lambda: w.submit(void)) == "VOID_NOT_ALLOWED"


def test_refund_timeout_is_reversed_as_a_refund_and_limits_survive_eviction(tmp_path: Path) -> None:
    w = World(tmp_path, keep_final=1)
    w.sale(1, amount=5000)
    w.host.force("debit_drop_response")  # the credit is booked, its answer lost
    w.refund(2, original=1, amount=4000)
    w.advance(8)
    rev = [f for f in w.sent if f["t"] == "0400"][0]
    assert rev["3"] == C.PROC_REFUND and parse_field90(rev["90"])[0] == "0200"
    assert w.ex.status(w.key(2)).state is TxnState.REVERSED  # type: ignore[union-attr]
    assert w.host.ledger()["totals"]["net_amount"] == 5000, "the refund's credit was taken back"
    w.sale(7, amount=100, pan=PAN_B)
    w.sale(8, amount=100, pan=PAN_B)  # the original is evicted from memory by now
    w.restart()
    assert w.refund(3, original=1, amount=5000).state is TxnState.APPROVED, "a reversed refund frees its amount"
    assert _code(lambda: w.refund(4, original=1, amount=1)) == "REFUND_EXCEEDS_ORIGINAL"


# ------------------------------------------------------------------ amount confirmation, CANCEL


def test_amount_confirmation_round_trip_and_cancel(tmp_path: Path) -> None:
    w = World(tmp_path, dataclasses.replace(OFF, confirm_amount=True))
    held = w.sale(1, amount=1234)
    assert held.state is TxnState.HELD and held.reason == "HOLD_CONFIRM_AMOUNT"
    assert held.display_text == "CONFIRM AMOUNT 12.34"
    assert w.sent == [] or all(f["t"] == "0800" for f in w.sent), "nothing goes to the host before CONFIRM"
    w.run(restore.call(w.engine, w.journal, lambda: w.engine.confirm(w.key(1), w.now)))
    assert w.shown[w.key(1)].state is TxnState.APPROVED
    wrong = w.sale(2, amount=12340)  # a digit too many: the operator cancels
    assert wrong.state is TxnState.HELD
    w.run(restore.call(w.engine, w.journal, lambda: w.engine.cancel(w.key(2), w.now)))
    r = w.shown[w.key(2)]
    assert r.state is TxnState.DECLINED and r.reason == "OPERATOR_CANCELLED" and "NOT CHARGED" in r.display_text
    assert w.host.ledger()["totals"]["net_amount"] == 1234
    assert _code(lambda: w.engine.cancel(w.key(1), w.now)) == "NOTHING_HELD"
    refund = w.refund(3, original=1, amount=1234)
    assert refund.state is TxnState.HELD and refund.reason == "HOLD_CONFIRM_AMOUNT", "refunds are confirmed too"


# ------------------------------------------------------------------------------------ signature


def test_missing_signature_is_flagged_in_the_journal_and_the_export(tmp_path: Path) -> None:
    w = World(tmp_path, dataclasses.replace(OFF, signature_above=5000, signature_timeout_s=60))
    small = w.sale(1, amount=5000)
    assert small.state is TxnState.APPROVED and "signature" not in small.extra
    signed = w.sale(2, amount=7500)
    assert signed.display_text.endswith("SIGNATURE REQUIRED")
    assert w.records("outcome", w.key(2))[0].payload["signature"] == "REQUIRED"
    w.run(restore.call(w.engine, w.journal, lambda: w.engine.signed(w.key(2), w.now)))
    assert w.shown[w.key(2)].extra["signature"] == "CAPTURED"
    w.sale(3, amount=9000)
    w.restart()  # the clock for the missing signature survives a restart
    w.advance(61)
    missing = w.records("signature_missing")
    assert [e.txn for e in missing] == [w.key(3)]
    assert _code(lambda: w.engine.signed(w.key(1), w.now)) == "SIGNATURE_NOT_REQUIRED"
    w.journal.close()
    view = load_view(w.path)
    assert {k[-2:]: v.signature for k, v in view.txns.items()} == {"01": "", "02": "CAPTURED", "03": "MISSING"}


# --------------------------------------------------------------------------- offline (deferred)

LIMITS = OfflineConfig(enabled=True, max_sale_amount=5000, max_total_amount=8000, max_count=3, max_age_s=3600)


def test_offline_sales_within_limits_are_deferred_then_forwarded_as_advices(tmp_path: Path) -> None:
    w = World(tmp_path, offline=LIMITS)
    w.down()
    d = w.sale(1, amount=3000)
    assert d.state is TxnState.DEFERRED and d.display_text == "APPROVED OFFLINE" and not d.in_progress
    assert w.records("deferred", w.key(1))[0].payload["stored"] == 1
    assert w.sale(2, amount=5001).reason == "OFFLINE_LIMIT_SALE_AMOUNT"
    assert w.sale(3, amount=4000).state is TxnState.DEFERRED
    assert w.sale(4, amount=1001).reason == "OFFLINE_LIMIT_TOTAL_AMOUNT"
    assert w.sale(5, amount=1000).state is TxnState.DEFERRED
    r = w.sale(6, amount=10)
    assert r.state is TxnState.DECLINED and r.reason == "OFFLINE_LIMIT_COUNT" and "NOT CHARGED" in r.display_text
    assert w.sent == [] and w.host.total_net_debits() == 0
    w.back_up()
    advices = [f for f in w.sent if f["t"] == "0220"]
    assert len(advices) == 3 and all("2" in f for f in advices), "the vault still held the card for the advice"
    assert all(w.ex.status(w.key(i)).state is TxnState.APPROVED for i in (1, 3, 5))  # type: ignore[union-attr]
    assert w.host.ledger()["totals"]["net_amount"] == 8000 and not w.engine.busy()
    assert w.journal.vault_refs() == set(), "card data shredded once every advice was answered"


@pytest.mark.parametrize("dup_detection", [True, False])
@pytest.mark.parametrize("fault", ["drop_request", "debit_drop_response", "wrong_echo", "close_mid_frame"])
def test_unanswered_advice_is_reversed_before_a_fresh_one(tmp_path: Path, fault: str, dup_detection: bool) -> None:
    w = World(tmp_path, offline=LIMITS, dup_detection=dup_detection)
    w.down()
    w.sale(1, amount=3000)
    w.host.force(fault)
    w.back_up()
    w.advance(30)
    stans = [f["11"] for f in w.sent if f["t"] == "0220"]
    revs = [f for f in w.sent if f["t"] in ("0400", "0401")]
    assert len(stans) == 2 and stans[0] != stans[1], "a second advice carries a new STAN"
    assert parse_field90(revs[0]["90"])[:2] == ("0220", stans[0]), "the unanswered 0220 was reversed first"
    assert w.ex.status(w.key(1)).state is TxnState.APPROVED  # type: ignore[union-attr]
    assert w.host.total_net_debits() == 1, "exactly one debit, with or without duplicate detection"


def test_advice_declined_by_the_host_is_declined_with_no_debit(tmp_path: Path) -> None:
    w = World(tmp_path, offline=LIMITS)
    w.down()
    w.sale(1, amount=2051)  # the host declines amounts ending in 51
    w.back_up()
    r = w.ex.status(w.key(1))
    assert r is not None and r.state is TxnState.DECLINED and r.reason == "ADVICE_DECLINED"
    assert "COLLECT PAYMENT" in r.display_text and w.host.total_net_debits() == 0


def test_crash_with_an_advice_in_flight_recovers_to_one_debit(tmp_path: Path) -> None:
    w = World(tmp_path, offline=LIMITS, dup_detection=False)
    w.down()
    w.sale(1, amount=3000)
    w.host.force("debit_drop_response")
    w.back_up()  # the host booked the advice; the terminal never heard
    w.restart()
    w.advance(30)
    assert [e.payload["reason"] for e in w.records("advice_reversal_pending")] == ["RECOVERY"]
    assert w.ex.status(w.key(1)).state is TxnState.APPROVED and w.host.total_net_debits() == 1  # type: ignore[union-attr]
    w.journal.close()
    assert verify_journal(w.path, k0=w.keys.k0, public_key=w.keys.signing_key.public_key()).ok


def test_offline_sale_not_forwarded_in_time_goes_to_manual_and_limits_free_up(tmp_path: Path) -> None:
    w = World(tmp_path, offline=dataclasses.replace(LIMITS, max_age_s=600))
    w.down()
    w.sale(1, amount=3000)
    w.advance(601, step=60)
    r = w.ex.status(w.key(1))
    assert r is not None and r.state is TxnState.NEEDS_MANUAL and r.reason == "OFFLINE_EXPIRED"
    assert w.sale(2, amount=5000).state is TxnState.DEFERRED, "the expired sale no longer counts"
    w.back_up()
    assert w.host.total_net_debits() == 1 and [f["t"] for f in w.sent].count("0220") == 1


def test_offline_off_fails_cleanly_with_no_host(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.down()
    r = w.sale(1)
    assert r.state is TxnState.DECLINED and r.reason == "NO_HOST" and r.display_text == "HOST UNAVAILABLE - NOT CHARGED"
    w.back_up()
    assert w.host.total_net_debits() == 0 and not w.engine.busy()


def test_void_of_a_forwarded_offline_sale_reverses_the_advice(tmp_path: Path) -> None:
    w = World(tmp_path, offline=LIMITS, dup_detection=False)
    w.down()
    w.sale(1, amount=3000)
    w.back_up()
    assert w.ex.status(w.key(1)).state is TxnState.APPROVED  # type: ignore[union-attr]
    void = Request("R1", (2).to_bytes(16, "big"), TxnKind.VOID, 3000, "978", None, (1).to_bytes(16, "big"))  # type: ignore[arg-type]
    w.submit(void)
    rev = [f for f in w.sent if f["t"] == "0400"][-1]
    assert parse_field90(rev["90"])[0] == "0220", "the host knows this sale from its advice"
    assert w.host.total_net_debits() == 0 and w.shown[void.key].state is TxnState.APPROVED


def test_reconcile_leaves_an_offline_sale_in_flight_to_replay(tmp_path: Path) -> None:
    from guard.ops.export import TxnView
    from guard.ops.reconcile import NONE, _Host, _judge

    t = TxnView(key="R1:x", kind="SALE", state="DEFERRED", stan=7, date="1122", amount=3000, currency="978",
                masked_pan="476173******0119", rc="", approval="", rrn="", reason="", tid=TID, mid=MID, original=None,
                created=NOW, updated=NOW)
    row: Any = type("Row", (), {"amount": 3000, "rrn": "000000000001", "response": "00"})()
    d = _judge(t, (TID, MID, "000007", "1122"), _Host(debits=[row]))
    assert d is not None and d.action == NONE and "replay" in d.note


# ------------------------------------------------------------------- VOID of an evicted sale


def _void(i: int, original: int, amount: int) -> Request:
    return Request("R1", i.to_bytes(16, "big"), TxnKind.VOID, amount, "978", None, original.to_bytes(16, "big"))  # type: ignore[arg-type]


def test_void_of_a_sale_evicted_from_memory_is_matched_to_its_reversal_answer(tmp_path: Path) -> None:
    """Found by the simulator (seed 1, operator_rate 0.5): the sale read back from the journal was not
    findable by STAN, so every 0410 was 'unmatched', the reversal retried to its cap and the VOID
    ended NEEDS_MANUAL although the host had reversed the debit at the first 0400."""
    w = World(tmp_path, keep_final=1)
    w.sale(1, amount=700)
    w.sale(2, amount=100, pan=PAN_B)
    w.sale(3, amount=100, pan=PAN_B)  # sale 1 is evicted from memory by now
    assert w.key(1) not in w.engine.txns
    w.submit(_void(4, original=1, amount=700))
    w.advance(5)
    assert w.records("unmatched_response") == []
    assert w.shown[_void(4, 1, 700).key].state is TxnState.APPROVED
    assert w.ex.status(w.key(1)).state is TxnState.REVERSED  # type: ignore[union-attr]
    assert w.host.total_net_debits() == 2


def test_void_pending_over_a_restart_after_its_sale_was_evicted_completes(tmp_path: Path) -> None:
    w = World(tmp_path, keep_final=1)
    w.sale(1, amount=700)
    w.sale(2, amount=100, pan=PAN_B)
    w.sale(3, amount=100, pan=PAN_B)
    w.host.force("drop_request")  # the 0400 is lost; the terminal then loses power
    w.submit(_void(4, original=1, amount=700))
    w.restart()  # restore evicts sale 1 again before the VOID's intent reads it back
    w.advance(30)
    assert w.records("unmatched_response") == []
    assert w.ex.status(_void(4, 1, 700).key).state is TxnState.APPROVED  # type: ignore[union-attr]
    assert w.host.total_net_debits() == 2


def test_void_after_a_reversed_refund_that_must_be_read_back_keeps_its_sale_in_memory(tmp_path: Path) -> None:
    """Found by the simulator (seed 1913, offline, operator_rate 0.5): checking the sale's refunds
    read a refund back from the journal, which evicted the sale the VOID was about to reverse. The
    sale was queued for reversal but gone from memory: KeyError in _dispatch_reversals, then on
    every tick, until a restart."""
    w = World(tmp_path, keep_final=1)
    w.sale(1, amount=5000)
    w.host.force("drop_request")  # the refund's 0200 is lost: timed out, reversed (host answers 25)
    w.refund(2, original=1, amount=100)
    w.advance(6)
    assert w.ex.status(w.key(2)).state is TxnState.REVERSED  # type: ignore[union-attr]
    w.submit(_void(3, original=1, amount=5000))
    w.advance(2)
    assert w.shown[_void(3, 1, 5000).key].state is TxnState.APPROVED
    assert w.ex.status(w.key(1)).state is TxnState.REVERSED  # type: ignore[union-attr]
    assert w.host.total_net_debits() == 0


def test_status_last_names_the_newest_transaction_even_after_an_older_one_is_read_back(tmp_path: Path) -> None:
    """PROTOCOL.md 5.4: STATUS(LAST) is the reader's newest AUTH/REFUND/VOID by arrival. A late
    SIGNED reads an evicted sale back from the journal into memory; that used to make it "newest"
    (the newest key in memory was taken), so a rebooted reader asking LAST got the wrong sale."""
    from guard.runtime.facade import GuardFacade

    w = World(tmp_path, dataclasses.replace(OFF, signature_above=5000, signature_timeout_s=600), keep_final=1)
    w.sale(1, amount=6000)  # approved, awaiting the customer's signature
    w.sale(2, pan=PAN_B)
    w.sale(3, pan=PAN_B)
    assert w.key(1) not in w.engine.txns, "sale 1 left memory"
    w.ex.call(w.engine.signed, w.key(1))
    assert w.key(1) in w.engine.txns, "read back for the SIGNED"
    last = GuardFacade(w.engine, w.ex).last_for_reader("R1")
    assert last is not None and last.key == w.key(3)
    w.restart()
    last = GuardFacade(w.engine, w.ex).last_for_reader("R1")
    assert last is not None and last.key == w.key(3)
