"""Unit tests under plain CPython: `python -m pytest`."""

from dbmazz import testing
from transform import DropWhere


def batch():
    return (
        testing.BatchBuilder(1)
        .table(1, "public", "orders", [("id", 23, True), ("status", 25, False)])
        .insert(1, [1, "ok"])
        .insert(1, [2, "test"])
        .delete(1, [3, "test"])
        .update(1, [4, "ok"])
        .build()
    )


def test_drops_the_matching_changes_and_keeps_the_rest_in_order():
    t = DropWhere(testing.config(column="status", equals="test"))
    assert t.process(batch()) == [0, 3]


def test_keeps_the_whole_batch_when_nothing_matches():
    t = DropWhere(testing.config(column="status", equals="nope"))
    assert t.process(batch()) is None
