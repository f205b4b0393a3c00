"""The pure engine: ordering of commits, sends and replies; idempotency; reversals; recovery."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from guard.core import constants as C
from guard.hostlink import iso
from guard.core.engine import Append, Engine, EngineConfig, Reply, SendHost
from guard.core.errors import IdempotencyConflict
from guard.core.policies import OFF
from guard.core.model import CardData, Request, TxnKind, TxnState
from tests.support import FakeCrypto

from tests.support.executor_support import ListStore, RecordingHost, Shown, executor

NOW = 1_760_000_000.0
CFG = EngineConfig("TERM0001", "MERCHANT0000001", host_timeout_s=5, reversal_timeout_s=5,
                   reversal_max_attempts=3, backoff_base_s=1, backoff_max_s=2, saf_window=2, echo_idle_s=1e9,
                   policy=OFF)


@dataclass
class E:
    seq: int
    kind: str
    txn: str | None
    payload: dict[str, Any]
    ts: float


class Log(ListStore):
    """Runs actions through the daemon's executor (a host that takes every send) and keeps the
    committed records as journal entries, to restore engines from."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[E] = []
        self.ex = executor(None, self, RecordingHost(), Shown(), lambda: NOW)

    def append(self, records: Any, *, now: float, vault_put: Any = (), vault_shred: Any = ()) -> None:
        for kind, txn, payload in records:
            self.entries.append(E(len(self.entries) + 1, kind, txn, payload, NOW))

    def take(self, acts: list[Any]) -> list[Any]:
        self.ex.run(acts)
        return acts


def req(i: int = 1, amount: int = 1000, pan: str = "4761739001010119") -> Request:
    return Request("R1", i.to_bytes(16, "big"), TxnKind.SALE, amount, "978", CardData(pan, "2912"))


def engine(log: Log | None = None) -> Engine:
    e = Engine(CFG, FakeCrypto(), random.Random(1))
    if log is not None:
        log.take(e.on_host_up(NOW))
    else:
        e.on_host_up(NOW)
    return e


def response(send: SendHost, rc: str = "00", **over: str) -> dict[str, str]:
    f = {k: v for k, v in send.fields.items() if k in ("4", "7", "11", "41", "42", "49")}
    f["t"] = send.fields["t"][:2] + "1" + send.fields["t"][3]
    f["39"] = rc
    f["38"] = "A1B2C3" if rc == "00" else ""
    f["37"] = "000000000042"
    f.update(over)
    return f


def kinds(acts: list[Any]) -> list[str]:
    out = []
    for a in acts:
        if isinstance(a, Append):
            out.append("append:" + "+".join(k for k, _, _ in a.records))
        elif isinstance(a, SendHost):
            out.append("send:" + a.fields["t"])
        elif isinstance(a, Reply):
            out.append("reply:" + a.result.state.value)
    return out


def test_happy_path_commits_intent_before_send_and_outcome_before_reply() -> None:
    e = engine()
    acts = e.submit(req(), NOW)
    assert kinds(acts) == ["append:intent", "send:0200"]
    intent = acts[0].records[0][2]
    assert intent["stan"] == 1 and intent["masked_pan"] == "476173******0119"
    assert "4761739001010119" not in repr(acts[0]) and acts[0].vault_put
    acts2 = e.host_message(response(acts[1]), NOW + 1)
    assert kinds(acts2) == ["append:outcome", "reply:APPROVED"]
    assert acts2[0].vault_shred == [acts[0].vault_put[0].ref], "card data shredded once final"


def test_same_id_same_request_returns_stored_result_and_sends_nothing() -> None:
    e = engine()
    acts = e.submit(req(), NOW)
    again = e.submit(req(), NOW + 0.1)
    assert kinds(again) == ["reply:SENT"] and again[0].result.in_progress
    e.host_message(response(acts[1]), NOW + 1)
    third = e.submit(req(), NOW + 2)
    assert kinds(third) == ["reply:APPROVED"] and not third[0].result.in_progress


def test_same_id_different_request_is_an_error_and_sends_nothing() -> None:
    e = engine()
    e.submit(req(amount=1000), NOW)
    with pytest.raises(IdempotencyConflict) as ei:
        e.submit(req(amount=1001), NOW + 1)
    assert ei.value.code == "IDEMPOTENCY_MISMATCH"
    with pytest.raises(IdempotencyConflict):
        e.submit(req(pan="5413330089020011"), NOW + 1)


