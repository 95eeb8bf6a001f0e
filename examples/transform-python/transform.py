"""A transform that drops the changes whose row has `column` equal to `equals` (for
example test traffic: `column = "status", equals = "test"`); every other change goes on."""

import dbmazz


class DropWhere(dbmazz.Transform):
    """Drops changes whose row has column = value."""

    name = "transform-python"
    version = "0.1.0"
    config_keys = [
        dbmazz.Key("column", "text", required=True, doc="the column to compare"),
        dbmazz.Key("equals", "text", required=True, doc="drop the change when the column's text equals this"),
    ]
    memory_mb = 128

    def __init__(self, config: dbmazz.Config):
        self.column = config.required("column")
        self.equals = config.required("equals")

    def process(self, batch):
        keep = []
        for c in dbmazz.changes(batch):
            row = c.new if c.new is not None else c.old
            if row is not None and self.column in row and str(row[self.column]) == self.equals:
                continue
            keep.append(c.index)
        # None keeps the whole batch without sending indices back
        return None if len(keep) == dbmazz.change_count(batch) else keep
