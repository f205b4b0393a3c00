"""ISO 8583 request builders for driving ``HostCore`` directly (tests of the host simulator and
its acquirer answer profiles): a 0200 ``sale``, a 0400 ``reversal`` naming it, and ``one`` (the
single reply a request must get)."""

from __future__ import annotations

from guard.hostlink.iso import field90
from guard.simulation.hostsim import HostCore
from guard.simulation.hosttypes import ACTION_SEND

PAN = "4111111111111111"
PAN2 = "5500000000000004"
TID, MID = "TERM0001", "MERCHANT0000001"
F7 = "1122153000"
NOW = 1_795_300_000.0


def sale(stan: int = 1, amount: int = 1000, pan: str = PAN, f7: str = F7, tid: str = TID, mti: str = "0200") -> dict[str, str]:
    return {
        "t": mti, "2": pan, "3": "000000", "4": f"{amount:012d}", "7": f7, "11": f"{stan:06d}",
        "41": tid, "42": MID, "49": "978",
    }


def reversal(stan: int = 1, amount: int = 1000, f7: str = F7, mti: str = "0400", tid: str = TID,
             own_stan: int | None = None) -> dict[str, str]:
    return {
        "t": mti, "3": "000000", "4": f"{amount:012d}", "7": "1122153100",
        "11": f"{(own_stan or stan):06d}", "41": tid, "42": MID, "49": "978",
        "90": field90("0200", stan, f7),
    }


def one(core: HostCore, fields: dict[str, str], now: float = NOW) -> dict[str, str]:
    """The one reply ``core`` sends to ``fields`` (asserts there is exactly one, sent)."""
    replies = core.handle(fields, now)
    assert len(replies) == 1 and replies[0].action == ACTION_SEND and replies[0].fields is not None
    return replies[0].fields