def test_timeout_commits_reversal_before_reply_then_0400_then_0401_repeats() -> None:
    e = engine()
    acts = e.submit(req(), NOW)
    assert e.tick(NOW + 4.9) == []
    t = e.tick(NOW + 5)
    assert kinds(t) == ["append:reversal_pending", "reply:REVERSAL_PENDING", "append:reversal_attempt", "send:0400"]
    rev = t[3]
    assert rev.fields["90"][:10] == "0200000001" and rev.fields["11"] == acts[1].fields["11"]
    assert rev.fields["90"][10:20] == acts[1].fields["7"], "field 90 carries the original's field 7"
    assert rev.fields["7"] == iso.transmission_dt(NOW + 5) != acts[1].fields["7"], "field 7 is the reversal's own time"
    assert t[2].records[0][2]["f7"] == rev.fields["7"], "journaled with the attempt"
    assert rev.card_ref == acts[0].vault_put[0].ref, "the reversal gets field 2 from the vault"
    t2 = e.tick(NOW + 10)  # reversal timed out
    assert kinds(t2) == ["append:reversal_failed"]
    t3 = e.tick(NOW + 20)
    assert kinds(t3) == ["append:reversal_attempt", "send:0401"]
    done = e.host_message(response(t3[1], "00"), NOW + 21)
    assert kinds(done) == ["append:reversed", "reply:REVERSED"]  # the final state is pushed after the commit
    assert e.txns[req().key].state is TxnState.REVERSED and not e.busy()


def test_late_approval_after_reversal_decision_is_journaled_and_does_not_cancel() -> None:
    e = engine()
    acts = e.submit(req(), NOW)
    e.tick(NOW + 5)
    late = e.host_message(response(acts[1], "00"), NOW + 6)
    assert kinds(late) == ["append:late_response"]
    assert late[0].records[0][2]["note"] == "after_reversal"
    assert e.txns[req().key].state is TxnState.REVERSAL_PENDING and e.pending_reversals() == 1


@pytest.mark.parametrize("field,value", [("41", "OTHER001"), ("42", "OTHERMERCHANT01"), ("4", "000000009999")])
def test_echo_mismatch_is_unknown_and_reversed(field: str, value: str) -> None:
    e = engine()
    acts = e.submit(req(), NOW)
    got = e.host_message(response(acts[1], "00", **{field: value}), NOW + 1)
    assert kinds(got)[:2] == ["append:reversal_pending", "reply:REVERSAL_PENDING"]
    assert got[0].records[0][2]["reason"] == "ECHO_MISMATCH" and got[0].records[0][2]["fields"] == [field]


def test_rc94_to_a_fresh_sale_is_a_stan_collision_and_rc94_on_reversal_means_done() -> None:
    """We never send a 0200 twice, so a 94 to one means the host holds its STAN for another
    transaction: ours was not processed (DECLINED, STAN_COLLISION) and no reversal goes out that
    could undo the other one. A 94 to a reversal still means "already reversed"."""
    e = engine()
    acts = e.submit(req(), NOW)
    out = e.host_message(response(acts[1], "94"), NOW + 1)
    assert kinds(out) == ["append:outcome", "reply:DECLINED"]
    assert out[1].result.reason == "STAN_COLLISION" and not e.pending_reversals()
    assert not [a for a in e.tick(NOW + 60) if isinstance(a, SendHost) and a.fields["t"] != "0800"]
    acts = e.submit(req(2), NOW + 61)
    t = e.tick(NOW + 61 + CFG.host_timeout_s)
    assert kinds(e.host_message(response(t[-1], "94"), NOW + 70)) == ["append:reversed", "reply:REVERSED"]


