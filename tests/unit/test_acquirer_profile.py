"""guard.simulation.acquirer through HostCore: every answer kind real acquirers give and what the
ledger makes of it (debit, no debit, partial amount), the forcing API, reversal silences,
refusals and 0411, seeded reproducibility, and the default profile's unchanged behaviour."""

from __future__ import annotations

from collections import Counter

import pytest

from guard.core import constants as C
from guard.core.errors import ConfigError
from guard.hostlink.iso import echo_mismatches
from guard.simulation.acquirer import (
    APPROVAL_CODES,
    DECLINE_CODES,
    PARTIAL_CODES,
    SYSTEM_CODES,
    AcquirerProfile,
    answer_class,
    books_by_default,
    field54,
)
from guard.simulation.hostsim import HostCore
from guard.simulation.hosttypes import ACTION_DROP, ACTION_SEND
from tests.support.hostmsgs import MID, NOW, TID, one, reversal, sale


def core(profile: AcquirerProfile | None = None, seed: int = 1, dup: bool = True) -> HostCore:
    return HostCore(seed=seed, dup_detection=dup, profile=profile)


def only(code: str, **kw: object) -> AcquirerProfile:
    """A profile that answers every new sale with ``code`` (a field-39 code or a wrong MTI)."""
    return AcquirerProfile(name="only", **kw).with_answers({code: 1.0})  # type: ignore[arg-type]


# --- the documented classes --------------------------------------------------------------------


def test_code_tables_are_disjoint_and_classify() -> None:
    tables = [set(APPROVAL_CODES), set(PARTIAL_CODES), set(DECLINE_CODES), set(SYSTEM_CODES), {"94"}]
    assert sum(len(t) for t in tables) == len(set().union(*tables))
    assert [answer_class(c) for c in ("00", "08", "10", "05", "94", "09", "96", "Q7")] == [
        "approval", "approval", "partial", "decline", "duplicate", "system", "system", "unknown"]
    assert [books_by_default(c) for c in ("11", "10", "51", "94", "91", "X1")] == [True, True, False, False, True, True]


def test_engine_never_reads_a_money_moving_or_ambiguous_code_as_a_clean_decline() -> None:
    """The oracle's point: the engine's default declined/duplicate classes hold only codes the
    acquirers' documentation calls declines (or 94), and every documented approval is approved or partial."""
    assert C.RC_DECLINED_CLASS <= set(DECLINE_CODES)
    assert C.RC_DUPLICATE_CLASS == {"94"}
    assert set(APPROVAL_CODES) <= C.RC_APPROVED_CLASS | C.RC_PARTIAL_CLASS
    assert set(PARTIAL_CODES) <= C.RC_PARTIAL_CLASS
    assert not set(SYSTEM_CODES) & (C.RC_APPROVED_CLASS | C.RC_DECLINED_CLASS | C.RC_DUPLICATE_CLASS)


# --- answer kinds and the ledger ---------------------------------------------------------------


@pytest.mark.parametrize("rc", ["08", "11", "16"])
def test_approval_variants_debit_the_full_amount(rc: str) -> None:
    host = core(only(rc))
    resp = one(host, sale(amount=1234))
    assert resp["t"] == "0210" and resp["39"] == rc and len(resp["38"]) == 6 and resp["4"] == f"{1234:012d}"
    (d,) = host.debits()
    assert (d.amount, d.response, d.requested_amount) == (1234, rc, None)
    assert host.net_debits(TID, MID, 1, "1122") == 1 and host.stats()["answers"] == {f"approval:{rc}": 1}


def test_approve_rule_approval_variants_book_too() -> None:
    """The ledger follows the acquirer's documentation, not posguard: an 08 from the rule is a debit."""
    host = HostCore(seed=1, dup_detection=True, approve_rule=lambda f: "08")
    assert one(host, sale())["39"] == "08" and host.total_net_debits() == 1


def test_partial_approval_in_field_4_debits_the_partial_amount() -> None:
    host = core(only("10"))
    amounts = []
    for stan in range(1, 41):
        resp = one(host, sale(stan=stan, amount=1000))
        assert resp["39"] == "10" and "54" not in resp and "38" in resp
        amounts.append(int(resp["4"]))
    assert all(1 <= a <= 999 for a in amounts) and len(set(amounts)) > 10
    assert [d.amount for d in host.debits()] == amounts
    assert {d.requested_amount for d in host.debits()} == {1000}
    assert host.ledger()["totals"]["net_amount"] == sum(amounts)


