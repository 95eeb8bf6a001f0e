"""A sink that POSTs each batch as JSON lines (one change per line) to `url`.

The batch id goes in the `Idempotency-Key` header: a replayed batch (after a crash) has
the same id, so the receiver can drop what it already has.
"""

import dbmazz
from dbmazz import http


class JsonLines(dbmazz.Sink):
    """POSTs batches as JSON lines."""

    name = "sink-python"
    version = "0.1.0"
    config_keys = [
        dbmazz.Key("url", "text", required=True, doc="where batches are POSTed (http://host:port/path)"),
        dbmazz.Key("only_table", "text", doc="send only this table's changes (schema.table)"),
    ]
    # CPython and a batch of a few thousand changes; the stage's limits.memory_mb must
    # be at least this.
    memory_mb = 128
    # the compact encoding: one buffer per batch instead of an object per value
    prefers_encoded = True

    def __init__(self, config: dbmazz.Config):
        self.url = config.required("url")
        self.only_table = config.get("only_table")

    def write(self, batch) -> None:
        lines = [
            dbmazz.to_json(c)
            for c in dbmazz.changes(batch)
            if self.only_table is None or c.table == self.only_table
        ]
        if not lines:
            return
        resp = http.post(
            self.url,
            ("\n".join(lines) + "\n").encode(),
            [("content-type", "application/x-ndjson"), ("idempotency-key", str(batch.id))],
        )
        if resp.status in (408, 429) or resp.status >= 500:
            raise dbmazz.Retryable(f"{self.url} answered {resp.status}")
        if not 200 <= resp.status < 300:
            raise dbmazz.Fatal(f"{self.url} answered {resp.status}: {resp.body[:200]!r}")
        dbmazz.log.debug("batch sent", id=batch.id, changes=len(lines))
