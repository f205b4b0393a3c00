"""guard.hostlink.iso: codec round trips, stream framing, every garbage code, helpers, fuzzing."""

from __future__ import annotations

import datetime as dt
import struct

import iso8583
import iso8583.specs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.core.constants import HOST_MAX_MESSAGE, TPDU_LEN
from guard.core.errors import ConfigError, HostProtocolError
from guard.hostlink.iso import (
    HOST_BAD_LENGTH,
    HOST_BAD_MTI,
    HOST_BAD_TPDU,
    HOST_FRAME_TRUNCATED,
    HOST_UNDECODABLE,
    CodecError,
    HostCodec,
    HostGarbage,
    HostMessage,
    echo_mismatches,
    field90,
    local_time_date,
    mti_class,
    parse_field90,
    response_mti,
    swap_tpdu,
    transmission_dt,
)

PAN = "4111111111111111"
TPDU = bytes.fromhex("6000120034")  # dest 0012, source 0034
CONFIGS = [("binary2", None), ("ascii4", None), ("binary2", TPDU), ("ascii4", TPDU)]
CONFIG_IDS = ["binary2", "ascii4", "binary2+tpdu", "ascii4+tpdu"]


def sale(stan: str = "000123", amount: str = "000000001000") -> dict[str, str]:
    return {
        "t": "0200", "2": PAN, "3": "000000", "4": amount, "7": "1122153000", "11": stan,
        "12": "163000", "13": "1122", "41": "TERM0001", "42": "MERCHANT0000001", "49": "978",
    }


def response(req: dict[str, str]) -> dict[str, str]:
    r = {k: req[k] for k in ("3", "4", "7", "11", "41", "42", "49")}
    r.update({"t": "0210", "37": "000000000042", "38": "123456", "39": "00"})
    return r


def raw_iso(fields: dict[str, str]) -> bytes:
    """An ISO message encoded straight by pyiso8583, bypassing HostCodec's checks."""
    return bytes(iso8583.encode(dict(fields), iso8583.specs.default)[0])


def host_frame(codec: HostCodec, payload: bytes) -> bytes:
    """Frame a payload as the host would (swapped TPDU when the link has one)."""
    return codec.frame(payload, tpdu=swap_tpdu(codec.tpdu) if codec.tpdu else None)


def only(items: list) -> object:
    assert len(items) == 1, items
    return items[0]


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "tpdu"), CONFIGS, ids=CONFIG_IDS)
def test_round_trip_request_and_response(header: str, tpdu: bytes | None) -> None:
    codec = HostCodec(header=header, tpdu=tpdu)
    req = sale()
    wire = codec.encode(req)
    hlen = 2 if header == "binary2" else 4
    body_len = len(wire) - hlen
    assert wire[:hlen] == (struct.pack(">H", body_len) if header == "binary2" else b"%04d" % body_len)
    if tpdu:
        assert wire[hlen : hlen + TPDU_LEN] == tpdu
    msg = only(codec.decoder("host").feed(wire))
    assert isinstance(msg, HostMessage)
    assert msg.fields == req and msg.raw_len == len(wire) and msg.tpdu == tpdu

    resp = response(req)
    rwire = codec.encode(resp, tpdu=swap_tpdu(tpdu) if tpdu else None)
    got = only(codec.decoder("terminal").feed(rwire))
    assert isinstance(got, HostMessage) and got.fields == resp
    assert echo_mismatches(req, got.fields) == []


def test_encode_does_not_mutate_input_and_drops_bitmaps() -> None:
    codec = HostCodec()
    req = sale()
    before = dict(req)
    codec.encode(req)
    assert req == before
    assert codec.encode(dict(req, p="FFFFFFFFFFFFFFFF")) == codec.encode(req)


@pytest.mark.parametrize(("header", "tpdu"), CONFIGS, ids=CONFIG_IDS)
def test_decoder_byte_by_byte_and_concatenated(header: str, tpdu: bytes | None) -> None:
    codec = HostCodec(header=header, tpdu=tpdu)
    frames = [codec.encode(sale(stan=f"{i:06d}")) for i in range(1, 4)]
    dec = codec.decoder("host")
    out: list = []
    stream = b"".join(frames)
    ends = {sum(len(f) for f in frames[: i + 1]) for i in range(3)}
    for i in range(len(stream)):
        got = dec.feed(stream[i : i + 1])
        assert bool(got) == (i + 1 in ends)
        out += got
    assert [m.fields["11"] for m in out] == ["000001", "000002", "000003"]
    assert dec.buffered == 0

    out = codec.decoder("host").feed(stream)
    assert [m.fields["11"] for m in out] == ["000001", "000002", "000003"]

    dec = codec.decoder("host")
    cut = len(frames[0]) + 3
    first, second = dec.feed(stream[:cut]), dec.feed(stream[cut:])
    assert len(first) == 1 and len(second) == 2