def test_partial_approval_in_field_54_keeps_field_4() -> None:
    host = core(only("10", partial_field="54"))
    req = sale(amount=5000)
    resp = one(host, req)
    assert echo_mismatches(req, resp) == [] and resp["39"] == "10"
    f54 = resp["54"]
    assert len(f54) == 20 and f54[:4] == "0002" and f54[4:7] == "978" and f54[7] == "C"
    (d,) = host.debits()
    assert int(f54[8:]) == d.amount < 5000 and f54 == field54(d.amount, "978")
    row = host.settlement_rows()[0]
    assert (row["amount"], row["response"]) == (str(d.amount), "10")


@pytest.mark.parametrize("rc", ["05", "51", "12", "01", "43"])
def test_declines_never_debit(rc: str) -> None:
    host = core(only(rc))
    resp = one(host, sale())
    assert resp["39"] == rc and "38" not in resp and host.total_net_debits() == 0


@pytest.mark.parametrize("rc", ["09", "91", "96", "Q7", "X1"])
@pytest.mark.parametrize("share", [0.0, 1.0])
def test_system_and_unknown_codes_debit_exactly_when_booked(rc: str, share: float) -> None:
    host = core(only(rc, booked_share=share))
    resp = one(host, sale())
    assert resp["39"] == rc and "38" not in resp
    assert host.total_net_debits() == int(share)
    if share:
        (d,) = host.debits()
        assert d.response == rc and d.amount == 1000
    rev = one(host, reversal())
    assert rev["39"] == ("00" if share else "25") and host.total_net_debits() == 0


def test_booked_share_is_seeded_and_near_its_rate() -> None:
    def run(seed: int) -> list[int]:
        host = core(only("96", booked_share=0.3), seed=seed)
        for stan in range(1, 501):
            one(host, sale(stan=stan))
        return [int(s) for (_, _, s, _) in host.net_by_key()]

    a, b, c = run(4), run(4), run(5)
    assert a == b and a != c and 100 < len(a) < 200


@pytest.mark.parametrize("mti", ["0230", "0810"])
def test_wrong_mti_answers_are_booked(mti: str) -> None:
    host = core(only(mti))
    resp = one(host, sale())
    assert resp["t"] == mti and resp["39"] == "00" and "38" in resp
    assert host.total_net_debits() == 1 and host.stats()["answers"] == {f"wrong_mti:{mti}": 1}


def test_profile_answers_only_new_sales() -> None:
    """Advices, keepalives, format errors, duplicates and tombstoned originals keep their answers."""
    host = core(only("96", booked_share=1.0))
    assert one(host, dict(sale(stan=7), t="0220"))["39"] == "00"
    assert one(host, {"t": "0800", "11": "000042", "41": TID, "70": "301"})["39"] == "00"
    assert one(host, {k: v for k, v in sale().items() if k != "2"})["39"] == "30"
    assert one(host, reversal(stan=9))["39"] == "25"
    assert one(host, sale(stan=9))["39"] == "68"
    assert one(host, sale(stan=1))["39"] == "96"
    assert one(host, sale(stan=1))["39"] == "94"
    assert host.stats()["answers"] == {"system:96+booked": 1}


def test_faults_combine_with_answers() -> None:
    host = core(only("10"))
    host.force("debit_drop_response")
    (r,) = host.handle(sale(), NOW)
    assert r.action == ACTION_DROP and r.fault == "debit_drop_response" and r.answer == "partial:10"
    assert host.net_debits(TID, MID, 1, "1122") == 1 and host.debits()[0].amount < 1000
    host.force("drop_request")
    assert host.handle(sale(stan=2), NOW)[0].answer is None and host.total_net_debits() == 1


# --- the forcing API ---------------------------------------------------------------------------


@pytest.mark.parametrize(("rc", "debits"), [("00", 1), ("08", 1), ("11", 1), ("16", 1), ("10", 1), ("05", 0),
                                            ("51", 0), ("94", 0), ("09", 1), ("91", 1), ("96", 1), ("Q7", 1)])
