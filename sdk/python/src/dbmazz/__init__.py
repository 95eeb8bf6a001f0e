"""dbmazz-sdk for Python: write dbmazz sinks and transforms as WebAssembly components.

A sink is a class with ``write(batch)``; a transform one with ``process(batch)``. The
same class runs under plain CPython in your tests (``dbmazz.testing``) and inside the
component that ``dbmazz-plugin-build`` makes with componentize-py::

    import dbmazz

    class Printer(dbmazz.Sink):
        config_keys = [dbmazz.Key("prefix", "text", default="batch", doc="log prefix")]

        def __init__(self, config: dbmazz.Config):
            self.prefix = config.get("prefix", "batch")

        def write(self, batch):
            for c in dbmazz.changes(batch):
                dbmazz.log.info(f"{self.prefix} {c.op} {c.table} {c.new}")

    SinkPlugin = dbmazz.export_sink(Printer)   # in app.py, the component's entry module

Shapes (contract ``dbmazz:plugin@0.3.0``, ``wit/dbmazz-plugin.wit``): a batch has ``id``
(stable across replays: an idempotency key), ``first_lsn``/``last_lsn``, ``relations``
and ``changes``; ``dbmazz.changes(batch)`` gives each change as a ``ChangeView`` with the
op name (``insert``, ``update``, ``delete``, ``truncate``, ``read``), ``schema.table``,
and ``old``/``new`` as dicts by column name, values as Python values
(``None`` for NULL, :data:`UNCHANGED_TOAST` for a TOASTed value the update did not send —
never a NULL).

Errors: raise :class:`Retryable` (the host retries the batch with backoff), :class:`Fatal`
(the pipeline stops) or :class:`DeadLetter` (these changes go to the dead-letter store,
the rest counts as written). Any other exception is retryable, with its traceback in
the error the host logs and shows in Status.
"""

from __future__ import annotations

import json
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from . import _encoded, _runtime, http, log  # noqa: F401  (re-exported: dbmazz.log.info(...))
from ._encoded import DecodeError, is_encoded

__all__ = [
    "Sink",
    "Transform",
    "Config",
    "Key",
    "Retryable",
    "Fatal",
    "DeadLetter",
    "ChangeView",
    "changes",
    "change_count",
    "is_encoded",
    "DecodeError",
    "value",
    "op_name",
    "to_json",
    "UNCHANGED_TOAST",
    "export_sink",
    "export_transform",
    "log",
]

CONTRACT = "0.3.0"


class _UnchangedToast:
    """A TOASTed value PostgreSQL did not send on UPDATE: the stored value stays."""

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


#: The value of a column whose TOASTed value the update did not change (not a NULL).
UNCHANGED_TOAST = _UnchangedToast()


