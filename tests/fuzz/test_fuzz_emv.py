"""Fuzzing the strict BER-TLV parser (guard.core.emv) and the reader messages that carry ICC data:
arbitrary and mutated bytes never raise anything but RequestInvalid / MessageError with a
REQUEST_ICC_* or MSG_* code, never quote the data, and whatever is accepted holds no forbidden tag."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.constants import MsgType, Tag
from firmware_bridge.messages import Auth, Complete, MessageError, decode_message, encode_message
from guard.core import emv
from guard.core.errors import RequestInvalid
from guard.journal.records import looks_like_pan
from tests.unit.test_emv import valid_icc

ICC_CODES = {"REQUEST_ICC_MALFORMED", "REQUEST_ICC_TOO_LONG", "REQUEST_ICC_FORBIDDEN_TAG"}


def accepted_is_clean(data: bytes) -> None:
    try:
        objs = emv.check_icc(data)
    except RequestInvalid as e:
        assert e.code in ICC_CODES
        assert len(data) < 4 or data.hex() not in str(e)
        return
    assert len(data) <= emv.ICC_MAX_LEN
    assert not any(o.tag in emv.FORBIDDEN_TAGS for o in emv.walk(objs))
    facts = emv.facts(data)
    assert set(facts) <= {"aid", "label", "atc", "tvr", "tsi", "cvm", "cryptogram"}
    assert not looks_like_pan(json.dumps(facts)), "the journal would refuse the intent: a reader could stop the guard"


@settings(max_examples=3000, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    accepted_is_clean(data)


@settings(max_examples=1000, deadline=None)
@given(label=st.text("0123456789 -", min_size=13, max_size=16), aid=st.binary(min_size=5, max_size=16))
def test_facts_from_digit_labels_and_aids_never_look_like_a_card_number(label: str, aid: bytes) -> None:
    accepted_is_clean(bytes([0x50, len(label)]) + label.encode() + bytes([0x84, len(aid)]) + aid)


@settings(max_examples=2000, deadline=None)
@given(data=valid_icc, flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       insert=st.sampled_from([b"", b"\x57\x02\x47\x61", b"\x5a\x01\x47", b"\x9f\x6b\x01\x00", b"\x00", b"\x9f"]))
def test_mutated_icc(data: bytes, flips: list[tuple[int, int]], insert: bytes) -> None:
    b = bytearray(data)
    for pos, val in flips:
        b[pos % len(b)] = val
    at = flips[0][0] % (len(b) + 1)
    accepted_is_clean(bytes(b[:at]) + insert + bytes(b[at:]))


@settings(max_examples=1000, deadline=None)
@given(icc=st.binary(min_size=1, max_size=300), decision=st.binary(min_size=1, max_size=2))
def test_messages_carrying_icc_decode_or_refuse_with_a_code(icc: bytes, decision: bytes) -> None:
    txn = bytes(16)
    for head in (bytes([MsgType.COMPLETE]), encode_message(Auth(txn, 100, "978", "4761739001010119"))):
        body = bytearray(head)
        if head[0] == MsgType.COMPLETE:
            body += bytes([Tag.TXN_ID]) + (16).to_bytes(2, "big") + txn
            body += bytes([Tag.CARD_DECISION]) + len(decision).to_bytes(2, "big") + decision
        body += bytes([Tag.ICC_DATA]) + len(icc).to_bytes(2, "big") + icc
        try:
            msg = decode_message(bytes(body))
        except MessageError as e:
            assert e.code in ICC_CODES or e.code.startswith("MSG_")
            continue
        assert isinstance(msg, (Auth, Complete)) and msg.icc == icc
        accepted_is_clean(icc)