def test_force_answer_books_by_documented_class(rc: str, debits: int) -> None:
    host = core()
    host.force_answer(rc)
    resp = one(host, sale())
    assert resp["39"] == rc and host.total_net_debits() == debits
    assert one(host, sale(stan=2))["39"] == "00", "one forced answer, then the plain host again"
    assert host.stats()["answers"] == {f"forced:{rc}": 1} and host.stats()["answers_forced_pending"] == 0


def test_force_answer_options_and_fifo() -> None:
    host = core(only("96", booked_share=1.0))
    host.force_answer("96", booked=False)
    host.force_answer("10", approved_amount=250, count=2)
    host.force_answer("00", mti="0230")
    host.force_answer("10", approved_amount=300, amount_field="54")
    host.force_answer("00", approved_amount=1000, booked=False)
    assert host.stats()["answers_forced_pending"] == 6
    assert one(host, sale(stan=1))["39"] == "96" and host.net_debits(TID, MID, 1, "1122") == 0
    for stan in (2, 3):
        resp = one(host, sale(stan=stan))
        assert (resp["39"], resp["4"]) == ("10", f"{250:012d}")
    assert one(host, sale(stan=4))["t"] == "0230"
    resp = one(host, sale(stan=5))
    assert resp["4"] == f"{1000:012d}" and resp["54"] == field54(300, "978")
    assert one(host, sale(stan=6))["39"] == "00" and host.net_debits(TID, MID, 6, "1122") == 0
    assert [(d.stan, d.amount, d.response) for d in host.debits()] == [
        ("000002", 250, "10"), ("000003", 250, "10"), ("000004", 1000, "00"), ("000005", 300, "10")]
    assert one(host, sale(stan=7))["39"] == "96", "then the profile again"


def test_forced_answer_waits_for_a_new_sale() -> None:
    host = core()
    host.force_answer("08")
    one(host, {"t": "0800", "11": "000042", "41": TID, "70": "301"})
    one(host, dict(sale(stan=5), t="0220"))
    host.force("drop_request")
    assert host.handle(sale(stan=1), NOW)[0].action == ACTION_DROP
    assert one(host, sale(stan=2))["39"] == "08"


@pytest.mark.parametrize("bad", [
    {"rc": "0"}, {"rc": "approved"}, {"rc": "00", "mti": "21"}, {"rc": "10", "approved_amount": -1},
    {"rc": "00", "count": 0}, {"rc": "10", "amount_field": "5"},
])
def test_force_answer_rejects_bad_arguments(bad: dict[str, object]) -> None:
    rc = str(bad.pop("rc"))
    with pytest.raises(ConfigError):
        core().force_answer(rc, **bad)  # type: ignore[arg-type]


# --- reversals ---------------------------------------------------------------------------------


def test_0401_answered_0411_and_0421_answered_0431() -> None:
    host = core()
    one(host, sale())
    host.force_reversal_answer("0411")
    rev = one(host, reversal(mti="0401"))
    assert rev["t"] == "0411" and rev["39"] == "00" and host.total_net_debits() == 0
    host.force_reversal_answer("0411")
    assert one(host, reversal(mti="0421"))["t"] == "0431"


def test_seeded_0411_only_answers_repeats() -> None:
    host = core(AcquirerProfile(reversal_0411=1.0))
    one(host, sale())
    assert one(host, reversal())["t"] == "0410"
    assert one(host, reversal(mti="0401"))["t"] == "0411"


@pytest.mark.parametrize("rc", ["12", "96"])
def test_refused_reversal_leaves_the_debit(rc: str) -> None:
    host = core()
    sold = one(host, sale())
    host.force_reversal_answer(f"refuse:{rc}", count=2)
    for mti in ("0400", "0401"):
        rev = one(host, reversal(mti=mti))
        assert rev["t"] == "0410" and rev["39"] == rc and rev["37"] == sold["37"]
        assert host.net_debits(TID, MID, 1, "1122") == 1
    assert one(host, reversal(mti="0401"))["39"] == "00" and host.total_net_debits() == 0
    assert [r["effect"] for r in host.ledger()["reversals"]] == ["refused", "refused", "reversed"]
    assert [r["response"] for r in host.settlement_rows() if r["type"] == "REVERSAL"] == ["00"]


