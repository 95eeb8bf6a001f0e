"""The component's exports: adapters from the SDK's classes to the generated protocol of
``sink-plugin`` / ``transform-plugin`` (imported only inside a component, where
componentize-py generated ``wit_world``)."""

from __future__ import annotations

from typing import Any

from wit_world import exports
from wit_world.imports import metadata as wit_meta
from componentize_py_types import Err

import sys

from . import DeadLetter, Fatal, Retryable, _config_from_wit, _error_text


class _OutOfMemory(Exception):
    """Not an ``Err``: raised out of an export, componentize-py traps."""


def _out_of_memory() -> None:
    """Ends the call with a trap whose stderr says "out of memory": the host then knows
    the batch did not fit (``limits.memory_mb``) and splits it, as for a Rust plugin
    whose allocator failed. Answering ``retryable`` would retry the same batch forever."""
    print("out of memory: the batch does not fit in the plugin's memory", file=sys.stderr, flush=True)
    raise _OutOfMemory("out of memory")

_TYPES = {
    "text": wit_meta.ConfigType.TEXT,
    "integer": wit_meta.ConfigType.INTEGER,
    "float": wit_meta.ConfigType.FLOAT,
    "boolean": wit_meta.ConfigType.BOOLEAN,
    "array": wit_meta.ConfigType.ARRAY,
    "table": wit_meta.ConfigType.TABLE,
    "any": wit_meta.ConfigType.ANY,
}


def _describe(cls: type) -> Any:
    return wit_meta.PluginMetadata(
        name=cls.name or cls.__name__,
        version=cls.version,
        description=cls.description or (cls.__doc__ or "").strip().split("\n")[0],
        config=[
            wit_meta.ConfigKey(
                name=k.name,
                value_type=_TYPES[k.type],
                required=k.required,
                default_value=k.default,
                description=k.doc,
            )
            for k in cls.config_keys
        ],
        other_keys=not cls.config_keys,
        memory_mb=cls.memory_mb,
    )


def _sink_error(e: BaseException) -> Any:
    from wit_world.exports import sink_plugin as wit_sink

    if isinstance(e, MemoryError):
        _out_of_memory()
    if isinstance(e, Retryable):
        return wit_sink.SinkError_Retryable((str(e), e.retry_after_ms))
    if isinstance(e, Fatal):
        return wit_sink.SinkError_Fatal(str(e))
    if isinstance(e, DeadLetter):
        return wit_sink.SinkError_DeadLetter(
            [wit_sink.Rejected(index=i, reason=r) for i, r in e.rejected]
        )
    # anything else: transient, with the traceback for the operator
    return wit_sink.SinkError_Retryable((_error_text(e), None))


def sink_plugin(cls: type) -> type:
    # only the world's own export exists in `wit_world.exports`
    from wit_world.exports import sink_plugin as wit_sink

    class SinkPlugin(exports.SinkPlugin):
        instance: Any = None

        def describe(self) -> Any:
            return _describe(cls)

        def init(self, config: list) -> Any:
            try:
                SinkPlugin.instance = cls(_config_from_wit(config))
            except Exception as e:  # noqa: BLE001 - every failure is reported to the host
                raise Err(_error_text(e))
            return wit_sink.SinkInfo(
                preferred_batch_size=cls.preferred_batch_size,
                needs_full_rows=False,
                prefers_encoded=bool(cls.prefers_encoded),
            )

        def _call(self, method: str, arg: Any) -> None:
            if SinkPlugin.instance is None:
                raise Err(wit_sink.SinkError_Fatal(f"{method} before init"))
            try:
                getattr(SinkPlugin.instance, method)(arg)
            except Exception as e:  # noqa: BLE001
                raise Err(_sink_error(e))

        def write(self, batch: Any) -> None:
            self._call("write", batch)

        def write_encoded(self, batch: Any) -> None:
            # the same method: dbmazz.changes reads both forms
            self._call("write", batch)

        def apply_schema_change(self, change: Any) -> None:
            self._call("apply_schema_change", change)

    return SinkPlugin


def transform_plugin(cls: type) -> type:
    from wit_world.exports import transform_plugin as wit_transform

    class TransformPlugin(exports.TransformPlugin):
        instance: Any = None

        def describe(self) -> Any:
            return _describe(cls)

        def init(self, config: list) -> Any:
            try:
                TransformPlugin.instance = cls(_config_from_wit(config))
            except Exception as e:  # noqa: BLE001
                raise Err(_error_text(e))
            return wit_transform.TransformInfo(prefers_encoded=bool(cls.prefers_encoded))

        def process(self, batch: Any) -> Any:
            if TransformPlugin.instance is None:
                raise Err("process before init")
            try:
                keep = TransformPlugin.instance.process(batch)
            except MemoryError:
                _out_of_memory()
            except Exception as e:  # noqa: BLE001
                raise Err(_error_text(e))
            if keep is None:
                return wit_transform.TransformResult_KeepAll()
            return wit_transform.TransformResult_Keep(sorted(int(i) for i in keep))

        def process_encoded(self, batch: Any) -> Any:
            # the same method: dbmazz.changes reads both forms
            return self.process(batch)

    return TransformPlugin