def test_reversal_cap_counts_only_explicit_refusals_and_does_not_block_the_queue() -> None:
    """Sale 1's reversal is refused (0410 with 12) at every attempt: NEEDS_MANUAL after
    reversal_max_attempts refusals, with the reason and the host's last code; sale 2, queued
    behind it, is reversed meanwhile."""
    e = engine()
    a1 = e.submit(req(1), NOW)
    a2 = e.submit(req(2), NOW)
    e.on_host_down(NOW + 1)  # both unknown, queued in order
    e.on_host_up(NOW + 1)
    now = NOW + 1
    for _ in range(60):
        now += 3
        for a in e.tick(now):
            if isinstance(a, SendHost) and a.fields["t"] in ("0400", "0401"):
                e.host_message(response(a, "12" if a.key == req(1).key else "00"), now)
    assert e.txns[req(2).key].state is TxnState.REVERSED
    t1 = e.txns[req(1).key]
    assert t1.state is TxnState.NEEDS_MANUAL and t1.rev_failures == CFG.reversal_max_attempts
    assert t1.rev_attempts == CFG.reversal_max_attempts + 1, "the first 0400 went unanswered: not a refusal"
    assert t1.reason == "REVERSAL_UNCONFIRMED:RC_12" and t1.rev_last_rc == "12"
    assert a1 and a2


def test_a_host_silent_on_reversals_for_ten_minutes_loses_nothing_to_manual_work() -> None:
    """Timeouts never count toward the cap: the reversal repeats (0401, backoff capped) until the
    host answers again (jPOS-EE SAF: repeat until answered or expired)."""
    e = engine()
    for i in range(1, 6):
        e.submit(req(i), NOW)
    e.on_host_down(NOW + 1)
    e.on_host_up(NOW + 1)
    now, sends = NOW + 1, 0
    while now < NOW + 600:  # ten minutes of silence, simulated time
        now += 1
        sends += sum(isinstance(a, SendHost) and a.fields["t"] in ("0400", "0401") for a in e.tick(now))
    assert sends > 5 * CFG.reversal_max_attempts, "silence is repeated past the refusal cap"
    assert not [t for t in e.txns.values() if t.state is TxnState.NEEDS_MANUAL]
    for _ in range(200):  # the host is back
        now += 1
        for a in e.tick(now):
            if isinstance(a, SendHost) and a.fields["t"] in ("0400", "0401"):
                e.host_message(response(a, "00"), now)
        if not e.pending_reversals():
            break
    assert all(e.txns[req(i).key].state is TxnState.REVERSED for i in range(1, 6))


def test_an_unanswered_reversal_expires_to_needs_manual_after_its_horizon() -> None:
    import dataclasses

    e = Engine(dataclasses.replace(CFG, reversal_max_age_s=3600.0), FakeCrypto(), random.Random(1))
    e.on_host_up(NOW)
    e.submit(req(), NOW)
    e.on_host_down(NOW + 1)
    now = NOW + 1
    for _ in range(1000):  # the host stays away for days: a reversal never sent never expires
        now += 3600
        e.tick(now)
    assert e.txns[req().key].state is TxnState.REVERSAL_PENDING
    e.on_host_up(now)  # connected, but silent: the first 0400 goes out now and starts the horizon
    first = now
    told: list[str] = []
    while now < first + 3700 and e.pending_reversals():
        now += 10
        told += [k for k in kinds(e.tick(now)) if k.startswith("reply:")]
    t = e.txns[req().key]
    assert t.state is TxnState.NEEDS_MANUAL and t.reason == "REVERSAL_EXPIRED"
    assert told == ["reply:NEEDS_MANUAL"], "the reader, told REVERSAL_PENDING, is told the final state"
    assert first + 3600 <= now <= first + 3610 + CFG.reversal_timeout_s


def test_host_down_at_submit_declines_cleanly_without_sending() -> None:
    e = Engine(CFG, FakeCrypto(), random.Random(1))
    acts = e.submit(req(), NOW)
    assert kinds(acts) == ["append:intent", "append:outcome", "reply:DECLINED"]
    assert acts[2].result.reason == "NO_HOST"


