"""``python -m dbmazz sink app -o sink.wasm``: see :mod:`dbmazz.build`."""

import sys

from .build import main

sys.exit(main())