def test_refusal_of_an_unknown_original_leaves_no_tombstone() -> None:
    host = core()
    host.force_reversal_answer("refuse:96")
    assert one(host, reversal(stan=3))["39"] == "96"
    assert one(host, sale(stan=3))["39"] == "00" and host.ledger()["tombstones"] == []


def test_forced_silence_drops_the_reversal_unprocessed() -> None:
    host = core()
    one(host, sale())
    host.force_reversal_answer("silence")
    (r,) = host.handle(reversal(), NOW)
    assert r.action == ACTION_DROP and r.fields is None and r.answer == "forced:silence"
    assert host.net_debits(TID, MID, 1, "1122") == 1 and host.ledger()["reversals"] == []
    assert one(host, reversal(mti="0401"), NOW + 1)["39"] == "00"
    assert host.stats()["reversals_silenced"] == 1


def test_forced_silence_window_and_sales_still_answered() -> None:
    host = core()
    one(host, sale())
    host.force_reversal_answer("silence:60")
    for dt in (0, 10, 59.9):
        assert host.handle(reversal(mti="0401"), NOW + dt)[0].action == ACTION_DROP
    assert one(host, sale(stan=2), NOW + 30)["39"] == "00"
    assert one(host, reversal(mti="0401"), NOW + 60)["39"] == "00"
    assert host.stats()["reversals_silenced"] == 3


def test_profile_silence_windows_count_from_the_first_request() -> None:
    host = core(AcquirerProfile(silence_windows=((0.0, 90.0), (200.0, 210.0))))
    one(host, sale(), NOW)
    for dt, silent in ((5, True), (89, True), (95, False), (205, True), (211, False)):
        replies = host.handle(reversal(mti="0401"), NOW + dt)
        assert (replies[0].action == ACTION_DROP) is silent, dt
    assert host.total_net_debits() == 0


def test_seeded_silence_lasts_its_duration_and_a_new_profile_ends_it() -> None:
    host = core(AcquirerProfile(reversal_silence=1.0, reversal_silence_s=30.0))
    one(host, sale())
    labels = [host.handle(reversal(mti="0401"), NOW + dt)[0].answer for dt in (0, 29)]
    assert labels == ["silence:start", "silence"]
    host.profile = AcquirerProfile()
    assert one(host, reversal(mti="0401"), NOW + 29.5)["39"] == "00"


def test_silence_comes_before_faults() -> None:
    host = core()
    one(host, sale())
    host.force("drop_request")
    host.force_reversal_answer("silence")
    assert host.handle(reversal(), NOW)[0].fault is None
    assert host.handle(reversal(mti="0401"), NOW)[0].fault == "drop_request"
    assert host.total_net_debits() == 1


@pytest.mark.parametrize("kind", ["refuse:00", "refuse:25", "refuse:94", "refuse:", "silence:-1", "0410", "nap"])
def test_force_reversal_answer_rejects_bad_kinds(kind: str) -> None:
    with pytest.raises(ConfigError):
        core().force_reversal_answer(kind)


# --- profiles -----------------------------------------------------------------------------------


def test_default_profile_keeps_the_old_host() -> None:
    """Same replies, ledger and fault draws with and without the default profile; nothing drawn."""
    rates = {"drop_request": 0.1, "garbage": 0.1, "wrong_echo": 0.1, "delay_response": 0.1}

    def run(profile: AcquirerProfile | None) -> tuple[list[object], list[object], dict[str, object]]:
        host = HostCore(seed=9, dup_detection=True, faults=rates, profile=profile)
        out = []
        for i in range(1, 200):
            fields = reversal(stan=i - 1, mti="0401") if i % 5 == 0 else sale(stan=i, amount=1000 + i)
            out.append([(r.action, r.fields and {k: v for k, v in r.fields.items() if k != "7"}, r.answer)
                        for r in host.handle(fields, NOW + i)])
        led = host.ledger()
        return out, [(d["stan"], d["amount"], d["reversed"]) for d in led["debits"]], host.stats()

    plain, default = run(None), run(AcquirerProfile())
    assert plain[:2] == default[:2] and plain[2]["answers"] == {} == default[2]["answers"]
    assert AcquirerProfile().is_plain and not AcquirerProfile.real_world().is_plain
    # the profile has its own stream: the fault draws of a sales-only run do not move
    sales_only = [sale(stan=i) for i in range(1, 300)]
    logs = []
    for p in (None, AcquirerProfile.real_world()):
        host = HostCore(seed=3, dup_detection=True, faults=rates, profile=p)
        for f in sales_only:
            host.handle(f, NOW)
        logs.append([(f.kind, f.stan) for f in host.fault_log])
    assert logs[0] == logs[1]


