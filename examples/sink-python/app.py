"""The component's entry module: `dbmazz-plugin-build sink app -o sink-python.wasm`."""

import dbmazz
from sink import JsonLines

SinkPlugin = dbmazz.export_sink(JsonLines)
