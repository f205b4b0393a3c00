"""The card fields of a chip sale on the host link: what the executor fills for a 0200, an 0220 and
a reversal, and that the ISO 8583 codec carries them (binary 52 and 55 as hex) both ways."""

from __future__ import annotations

import pytest

from guard.core.host_events import ADVICE_CARD_FIELDS, REVERSAL_CARD_FIELDS, REVERSAL_ICC_FIELDS
from guard.core.model import CardData
from guard.core.txn import card_from_plaintext, card_plaintext
from guard.hostlink.iso import HostCodec, redact
from guard.runtime.executor import card_fields
from guard.simulation.hostsim import issuer_auth_data

PAN = "4761739001010119"
ICC = bytes.fromhex("9F2701809F360200019F26081122334455667788")
CARD = CardData(PAN, "2912", entry_mode="CHIP", pan_seq="001", track2=PAN + "D29122010000", icc=ICC,
                pin_block=bytes.fromhex("0123456789ABCDEF"), ksn=bytes.fromhex("FFFF9876543210E00001"))


def test_a_chip_0200_carries_23_35_52_ksn_and_55() -> None:
    f = card_fields(CARD, None, "62")
    assert f == {"2": PAN, "14": "2912", "23": "001", "35": PAN + "D29122010000", "52": "0123456789ABCDEF",
                 "62": "FFFF9876543210E00001", "55": ICC.hex().upper()}


def test_a_reversal_and_an_advice_never_carry_track2_or_the_pin_block() -> None:
    rev = card_fields(CARD, REVERSAL_CARD_FIELDS | REVERSAL_ICC_FIELDS, "62")
    assert set(rev) == {"2", "14", "23", "55"}
    assert set(card_fields(CARD, REVERSAL_CARD_FIELDS, "62")) == {"2", "14"}
    assert set(card_fields(CARD, ADVICE_CARD_FIELDS, "62")) == {"2", "14", "23", "35", "55"}


def test_the_vault_keeps_track2_and_icc_but_never_the_pin_block() -> None:
    plain = card_plaintext(CARD)
    assert CARD.pin_block.hex().encode() not in plain.lower() and CARD.ksn.hex().encode() not in plain.lower()
    back = card_from_plaintext(plain)
    assert (back.track2, back.icc, back.pan_seq, back.entry_mode) == (CARD.track2, ICC, "001", "CHIP")
    assert not back.pin_block
    assert card_from_plaintext(b"4761739001010119|2912") == CardData(PAN, "2912"), "old vault blobs still open"


@pytest.mark.parametrize("spec", ["default", "default_ascii"])
def test_the_codec_carries_the_chip_fields_both_ways(spec: str) -> None:
    from guard.hostlink.iso import load_spec

    codec = HostCodec(spec=load_spec(spec))
    fields = {"t": "0200", "3": "000000", "4": "000000001250", "7": "1130120000", "11": "000001", "22": "051",
              "41": "TERM0001", "42": "MERCHANT0000001", "49": "978", **card_fields(CARD, None, "62")}
    wire = codec.encode(fields)
    got = codec.decoder().feed(wire)[0]
    assert {k: v for k, v in got.fields.items() if k in fields} == fields  # type: ignore[union-attr]
    answer = {"t": "0210", "3": "000000", "4": "000000001250", "7": "1130120000", "11": "000001", "37": "000000000001",
              "38": "123456", "39": "00", "41": "TERM0001", "42": "MERCHANT0000001", "49": "978",
              "55": issuer_auth_data(bytes(8), "00")}
    back = codec.decoder().feed(codec.encode(answer))[0]
    assert back.fields["55"] == "910A0000000000000000" + "3030"  # type: ignore[union-attr]


def test_logs_redact_track2_pin_block_and_icc() -> None:
    shown = repr(redact(card_fields(CARD, None, "62")))
    assert PAN not in shown and "0123456789ABCDEF" not in shown and ICC.hex().upper() not in shown


def test_the_host_simulator_declines_a_chip_sale_without_field_55_and_answers_one_with_issuer_data() -> None:
    from guard.simulation.hostsim import HostCore
    from tests.support.hostmsgs import one, sale

    core = HostCore(seed=1, dup_detection=True)
    bare = one(core, {**sale(1), "22": "051"})
    assert bare["39"] == "30" and core.total_net_debits() == 0 and core.stats()["chip_without_icc"] == 1
    ok = one(core, {**sale(2), "22": "051", "55": ICC.hex().upper()})
    assert ok["39"] == "00" and ok["55"].startswith("910A") and core.total_net_debits() == 1
    swiped = one(core, {**sale(3), "22": "901"})
    assert swiped["39"] == "00" and "55" not in swiped
