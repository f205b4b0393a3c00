"""Audit regressions: no clear card data in errors, outputs or exceptions' baggage, and a clear
error (stable code, exit 2/3) instead of a traceback for bad input. Fast, loopback-free."""

from __future__ import annotations

import traceback

import pytest

from guard.iso import CodecError, HostCodec

PAN = "4761739001010119"


def _sale(**extra: str) -> dict[str, str]:
    return {"t": "0200", "3": "000000", "4": "000000001250", "7": "1130004850", "11": "000001",
            "41": "TERM0001", "42": "MERCHANT0000001", "49": "978", **extra}


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


# --- ISO 8583 encode errors ---------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    _sale(**{"2": PAN * 2}),  # too long for field 2
    _sale(**{"2": PAN + "\u00e9"}),  # not encodable
    _sale(**{"2": PAN, "14": "25121"}),  # another field wrong, field 2 fine
    _sale(**{"2": PAN, "4": "1"}),
])
def test_codec_error_carries_no_card_data_even_in_its_context(fields: dict[str, str]) -> None:
    """pyiso8583's EncodeError keeps the whole message (doc_dec, field 2 included); `from None`
    only hides it from the printed traceback, __context__ still holds it for any handler, error
    reporter or debugger that walks the chain."""
    with pytest.raises(CodecError) as ei:
        HostCodec().encode(fields)
    for e in _chain(ei.value):
        assert PAN not in repr(e) and PAN not in repr(vars(e)), type(e)
    assert len(_chain(ei.value)) == 1
    assert PAN not in "".join(traceback.format_exception(ei.value))


# --- terminal and merchant ids --------------------------------------------------------------------


@pytest.mark.parametrize("tid,mid", [("TERM\u00c9001", "MERCHANT0000001"), ("TERM0001", "MERCHANT\u00e9000001"),
                                     ("TERM\x00001", "MERCHANT0000001")])
def test_engine_refuses_ids_the_host_codec_cannot_carry(tid: str, mid: str) -> None:
    from guard.engine import EngineConfig
    from guard.errors import PosguardError

    assert len(tid) == 8 and len(mid) == 15
    with pytest.raises(PosguardError) as ei:
        EngineConfig(tid, mid)
    assert ei.value.code in ("CONFIG_TERMINAL_ID", "CONFIG_MERCHANT_ID")
