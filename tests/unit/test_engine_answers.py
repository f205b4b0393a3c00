"""The host's answers the way acquirers mean them (ISO 8583:1987 field 39 classes, partial
approvals, MTI pairing), through the pure engine. The end-to-end versions run the daemon against
the host simulator's acquirer profile."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from guard.core.engine import Engine, EngineConfig, SendHost
from guard.core.errors import ConfigError
from guard.core.model import TxnState
from tests.unit.test_engine import CFG, NOW, FakeCrypto, kinds, req, response


def sale(e: Engine, i: int = 1, amount: int = 1000) -> SendHost:
    acts = e.submit(req(i, amount=amount), NOW)
    send = acts[1]
    assert isinstance(send, SendHost)
    return send


def engine(**over: Any) -> Engine:
    e = Engine(dataclasses.replace(CFG, **over), FakeCrypto(), random.Random(1))
    e.on_host_up(NOW)
    return e


@pytest.mark.parametrize("rc", ["00", "08", "11", "16"])
def test_every_approval_class_code_approves(rc: str) -> None:
    e = engine()
    out = e.host_message(response(sale(e), rc), NOW + 1)
    assert kinds(out) == ["append:outcome", "reply:APPROVED"] and out[1].result.response_code == rc


@pytest.mark.parametrize("rc", ["05", "51", "54", "55", "57", "61", "65"])
def test_explicit_declines_decline_without_reversal(rc: str) -> None:
    e = engine()
    out = e.host_message(response(sale(e), rc), NOW + 1)
    assert kinds(out) == ["append:outcome", "reply:DECLINED"] and not e.pending_reversals()


@pytest.mark.parametrize("rc", ["Q7", "09", "96", "91", "06", "68", "19"])
def test_any_other_code_is_maybe_debited_not_charged_and_reversed(rc: str) -> None:
    e = engine()
    send = sale(e)
    out = e.host_message(response(send, rc), NOW + 1)
    assert kinds(out)[:2] == ["append:reversal_pending", "reply:REVERSAL_PENDING"]
    assert out[0].records[0][2]["reason"] == "UNCLASSIFIED_RESPONSE" and out[0].records[0][2]["rc"] == rc
    assert "NOT CHARGED" in out[1].result.display_text
    rev = [a for a in out if isinstance(a, SendHost)]
    assert rev and rev[0].fields["t"] == "0400" and rev[0].fields["90"].startswith("0200" + send.fields["11"])


def test_a_partial_approval_accepted_completes_for_the_approved_amount() -> None:
    e = engine()
    send = sale(e, amount=5000)
    out = e.host_message(response(send, "10", **{"4": "000000003000"}), NOW + 1)
    assert kinds(out) == ["append:partial", "reply:PARTIAL"]
    r = out[1].result
    assert r.extra["amount"] == 5000 and r.extra["approved_amount"] == 3000 and "30.00 OF 50.00" in r.display_text
    done = e.confirm(req(1).key, NOW + 5)
    assert kinds(done) == ["append:outcome", "reply:APPROVED"]
    assert done[0].records[0][2]["approved_amount"] == 3000
    assert e.txns[req(1).key].settled == 3000


def test_a_partial_approval_cancelled_or_left_alone_is_reversed_for_the_approved_amount() -> None:
    e = engine()
    send = sale(e, amount=5000)
    e.host_message(response(send, "10", **{"4": "000000003000"}), NOW + 1)
    out = e.cancel(req(1).key, NOW + 2)
    assert kinds(out)[:2] == ["append:reversal_pending", "reply:REVERSAL_PENDING"]
    rev = next(a for a in out if isinstance(a, SendHost))
    assert rev.fields["4"] == "000000003000", "the reversal undoes what was debited"

    e = engine()
    e.host_message(response(sale(e, amount=5000), "10", **{"4": "000000003000"}), NOW + 1)
    assert e.next_deadline() is not None and e.next_deadline() <= NOW + 1 + CFG.partial_expiry_s  # type: ignore[operator]
    out = e.tick(NOW + 1 + CFG.partial_expiry_s)
    assert e.txns[req(1).key].state is TxnState.REVERSAL_PENDING and e.txns[req(1).key].reason == "PARTIAL_EXPIRED"


def test_a_reader_without_partials_gets_a_reversal_and_not_charged() -> None:
    e = engine(partial_approvals=False)
    out = e.host_message(response(sale(e, amount=5000), "10", **{"4": "000000003000"}), NOW + 1)
    assert kinds(out)[:2] == ["append:partial+reversal_pending", "reply:REVERSAL_PENDING"]


def test_a_partial_amount_in_field_54_with_field_4_echoed() -> None:
    e = engine(partial_amount_field="54")
    send = sale(e, amount=5000)
    f54 = "0002" + "978" + "C" + "000000003000"
    out = e.host_message(response(send, "10", **{"54": f54}), NOW + 1)
    assert kinds(out) == ["append:partial", "reply:PARTIAL"] and out[1].result.extra["approved_amount"] == 3000


@pytest.mark.parametrize("amount", ["000000005000", "000000009999", "000000000000", "abc"])
def test_a_partial_that_is_not_partial_is_reversed(amount: str) -> None:
    e = engine()
    out = e.host_message(response(sale(e, amount=5000), "10", **{"4": amount}), NOW + 1)
    assert kinds(out)[0] == "append:reversal_pending"


@pytest.mark.parametrize("mti", ["0230", "0810", "0410", "0211", "0430"])
def test_an_answer_of_the_wrong_mti_never_decides_a_sale(mti: str) -> None:
    e = engine()
    send = sale(e)
    out = e.host_message(response(send, "00", t=mti), NOW + 1)
    if mti == "0410":  # a reversal answer for a sale no reversal was sent for
        assert kinds(out) == ["append:late_response"]
    else:
        assert kinds(out) == ["append:unmatched_response"]
    assert e.txns[req(1).key].state is TxnState.SENT
    e.tick(NOW + CFG.host_timeout_s)
    assert e.txns[req(1).key].state is TxnState.REVERSAL_PENDING


def test_a_0411_answers_a_reversal() -> None:
    e = engine()
    sale(e)
    rev = next(a for a in e.tick(NOW + CFG.host_timeout_s) if isinstance(a, SendHost))
    out = e.host_message(response(rev, "00", t="0411"), NOW + CFG.host_timeout_s + 1)
    assert kinds(out) == ["append:reversed", "reply:REVERSED"]


@pytest.mark.parametrize("over,key", [
    ({"rc_approved": frozenset({"08"})}, "approved"),
    ({"rc_declined": frozenset({"05", "08"})}, "declined"),
    ({"rc_partial": frozenset({"10", "94"})}, "duplicate"),
    ({"rc_declined": frozenset({"5"})}, "declined"),
])
def test_a_host_profile_whose_classes_overlap_or_omit_00_is_refused(over: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        dataclasses.replace(CFG, **over)
    assert ei.value.key == f"response_codes.{key}"


def test_stans_never_fall_below_the_clock_floor_so_a_new_journal_cannot_reuse_one() -> None:
    from guard.core.state import stan_floor

    day = 1_760_000_000 - 1_760_000_000 % 86_400
    old = engine(stan_clock_floor=True)
    stans = [int(sale(old, i).fields["11"]) for i in range(1, 4)]
    # A replaced journal (a fresh engine) one second later starts above everything drawn before.
    new = Engine(dataclasses.replace(CFG, stan_clock_floor=True), FakeCrypto(), random.Random(1))
    new.on_host_up(NOW + 1)
    acts = new.submit(req(9), NOW + 1)
    assert int(acts[1].fields["11"]) > max(stans)  # type: ignore[union-attr]
    assert stan_floor(day) == 1 and stan_floor(day + 86_399) == 1 + 86_399 * 11 <= 999_999


def test_a_journal_holding_a_partial_approval_restores_and_the_offer_still_stands() -> None:
    """SENT is never journaled: replay moves a sale from JOURNALED straight to PARTIAL (found by
    the acquirer-profile simulation: 19 of 20 seeds with partials could not restart)."""
    from tests.unit.test_engine import Log

    log = Log()
    e = engine()
    send = log.take(e.submit(req(1, amount=5000), NOW))[1]
    log.take(e.host_message(response(send, "10", **{"4": "000000003000"}), NOW + 1))
    r = Engine.restore(CFG, FakeCrypto(), log.entries, random.Random(2))
    t = r.txns[req(1).key]
    assert t.state is TxnState.PARTIAL and t.settled == 3000
    assert kinds(r.confirm(req(1).key, NOW + 2)) == ["append:outcome", "reply:APPROVED"]
