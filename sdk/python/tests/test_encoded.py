"""The SDK under CPython: the compact encoding reads as the same changes as a typed batch.
Run by tests/python.rs (``python -m pytest sdk/python/tests``)."""

import math

import pytest

import dbmazz
from dbmazz import testing
from dbmazz.testing import Datum_Json, Datum_Numeric, Op


def everything():
    """Every column type the host maps, every op, NULL, unchanged TOAST, a key-only old row."""
    cols = [("id", 20, True), ("ok", 16, False), ("n", 23, False), ("f", 701, False),
            ("amount", 1700, False), ("raw", 17, False), ("doc", 3802, False), ("note", 25, False)]
    return (
        testing.BatchBuilder(9)
        .table(4, "public", "all", cols)
        .insert(4, [2**63 - 1, True, -5, 1.5, Datum_Numeric("12345678901234567890.5"), b"\x00\xff",
                    Datum_Json('{"big": 123456789012345678901234567890}'), 'héllo "q"\n'])
        .insert(4, [-(2**63), False, 0, math.inf, Datum_Numeric("NaN"), b"", [1, 2], "x" * 100 + "€"])
        .update(4, [1, None, 7, -math.inf, None, None, None, dbmazz.UNCHANGED_TOAST],
                old=[1, True, 6, 0.0, None, None, None, "old"])
        .delete(4, [2, None, None, None, None, None, None, None])
        .change(Op.READ, 4, new=[3, True, 1, 0.1, Datum_Numeric("0.10"), None, Datum_Json("null"), ""])
        .change(Op.TRUNCATE, 4)
        .build()
    )


def test_an_encoded_batch_reads_as_the_same_changes_and_json_lines():
    typed = everything()
    enc = testing.encode(typed)
    assert dbmazz.is_encoded(enc) and not dbmazz.is_encoded(typed)
    assert dbmazz.change_count(enc) == dbmazz.change_count(typed) == 6
    a = list(dbmazz.changes(typed))
    b = list(dbmazz.changes(enc))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert y.raw is None and x.raw is not None
        y.raw = x.raw
        assert x == y
        assert dbmazz.to_json(x) == dbmazz.to_json(y)
    assert b[0].new["id"] == 2**63 - 1
    assert b[0].new["raw"] == b"\x00\xff"
    assert b[0].new["amount"] == "12345678901234567890.5"
    assert b[1].new["note"].endswith("€")
    assert b[2].new["note"] is dbmazz.UNCHANGED_TOAST
    assert b[3].old_is_key and b[3].new is None
    assert b[5].op == "truncate"


def test_a_malformed_buffer_is_a_decode_error_naming_the_byte():
    enc = testing.encode(everything())
    enc.data = enc.data[:40]
    with pytest.raises(dbmazz.DecodeError, match=r"at byte \d+: (truncated|value past the end)"):
        list(dbmazz.changes(enc))
    enc = testing.encode(everything())
    enc.data = b"X" + enc.data[1:]
    with pytest.raises(dbmazz.DecodeError, match="at byte 0: unknown op"):
        list(dbmazz.changes(enc))
