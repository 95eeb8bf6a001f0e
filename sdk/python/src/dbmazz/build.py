"""``dbmazz-plugin-build sink app -o sink.wasm``: builds a component with componentize-py
against the contract packaged with this SDK (``dbmazz:plugin@0.3.0``).

``app`` is the entry module (``app.py`` in the current directory) that assigns
``SinkPlugin = dbmazz.export_sink(MySink)`` (or ``TransformPlugin = ...``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

WIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wit")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dbmazz-plugin-build", description=__doc__.split("\n")[0])
    p.add_argument("world", choices=["sink", "transform"], help="the plugin's world")
    p.add_argument("module", help="the entry module (app for app.py)")
    p.add_argument("-o", "--output", required=True, help="the component file to write")
    p.add_argument("-p", "--path", action="append", default=[], help="more module search paths")
    args = p.parse_args(argv)
    sdk_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable, "-c", "import sys; from componentize_py import script; sys.argv[0] = 'componentize-py'; sys.exit(script())",
        "-d", WIT,
        "-w", f"dbmazz:plugin/{args.world}@0.3.0",
        "componentize", args.module,
        "-p", ".", "-p", sdk_root,
        *[x for path in args.path for x in ("-p", path)],
        "-o", args.output,
    ]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
