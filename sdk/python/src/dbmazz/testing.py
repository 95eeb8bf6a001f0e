"""Run a plugin under plain CPython, without wasm, a host or a database.

Batches are built with :class:`BatchBuilder` from classes shaped like the contract's
(``Datum_Text(value=...)``, ``Op.INSERT``, ...), so the SDK's helpers and your code see
the same shapes as in the component. Logs are recorded (:func:`logs`), and HTTP requests
go to the handler installed with :func:`on_http` (:func:`requests` lists them)::

    from dbmazz import testing
    batch = (testing.BatchBuilder(7)
             .table(1, "public", "users", [("id", 23, True), ("email", 25, False)])
             .insert(1, [1, "a@b.c"])
             .build())
    testing.on_http(lambda req: testing.Response(200))
    MySink(testing.config(url="http://x/")).write(batch)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, List, Optional

from . import Config
from .http import HttpError, Request, Response  # noqa: F401  (re-exported)

# --- the contract's shapes (wit/dbmazz-plugin.wit, interface `data`) -------------------


@dataclass
class Column:
    name: str
    type_oid: int
    type_modifier: int
    key: bool


@dataclass
class Relation:
    id: int
    schema: str
    table: str
    columns: List[Column]


@dataclass
class Datum_Null:
    pass


@dataclass
class Datum_UnchangedToast:
    pass


@dataclass
class Datum_Boolean:
    value: bool


@dataclass
class Datum_Int:
    value: int


@dataclass
class Datum_Float:
    value: float


@dataclass
class Datum_Numeric:
    value: str


@dataclass
class Datum_Text:
    value: str


@dataclass
class Datum_Bytes:
    value: bytes


@dataclass
class Datum_Json:
    value: str


class Op(Enum):
    INSERT = 0
    UPDATE = 1
    DELETE = 2
    TRUNCATE = 3
    READ = 4


@dataclass
class Change:
    op: Op
    relation: int
    lsn: int
    commit_lsn: int
    xid: int
    commit_time_us: int
    old: Optional[list]
    old_is_key: bool
    new: Optional[list]


@dataclass
class Batch:
    id: int
    first_lsn: int
    last_lsn: int
    relations: List[Relation]
    changes: List[Change]


def datum(v: Any) -> Any:
    """A Python value as a datum: None → NULL, bool, int, float, str → text, bytes,
    dict/list → json, ``dbmazz.UNCHANGED_TOAST``; a ``Datum_*`` (e.g. ``Datum_Numeric("1.10")``)
    as it is."""
    from . import UNCHANGED_TOAST

    if type(v).__name__.startswith("Datum_"):
        return v
    if v is None:
        return Datum_Null()
    if v is UNCHANGED_TOAST:
        return Datum_UnchangedToast()
    if isinstance(v, bool):
        return Datum_Boolean(v)
    if isinstance(v, int):
        return Datum_Int(v)
    if isinstance(v, float):
        return Datum_Float(v)
    if isinstance(v, bytes):
        return Datum_Bytes(v)
    if isinstance(v, (dict, list)):
        return Datum_Json(json.dumps(v))
    return Datum_Text(str(v))


class BatchBuilder:
    """Builds a :class:`Batch`: relations, then changes; LSNs count up from 0x1000."""

    def __init__(self, batch_id: int = 1):
        self.batch = Batch(batch_id, 0, 0, [], [])
        self.lsn = 0x1000

    def table(self, rel_id: int, schema: str, table: str, columns: list[tuple[str, int, bool]]) -> "BatchBuilder":
        """A relation: ``columns`` as (name, type OID, key)."""
        self.batch.relations.append(
            Relation(rel_id, schema, table, [Column(n, oid, -1, key) for n, oid, key in columns])
        )
        return self

    def change(self, op: Op, rel_id: int, old: Optional[list] = None, new: Optional[list] = None, xid: int = 700) -> "BatchBuilder":
        self.lsn += 0x10
        self.batch.changes.append(
            Change(
                op,
                rel_id,
                self.lsn,
                self.lsn + 8,
                xid,
                1_700_000_000_000_000,
                None if old is None else [datum(v) for v in old],
                old is not None and op == Op.DELETE,
                None if new is None else [datum(v) for v in new],
            )
        )
        return self

    def insert(self, rel_id: int, new: list) -> "BatchBuilder":
        return self.change(Op.INSERT, rel_id, None, new)

    def update(self, rel_id: int, new: list, old: Optional[list] = None) -> "BatchBuilder":
        return self.change(Op.UPDATE, rel_id, old, new)

    def delete(self, rel_id: int, old: list) -> "BatchBuilder":
        return self.change(Op.DELETE, rel_id, old, None)

    def build(self) -> Batch:
        lsns = [c.commit_lsn for c in self.batch.changes] or [0]
        self.batch.first_lsn, self.batch.last_lsn = min(lsns), max(lsns)
        return self.batch


@dataclass
class EncodedBatch:
    """A batch in the compact encoding, as a plugin with ``prefers_encoded = True``
    receives it."""

    id: int
    first_lsn: int
    last_lsn: int
    relations: List[Relation]
    count: int
    data: bytes


_OP_BYTES = {Op.INSERT: b"I", Op.UPDATE: b"U", Op.DELETE: b"D", Op.TRUNCATE: b"T", Op.READ: b"R"}


def _datum_text(d: Any) -> str:
    if isinstance(d, Datum_Boolean):
        return "t" if d.value else "f"
    if isinstance(d, Datum_Bytes):
        return "\\x" + bytes(d.value).hex()
    if isinstance(d, Datum_Float):
        v = d.value
        if v != v:
            return "NaN"
        if v in (float("inf"), float("-inf")):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)
    return str(d.value)


def encode(batch: Batch) -> EncodedBatch:
    """A typed batch (from :class:`BatchBuilder`) in the compact encoding, values in
    PostgreSQL's text form, as the host sends it: test a plugin's encoded path with it."""
    import struct

    out = bytearray()

    def tuple_(values: list) -> None:
        out.extend(struct.pack(">H", len(values)))
        for d in values:
            if isinstance(d, Datum_Null):
                out.extend(b"n")
            elif isinstance(d, Datum_UnchangedToast):
                out.extend(b"u")
            else:
                t = _datum_text(d).encode()
                out.extend(b"t" + struct.pack(">I", len(t)) + t)

    for c in batch.changes:
        out += _OP_BYTES[c.op]
        out += struct.pack(">IQQIq", c.relation, c.lsn, c.commit_lsn, c.xid, c.commit_time_us)
        out.append((c.old is not None) | (c.old_is_key << 1) | ((c.new is not None) << 2))
        if c.old is not None:
            tuple_(c.old)
        if c.new is not None:
            tuple_(c.new)
    return EncodedBatch(batch.id, batch.first_lsn, batch.last_lsn, batch.relations, len(batch.changes), bytes(out))


def config(**values: Any) -> Config:
    """A :class:`Config` as the host would pass it."""
    return Config(values)


# --- the host double -----------------------------------------------------------------

_logs: list[tuple[str, str, list[tuple[str, str]]]] = []
_requests: list[Request] = []
_handler: Optional[Callable[[Request], Response]] = None


def reset() -> None:
    """Forgets recorded logs, requests and the HTTP handler."""
    global _handler
    _logs.clear()
    _requests.clear()
    _handler = None


def logs() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Recorded log events: (level, message, fields)."""
    return list(_logs)


def requests() -> list[Request]:
    """HTTP requests sent so far."""
    return list(_requests)


def on_http(handler: Callable[[Request], Response]) -> None:
    """Answers ``dbmazz.http.send``; raise :class:`HttpError` to fail a request."""
    global _handler
    _handler = handler


def _record_log(level: str, message: str, fields: list[tuple[str, str]]) -> None:
    _logs.append((level, message, fields))


def _send(request: Request) -> Response:
    _requests.append(request)
    if _handler is None:
        raise HttpError("no HTTP handler installed (dbmazz.testing.on_http)")
    return _handler(request)