def test_recovery_reverses_every_intent_without_outcome_and_repeats_inflight_as_0401() -> None:
    log = Log()
    e = engine(log)
    log.take(e.submit(req(1), NOW))  # crashed after intent (maybe sent)
    a2 = log.take(e.submit(req(2), NOW))
    log.take(e.host_message(response(a2[1]), NOW + 1))  # approved
    log.take(e.submit(req(3), NOW))
    log.take(e.tick(NOW + 5))  # 3 (and 1) timed out, reversal 0400 sent, then crash
    r = Engine.restore(CFG, FakeCrypto(), log.entries, random.Random(2))
    rec = r.recover(NOW + 100)
    assert rec == []  # nothing was left without an outcome
    assert r.txns[req(2).key].state is TxnState.APPROVED
    r.on_host_up(NOW + 100)
    # simulate a crash right after an intent: restore from a log that only has the intent
    log2 = Log()
    e2 = engine(log2)
    log2.take(e2.submit(req(9), NOW)[:1])
    r2 = Engine.restore(CFG, FakeCrypto(), log2.entries)
    assert kinds(r2.recover(NOW + 1)) == ["append:reversal_pending"]
    sends = [a for a in r2.on_host_up(NOW + 1) if isinstance(a, SendHost)]
    assert [s.fields["t"] for s in sends] == ["0400"]
    r3 = Engine.restore(CFG, FakeCrypto(), log.entries)
    r3.recover(NOW + 1)
    repeats = [a.fields["t"] for a in r3.on_host_up(NOW + 1) if isinstance(a, SendHost)]
    assert repeats == ["0401", "0401"], "reversals in flight at the crash are repeated as 0401"


def test_stan_is_allocated_from_the_journal_and_wraps() -> None:
    log = Log()
    e = engine(log)
    e.last_stan = C.STAN_MAX - 1
    log.take(e.submit(req(1), NOW))
    log.take(e.submit(req(2), NOW))
    assert [e.txns[req(i).key].stan for i in (1, 2)] == [C.STAN_MAX, 1]
    r = Engine.restore(CFG, FakeCrypto(), log.entries)
    assert r.last_stan == 1
    acts = r.submit(req(3), NOW)
    assert acts[0].records[0][2]["stan"] == 2


def test_unmatched_and_malformed_host_messages_are_journaled_not_raised() -> None:
    e = engine()
    for f in ({"t": "0210", "11": "123456", "39": "00"}, {"t": "02x0"}, {}, {"t": "0210", "11": "abc"}):
        acts = e.host_message(f, NOW)
        assert kinds(acts) == ["append:unmatched_response"]
    g = e.host_garbage("HOST_UNDECODABLE", "field 39 too long", 40, "ab" * 8, NOW)
    assert kinds(g) == ["append:host_garbage"]


def test_final_transactions_are_evicted_and_read_back_for_idempotency_and_status() -> None:
    import dataclasses

    from guard.core.engine import Load
    from guard.runtime import restore

    log = Log()
    cfg = dataclasses.replace(CFG, keep_final=2)

    class Store:
        def entries(self) -> list[E]:
            return list(log.entries)

        def entries_for(self, key: str) -> list[E]:
            return [e for e in log.entries if e.txn == key]

        def archived_key_hashes(self) -> list[int]:
            return []

    store = Store()
    e = Engine(cfg, FakeCrypto(), random.Random(1))
    log.take(e.on_host_up(NOW))
    for i in range(1, 6):
        acts = log.take(e.submit(req(i, amount=1000 + i), NOW))
        log.take(e.host_message(response(acts[1]), NOW))
    assert len(e.txns) == 2 and e.stats["evicted"] == 3
    # The engine does not read the journal: it asks for the data, having changed nothing.
    before = (dict(e.txns), e.last_stan, dict(e.stats))
    need = e.submit(req(1, amount=1001), NOW)
    assert need == [Load((req(1).key,))] and (dict(e.txns), e.last_stan, dict(e.stats)) == before
    old = restore.call(e, store, lambda: e.submit(req(1, amount=1001), NOW))  # same id, same request
    assert kinds(old) == ["reply:APPROVED"] and old[0].result.approval_code == "A1B2C3"
    with pytest.raises(IdempotencyConflict):
        restore.call(e, store, lambda: e.submit(req(2, amount=9999), NOW))
    # STATUS is a query: it answers from the entries it is given and changes nothing.
    before = (dict(e.txns), dict(e.stats))
    assert e.status(req(3).key) == Load((req(3).key,))
    assert restore.status(e, store, req(3).key).state is TxnState.APPROVED
    assert (dict(e.txns), dict(e.stats)) == before
    r = restore.restore_engine(cfg, FakeCrypto(), store)
    assert len(r.txns) <= 3 and restore.status(r, store, req(1).key).state is TxnState.APPROVED


