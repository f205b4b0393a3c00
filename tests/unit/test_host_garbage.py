"""The engine's answer to host garbage and to unmatched answers: a flood of unusable frames is
journaled as bounded summaries (counts, bytes, first/last digest), and what a host puts in
fields 41/42 of an answer that is not ours never reaches the journal as a clear card number."""

from __future__ import annotations

from typing import Any

from guard.core import host_events
from guard.core.engine import Append, Engine, EngineConfig
from guard.core.policies import OFF
from guard.core.records import REQUIRED, Kind
from tests.support import FakeCrypto

NOW = 1_760_000_000.0
CFG = EngineConfig("TERM0001", "MERCHANT0000001", host_timeout_s=5, reversal_timeout_s=5, policy=OFF)


def garbage_records(acts: list[Any]) -> list[dict[str, Any]]:
    return [p for a in acts if isinstance(a, Append) for k, _, p in a.records if k is Kind.HOST_GARBAGE]


def test_a_garbage_flood_is_journaled_as_bounded_summaries_that_account_for_every_frame() -> None:
    e = Engine(CFG, FakeCrypto())
    e.on_host_up(NOW)
    items, per_s = 200_000, 10_000  # 200k 3-byte frames over 20 s, the loop ticking every 0.1 s
    recs: list[dict[str, Any]] = []
    for i in range(items):
        now = NOW + i / per_s
        recs += garbage_records(e.host_garbage("HOST_UNDECODABLE" if i % 2 else "HOST_BAD_MTI", "bad", 3,
                                               f"{i:016x}", now))
        if i % 1000 == 0:
            recs += garbage_records(e.tick(now))
    recs += garbage_records(e.on_host_down(NOW + items / per_s))
    assert len(recs) <= 1 + items // host_events.GARBAGE_SUMMARY_ITEMS + 20 / host_events.GARBAGE_INTERVAL_S + 2, len(recs)
    assert sum(r["count"] for r in recs) == items, "every frame is counted"
    assert sum(r["bytes"] for r in recs) == 3 * items
    assert sum(n for r in recs for n in r["codes"].values()) == items
    assert recs[0]["digest"] == f"{0:016x}" and recs[-1]["last"]["digest"] == f"{items - 1:016x}"
    assert all(REQUIRED[Kind.HOST_GARBAGE] <= set(r) for r in recs)
    assert e.stats["host_garbage"] == items


def test_the_first_garbage_is_journaled_at_once_and_a_quiet_interval_resets_the_tally() -> None:
    e = Engine(CFG, FakeCrypto())
    first = garbage_records(e.host_garbage("HOST_UNDECODABLE", "field 39 too long", 40, "ab" * 8, NOW))
    assert first == [{"code": "HOST_UNDECODABLE", "detail": "field 39 too long", "len": 40, "digest": "ab" * 8,
                      "count": 1, "bytes": 40, "codes": {"HOST_UNDECODABLE": 1},
                      "last": {"code": "HOST_UNDECODABLE", "len": 40, "digest": "ab" * 8}, "since": NOW}]
    assert garbage_records(e.host_garbage("HOST_BAD_MTI", "x", 10, "cd" * 8, NOW + 1)) == []
    deadline = e.next_deadline()
    assert deadline is not None and deadline <= NOW + host_events.GARBAGE_INTERVAL_S, "the loop wakes for the summary"
    assert garbage_records(e.tick(NOW + 1)) == []
    summary = garbage_records(e.tick(NOW + host_events.GARBAGE_INTERVAL_S))
    assert [(s["count"], s["bytes"], s["codes"], s["digest"]) for s in summary] == [(1, 10, {"HOST_BAD_MTI": 1}, "cd" * 8)]
    later = NOW + 3 * host_events.GARBAGE_INTERVAL_S
    assert garbage_records(e.tick(later)) == []
    assert [r["count"] for r in garbage_records(e.host_garbage("HOST_BAD_MTI", "x", 10, "ef" * 8, later))] == [1]


def test_a_connection_change_journals_what_the_connection_tallied() -> None:
    e = Engine(CFG, FakeCrypto())
    e.on_host_up(NOW)
    for i in range(5):
        e.host_garbage("HOST_UNDECODABLE", "bad", 7, f"{i:016x}", NOW)
    assert [r["count"] for r in garbage_records(e.on_host_down(NOW + 1))] == [4]
    assert [r["count"] for r in garbage_records(e.host_garbage("HOST_UNDECODABLE", "bad", 7, "00" * 8, NOW + 2))] == [1]
    e.host_garbage("HOST_UNDECODABLE", "bad", 7, "11" * 8, NOW + 2)
    assert [r["count"] for r in garbage_records(e.on_host_up(NOW + 3))] == [1]


def unmatched(mid: str) -> dict[str, Any]:
    e = Engine(CFG, FakeCrypto())
    acts = e.host_message({"t": "0210", "11": "123456", "39": "00", "41": "TERM0001", "42": mid}, NOW)
    (a,) = acts
    assert isinstance(a, Append)
    ((kind, _, payload),) = a.records
    assert kind is Kind.UNMATCHED_RESPONSE
    return payload


def test_card_numbers_with_separators_in_field_42_of_an_unmatched_answer_are_masked() -> None:
    assert unmatched("4222-2222-22222")["42"] == "422222***2222"
    assert unmatched("4222222222222  ")["42"] == "422222***2222  "
    assert unmatched("4222 2222 2222 2")["42"] == "422222***2222"
    assert unmatched("4761739001010119")["42"] == "476173******0119"


def test_merchant_ids_that_are_not_card_numbers_are_kept() -> None:
    assert unmatched("MERCHANT0000001")["42"] == "MERCHANT0000001"
    assert unmatched("OTHERMERCHANT01")["42"] == "OTHERMERCHANT01"
    assert unmatched("SHOP 1234-5678")["42"] == "SHOP 1234-5678"
    assert unmatched("123456789012")["42"] == "123456789012"