# --- garbage codes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "tpdu", "head"),
    [
        ("binary2", None, b"\x00\x00"),
        ("binary2", None, struct.pack(">H", HOST_MAX_MESSAGE + 1)),
        ("ascii4", None, b"0000"),
        ("ascii4", None, b"12a4"),
        ("ascii4", None, b" 123"),
        ("ascii4", None, b"9000"),
        ("binary2", TPDU, b"\x00\x03"),
    ],
    ids=["zero", "too-big", "ascii-zero", "ascii-non-digit", "ascii-space", "ascii-too-big", "shorter-than-tpdu"],
)
def test_bad_length_breaks_the_stream(header: str, tpdu: bytes | None, head: bytes) -> None:
    codec = HostCodec(header=header, tpdu=tpdu)
    dec = codec.decoder("terminal")
    good = host_frame(codec, raw_iso(response(sale())))
    items = dec.feed(good + head + PAN.encode() * 3)
    assert isinstance(items[0], HostMessage)
    g = items[1]
    assert isinstance(g, HostGarbage) and g.code == HOST_BAD_LENGTH
    assert dec.broken and dec.buffered == 0
    assert PAN not in repr(g) and len(g.digest) == 16
    assert dec.feed(good) == []
    assert dec.eof() is None


@pytest.mark.parametrize(
    ("side", "tpdu_on_wire", "why"),
    [
        ("terminal", b"\x61" + TPDU[3:5] + TPDU[1:3], "id byte"),
        ("terminal", TPDU, "not swapped"),
        ("host", b"\x60\x99\x99\x00\x34", "wrong destination"),
        ("host", b"\x00" + TPDU[1:], "id byte"),
    ],
)
def test_bad_tpdu_skips_one_frame(side: str, tpdu_on_wire: bytes, why: str) -> None:
    codec = HostCodec(tpdu=TPDU)
    dec = codec.decoder(side)
    payload = raw_iso(sale())
    bad = struct.pack(">H", len(payload) + 5) + tpdu_on_wire + payload
    ok_tpdu = swap_tpdu(TPDU) if side == "terminal" else TPDU
    ok = codec.frame(payload, tpdu=ok_tpdu)
    g, m = dec.feed(bad + ok)
    assert isinstance(g, HostGarbage) and g.code == HOST_BAD_TPDU, why
    assert isinstance(m, HostMessage) and not dec.broken


def test_host_side_accepts_any_source_and_swaps() -> None:
    codec = HostCodec(tpdu=TPDU)
    other_terminal = b"\x60\x00\x12\x77\x77"
    msg = only(codec.decoder("host").feed(codec.frame(raw_iso(sale()), tpdu=other_terminal)))
    assert isinstance(msg, HostMessage) and msg.tpdu == other_terminal
    assert swap_tpdu(other_terminal) == b"\x60\x77\x77\x00\x12"


@pytest.mark.parametrize(
    ("payload", "code", "detail_part"),
    [
        (b"\xff\xfe" + PAN.encode(), HOST_UNDECODABLE, "field t"),
        (raw_iso(response(sale())) + PAN.encode(), HOST_UNDECODABLE, "Extra data"),
        (raw_iso(response(sale()))[:-3], HOST_UNDECODABLE, ""),
        (raw_iso(dict(response(sale()), **{"11": "00012A"})), HOST_UNDECODABLE, "field 11: not numeric"),
        (raw_iso(dict(response(sale()), **{"7": "1322153000"})), HOST_UNDECODABLE, "field 7"),
        (raw_iso(dict(response(sale()), **{"41": "TERM\x00001"})), HOST_UNDECODABLE, "field 41"),
        (raw_iso(dict(response(sale()), t="0110")), HOST_BAD_MTI, ""),
        (raw_iso(dict(response(sale()), t="02X0")), HOST_BAD_MTI, ""),
        (raw_iso(dict(response(sale()), t="1210")), HOST_BAD_MTI, ""),
    ],
    ids=["bad-mti-bytes", "trailing", "short", "non-numeric", "bad-date", "control-char", "class-01", "non-digit", "version-1"],
)
def test_undecodable_and_bad_mti_keep_stream(payload: bytes, code: str, detail_part: str) -> None:
    codec = HostCodec()
    dec = codec.decoder("terminal")
    good = codec.encode(response(sale()))
    g, m = dec.feed(codec.frame(payload) + good)
    assert isinstance(g, HostGarbage) and g.code == code
    assert detail_part in g.detail
    assert g.raw_len == len(payload) + 2
    assert PAN not in g.detail and "4111" not in g.detail
    assert isinstance(m, HostMessage)


