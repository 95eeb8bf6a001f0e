"""Logging into the host's log (always granted): ``dbmazz.log.info("msg", key=value)``.

Inside a component the events go to the host (with the plugin's name); under CPython
they are recorded by :mod:`dbmazz.testing` (``testing.logs()``).
"""

from __future__ import annotations

from ._runtime import IN_COMPONENT

if IN_COMPONENT:
    # imported while componentize-py builds (see http.py)
    from wit_world.imports import log as wit_log

LEVELS = ("trace", "debug", "info", "warn", "error")


def write(level: str, message: str, **fields: object) -> None:
    """One event at ``level`` (trace, debug, info, warn, error) with key=value fields."""
    pairs = [(k, str(v)) for k, v in fields.items()]
    if IN_COMPONENT:
        wit_log.write(getattr(wit_log.Level, level.upper()), message, pairs)
    else:
        from . import testing

        testing._record_log(level, message, pairs)


def trace(message: str, **fields: object) -> None:
    write("trace", message, **fields)


def debug(message: str, **fields: object) -> None:
    write("debug", message, **fields)


def info(message: str, **fields: object) -> None:
    write("info", message, **fields)


def warn(message: str, **fields: object) -> None:
    write("warn", message, **fields)


def error(message: str, **fields: object) -> None:
    write("error", message, **fields)
