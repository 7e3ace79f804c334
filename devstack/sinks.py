"""Notification sinks on 127.0.0.1: a webhook sink (Alertmanager webhooks and Slack posts) and
an SMTP sink (aiosmtpd). Each keeps what it received and shows it on GET as JSON."""
from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional


class WebhookSink:
    """Records every POST body (JSON if it parses) by path. ``GET /`` lists them."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.received: List[dict] = []
        self.mail_source: Optional[Callable[[], List[dict]]] = None   # GET /mail shows these
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(min(length, 10 * 1024 * 1024))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with sink._lock:
                    sink.received.append({"path": self.path, "body": body, "at": time.time(),
                                          "authorization": self.headers.get("Authorization")})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def do_GET(self):
                if self.path.startswith("/mail") and sink.mail_source is not None:
                    payload = json.dumps(sink.mail_source(), indent=1).encode()
                else:
                    with sink._lock:
                        payload = json.dumps(sink.received, indent=1).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "WebhookSink":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def posts(self, path: Optional[str] = None) -> List[dict]:
        with self._lock:
            return [r for r in self.received if path is None or r["path"] == path]

    def alerts(self, path: str = "/alerts") -> List[dict]:
        """Every alert in every Alertmanager webhook notification received on ``path``."""
        out = []
        for post in self.posts(path):
            body = post["body"]
            if isinstance(body, dict):
                out.extend(body.get("alerts", []))
        return out


class SmtpSink:
    """An SMTP server that accepts every message and keeps it parsed."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        from aiosmtpd.controller import Controller
        self.messages: List[email.message.EmailMessage] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
                sink.messages.append(msg)
                return "250 OK"

        if port == 0:
            from devstack.stack import free_port
            port = free_port()
        self.host, self.port = host, port
        self.controller = Controller(Handler(), hostname=host, port=port)

    def start(self) -> "SmtpSink":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def find(self, predicate: Callable[[email.message.EmailMessage], bool]) -> List[dict]:
        out = []
        for msg in list(self.messages):
            if predicate(msg):
                body = msg.get_body(preferencelist=("plain", "html"))
                out.append({"subject": str(msg["Subject"]), "to": str(msg["To"]),
                            "body": body.get_content() if body else ""})
        return out

    def summaries(self) -> List[Dict[str, str]]:
        return self.find(lambda m: True)
