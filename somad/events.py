"""Events the pipeline hands to sinks. Sinks serialise ``event.to_dict()`` and need nothing else.

>>> e = RecordScored(stream="s", time=1.0, index=3, record=b"12.5\\n", bits=2.0, anomaly=0.5)
>>> e.to_dict()["record"], e.to_dict()["event"]
('12.5\\\\n', 'score')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

RECORD_TEXT_MAX = 256  # bytes of the offending record carried in an event


def escape_record(record: bytes, limit: int = RECORD_TEXT_MAX) -> str:
    """Printable, single-line text of a record: ASCII kept, everything else escaped, cut at ``limit``.

    >>> escape_record(b"ok\\x00\\xff\\n")
    'ok\\\\x00\\\\xff\\\\n'
    >>> escape_record(b"x" * 10, limit=4)
    'xxxx...(+6 bytes)'
    """
    text = record[:limit].decode("ascii", "backslashreplace")
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    if len(record) > limit:
        text += f"...(+{len(record) - limit} bytes)"
    return text


@dataclass(frozen=True)
class Timescale:
    """Where a surprise lives: band k of the trace bank remembers about ``tau_bytes`` bytes."""

    band: int
    tau_bytes: float
    share: float  # share of the gradient power in this band, 0..1


@dataclass(frozen=True)
class RecordScored:
    stream: str
    time: float  # unix seconds when the record was scored
    index: int  # record number in the stream, from 0
    record: bytes
    bits: float  # record score in bits (mean, max or sum of its bytes' losses, per config)
    anomaly: float  # anomaly score in [0, 1] relative to the stream's own history

    def to_dict(self) -> dict:
        d = asdict(self)
        d["record"] = escape_record(self.record)
        d["event"] = "score"
        return d


@dataclass(frozen=True)
class AlertEvent:
    kind: str  # "open" or "close"
    stream: str
    alert_id: str  # unique per alert; the close event repeats the open event's id
    started_at: float  # unix seconds of the record that opened the alert
    time: float  # unix seconds of this event
    peak_anomaly: float
    peak_bits: float
    records: int  # records seen while the alert was open (1 at open)
    record: bytes  # the record that opened (or peaked) the alert
    timescales: tuple[Timescale, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["record"] = escape_record(self.record)
        d["timescales"] = [asdict(t) for t in self.timescales]
        d["event"] = f"alert_{self.kind}"
        return d
