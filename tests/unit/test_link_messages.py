"""TLV application messages: round trips, every error code, forward compatibility, no PAN leaks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.constants import MAX_PAYLOAD, STATE_CODES, FrameType, MsgType, Tag
from firmware_bridge.frame import Frame, FrameParser, encode_frame
from firmware_bridge.messages import (
    MESSAGE_CLASSES,
    Auth,
    Cancel,
    Complete,
    Confirm,
    Signed,
    ErrorMessage,
    Message,
    MessageError,
    Ping,
    Pong,
    Progress,
    Refund,
    ResultMessage,
    Status,
    Void,
    decode_message,
    encode_message,
    error_message,
    fit_display_text,
    result_message,
    to_request,
)
from firmware_bridge.constants import DECISION_CODES, ENTRY_MODE_CODES
from firmware_bridge.tags import CARD_DATA_TAGS
from tests.unit.test_emv import valid_icc
from guard.core.errors import IdempotencyConflict, LinkError, PosguardError, RequestInvalid
from guard.core.model import Result, TxnKind, TxnState

PAN = "4761739001010119"
TXN = bytes.fromhex("00000000000000070000000000000001")
ORIG = bytes.fromhex("00000000000000070000000000000000")

# ---------------------------------------------------------------------------- strategies

txn_ids = st.binary(min_size=16, max_size=16)
amounts = st.integers(1, 999_999_999_999)
currencies = st.text("0123456789", min_size=3, max_size=3)
pans = st.text("0123456789", min_size=12, max_size=19)
expiries = st.builds(lambda y, m: f"{y:02d}{m:02d}", st.integers(0, 99), st.integers(1, 12))
reader_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"), min_size=1, max_size=32)
printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
display_texts = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=64
).filter(lambda s: len(s.encode()) <= 64)
error_codes = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:", min_size=1, max_size=64)


def masked_pans() -> st.SearchStrategy[str]:
    def build(n: int, digits: str) -> str:
        return digits[:6] + "*" * (n - 10) + digits[6:10]

    return st.builds(build, st.integers(12, 19), st.text("0123456789", min_size=10, max_size=10))


def opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | s


STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Auth: st.builds(Auth, txn_ids, amounts, currencies, pans, opt(expiries), opt(reader_ids),
                    entry_mode=opt(st.sampled_from(sorted(ENTRY_MODE_CODES))), pan_seq=opt(st.text("0123456789", min_size=3, max_size=3)),
                    track2=opt(st.text("0123456789", min_size=12, max_size=19).map(lambda p: p + "D2912201")),
                    icc=opt(valid_icc), pin_block=opt(st.binary(min_size=8, max_size=8)), ksn=opt(st.binary(min_size=10, max_size=10))),
    Complete: st.builds(Complete, txn_ids, st.sampled_from(sorted(DECISION_CODES)), opt(valid_icc), opt(reader_ids)),
    Void: st.builds(Void, txn_ids, amounts, currencies, txn_ids, opt(reader_ids)),
    Refund: st.builds(Refund, txn_ids, amounts, currencies, pans, opt(expiries), opt(txn_ids), opt(reader_ids)),
    Confirm: st.builds(Confirm, txn_ids, opt(reader_ids)),
    Cancel: st.builds(Cancel, txn_ids, opt(reader_ids)),
    Signed: st.builds(Signed, txn_ids, opt(reader_ids)),
    Status: st.one_of(
        st.builds(Status, txn_id=txn_ids, reader_id=opt(reader_ids)),
        st.builds(Status, reader_id=opt(reader_ids), last=st.just(True)),
    ),
    Ping: st.builds(Ping, txn_ids, opt(reader_ids)),
    ResultMessage: st.builds(
        ResultMessage,
        txn_id=txn_ids,
        state=st.sampled_from(list(TxnState)),
        display_text=display_texts,
        in_progress=st.booleans(),
        amount=opt(amounts),
        currency=opt(currencies),
        response_code=opt(st.text(printable, min_size=2, max_size=2)),
        approval_code=opt(st.text(printable, min_size=1, max_size=6)),
        rrn=opt(st.text(printable, min_size=1, max_size=12)),
        masked_pan=opt(masked_pans()),
        error_code=opt(error_codes),
        stan=opt(st.integers(1, 999_999)),
        issuer_icc=opt(valid_icc),
    ),
    Progress: st.builds(Progress, txn_ids, opt(display_texts), opt(st.integers(1, 120))),
    Pong: st.builds(Pong, txn_ids),
    ErrorMessage: st.builds(ErrorMessage, error_codes, opt(txn_ids), opt(display_texts)),
}
any_message = st.one_of(*STRATEGIES.values())


def test_strategies_cover_every_message_type() -> None:
    assert set(STRATEGIES) == set(MESSAGE_CLASSES.values())
    assert {c.MSG_TYPE for c in STRATEGIES} == set(MsgType)


@settings(max_examples=600, deadline=None)
@given(msg=any_message, seq=st.integers(0, 255), epoch=st.integers(1, 2**32 - 1), cut=st.integers(0, 10_000))
def test_round_trip_through_frame_and_parser(msg: Message, seq: int, epoch: int, cut: int) -> None:
    payload = encode_message(msg)
    assert len(payload) <= MAX_PAYLOAD
    wire = encode_frame(Frame(FrameType.DATA, seq, epoch, payload))
    cut %= len(wire) + 1
    p = FrameParser()
    got = p.feed(wire[:cut], 0.0) + p.feed(wire[cut:], 0.0)
    assert len(got) == 1 and isinstance(got[0], Frame)
    assert got[0].payload == payload and got[0].seq == seq and got[0].epoch == epoch
    assert decode_message(got[0].payload) == msg


@settings(max_examples=200, deadline=None)
@given(msg=any_message, data=st.data())
def test_tag_order_and_unknown_tags_do_not_matter(msg: Message, data: st.DataObject) -> None:
    payload = encode_message(msg)
    tlvs = split_tlvs(payload[1:])
    tlvs = data.draw(st.permutations(tlvs))
    unknown = [bytes([t]) + len(v).to_bytes(2, "big") + v for t, v in (
        (0x7F, data.draw(st.binary(max_size=40))),
        (0xEE, b""),
    )]
    # a known tag the message type does not use is skipped too (card data excepted)
    used = {tag for tag, _, _ in msg.FIELDS}
    unused = [t for t in Tag if t not in used and t not in CARD_DATA_TAGS and t not in (Tag.ICC_DATA, Tag.ISSUER_DATA, Tag.ENTRY_MODE, Tag.CARD_DECISION, Tag.PAN_SEQ)]
    unknown.append(tlv(data.draw(st.sampled_from(unused)), b"abc"))
    shuffled = bytes([payload[0]]) + b"".join(tlvs[:1] + unknown + tlvs[1:])
    assert decode_message(shuffled) == msg


def split_tlvs(body: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(body):
        n = int.from_bytes(body[i + 1 : i + 3], "big")
        out.append(body[i : i + 3 + n])
        i += 3 + n
    return out


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + len(value).to_bytes(2, "big") + value


def test_amount_is_bcd_n12() -> None:
    payload = encode_message(Auth(TXN, 1250, "978", PAN))
    assert tlv(Tag.AMOUNT, bytes.fromhex("000000001250")) in payload
    assert decode_message(payload).amount == 1250  # type: ignore[union-attr]
    assert tlv(Tag.AMOUNT, bytes.fromhex("999999999999")) in encode_message(Auth(TXN, 999_999_999_999, "978", PAN))


def test_state_codes_cover_every_state_and_are_distinct() -> None:
    assert set(STATE_CODES) == set(TxnState)
    assert len(set(STATE_CODES.values())) == len(TxnState) and 0 not in STATE_CODES.values()


RES = b"\x81" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.STATE, b"\x03") + tlv(Tag.DISPLAY_TEXT, b"OK") + tlv(Tag.IN_PROGRESS, b"\x00")
AUTH_BODY = tlv(Tag.TXN_ID, TXN) + tlv(Tag.AMOUNT, bytes.fromhex("000000001250")) + tlv(Tag.CURRENCY, b"978") + tlv(Tag.PAN, PAN.encode())


@pytest.mark.parametrize(
    ("payload", "code", "tag"),
    [
        (b"", "MSG_TRUNCATED", None),
        (b"\x01" + AUTH_BODY[:2], "MSG_TRUNCATED", None),
        (b"\x01" + AUTH_BODY[:-1], "MSG_TRUNCATED", Tag.PAN),
        (b"\x7f" + AUTH_BODY, "MSG_UNKNOWN_TYPE", None),
        (b"\x00", "MSG_UNKNOWN_TYPE", None),
        (b"\x01" + AUTH_BODY[: -len(tlv(Tag.PAN, PAN.encode()))], "MSG_MISSING_TAG", Tag.PAN),
        (b"\x01" + AUTH_BODY + tlv(Tag.CURRENCY, b"978"), "MSG_DUPLICATE_TAG", Tag.CURRENCY),
        (b"\x01" + AUTH_BODY + tlv(0x70, b"") + tlv(0x70, b""), "MSG_DUPLICATE_TAG", 0x70),
        (b"\x01" + tlv(Tag.TXN_ID, TXN[:15]) + AUTH_BODY[19:], "MSG_BAD_VALUE", Tag.TXN_ID),
        (b"\x01" + AUTH_BODY.replace(bytes.fromhex("000000001250"), bytes.fromhex("0000000012a0")), "MSG_BAD_VALUE", Tag.AMOUNT),
        (b"\x01" + AUTH_BODY.replace(bytes.fromhex("000000001250"), bytes(6)), "MSG_BAD_VALUE", Tag.AMOUNT),
        (b"\x01" + AUTH_BODY.replace(b"978", b"97A"), "MSG_BAD_VALUE", Tag.CURRENCY),
        (b"\x01" + AUTH_BODY.replace(PAN.encode(), b"476173900101011X"), "MSG_BAD_VALUE", Tag.PAN),
        (b"\x01" + AUTH_BODY + tlv(Tag.EXPIRY, b"2513"), "MSG_BAD_VALUE", Tag.EXPIRY),
        (b"\x01" + AUTH_BODY + tlv(Tag.READER_ID, b"a:b"), "MSG_BAD_VALUE", Tag.READER_ID),
        (b"\x01" + AUTH_BODY + tlv(Tag.READER_ID, "r\u00e9".encode()), "MSG_BAD_VALUE", Tag.READER_ID),
        (b"\x05", "MSG_MISSING_TAG", Tag.TXN_ID),
        (b"\x05" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.LAST, b"\x01"), "MSG_CONFLICTING_TAGS", Tag.LAST),
        (b"\x05" + tlv(Tag.LAST, b"\x00"), "MSG_BAD_VALUE", Tag.LAST),
        (b"\x05" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.PAN, PAN.encode()), "MSG_CLEAR_PAN", Tag.PAN),
        (b"\x02" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.EXPIRY, b"2512"), "MSG_CLEAR_PAN", Tag.EXPIRY),
        (b"\x81" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.PAN, PAN.encode()), "MSG_CLEAR_PAN", Tag.PAN),
        (b"\x81" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.STATE, b"\x03") + tlv(Tag.DISPLAY_TEXT, b"OK"), "MSG_MISSING_TAG", Tag.IN_PROGRESS),
        (b"\x81" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.STATE, b"\x7f") + tlv(Tag.DISPLAY_TEXT, b"OK") + tlv(Tag.IN_PROGRESS, b"\x00"), "MSG_BAD_VALUE", Tag.STATE),
        (b"\x81" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.STATE, b"\x03") + tlv(Tag.DISPLAY_TEXT, b"OK") + tlv(Tag.IN_PROGRESS, b"\x02"), "MSG_BAD_VALUE", Tag.IN_PROGRESS),
        (b"\x81" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.STATE, b"\x03") + tlv(Tag.DISPLAY_TEXT, b"\xff") + tlv(Tag.IN_PROGRESS, b"\x00"), "MSG_BAD_VALUE", Tag.DISPLAY_TEXT),
        (b"\x81" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.STATE, b"\x03") + tlv(Tag.DISPLAY_TEXT, b"A\nB") + tlv(Tag.IN_PROGRESS, b"\x00"), "MSG_BAD_VALUE", Tag.DISPLAY_TEXT),
        (b"\x81" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.STATE, b"\x03") + tlv(Tag.DISPLAY_TEXT, b"x" * 65) + tlv(Tag.IN_PROGRESS, b"\x00"), "MSG_BAD_VALUE", Tag.DISPLAY_TEXT),
        (RES + tlv(Tag.MASKED_PAN, PAN.encode()), "MSG_BAD_VALUE", Tag.MASKED_PAN),
        (RES + tlv(Tag.STAN, bytes(4)), "MSG_BAD_VALUE", Tag.STAN),
        (RES + tlv(Tag.ERROR_CODE, b"lower"), "MSG_BAD_VALUE", Tag.ERROR_CODE),
        (RES + tlv(Tag.RESPONSE_CODE, b"0"), "MSG_BAD_VALUE", Tag.RESPONSE_CODE),
        (b"\x82" + tlv(Tag.TXN_ID, TXN) + tlv(Tag.WAIT_S, b"\x00\x79"), "MSG_BAD_VALUE", Tag.WAIT_S),
        (b"\x84" + tlv(Tag.TXN_ID, TXN), "MSG_MISSING_TAG", Tag.ERROR_CODE),
    ],
)
def test_decode_errors_have_specific_codes(payload: bytes, code: str, tag: int | None) -> None:
    with pytest.raises(MessageError) as e:
        decode_message(payload)
    assert e.value.code == code
    assert e.value.tag == tag
    assert isinstance(e.value, LinkError) and isinstance(e.value, PosguardError)
    assert PAN not in str(e.value) and "476173900101011X" not in str(e.value)


def test_constructors_validate_like_the_decoder() -> None:
    with pytest.raises(MessageError) as e:
        Auth(TXN, 0, "978", PAN)
    assert e.value.code == "MSG_BAD_VALUE" and e.value.tag == Tag.AMOUNT
    with pytest.raises(MessageError) as e:
        ResultMessage(TXN, TxnState.APPROVED, "OK", masked_pan=PAN)
    assert e.value.code == "MSG_BAD_VALUE"
    with pytest.raises(MessageError) as e:
        Status()
    assert e.value.code == "MSG_MISSING_TAG"
    with pytest.raises(MessageError) as e:
        Auth(TXN, True, "978", PAN)  # bool is not an amount
    assert e.value.code == "MSG_BAD_VALUE"


def test_repr_never_shows_the_pan_or_expiry() -> None:
    for msg in (Auth(TXN, 1250, "978", PAN, "2512"), Refund(TXN, 1, "978", PAN, "2512", ORIG)):
        r = repr(msg)
        assert PAN not in r and "2512" not in r
        assert "476173******0119" in r and TXN.hex() in r


def test_to_request_sale_refund_void() -> None:
    sale = to_request(Auth(TXN, 1250, "978", PAN, "2512", "lane-1"), "lane-1")
    assert (sale.kind, sale.amount, sale.currency, sale.card.pan, sale.card.expiry) == (TxnKind.SALE, 1250, "978", PAN, "2512")
    assert sale.key == f"lane-1:{TXN.hex()}" and sale.original_txn_id is None
    refund = to_request(Refund(TXN, 500, "978", PAN, None, ORIG), "lane-1")
    assert (refund.kind, refund.original_txn_id, refund.card.expiry) == (TxnKind.REFUND, ORIG, "")
    void = to_request(Void(TXN, 1250, "978", ORIG), "lane-1")
    assert (void.kind, void.original_txn_id) == (TxnKind.VOID, ORIG) and void.card is None


def test_to_request_refuses_non_requests_and_foreign_readers() -> None:
    for msg in (Status(last=True), Ping(TXN), Confirm(TXN), Pong(TXN)):
        with pytest.raises(MessageError) as e:
            to_request(msg, "lane-1")
        assert e.value.code == "MSG_NOT_A_REQUEST"
    with pytest.raises(MessageError) as e:
        to_request(Auth(TXN, 1, "978", PAN, reader_id="lane-2"), "lane-1")
    assert e.value.code == "MSG_READER_MISMATCH"
    with pytest.raises(RequestInvalid) as e2:
        to_request(Auth(TXN, 1, "978", PAN), "bad:reader")
    assert e2.value.code == "REQUEST_BAD_READER"


def test_result_message_from_engine_result() -> None:
    r = Result(
        key=f"lane-1:{TXN.hex()}", state=TxnState.APPROVED, response_code="00", approval_code="123456",
        rrn="123456789012", masked_pan="476173******0119", stan=42, extra={"amount": 1250, "currency": "978"},
    )
    m = result_message(r)
    assert m == ResultMessage(TXN, TxnState.APPROVED, "APPROVED 123456", False, 1250, "978", "00", "123456", "123456789012", "476173******0119", None, 42)
    assert decode_message(encode_message(m)) == m
    declined = result_message(Result(key=f"lane-1:{TXN.hex()}", state=TxnState.DECLINED, reason="NO_HOST", masked_pan="************"))
    assert declined.error_code == "NO_HOST" and declined.display_text == "HOST UNAVAILABLE - NOT CHARGED"
    assert declined.response_code is None and declined.stan is None and declined.amount is None
    pending = result_message(Result(key=f"lane-1:{TXN.hex()}", state=TxnState.SENT, in_progress=True))
    assert pending.in_progress and pending.display_text == "PROCESSING - PLEASE WAIT"
    manual = result_message(Result(key=f"r:{TXN.hex()}", state=TxnState.NEEDS_MANUAL, reason="REVERSAL_UNCONFIRMED:HOST_TIMEOUT"))
    assert decode_message(encode_message(manual)) == manual


def test_result_message_refuses_a_clear_pan_and_bad_keys() -> None:
    with pytest.raises(MessageError) as e:
        result_message(Result(key=f"lane-1:{TXN.hex()}", state=TxnState.APPROVED, masked_pan=PAN))
    assert e.value.code == "MSG_BAD_VALUE" and PAN not in str(e.value)
    with pytest.raises(MessageError):
        result_message(Result(key="lane-1:zz", state=TxnState.APPROVED))


def test_fit_display_text() -> None:
    assert fit_display_text("\u00e9" * 40) == "\u00e9" * 32
    assert fit_display_text("A\nB\x00") == "A B "
    assert fit_display_text("") == "-"
    assert len(fit_display_text("x" * 100).encode()) == 64


def test_error_message_carries_the_stable_code() -> None:
    m = error_message(IdempotencyConflict("id reused"), TXN)
    assert m == ErrorMessage("IDEMPOTENCY_MISMATCH", TXN)
    assert decode_message(encode_message(m)) == m
    odd = PosguardError("x")
    odd.code = "lower-case"  # registered codes cannot be like this; the encoder still refuses one
    assert error_message(odd).error_code == "POSGUARD_ERROR"


def test_status_last_encoding() -> None:
    assert encode_message(Status(last=True)) == b"\x05" + tlv(Tag.LAST, b"\x01")
    assert encode_message(Status(TXN)) == b"\x05" + tlv(Tag.TXN_ID, TXN)