def test_key_filter_has_no_false_negatives_and_few_false_positives() -> None:
    from guard.core.keyfilter import KeyFilter

    f = KeyFilter()
    keys = [f"R1:{i:032x}" for i in range(100_000)]
    for k in keys:
        f.add(k)
    assert all(k in f for k in keys), "an evicted id must always be looked up in the journal"
    fp = sum(f"R2:{i:032x}" in f for i in range(20_000))
    assert fp < 20_000 * 0.05, f"{fp} false positives in 20,000 new ids"


def test_timers_find_the_one_sale_in_flight_among_thousands_of_final_ones() -> None:
    """Loop rounds look only at watched transactions; a sale in flight (live or restored from the
    journal) must still time out and be reversed when thousands of final ones sit in memory."""
    log = Log()
    e = engine(log)
    for i in range(1, 3001):
        send = next(a for a in log.take(e.submit(req(i), NOW)) if isinstance(a, SendHost))
        log.take(e.host_message(response(send), NOW))
    assert not e.busy() and e.next_deadline() == NOW + 1e9  # only the idle echo is due
    send = next(a for a in log.take(e.submit(req(5000), NOW + 1)) if isinstance(a, SendHost))
    assert e.busy() and e.next_deadline() == NOW + 1 + CFG.host_timeout_s
    assert len(e._watch) <= 1, "final transactions are not watched"
    acts = log.take(e.tick(NOW + 1 + CFG.host_timeout_s))
    assert any(isinstance(a, SendHost) and a.fields["t"] == C.MTI_REVERSAL for a in acts)
    assert e.status(send.key).state is TxnState.REVERSAL_PENDING  # type: ignore[union-attr]

    crashed = Log()
    crashed.entries = [x for x in log.entries if not (x.txn == send.key and x.kind != "intent")]
    r = Engine.restore(CFG, FakeCrypto(), crashed.entries, random.Random(1))
    assert r.busy(), "a restored intent without an outcome is watched"
    recovered = r.recover(NOW + 10)
    assert any(isinstance(a, Append) and a.records[0][0] == "reversal_pending" for a in recovered)


def test_a_voided_sale_read_back_from_the_journal_still_names_its_void() -> None:
    """The link sale -> VOID lives in the sale's own reversal_pending record, so a sale rebuilt
    from its entries alone (evicted, archived) knows which VOID follows its reversal."""
    from guard.core.txn import rebuild as _rebuild

    log = Log()
    e = engine(log)
    send = next(a for a in log.take(e.submit(req(1), NOW)) if isinstance(a, SendHost))
    log.take(e.host_message(response(send), NOW))
    void = Request("R1", (2).to_bytes(16, "big"), TxnKind.VOID, 1000, "978", None, (1).to_bytes(16, "big"))  # type: ignore[arg-type]
    log.take(e.submit(void, NOW + 1))
    rebuilt = _rebuild(send.key, [x for x in log.entries if x.txn == send.key])  # type: ignore[arg-type]
    assert rebuilt is not None and rebuilt.state is TxnState.REVERSAL_PENDING and rebuilt.voided_by == void.key


def test_queries_change_nothing() -> None:
    """status, last_for_reader, next_deadline, busy, pending_work are queries: the engine's state
    (transactions, indexes, counters) is the same after them."""
    import dataclasses

    e = Engine(dataclasses.replace(CFG, keep_final=1), FakeCrypto(), random.Random(1))
    e.on_host_up(NOW)
    for i in range(1, 4):
        e.host_message(response(next(a for a in e.submit(req(i), NOW) if isinstance(a, SendHost))), NOW)
    e.submit(req(9), NOW)  # one in flight
    e.txns[req(9).key].state = TxnState.SENT

    def snapshot() -> tuple[Any, ...]:
        return (repr(sorted(e.txns.items())), list(e._watch), list(e._finals), list(e._saf), dict(e.stats),
                e.last_stan, dict(e.by_stan), bytes(e._evicted.bits))

    before = snapshot()
    for key in (req(1).key, req(3).key, req(9).key, "R1:" + "ff" * 16):
        e.status(key)
    e.last_for_reader("R1")
    e.next_deadline()
    e.busy()
    e.pending_work()
    assert snapshot() == before