def test_garbage_detail_never_echoes_decoder_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyiso8583 messages may quote offending bytes; HostGarbage must keep only the fixed text."""
    codec = HostCodec()
    frame = codec.frame(raw_iso(response(sale())))

    def leaky(s: bytes, spec: object) -> None:
        raise iso8583.DecodeError(f"Failed to decode field, bad value '{PAN}'", s, {}, {}, 7, "2")

    monkeypatch.setattr("guard.hostlink.iso.iso8583.decode", leaky)
    g = only(codec.decoder("terminal").feed(frame))
    assert isinstance(g, HostGarbage) and g.code == HOST_UNDECODABLE
    assert "field 2 at offset 7: Failed to decode field" in g.detail and PAN not in g.detail

    def crash(s: bytes, spec: object) -> None:
        raise RuntimeError(PAN)

    monkeypatch.setattr("guard.hostlink.iso.iso8583.decode", crash)
    g = only(codec.decoder("terminal").feed(frame))
    assert isinstance(g, HostGarbage) and g.code == HOST_UNDECODABLE and PAN not in g.detail


@pytest.mark.parametrize(("header", "tpdu"), CONFIGS, ids=CONFIG_IDS)
def test_eof_reports_truncated_frame(header: str, tpdu: bytes | None) -> None:
    codec = HostCodec(header=header, tpdu=tpdu)
    wire = host_frame(codec, raw_iso(response(sale())))
    for cut in (1, len(wire) // 2, len(wire) - 1):
        dec = codec.decoder("terminal")
        assert dec.feed(wire[:cut]) == []
        g = dec.eof()
        assert isinstance(g, HostGarbage) and g.code == HOST_FRAME_TRUNCATED
        assert g.raw_len == cut and PAN not in g.detail
        assert dec.eof() is None
    dec = codec.decoder("terminal")
    assert len(dec.feed(wire)) == 1 and dec.eof() is None


def test_garbage_error_has_stable_code() -> None:
    g = HostGarbage(HOST_BAD_MTI, "x", 1, "00")
    err = g.error()
    assert isinstance(err, HostProtocolError) and err.code == HOST_BAD_MTI


# --- encoding errors and configuration ---------------------------------------------------------------


def test_encode_errors_name_field_not_value() -> None:
    codec = HostCodec()
    with pytest.raises(CodecError) as ei:
        codec.encode(dict(sale(), **{"2": PAN + "1234"}))
    assert ei.value.code == "HOST_ENCODE_INVALID" and "field 2" in str(ei.value)
    assert PAN not in str(ei.value) and ei.value.__cause__ is None
    with pytest.raises(CodecError):
        codec.encode(dict(sale(), **{"4": "1000"}))
    with pytest.raises(CodecError):
        codec.encode(dict(sale(), t="0100"))
    with pytest.raises(CodecError):
        codec.encode({"t": "0200", "2": PAN * 600})


def test_codec_config_validation() -> None:
    with pytest.raises(ConfigError):
        HostCodec(header="binary4")
    with pytest.raises(ConfigError):
        HostCodec(tpdu=b"\x61\x00\x00\x00\x00")
    with pytest.raises(ConfigError):
        HostCodec(tpdu=b"\x60\x00")
    with pytest.raises(CodecError):
        HostCodec().frame(b"abc", tpdu=TPDU)


def test_host_message_repr_masks_pan() -> None:
    msg = only(HostCodec().decoder("host").feed(HostCodec().encode(dict(sale(), **{"14": "2812"}))))
    assert PAN not in repr(msg) and "411111******1111" in repr(msg) and "2812" not in repr(msg)


# --- helpers -----------------------------------------------------------------------------------------


def test_mti_helpers() -> None:
    assert [mti_class(m) for m in ("0200", "0201", "0210", "0400", "0410", "0800")] == ["02"] * 3 + ["04"] * 2 + ["08"]
    assert mti_class("0410") != mti_class("0210")
    assert [response_mti(m) for m in ("0200", "0201", "0400", "0401", "0420", "0421", "0800")] == [
        "0210", "0210", "0410", "0410", "0430", "0430", "0810"]
    for bad in ("0210", "0100", "02X0", "200", ""):
        with pytest.raises(HostProtocolError):
            response_mti(bad)


def test_field90_round_trip_and_zero_fill() -> None:
    s = field90("0200", 123, "1122153000")
    assert s == "0200" + "000123" + "1122153000" + "0" * 22 and len(s) == 42
    assert parse_field90(s) == ("0200", "000123", "1122153000", "0" * 11, "0" * 11)
    s2 = field90("0200", "000123", "1122153000", acq_id="123456", fwd_id="42")
    assert parse_field90(s2)[3:] == ("00000123456", "00000000042")
    for args in (("0200", 1_000_000, "1122153000"), ("0200", 1, "112215300"), ("020", 1, "1122153000"),
                 ("0200", 1, "1122153000", "123456789012"), ("0200", "00012A", "1122153000")):
        with pytest.raises(CodecError):
            field90(*args)
    for bad in ("", "0" * 41, "0" * 41 + "A"):
        with pytest.raises(HostProtocolError):
            parse_field90(bad)


def test_echo_mismatches() -> None:
    req = sale()
    resp = response(req)
    assert echo_mismatches(req, resp) == []
    assert echo_mismatches(req, dict(resp, **{"41": "TERM0002"})) == ["41"]
    assert echo_mismatches(req, dict(resp, **{"4": "000000001001", "42": "X" * 15})) == ["4", "42"]
    assert echo_mismatches(req, {k: v for k, v in resp.items() if k != "4"}) == ["4"]


def test_time_fields() -> None:
    now = dt.datetime(2024, 2, 29, 23, 59, 58, tzinfo=dt.timezone.utc).timestamp()
    assert transmission_dt(now) == "0229235958"
    assert local_time_date(now, dt.timezone.utc) == ("235958", "0229")
    assert local_time_date(now, dt.timezone(dt.timedelta(hours=1))) == ("005958", "0301")


# --- fuzzing ------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg=st.sampled_from(CONFIGS),
    side=st.sampled_from(["terminal", "host"]),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
)
def test_random_bytes_never_raise(cfg: tuple[str, bytes | None], side: str, data: bytes, cuts: list[int]) -> None:
    codec = HostCodec(header=cfg[0], tpdu=cfg[1])
    dec = codec.decoder(side)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in zip(bounds, bounds[1:]):
        for item in dec.feed(data[a:b]):
            assert isinstance(item, (HostMessage, HostGarbage))
        assert dec.buffered <= codec.header_len + HOST_MAX_MESSAGE
    g = dec.eof()
    assert g is None or g.code == HOST_FRAME_TRUNCATED


@settings(max_examples=100, deadline=None)
@given(
    cfg=st.sampled_from(CONFIGS),
    prefix=st.binary(max_size=40),
)
def test_valid_frame_after_fuzzed_frame_is_still_decoded(cfg: tuple[str, bytes | None], prefix: bytes) -> None:
    """A well-framed garbage payload never costs us the next message."""
    codec = HostCodec(header=cfg[0], tpdu=cfg[1])
    payload = b"\xff" + prefix
    items = codec.decoder("terminal").feed(host_frame(codec, payload) + host_frame(codec, raw_iso(response(sale()))))
    assert isinstance(items[0], HostGarbage) and items[0].code == HOST_UNDECODABLE
    assert isinstance(items[1], HostMessage)


@settings(max_examples=100, deadline=None)
@given(
    stan=st.integers(min_value=1, max_value=999_999),
    amount=st.integers(min_value=1, max_value=999_999_999_999),
    tid=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=8, max_size=8),
    cfg=st.sampled_from(CONFIGS),
)
def test_round_trip_property(stan: int, amount: int, tid: str, cfg: tuple[str, bytes | None]) -> None:
    codec = HostCodec(header=cfg[0], tpdu=cfg[1])
    req = dict(sale(stan=f"{stan:06d}", amount=f"{amount:012d}"), **{"41": tid})
    msg = only(codec.decoder("host").feed(codec.encode(req)))
    assert isinstance(msg, HostMessage) and msg.fields == req