class Retryable(Exception):
    """A transient failure: the host retries the whole batch, after ``retry_after_ms``."""

    def __init__(self, message: str, retry_after_ms: Optional[int] = None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Fatal(Exception):
    """The sink cannot work (bad credentials, a missing table): the pipeline stops."""


class DeadLetter(Exception):
    """The batch was written except these changes: ``[(index, reason), ...]``."""

    def __init__(self, rejected: list[tuple[int, str]]):
        super().__init__(f"{len(rejected)} changes rejected")
        self.rejected = list(rejected)


#: The types a configuration key may declare (``metadata.config-type``).
CONFIG_TYPES = ("text", "integer", "float", "boolean", "array", "table", "any")


@dataclass
class Key:
    """A configuration key the plugin takes; the host refuses others before ``init``."""

    name: str
    type: str = "text"
    required: bool = False
    default: Optional[str] = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.type not in CONFIG_TYPES:
            raise ValueError(f"Key {self.name!r}: type {self.type!r} is not one of {CONFIG_TYPES}")


class Config:
    """The stage's ``config`` table (then the host's ``dbmazz.*`` keys), typed: strings,
    ints, floats, bools, and lists/dicts for TOML arrays and tables."""

    def __init__(self, values: dict[str, Any]):
        self.values = dict(values)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def required(self, key: str) -> Any:
        if key not in self.values:
            raise Fatal(f"config key {key!r} is required")
        return self.values[key]

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __repr__(self) -> str:
        return f"Config({self.values!r})"


class _Plugin:
    #: Name shown by ``dbmazz plugin inspect`` (default: the class name).
    name: Optional[str] = None
    #: The plugin's own version.
    version: str = "0.1.0"
    #: One line on what it does.
    description: str = ""
    #: The keys it takes; empty: any key is passed through unchecked.
    config_keys: list[Key] = []
    #: Linear memory it needs, MiB; the host refuses a stage whose ``limits.memory_mb``
    #: is lower. CPython in a component needs about 40 MiB before any batch.
    memory_mb: Optional[int] = None


class Sink(_Plugin):
    """Subclass and implement ``write``; ``__init__(self, config)`` receives the
    :class:`Config`."""

    #: True: the host sends batches in the compact encoding (``encoded-batch``: one
    #: ``bytes`` buffer instead of an object per value, so crossing into the component
    #: is one copy). :func:`changes` reads both forms into the same values, so ``write``
    #: does not change; such a batch has ``count`` and ``data`` instead of ``changes``.
    prefers_encoded: bool = False

    #: Preferred number of changes per batch (a hint to the host).
    preferred_batch_size: Optional[int] = None

    def __init__(self, config: Config):
        self.config = config

    def write(self, batch: Any) -> None:
        raise NotImplementedError

    def apply_schema_change(self, change: Any) -> None:
        """A relation's shape changed, before the next batch that uses it."""


class Transform(_Plugin):
    """Subclass and implement ``process``: return ``None`` to keep every change, or the
    list of indices to keep."""

    #: As :attr:`Sink.prefers_encoded`; the indices ``process`` returns are the same.
    prefers_encoded: bool = False

    def __init__(self, config: Config):
        self.config = config

    def process(self, batch: Any) -> Optional[list[int]]:
        raise NotImplementedError


# --- values -----------------------------------------------------------------------

_OPS = {"INSERT": "insert", "UPDATE": "update", "DELETE": "delete", "TRUNCATE": "truncate", "READ": "read"}


def op_name(op: Any) -> str:
    """``insert``, ``update``, ``delete``, ``truncate`` or ``read``."""
    return _OPS[op.name]


def value(datum: Any) -> Any:
    """A column value as Python: None (NULL), UNCHANGED_TOAST, bool, int, float, str
    (text, and numeric as PostgreSQL prints it, to keep every digit), bytes, or the
    parsed document for json/jsonb."""
    kind = type(datum).__name__
    if kind == "Datum_Null":
        return None
    if kind == "Datum_UnchangedToast":
        return UNCHANGED_TOAST
    if kind == "Datum_Json":
        return json.loads(datum.value)
    if kind == "Datum_Bytes":
        return bytes(datum.value)
    return datum.value


@dataclass
class ChangeView:
    """One change, Pythonic: ``op`` name, ``table`` as ``schema.table``, ``old``/``new``
    dicts by column name (``None`` when absent), LSNs and the transaction."""

    index: int
    op: str
    table: str
    key: list[str]
    old: Optional[dict[str, Any]]
    new: Optional[dict[str, Any]]
    lsn: int
    commit_lsn: int
    xid: int
    commit_time_us: int
    old_is_key: bool = False
    raw: Any = field(default=None, repr=False)


def change_count(batch: Any) -> int:
    """Number of changes in a typed or an encoded batch."""
    return batch.count if is_encoded(batch) else len(batch.changes)


def _encoded_changes(batch: Any) -> Iterator[ChangeView]:
    relations = {r.id: r for r in batch.relations}
    shapes: dict[int, tuple[list[str], list, str, list[str]]] = {}

    def shape(rel_id: int) -> tuple[list[str], list]:
        s = shapes.get(rel_id)
        if s is None:
            rel = relations.get(rel_id)
            cols = rel.columns if rel else []
            s = shapes[rel_id] = (
                [c.name for c in cols],
                _encoded.converters([c.type_oid for c in cols]),
                f"{rel.schema}.{rel.table}" if rel else str(rel_id),
                [c.name for c in cols if c.key],
            )
        return s[0], s[1]

    for i, (op, rel_id, lsn, commit_lsn, xid, time_us, old_is_key, old, new) in enumerate(
        _encoded.read(batch.data, batch.count, shape, UNCHANGED_TOAST)
    ):
        _, _, table, key = shapes[rel_id]
        yield ChangeView(
            index=i,
            op=op,
            table=table,
            key=key,
            old=old,
            new=new,
            lsn=lsn,
            commit_lsn=commit_lsn,
            xid=xid,
            commit_time_us=time_us,
            old_is_key=old_is_key,
        )


def changes(batch: Any) -> Iterator[ChangeView]:
    """The batch's changes as :class:`ChangeView`, in commit order — of a typed batch or
    of an encoded one (a plugin with ``prefers_encoded = True``; ``raw`` is then None). A
    malformed encoded buffer raises :class:`DecodeError`."""
    if is_encoded(batch):
        yield from _encoded_changes(batch)
        return
    relations = {r.id: r for r in batch.relations}
    for i, c in enumerate(batch.changes):
        rel = relations.get(c.relation)
        names = [col.name for col in rel.columns] if rel else []

        def row(values: Any) -> Optional[dict[str, Any]]:
            if values is None:
                return None
            return {n: value(v) for n, v in zip(names, values)}

        yield ChangeView(
            index=i,
            op=op_name(c.op),
            table=f"{rel.schema}.{rel.table}" if rel else str(c.relation),
            key=[col.name for col in rel.columns if col.key] if rel else [],
            old=row(c.old),
            new=row(c.new),
            lsn=c.lsn,
            commit_lsn=c.commit_lsn,
            xid=c.xid,
            commit_time_us=c.commit_time_us,
            old_is_key=c.old_is_key,
            raw=c,
        )


def _jsonable(v: Any) -> Any:
    if v is UNCHANGED_TOAST:
        return {"unchanged_toast": True}
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float) and not math.isfinite(v):
        # JSON has no NaN or Infinity: as strings, as PostgreSQL prints them
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    return v


