"""A fake upstream API for the proxy's tests, its benchmark and the demo: a threaded WSGI app
that speaks GitHub's, OpenAI's or Anthropic's rate-limit headers per token, answers 429 with
``Retry-After`` when a token's quota is spent, 401 for a revoked or unknown token, and streams
server-sent events chunk by chunk (a test can hold the stream open with ``gate``)."""
from __future__ import annotations

import datetime as dt
import json
import math
import threading
import time
from typing import Callable, Dict, List, Optional


def go_duration(seconds: float) -> str:
    """OpenAI's reset form: 12ms, 1s, 6m0s, 1m12.5s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


class Quota:
    __slots__ = ("limit", "remaining", "reset_at", "tokens_remaining")

    def __init__(self, limit: int, remaining: int, reset_at: float):
        self.limit, self.remaining, self.reset_at = limit, remaining, reset_at
        self.tokens_remaining = 150_000


class FakeUpstream:
    def __init__(self, provider: str = "github", limit: int = 5000, window: float = 3600.0,
                 clock: Callable[[], float] = time.time, chunk_delay: float = 0.0):
        self.provider, self.limit, self.window, self.clock = provider, limit, window, clock
        self.chunk_delay = chunk_delay
        self.quotas: Dict[str, Quota] = {}           # by account
        self.accounts: Dict[str, str] = {}           # secret -> account
        self.revoked: set = set()
        self.seen: List[dict] = []                   # what each request looked like
        self.fail_next = 0                           # answer this many requests with 500
        self.gate = threading.Event()                # a /stream waits on it before its last chunk
        self.gate.set()
        self.finished = threading.Event()            # set when a /stream sent its last chunk
        self.record = True
        self._lock = threading.Lock()
        self._server = None

    # -- set-up --------------------------------------------------------------------------------
    def add(self, secret: str, limit: Optional[int] = None, remaining: Optional[int] = None,
            reset_in: Optional[float] = None, account: Optional[str] = None) -> None:
        account = account or secret
        self.accounts[secret] = account
        if account not in self.quotas or limit is not None or remaining is not None:
            limit = limit if limit is not None else self.limit
            self.quotas[account] = Quota(limit, limit if remaining is None else remaining,
                                         self.clock() + (self.window if reset_in is None else reset_in))

    def revoke(self, secret: str) -> None:
        self.revoked.add(secret)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        from werkzeug.serving import make_server
        self._server = make_server(host, port, self, threaded=True)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://{host}:{self._server.server_port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the API -------------------------------------------------------------------------------
    def _secret(self, environ) -> str:
        if self.provider == "anthropic":
            return environ.get("HTTP_X_API_KEY", "")
        auth = environ.get("HTTP_AUTHORIZATION", "")
        return auth.split(" ", 1)[1] if " " in auth else auth

    def _headers(self, q: Quota, now: float) -> List[tuple]:
        left = max(0.0, q.reset_at - now)
        if self.provider == "openai":
            return [("x-ratelimit-limit-requests", str(q.limit)), ("x-ratelimit-remaining-requests", str(q.remaining)),
                    ("x-ratelimit-reset-requests", go_duration(left)), ("x-ratelimit-limit-tokens", "150000"),
                    ("x-ratelimit-remaining-tokens", str(q.tokens_remaining)),
                    ("x-ratelimit-reset-tokens", go_duration(min(left, 6.0)))]
        if self.provider == "anthropic":
            reset = dt.datetime.fromtimestamp(q.reset_at, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return [("anthropic-ratelimit-requests-limit", str(q.limit)),
                    ("anthropic-ratelimit-requests-remaining", str(q.remaining)),
                    ("anthropic-ratelimit-requests-reset", reset),
                    ("anthropic-ratelimit-tokens-limit", "150000"),
                    ("anthropic-ratelimit-tokens-remaining", str(q.tokens_remaining)),
                    ("anthropic-ratelimit-tokens-reset", reset)]
        return [("x-ratelimit-limit", str(q.limit)), ("x-ratelimit-remaining", str(q.remaining)),
                ("x-ratelimit-used", str(q.limit - q.remaining)), ("x-ratelimit-reset", str(int(q.reset_at))),
                ("x-ratelimit-resource", "core")]

    def __call__(self, environ, start_response):
        now = self.clock()
        path = environ.get("PATH_INFO", "/")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            body = environ["wsgi.input"].read(length)
        else:                                           # a chunked body, or none
            body = environ["wsgi.input"].read() if environ.get("wsgi.input_terminated") else b""
        secret = self._secret(environ)
        if self.record:
            with self._lock:
                self.seen.append({"method": environ["REQUEST_METHOD"], "path": path, "secret": secret,
                                  "query": environ.get("QUERY_STRING", ""), "body": body,
                                  "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")}})
        account = self.accounts.get(secret)
        if account is None or secret in self.revoked:
            return self._json(start_response, "401 Unauthorized", {"message": "Bad credentials"},
                              [("x-ratelimit-limit", "60"), ("x-ratelimit-remaining", "59")]
                              if self.provider == "github" else [])
        with self._lock:
            q = self.quotas[account]
            if q.reset_at <= now:
                q.remaining, q.reset_at, q.tokens_remaining = q.limit, now + self.window, 150_000
            if path == "/rate_limit" and self.provider == "github":      # free, as on GitHub
                core = {"limit": q.limit, "remaining": q.remaining, "used": q.limit - q.remaining,
                        "reset": int(q.reset_at)}
                return self._json(start_response, "200 OK", {"resources": {
                    "core": core, "search": {"limit": 30, "remaining": 30, "used": 0, "reset": int(now) + 60}},
                    "rate": core}, self._headers(q, now))
            if self.fail_next > 0:
                self.fail_next -= 1
                return self._json(start_response, "500 Internal Server Error", {"message": "boom"})
            if q.remaining <= 0:
                wait = str(max(1, math.ceil(q.reset_at - now)))
                return self._json(start_response, "429 Too Many Requests",
                                  {"message": "API rate limit exceeded"}, self._headers(q, now) + [("Retry-After", wait)])
            q.remaining -= 1
            headers = self._headers(q, now)
        if path.startswith("/status/"):                 # any status the test asks for
            code = int(path.rsplit("/", 1)[1])
            return self._json(start_response, f"{code} Status {code}", {"status": code}, headers)
        if path == "/sleep":
            time.sleep(float(environ.get("QUERY_STRING") or 1))
        request = json.loads(body) if body.startswith(b"{") else {}
        if path == "/stream" or request.get("stream"):
            start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")] + headers)
            return self._events(path, request)
        if path == "/v1/chat/completions":
            answer = {"model": request.get("model", "gpt-4o"), "choices": [{"message": {"content": "hi"}}],
                      "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
            if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):         # as OpenAI's edge does
                import gzip
                payload = gzip.compress(json.dumps(answer).encode())
                start_response("200 OK", [("Content-Type", "application/json"), ("Content-Encoding", "gzip"),
                                          ("Content-Length", str(len(payload)))] + headers)
                return [payload]
            return self._json(start_response, "200 OK", answer, headers)
        if path == "/v1/messages":
            return self._json(start_response, "200 OK", {
                "type": "message", "model": request.get("model", "claude-sonnet-4-5"),
                "content": [{"type": "text", "text": "hi"}], "usage": {"input_tokens": 12, "output_tokens": 8}}, headers)
        return self._json(start_response, "200 OK", {"ok": True, "path": path, "method": environ["REQUEST_METHOD"],
                                                     "bytes": len(body)}, headers)

    def _events(self, path: str, request: dict):
        model = request.get("model", "gpt-4o")
        if path == "/v1/messages":
            events = [{"type": "message_start", "message": {"model": model, "usage": {"input_tokens": 12, "output_tokens": 1}}},
                      {"type": "content_block_delta", "delta": {"text": "hi"}},
                      {"type": "message_delta", "usage": {"output_tokens": 9}}]
        else:
            events = [{"model": model, "choices": [{"delta": {"content": "h"}}]},
                      {"model": model, "choices": [{"delta": {"content": "i"}}]},
                      {"model": model, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5}}]
        for i, event in enumerate(events):
            if i == len(events) - 1:
                self.gate.wait(30)
            elif i and self.chunk_delay:
                time.sleep(self.chunk_delay)
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"
        self.finished.set()

    @staticmethod
    def _json(start_response, status: str, doc: dict, headers=()):
        payload = json.dumps(doc).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
                       + list(headers))
        return [payload]