def test_seeded_profile_rates_are_reproducible_and_near_their_rates() -> None:
    profile = AcquirerProfile(answers={"08": 0.1, "10": 0.1, "96": 0.1, "Q7": 0.05}, wrong_mti={"0230": 0.05})

    def run(seed: int) -> list[str]:
        host = core(profile, seed=seed)
        return [resp["39"] + resp["t"] for resp in (one(host, sale(stan=i)) for i in range(1, 2001))]

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    counts = Counter(x[:2] for x in a)
    for rc, rate in (("08", 0.1), ("10", 0.1), ("96", 0.1), ("Q7", 0.05)):
        assert abs(counts[rc] / 2000 - rate) < 0.03, (rc, counts[rc])
    assert abs(sum(1 for x in a if x.endswith("0230")) / 2000 - 0.05) < 0.02


def test_real_world_profile_exercises_every_kind() -> None:
    host = core(AcquirerProfile.real_world(), seed=2)
    now = NOW
    for stan in range(1, 3001):
        now += 1
        resp = host.handle(sale(stan=stan), now)[0].fields
        assert resp is not None
        for mti in ("0400", "0401"):
            host.handle(reversal(stan=stan, mti=mti), now + 0.5)
    kinds = {k.split(":")[0] for k in host.stats()["answers"]}
    assert {"approval", "partial", "system", "unknown", "wrong_mti", "silence", "refuse", "0411"} <= kinds
    ledger = host.ledger()
    assert any(d["response"] not in ("00", "10") for d in ledger["debits"])
    assert any(d["requested_amount"] for d in ledger["debits"])


def test_for_seed_is_reproducible_valid_and_covers_every_kind() -> None:
    assert AcquirerProfile.for_seed(5) == AcquirerProfile.for_seed(5)
    profiles = [AcquirerProfile.for_seed(s) for s in range(1, 101)]
    assert len({repr(p) for p in profiles}) > 90
    codes = set().union(*(p.answers for p in profiles))
    assert {"08", "11", "16", "10", "09", "91", "96", "Q7", "X1"} <= codes
    assert {"0230", "0810"} <= set().union(*(p.wrong_mti for p in profiles))
    assert {"12", "96"} <= set().union(*(p.reversal_refusals for p in profiles))
    assert any(p.reversal_silence for p in profiles) and any(p.silence_windows for p in profiles)
    assert any(p.reversal_0411 for p in profiles) and {p.partial_field for p in profiles} == {"4", "54"}
    assert max(max(p.reversal_refusals.values(), default=0) for p in profiles) <= 0.2
    for seed in range(1, 30):
        full, no10 = AcquirerProfile.for_seed(seed), AcquirerProfile.for_seed(seed, partial=False)
        assert no10.answers == {k: v for k, v in full.answers.items() if k != "10"}
        assert (no10.reversal_refusals, no10.silence_windows) == (full.reversal_refusals, full.silence_windows)


@pytest.mark.parametrize("bad", [
    {"answers": {"0": 0.1}}, {"answers": {"08": 1.5}}, {"answers": {"08": 0.6, "10": 0.5}},
    {"answers": {"08": 0.6}, "wrong_mti": {"0230": 0.5}}, {"wrong_mti": {"0210": 0.1}},
    {"wrong_mti": {"230": 0.1}}, {"reversal_refusals": {"00": 0.1}}, {"reversal_refusals": {"25": 0.1}},
    {"booked_share": -0.1}, {"partial_field": "3"}, {"reversal_silence": 2.0}, {"reversal_silence_s": -1.0},
    {"silence_windows": ((10.0, 5.0),)}, {"reversal_0411": float("nan")},
])
def test_profile_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        AcquirerProfile(**bad)  # type: ignore[arg-type]


def test_replies_name_their_answer() -> None:
    host = core(only("11"))
    (r,) = host.handle(sale(), NOW)
    assert r.action == ACTION_SEND and r.answer == "approval:11"
    assert host.ledger()["profile"] == "only"
