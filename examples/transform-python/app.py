"""The component's entry module: `dbmazz-plugin-build transform app -o transform-python.wasm`."""

import dbmazz
from transform import DropWhere

TransformPlugin = dbmazz.export_transform(DropWhere)
