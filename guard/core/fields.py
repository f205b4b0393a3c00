"""ISO 8583 field values the engine builds itself: pure functions of their inputs."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping

from guard.core.constants import ECHO_FIELDS
from guard.core.errors import CodecError

_UTC = _dt.timezone.utc


def transmission_dt(now: float) -> str:
    """Field 7: MMDDhhmmss in UTC."""
    return _dt.datetime.fromtimestamp(now, _UTC).strftime("%m%d%H%M%S")


def _digits(value: str | int, width: int, name: str) -> str:
    s = f"{value:0{width}d}" if isinstance(value, int) else value.zfill(width)
    if len(s) != width or not (s.isascii() and s.isdigit()):
        raise CodecError(f"{name} must be at most {width} digits")
    return s


def field90(orig_mti: str, stan: str | int, f7: str, acq_id: str = "", fwd_id: str = "") -> str:
    """Field 90 (ISO 8583:1987 n42): MTI(4) + STAN(6) + field 7(10) + acquirer(11) + forwarder(11).

    Institution ids are right-justified and zero-filled (all zeros when absent).
    """
    if len(orig_mti) != 4:
        raise CodecError("original MTI must be 4 digits")
    if len(f7) != 10:
        raise CodecError("original field 7 must be 10 digits")
    return (
        _digits(orig_mti, 4, "original MTI")
        + _digits(stan, 6, "original STAN")
        + _digits(f7, 10, "original field 7")
        + _digits(acq_id, 11, "acquiring institution id")
        + _digits(fwd_id, 11, "forwarding institution id")
    )


def echo_mismatches(sent: Mapping[str, str], got: Mapping[str, str]) -> list[str]:
    """ECHO_FIELDS (4, 11, 41, 42) whose value differs, including present-vs-absent.

    A non-empty result means the response is not ours ("receiving account mismatch").
    """
    return [f for f in ECHO_FIELDS if sent.get(f) != got.get(f)]
