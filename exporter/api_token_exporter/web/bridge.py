"""A WSGI app served from an event loop: what lets `serve` and `proxy` hold thousands of slow
or silent clients while a few threads answer the others.

The loop (uvicorn's, see worker.py) reads each request; its body is read here, on the loop,
within ``http_body_timeout`` and up to the size the app reads (``buffered_body_bytes``), so a
slow body costs a buffer, not a thread. Then the app runs on a bounded pool of threads; a small
answer goes back in one piece, a streamed one (no Content-Length, or a large one: the proxy's
upstream answers) chunk by chunk as the app yields it. A body larger than the buffer (the proxy
passing an upload on) is read by the app from the loop, each read within the body timeout.

An app may hand an endless answer to the loop instead (the console's live view): it puts an
object in ``environ[LOOP_STREAM]`` whose ``on_loop(stopping)`` is an async generator of chunks;
its WSGI answer then gives only the status and headers. The loop ``take``s the object before
closing that answer and ``release``s it at the end. Such a stream holds no thread; it ends when
the client leaves, stops reading for the body timeout, or the worker drains.

The ASGI middleware's built-in endpoints go through ``wsgi_environ`` and ``call_wsgi`` too: one
translation from an ASGI scope to a WSGI environ.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import sys
import threading
from typing import List, Tuple

log = logging.getLogger("api_token_exporter")

SMALL_ANSWER = 1 << 20          # answers up to this with a Content-Length are sent in one piece
DEFAULT_BUFFER = 1 << 20
LOOP_STREAM = "api_token_exporter.loop_stream"
DRAINING = threading.Event()    # set when the worker drains (SIGTERM): streams on the loop end


class ClientGone(Exception):
    """The client closed its connection: a streamed answer stops."""


def wsgi_environ(scope, path: str, body: bytes, stream=None) -> dict:
    """The WSGI environ of an ASGI request whose body is ``body``, or ``stream`` (a longer one,
    whose Content-Length or chunking the client's headers give)."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client")
    query = scope.get("query_string", b"").decode("latin-1")
    raw_path = scope.get("raw_path")
    environ = {
        "REQUEST_METHOD": scope.get("method", "GET"),
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": query,
        "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1] if server[1] is not None else 80),
        "SERVER_PROTOCOL": "HTTP/" + scope.get("http_version", "1.1"),
        "REMOTE_ADDR": client[0] if client else "",
        "wsgi.version": (1, 0), "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body) if stream is None else stream,
        "wsgi.input_terminated": True, "wsgi.errors": sys.stderr, "wsgi.multithread": True,
        "wsgi.multiprocess": True, "wsgi.run_once": False,
    }
    if raw_path:
        environ["RAW_URI"] = raw_path.decode("latin-1") + ("?" + query if query else "")
    if stream is None:
        environ["CONTENT_LENGTH"] = str(len(body))       # the body read, which may be shorter than said
    for name, value in scope.get("headers", ()):
        name, value = name.decode("latin-1").upper().replace("-", "_"), value.decode("latin-1")
        if name == "CONTENT_LENGTH":
            if stream is not None:
                environ["CONTENT_LENGTH"] = value
            continue
        if name == "TRANSFER_ENCODING" and stream is None:
            continue                                     # the whole body is here: its length is known
        key = name if name == "CONTENT_TYPE" else "HTTP_" + name
        environ[key] = environ[key] + "," + value if key in environ else value
    return environ


def call_wsgi(app, environ) -> Tuple[int, List[Tuple[bytes, bytes]], object]:
    """(status, headers, body) of a WSGI app's whole answer; the body is the environ's
    LOOP_STREAM instead where the app set one (send it with ``send_answer``)."""
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, headers

    result = app(environ, start_response)
    try:
        payload = _taken(environ) or b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return int(answer["status"][:3]), _asgi_headers(answer["headers"]), payload


async def _send_loop_stream(stream, send, receive, timeout: float) -> None:
    """Send a LOOP_STREAM's chunks (the head is sent) until it ends, the client leaves or does
    not take a chunk within ``timeout``, or the worker drains."""
    gone = asyncio.ensure_future(_watch_disconnect(receive))
    chunks = stream.on_loop(lambda: gone.done() or DRAINING.is_set())
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if gone.done():
                    return
                await asyncio.wait_for(send({"type": "http.response.body", "body": chunk, "more_body": True}),
                                       timeout)
        if not gone.done():
            await send({"type": "http.response.body", "body": b""})
    except (asyncio.TimeoutError, OSError):
        pass                                             # the client stopped reading, or left
    finally:
        gone.cancel()
        stream.release()


def _asgi_headers(headers) -> List[Tuple[bytes, bytes]]:
    return [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]


class WsgiBridge:
    """The ASGI app that serves ``app`` (WSGI) on ``threads`` threads."""

    def __init__(self, app, *, threads: int, body_timeout: float):
        self.app = app
        self.body_timeout = body_timeout
        self.buffered = getattr(app, "buffered_body_bytes", DEFAULT_BUFFER)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="app")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.executor)
            return
        if scope["type"] != "http":
            return                                       # websockets: refused by the server
        loop = asyncio.get_running_loop()
        read = await self._read_body(scope, receive, loop)
        if read is None:
            return                                       # the client went away
        if read == 408:
            await _answer(send, 408, {"detail": f"The request's body did not arrive within {self.body_timeout:g} s"})
            return
        body, more = read
        stream = io.BufferedReader(LoopInput(body, receive, loop, self.body_timeout)) if more else None
        environ = wsgi_environ(scope, scope["path"], body, stream)
        answer = await loop.run_in_executor(self.executor, self._run, environ, send, receive, loop)
        if answer is not None:                           # a whole answer or a loop stream: sent from here
            await send_answer(answer, send, receive, self.body_timeout)

    async def _read_body(self, scope, receive, loop):
        """(body, more) once up to ``buffered`` bytes have come (more: the client sends more),
        408 past the body timeout, None if the client left."""
        if not _has_body(scope["headers"]):
            return b"", False
        chunks, size = [], 0
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return 408
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
            more = message.get("more_body", False)
            if not more or size >= self.buffered:
                return b"".join(chunks), more

    def _run(self, environ, send, receive, loop):
        """On a thread: the app's answer, whole (returned) or streamed (sent from here)."""
        started = []

        def start_response(status, headers, exc_info=None):
            if exc_info and started and started[0] is True:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [int(status[:3]), headers]

        try:
            result = self.app(environ, start_response)
        except Exception:
            log.exception("the app failed")
            return 500, [(b"content-type", b"application/json")], b'{"detail": "Internal error"}'
        try:
            stream = _taken(environ)
            if stream is not None:
                return started[0], _asgi_headers(started[1]), stream
            length = next((v for n, v in started[1] if n.lower() == "content-length"), None) if started else None
            if isinstance(result, (list, tuple)) or (length is not None and int(length) <= SMALL_ANSWER):
                payload = b"".join(result)
                return started[0], _asgi_headers(started[1]), payload
            self._stream(result, started, send, receive, loop)
            return None
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def _stream(self, result, started, send, receive, loop):
        """Send the app's chunks as it yields them; a client that leaves, or does not take a
        chunk within the body timeout (it stopped reading), ends the stream and frees the thread."""
        gone = asyncio.run_coroutine_threadsafe(_watch_disconnect(receive), loop)

        def put(message):
            if gone.done():
                raise ClientGone()
            future = asyncio.run_coroutine_threadsafe(send(message), loop)
            try:
                future.result(self.body_timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise ClientGone() from None

        head_sent = False
        try:
            for chunk in result:
                if not head_sent:
                    put({"type": "http.response.start", "status": started[0], "headers": _asgi_headers(started[1])})
                    head_sent = True
                if chunk:
                    put({"type": "http.response.body", "body": chunk, "more_body": True})
            if not head_sent:
                put({"type": "http.response.start", "status": started[0], "headers": _asgi_headers(started[1])})
            put({"type": "http.response.body", "body": b""})
        finally:
            gone.cancel()


def _taken(environ):
    """The environ's LOOP_STREAM, taken by the loop, or None."""
    stream = environ.get(LOOP_STREAM)
    if stream is not None:
        stream.take()
    return stream


async def send_answer(answer, send, receive, timeout: float) -> None:
    """Send (status, headers, body): a body in one piece, or a LOOP_STREAM's chunks."""
    status, headers, payload = answer
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if isinstance(payload, bytes):
            await send({"type": "http.response.body", "body": payload})
            return
    except BaseException:
        if not isinstance(payload, bytes):
            payload.release()
        raise
    await _send_loop_stream(payload, send, receive, timeout)


def _has_body(headers) -> bool:
    for name, value in headers:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


async def _watch_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(send, status: int, document: dict) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": json.dumps(document).encode()})


async def _lifespan(receive, send, executor) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            executor.shutdown(wait=False)
            await send({"type": "lifespan.shutdown.complete"})
            return


class LoopInput(io.RawIOBase):
    """A body longer than the buffer: its first part, then the rest read on a thread from the
    loop, each read within the timeout (wrap it in io.BufferedReader)."""

    def __init__(self, first: bytes, receive, loop, timeout: float):
        self.receive, self.loop, self.timeout = receive, loop, timeout
        self.pending, self.ended = first, False

    def readable(self):
        return True

    def readinto(self, buffer) -> int:
        while not self.pending and not self.ended:
            future = asyncio.run_coroutine_threadsafe(self.receive(), self.loop)
            try:
                message = future.result(self.timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise OSError("the request's body stopped arriving") from None
            if message["type"] == "http.disconnect":
                raise OSError("the client went away during the request's body")
            self.pending = message.get("body", b"")
            self.ended = not message.get("more_body", False)
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n
