"""Unit tests under plain CPython: `python -m pytest` (no wasm, no host, no database)."""

import json

import pytest

import dbmazz
from dbmazz import testing
from sink import JsonLines


def batch():
    return (
        testing.BatchBuilder(42)
        .table(1, "public", "orders", [("id", 23, True), ("note", 25, False), ("meta", 3802, False)])
        .insert(1, [1, "first", {"k": [1, 2]}])
        .update(1, [1, dbmazz.UNCHANGED_TOAST, None])
        .delete(1, [1, None, None])
        .build()
    )


def setup_function():
    testing.reset()


def test_a_batch_is_one_post_of_json_lines_keyed_by_its_id():
    testing.on_http(lambda req: testing.Response(200))
    JsonLines(testing.config(url="http://receiver:8080/in")).write(batch())
    [req] = testing.requests()
    assert req.method == "POST" and req.url == "http://receiver:8080/in"
    assert ("idempotency-key", "42") in req.headers
    lines = [json.loads(line) for line in req.body.decode().splitlines()]
    assert [line["op"] for line in lines] == ["insert", "update", "delete"]
    assert lines[0]["new"] == {"id": 1, "note": "first", "meta": {"k": [1, 2]}}
    assert lines[1]["new"]["note"] == {"unchanged_toast": True}
    assert lines[2]["old"]["id"] == 1 and lines[2]["new"] is None


def test_a_5xx_is_retryable_and_a_4xx_is_fatal():
    testing.on_http(lambda req: testing.Response(503))
    with pytest.raises(dbmazz.Retryable):
        JsonLines(testing.config(url="http://r/")).write(batch())
    testing.on_http(lambda req: testing.Response(400, body=b"bad"))
    with pytest.raises(dbmazz.Fatal, match="answered 400"):
        JsonLines(testing.config(url="http://r/")).write(batch())


def test_only_table_filters():
    testing.on_http(lambda req: testing.Response(200))
    JsonLines(testing.config(url="http://r/", only_table="public.other")).write(batch())
    assert testing.requests() == []
