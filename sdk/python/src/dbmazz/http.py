"""Outgoing HTTP for sinks, blocking: ``dbmazz.http.post(url, body, headers)``.

Inside a component it goes through ``wasi:http/outgoing-handler``: only to the
``host:port``s in the stage's ``capabilities.http``, bounded by its ``call_timeout_ms``
(the host refuses anything else; a refusal raises :class:`HttpError`). Under CPython the
request goes to the handler installed with ``dbmazz.testing.on_http``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from ._runtime import IN_COMPONENT

if IN_COMPONENT:
    # At module load, not in the call: componentize-py snapshots the modules imported
    # while it builds, and a component cannot read module files at run time (the host
    # gives it no file system).
    from componentize_py_types import Err

    try:
        from wit_world.imports import outgoing_handler, streams
        from wit_world.imports import types as wasi_http
    except ImportError:  # the transform world has no wasi:http
        outgoing_handler = None

#: Bytes written to the request body stream per call (wasi:io's limit is 4096).
_CHUNK = 4096


class HttpError(Exception):
    """The request did not get an answer: refused by the host, connection failed, timed
    out. Usually retryable."""


@dataclass
class Request:
    method: str
    url: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


def post(url: str, body: bytes, headers: Optional[list[tuple[str, str]]] = None) -> Response:
    """POSTs ``body`` to ``url`` and returns the whole response."""
    return send(Request("POST", url, list(headers or []), body))


def send(request: Request) -> Response:
    """Sends a request and returns the whole response."""
    if not IN_COMPONENT:
        from . import testing

        return testing._send(request)
    return _send_wasi(request)


def _send_wasi(request: Request) -> Response:
    if outgoing_handler is None:
        raise HttpError("outgoing HTTP is for sinks only: a transform's world has no wasi:http")
    http = wasi_http
    parts = urlsplit(request.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HttpError(f"not an http(s) URL: {request.url!r}")
    methods = {
        "GET": http.Method_Get(),
        "POST": http.Method_Post(),
        "PUT": http.Method_Put(),
        "DELETE": http.Method_Delete(),
    }
    headers = http.Fields.from_list([(k, v.encode()) for k, v in request.headers])
    req = http.OutgoingRequest(headers)
    req.set_method(methods.get(request.method.upper(), http.Method_Other(request.method)))
    req.set_scheme(http.Scheme_Https() if parts.scheme == "https" else http.Scheme_Http())
    req.set_authority(parts.netloc)
    req.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    out_body = req.body()
    # The request goes out first: the host streams the body as it is written (writing a
    # large body before `handle` would wait for a reader that is not there yet).
    try:
        future = outgoing_handler.handle(req, None)
    except Err as e:
        raise HttpError(f"request refused: {e.value}") from None
    with out_body.write() as stream:
        data = memoryview(request.body)
        for i in range(0, len(data), _CHUNK):
            stream.blocking_write_and_flush(bytes(data[i : i + _CHUNK]))
    http.OutgoingBody.finish(out_body, None)
    with future:
        with future.subscribe() as pollable:
            pollable.block()
        answer = future.get()
    if answer is None:
        raise HttpError("no response")
    if isinstance(answer, Err) or isinstance(answer.value, Err):
        err = answer.value if isinstance(answer, Err) else answer.value.value
        raise HttpError(f"request failed: {err}")
    resp = answer.value.value
    body = bytearray()
    with resp:
        status = resp.status()
        with resp.headers() as fields:
            resp_headers = [(k, v.decode("latin-1")) for k, v in fields.entries()]
        with resp.consume() as in_body:
            with in_body.stream() as stream:
                while True:
                    try:
                        chunk = stream.blocking_read(65536)
                    except Err as e:
                        if isinstance(e.value, streams.StreamError_Closed):
                            break
                        raise HttpError(f"reading the response: {e.value}") from None
                    body += chunk
    return Response(status, resp_headers, bytes(body))
