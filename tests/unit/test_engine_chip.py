"""Chip sales through the pure engine: the host's approval is final only when the card accepts
(COMPLETE); a card decline, removal, terminal error or silence reverses it, also after a restart."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from guard.core.emv import CardDecision
from guard.core.engine import Engine, SendHost
from guard.core.errors import PosguardError, RequestInvalid
from guard.core.model import CardData, Request, TxnKind, TxnState
from guard.core.policies import OfflineConfig
from guard.core.records import Kind
from tests.unit.test_engine import CFG, NOW, E, FakeCrypto, kinds, response

PAN = "4761739001010119"


def tlv(tag: int, value: bytes) -> bytes:
    t = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
    return t + bytes([len(value)]) + value


ICC = (tlv(0x9F26, bytes(8)) + tlv(0x9F27, b"\x80") + tlv(0x9F36, b"\x00\x2a") + tlv(0x95, bytes(5))
       + tlv(0x84, bytes.fromhex("A0000000031010")) + tlv(0x50, b"VISA CREDIT") + tlv(0x9F37, b"\x01\x02\x03\x04"))
FINAL_TC = tlv(0x9F27, b"\x40") + tlv(0x9F36, b"\x00\x2a") + tlv(0x9B, b"\xe8\x00")
FINAL_AAC = tlv(0x9F27, b"\x00") + tlv(0x9F36, b"\x00\x2a")


def chip_req(i: int = 1, mode: str = "CHIP", amount: int = 1000, **card: Any) -> Request:
    c = CardData(PAN, "2912", entry_mode=mode, pan_seq="001", track2=PAN + "D29122010000000000",
                 icc=ICC if mode in ("CHIP", "CONTACTLESS") else b"", pin_block=bytes(range(8)), ksn=bytes(10), **card)
    return Request("R1", i.to_bytes(16, "big"), TxnKind.SALE, amount, "978", c)


def engine(**over: Any) -> Engine:
    e = Engine(dataclasses.replace(CFG, **over), FakeCrypto(), random.Random(1))
    e.on_host_up(NOW)
    return e


def approved_by_host(e: Engine, i: int = 1, mode: str = "CHIP") -> list[Any]:
    acts = e.submit(chip_req(i, mode), NOW)
    send = acts[1]
    assert isinstance(send, SendHost)
    return e.host_message(response(send, "00", **{"55": "910A" + "11" * 10}), NOW + 1)


def test_chip_approval_awaits_the_card_and_carries_issuer_data() -> None:
    e = engine()
    out = approved_by_host(e)
    assert kinds(out) == ["append:await_completion", "reply:AWAITING_COMPLETION"]
    r = out[1].result
    assert not r.state.shown_as_success and r.extra["issuer_icc"] == bytes.fromhex("910A" + "11" * 10)
    assert not out[0].vault_shred, "the card data stays in the vault until the sale is final"


def test_card_accepts_then_approved_and_card_data_shredded() -> None:
    e = engine()
    approved_by_host(e)
    out = e.complete(chip_req().key, CardDecision.ACCEPTED, FINAL_TC, NOW + 2)
    assert kinds(out) == ["append:outcome", "reply:APPROVED"]
    payload = out[0].records[0][2]
    assert payload["card"] == "ACCEPTED" and payload["emv"]["cryptogram"] == "TC" and out[0].vault_shred


@pytest.mark.parametrize("decision", [CardDecision.CARD_DECLINED, CardDecision.CARD_REMOVED, CardDecision.TERMINAL_ERROR])
def test_card_refusal_after_host_approval_is_reversed_and_not_charged(decision: CardDecision) -> None:
    e = engine()
    approved_by_host(e)
    out = e.complete(chip_req().key, decision, FINAL_AAC if decision is CardDecision.CARD_DECLINED else b"", NOW + 2)
    assert kinds(out)[:3] == ["append:reversal_pending", "reply:REVERSAL_PENDING", "append:reversal_attempt"]
    assert out[0].records[0][2]["reason"] == decision.value
    assert "NOT CHARGED" in out[1].result.display_text
    rev = [a for a in out if isinstance(a, SendHost)][0]
    assert rev.fields["t"] == "0400" and rev.card_fields is not None and "55" in rev.card_fields
    assert "52" not in rev.card_fields and "35" not in rev.card_fields


def test_no_complete_in_time_reverses() -> None:
    e = engine(completion_timeout_s=30)
    approved_by_host(e)
    assert e.next_deadline() is not None and e.next_deadline() <= NOW + 31  # type: ignore[operator]
    assert kinds(e.tick(NOW + 30)) == []
    assert kinds(e.tick(NOW + 31))[:2] == ["append:reversal_pending", "reply:REVERSAL_PENDING"]


def test_complete_for_a_final_txn_answers_the_stored_result() -> None:
    e = engine()
    approved_by_host(e)
    e.complete(chip_req().key, CardDecision.CARD_DECLINED, b"", NOW + 2)
    again = e.complete(chip_req().key, CardDecision.ACCEPTED, b"", NOW + 3)
    assert kinds(again) == ["reply:REVERSAL_PENDING"]
    with pytest.raises(PosguardError) as exc:
        e.complete(chip_req(7).key, CardDecision.ACCEPTED, b"", NOW + 3)
    assert exc.value.code == "TXN_UNKNOWN"


def test_magstripe_and_manual_complete_at_once() -> None:
    e = engine()
    out = approved_by_host(e, 1, "MAGSTRIPE")
    assert kinds(out) == ["append:outcome", "reply:APPROVED"]


def test_contactless_awaits_the_card_too() -> None:
    assert kinds(approved_by_host(engine(), 1, "CONTACTLESS"))[1] == "reply:AWAITING_COMPLETION"


def _journal(e: Engine, acts: list[Any], into: list[E], ts: float) -> None:
    for a in acts:
        for k, txn, p in getattr(a, "records", []):
            into.append(E(len(into) + 1, str(k), txn, p, ts))


def test_restore_rebuilds_awaiting_completion_and_its_timer_fires() -> None:
    e = engine(completion_timeout_s=30)
    log: list[E] = []
    acts = e.submit(chip_req(), NOW)
    _journal(e, acts, log, NOW)
    out = e.host_message(response(acts[1], "00"), NOW + 1)
    _journal(e, out, log, NOW + 1)
    r = Engine.restore(dataclasses.replace(CFG, completion_timeout_s=30), FakeCrypto(), log, random.Random(2))
    assert r.recover(NOW + 5) == []
    assert r.txns[chip_req().key].state is TxnState.AWAITING_COMPLETION
    assert r.next_deadline() == NOW + 31
    assert kinds(r.tick(NOW + 20)) == []
    out = r.tick(NOW + 31)
    assert out[0].records[0][2]["reason"] == "COMPLETION_TIMEOUT"
    # a COMPLETE re-sent after the reader's reboot, within the timeout, is honoured
    r2 = Engine.restore(dataclasses.replace(CFG, completion_timeout_s=30), FakeCrypto(), log, random.Random(2))
    assert kinds(r2.complete(chip_req().key, CardDecision.ACCEPTED, b"", NOW + 10)) == ["append:outcome", "reply:APPROVED"]


def test_the_pin_block_and_track2_never_reach_a_record() -> None:
    e = engine()
    acts = e.submit(chip_req(), NOW)
    blob = repr([a.records for a in acts if hasattr(a, "records")])
    assert "0001020304050607" not in blob and "D2912" not in blob and PAN not in blob
    intent = acts[0].records[0][2]
    assert intent["entry"] == "CHIP" and intent["emv"] == {"aid": "A0000000031010", "label": "VISA CREDIT",
                                                           "atc": "002A", "tvr": "0000000000", "cryptogram": "ARQC"}
    assert acts[1].card.pin_block and acts[1].fields["22"] == "051"


def test_malformed_icc_is_refused_before_anything_is_journaled() -> None:
    for icc, code in [(b"\x9f\x26\x09" + bytes(8), "REQUEST_ICC_MALFORMED"), (tlv(0x57, bytes(8)), "REQUEST_ICC_FORBIDDEN_TAG"),
                      (tlv(0x5A, bytes(8)), "REQUEST_ICC_FORBIDDEN_TAG"), (bytes(300), "REQUEST_ICC_TOO_LONG")]:
        with pytest.raises(RequestInvalid) as exc:
            CardData(PAN, "2912", entry_mode="CHIP", icc=icc)
        assert exc.value.code == code


def test_offline_never_approves_a_swipe_and_defers_chip_within_its_floor() -> None:
    off = OfflineConfig(enabled=True, max_sale_amount=5000, floor_limits=(("CHIP", 3000),))
    e = Engine(dataclasses.replace(CFG, offline=off), FakeCrypto(), random.Random(1))  # host down
    swipe = e.submit(chip_req(1, "MAGSTRIPE"), NOW)
    assert swipe[-1].result.state is TxnState.DECLINED and swipe[-1].result.reason == "OFFLINE_SWIPE_REFUSED"
    fallback = e.submit(chip_req(2, "FALLBACK"), NOW)
    assert fallback[-1].result.state is TxnState.DECLINED
    assert e.submit(chip_req(3, "CHIP", amount=2000), NOW)[-1].result.state is TxnState.DEFERRED
    assert e.submit(chip_req(4, "CHIP", amount=4000), NOW)[-1].result.reason == "OFFLINE_LIMIT_SALE_AMOUNT"


def test_an_await_completion_record_is_a_known_kind() -> None:
    assert Kind("await_completion") is Kind.AWAIT_COMPLETION


def test_offline_floor_limits_come_from_the_config_file(tmp_path: Any) -> None:
    from posguard.config import engine_config, load

    toml = tmp_path / "guard.toml"
    toml.write_text('[terminal]\nterminal_id = "TERM0001"\nmerchant_id = "MERCHANT0000001"\n[reader]\nurl = "loop://"\n'
                    'completion_timeout = 45\n[host]\naddress = "127.0.0.1"\nport = 1\nksn_field = "53"\n'
                    '[journal]\npath = "j"\nkeys = "k"\n[offline]\nenabled = true\nchip_floor_limit = 3000\n')
    cfg = engine_config(load(toml))
    assert cfg.completion_timeout_s == 45 and cfg.ksn_field == "53"
    assert cfg.offline.refuse(4000, 0, 0, "CHIP") == "OFFLINE_LIMIT_SALE_AMOUNT"
    assert cfg.offline.refuse(4000, 0, 0, "CONTACTLESS") == ""
    assert cfg.offline.refuse(100, 0, 0, "MAGSTRIPE") == "OFFLINE_SWIPE_REFUSED"


def test_complete_for_an_evicted_final_sale_asks_for_its_entries_and_answers_from_them() -> None:
    e = engine(keep_final=1)
    log: list[E] = []
    for i in (1, 2):
        acts = e.submit(chip_req(i), NOW)
        _journal(e, acts, log, NOW)
        out = e.host_message(response(acts[1], "00"), NOW + 1)
        _journal(e, out, log, NOW + 1)
        _journal(e, e.complete(chip_req(i).key, CardDecision.ACCEPTED, FINAL_TC, NOW + 2), log, NOW + 2)
    key = chip_req(1).key
    assert key not in e.txns, "evicted (keep_final=1)"
    asked = e.complete(key, CardDecision.CARD_DECLINED, b"", NOW + 3)
    assert len(asked) == 1 and asked[0].keys == (key,)  # type: ignore[union-attr]
    e.load(key, [x for x in log if x.txn == key])
    again = e.complete(key, CardDecision.CARD_DECLINED, b"", NOW + 3)
    assert kinds(again) == ["reply:APPROVED"], "a final sale is answered from the journal, never re-decided"


@pytest.mark.parametrize("decision", [CardDecision.ACCEPTED, CardDecision.CARD_DECLINED])
def test_an_accepted_partial_approval_of_a_chip_sale_still_waits_for_the_card(decision: CardDecision) -> None:
    e = engine()
    acts = e.submit(chip_req(1, amount=5000), NOW)
    out = e.host_message(response(acts[1], "10", **{"4": f"{3000:012d}", "55": "9102AABB"}), NOW + 1)
    assert kinds(out) == ["append:partial", "reply:PARTIAL"]
    waiting = e.confirm(chip_req(1).key, NOW + 2)
    assert kinds(waiting) == ["append:await_completion", "reply:AWAITING_COMPLETION"]
    assert waiting[1].result.extra["issuer_icc"] == bytes.fromhex("9102AABB")
    done = e.complete(chip_req(1).key, decision, b"", NOW + 3)
    if decision is CardDecision.ACCEPTED:
        assert kinds(done) == ["append:outcome", "reply:APPROVED"] and done[1].result.extra["approved_amount"] == 3000
    else:
        rev = [a for a in done if isinstance(a, SendHost)][0]
        assert rev.fields["4"] == f"{3000:012d}", "the reversal undoes what the host approved"


def test_a_held_pin_sale_whose_pin_was_lost_in_a_restart_is_declined_not_sent_without_it() -> None:
    """The PIN block lives in memory only (PCI DSS 3.3.1.3). A sale held for the operator that a
    restart separated from its PIN must not go to the host without it (an issuer may approve it
    with no cardholder verification): CONFIRM declines it, PIN_LOST, and sends nothing."""
    policy = dataclasses.replace(CFG.policy, confirm_amount=True)
    e = engine(policy=policy)
    log: list[E] = []
    acts = e.submit(chip_req(), NOW)
    assert kinds(acts) == ["append:intent+held", "reply:HELD"]
    _journal(e, acts, log, NOW)
    r = Engine.restore(dataclasses.replace(CFG, policy=policy), FakeCrypto(), log, random.Random(2))
    r.on_host_up(NOW + 1)
    out = r.confirm(chip_req().key, NOW + 2)
    assert not any(isinstance(a, SendHost) for a in out)
    assert kinds(out) == ["append:outcome", "reply:DECLINED"] and out[0].records[0][2]["reason"] == "PIN_LOST"
    # the same sale confirmed without a restart still goes out with its PIN
    e2 = engine(policy=policy)
    e2.submit(chip_req(), NOW)
    sent = [a for a in e2.confirm(chip_req().key, NOW + 2) if isinstance(a, SendHost)]
    assert len(sent) == 1 and sent[0].card is not None and sent[0].card.pin_block == bytes(range(8))
