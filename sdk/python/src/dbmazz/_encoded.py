"""Reading the compact batch encoding (``encoded-batch`` in ``wit/dbmazz-plugin.wit``).

A plugin with ``prefers_encoded = True`` receives each batch as one byte buffer instead
of an object per value; :func:`dbmazz.changes` reads it through this module into the same
:class:`dbmazz.ChangeView` values as a typed batch. Layout of ``data`` (``count`` changes,
integers big-endian)::

    op u8 ('I' insert, 'U' update, 'D' delete, 'T' truncate, 'R' read)
    relation u32 | lsn u64 | commit-lsn u64 | xid u32 | commit-time-us i64
    flags u8: bit 0 old present, bit 1 old is key only, bit 2 new present
    [old tuple] [new tuple]

A tuple is pgoutput's TupleData (PostgreSQL docs, "Logical Replication Message
Formats"): ``ncols u16``, then per column ``n`` (null), ``u`` (unchanged TOAST), or
``t`` (text) / ``b`` (binary) followed by ``len u32`` and the value's bytes. Values are
typed by the column's type OID with the host's mapping for typed batches (dbmazz-sdk
``encoded::datum``).
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any, Callable, Iterator, Optional

_HEADER = struct.Struct(">BIQQIqB")  # 34 bytes
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

OPS = {0x49: "insert", 0x55: "update", 0x44: "delete", 0x54: "truncate", 0x52: "read"}

_BYTEA_HEX = re.compile(r"\\x(?:[0-9a-fA-F]{2})*")


class DecodeError(ValueError):
    """A malformed encoded batch (a host bug, never expected); ``offset`` is the byte in
    ``data``."""

    def __init__(self, offset: int, what: str):
        super().__init__(f"malformed encoded batch at byte {offset}: {what}")
        self.offset = offset


def is_encoded(batch: Any) -> bool:
    """True for an ``encoded-batch`` (``count`` and ``data``), false for a typed batch."""
    return getattr(batch, "changes", None) is None and getattr(batch, "data", None) is not None


def _int(t: str) -> Any:
    try:
        return int(t)
    except ValueError:
        return t


def _float(t: str) -> Any:
    try:
        return float(t)  # also NaN, Infinity, -Infinity as PostgreSQL prints them
    except ValueError:
        return t


def _bytea(t: str) -> Any:
    return bytes.fromhex(t[2:]) if _BYTEA_HEX.fullmatch(t) else t


def _text(t: str) -> str:
    return t


# Column type OID → conversion of PostgreSQL's text form (pg_type.dat).
_BY_OID: dict[int, Callable[[str], Any]] = {
    16: lambda t: t == "t",
    20: _int,
    21: _int,
    23: _int,
    26: _int,
    700: _float,
    701: _float,
    1700: _text,  # numeric: a string keeps every digit
    17: _bytea,
    114: json.loads,
    3802: json.loads,
}


def converters(type_oids: list[int]) -> list[Callable[[str], Any]]:
    """One text → value function per column."""
    return [_BY_OID.get(oid, _text) for oid in type_oids]


def _tuple(data: bytes, at: int, names: list[str], conv: list, toast: Any) -> tuple[dict[str, Any], int]:
    end = len(data)
    if at + 2 > end:
        raise DecodeError(at, "truncated")
    (n,) = _U16.unpack_from(data, at)
    at += 2
    row: dict[str, Any] = {}
    for i in range(n):
        if at >= end:
            raise DecodeError(at, "truncated")
        kind = data[at]
        at += 1
        name = names[i] if i < len(names) else f"column{i}"
        if kind == 0x74 or kind == 0x62:  # 't', 'b'
            if at + 4 > end:
                raise DecodeError(at, "truncated")
            (length,) = _U32.unpack_from(data, at)
            at += 4
            if at + length > end:
                raise DecodeError(at, "value past the end")
            raw = data[at : at + length]
            at += length
            if kind == 0x62:
                row[name] = bytes(raw)
                continue
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                raise DecodeError(at - length, "text value is not UTF-8") from None
            row[name] = conv[i](text) if i < len(conv) else text
        elif kind == 0x6E:  # 'n'
            row[name] = None
        elif kind == 0x75:  # 'u'
            row[name] = toast
        else:
            raise DecodeError(at - 1, "unknown value kind")
    return row, at


def read(
    data: bytes, count: int, shape: Callable[[int], tuple[list[str], list]], toast: Any
) -> Iterator[tuple[str, int, int, int, int, int, bool, Optional[dict], Optional[dict]]]:
    """The changes of ``data``: (op, relation, lsn, commit_lsn, xid, commit_time_us,
    old_is_key, old, new), rows as dicts by column name; ``shape(relation)`` gives the
    relation's column names and converters."""
    data = bytes(data)
    at = 0
    for _ in range(count):
        if at + _HEADER.size > len(data):
            raise DecodeError(at, "truncated")
        op, relation, lsn, commit_lsn, xid, time_us, flags = _HEADER.unpack_from(data, at)
        name = OPS.get(op)
        if name is None:
            raise DecodeError(at, "unknown op")
        at += _HEADER.size
        names, conv = shape(relation)
        old = new = None
        if flags & 1:
            old, at = _tuple(data, at, names, conv, toast)
        if flags & 4:
            new, at = _tuple(data, at, names, conv, toast)
        yield name, relation, lsn, commit_lsn, xid, time_us, bool(flags & 2), old, new
