"""The strict BER-TLV parser (guard.core.emv) and the ICC rules: round trips of well-formed data,
never anything but RequestInvalid on arbitrary bytes, forbidden tags found at any depth."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.core import emv
from guard.core.errors import RequestInvalid

PRIMITIVE_TAGS = [0x82, 0x84, 0x95, 0x9A, 0x9C, 0x50, 0x5F2A, 0x5F34, 0x9F02, 0x9F10, 0x9F1A, 0x9F26, 0x9F27,
                  0x9F33, 0x9F34, 0x9F35, 0x9F36, 0x9F37, 0x9B, 0x91]


def enc_tag(tag: int) -> bytes:
    return tag.to_bytes((tag.bit_length() + 7) // 8, "big")


def enc_len(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else (b"\x81" + bytes([n]) if n < 0x100 else b"\x82" + n.to_bytes(2, "big"))


def tlv(tag: int, value: bytes) -> bytes:
    return enc_tag(tag) + enc_len(len(value)) + value


@st.composite
def icc_objects(draw: st.DrawFn, max_total: int = emv.ICC_MAX_LEN) -> bytes:
    tags = draw(st.lists(st.sampled_from(PRIMITIVE_TAGS), unique=True, min_size=1, max_size=8))
    out = b""
    for t in tags:
        v = draw(st.binary(max_size=12))
        out += tlv(t, v)
    if draw(st.booleans()):
        out += tlv(0x71, tlv(0x9F18, b"\x00\x00\x00\x01") + tlv(0x86, b"\x84\x24\x00\x00\x08"))
    return out[:0] if len(out) > max_total else out


valid_icc = icc_objects().filter(bool)


@settings(max_examples=300, deadline=None)
@given(data=valid_icc)
def test_well_formed_icc_parses_and_keeps_every_byte(data: bytes) -> None:
    objs = emv.check_icc(data)
    assert b"".join(enc_tag(o.tag) + enc_len(len(o.value)) + o.value for o in objs) == data


@settings(max_examples=300, deadline=None)
@given(data=valid_icc, cut=st.integers(1, 40))
def test_a_cut_short_object_is_malformed(data: bytes, cut: int) -> None:
    last_len = len(emv.parse_tlv(data)[-1].value)
    if cut > last_len:
        return
    with pytest.raises(RequestInvalid):
        emv.check_icc(data[:-cut] if cut <= last_len else data)


@pytest.mark.parametrize("tag", sorted(emv.FORBIDDEN_TAGS))
def test_forbidden_tags_are_refused_even_inside_a_template(tag: int) -> None:
    for data in (tlv(tag, b"\x47\x61"), tlv(0x70, tlv(0x9F27, b"\x80") + tlv(tag, b"\x47\x61"))):
        with pytest.raises(RequestInvalid) as exc:
            emv.check_icc(data)
        assert exc.value.code == "REQUEST_ICC_FORBIDDEN_TAG"


@pytest.mark.parametrize("data", [
    b"\x9f", b"\x9f\x27", b"\x9f\x27\x02\x80", b"\x95\x80", b"\x95\x83\x00\x00\x01\x00", b"\x95\x81\x05" + bytes(5),
    b"\x00\x95\x01\x00", b"\x9f\x80\x01\x01\x00", b"\x9f\xff\xff\x01\x00", tlv(0x95, bytes(5)) * 2,
    tlv(0x70, tlv(0x70, tlv(0x70, b"\x95\x00"))),
])
def test_malformed_is_refused(data: bytes) -> None:
    with pytest.raises(RequestInvalid) as exc:
        emv.check_icc(data)
    assert exc.value.code == "REQUEST_ICC_MALFORMED"


def test_over_long_is_refused_before_parsing() -> None:
    with pytest.raises(RequestInvalid) as exc:
        emv.check_icc(tlv(0x9F10, bytes(253)))
    assert exc.value.code == "REQUEST_ICC_TOO_LONG"


def test_facts_keep_only_non_sensitive_tags() -> None:
    data = (tlv(0x9F27, b"\x40") + tlv(0x9F36, b"\x01\x02") + tlv(0x95, b"\x00\x00\x00\x80\x00") + tlv(0x9B, b"\xe8\x00")
            + tlv(0x4F, bytes.fromhex("A0000000041010")) + tlv(0x50, b"MASTERCARD") + tlv(0x9F26, bytes(8)))
    assert emv.facts(data) == {"cryptogram": "TC", "atc": "0102", "tvr": "0000008000", "tsi": "E800",
                               "aid": "A0000000041010", "label": "MASTERCARD"}


def test_issuer_data_from_a_host_is_dropped_when_malformed() -> None:
    assert emv.issuer_data(tlv(0x91, bytes(10))) == tlv(0x91, bytes(10))
    assert emv.issuer_data(b"\x91\x0a") == b""
    assert emv.issuer_data(tlv(0x57, bytes(8))) == b""


def test_track2_must_name_the_same_card() -> None:
    emv.check_track2("4761739001010119D29122010000", "4761739001010119")
    for bad in ("4761739001010119", "4761739001010110D2912", "4761739001010119D29X2", "4" * 30 + "D" + "1" * 10):
        with pytest.raises(RequestInvalid):
            emv.check_track2(bad, "4761739001010119")


def test_facts_never_hold_a_card_number_like_run_the_journal_would_refuse() -> None:
    import json

    from guard.journal.records import looks_like_pan

    data = tlv(0x50, b"4761739001010119") + tlv(0x84, bytes.fromhex("4761739001010119")) + tlv(0x9F36, b"\x00\x01")
    f = emv.facts(data)
    assert not looks_like_pan(json.dumps(f)) and f["atc"] == "0001"
    assert emv.facts(tlv(0x84, bytes.fromhex("A0000000031010")))["aid"] == "A0000000031010"