def to_json(change: ChangeView) -> str:
    """One change as a JSON object: op, table, lsn, commit_lsn, xid, old, new (bytea as
    hex, an unchanged TOAST value as ``{"unchanged_toast": true}``, a non-finite float as
    the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``)."""
    row = lambda r: None if r is None else {k: _jsonable(v) for k, v in r.items()}  # noqa: E731
    return json.dumps(
        {
            "op": change.op,
            "table": change.table,
            "lsn": change.lsn,
            "commit_lsn": change.commit_lsn,
            "xid": change.xid,
            "old": row(change.old),
            "new": row(change.new),
        },
        separators=(",", ":"),
    )


def _config_from_wit(entries: list) -> Config:
    values: dict[str, Any] = {}
    for key, v in entries:
        kind = type(v).__name__
        values[key] = json.loads(v.value) if kind == "ConfigValue_Json" else v.value
    return Config(values)


def _error_text(e: BaseException) -> str:
    """The exception and its traceback, one string (what the host logs and shows)."""
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)).strip()


# Inside a component, the export glue is imported now, while componentize-py builds (a
# component cannot read module files at run time).
if _runtime.IN_COMPONENT:
    from . import _export  # noqa: E402,F401


def export_sink(cls: type) -> type:
    """The component's ``sink-plugin`` export for a :class:`Sink` subclass. Assign it to
    ``SinkPlugin`` in the entry module (``app.py``)."""
    from ._export import sink_plugin

    return sink_plugin(cls)


def export_transform(cls: type) -> type:
    """The component's ``transform-plugin`` export for a :class:`Transform` subclass.
    Assign it to ``TransformPlugin`` in the entry module."""
    from ._export import transform_plugin

    return transform_plugin(cls)
