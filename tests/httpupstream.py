"""A real HTTP (or HTTPS) upstream on loopback for tests, from ``http.server`` in a thread of
its own, so it serves whatever event loop (or none) the test runs."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HttpUpstream:
    """A real HTTP server (``http.server``, its own thread); with ``tls``, HTTPS that records the
    SNI name of every handshake. GET answers ``hello PATH from NAME``. ``host``: the address it
    listens on (loopback by default)."""

    def __init__(
        self, name: str, tls: ssl.SSLContext | None = None, *, host: str = "127.0.0.1"
    ) -> None:
        self.name = name
        self.requests: list[dict[str, str]] = []  # path, host, user_agent
        self.sni: list[str | None] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                upstream.requests.append(
                    {
                        "path": self.path,
                        "host": self.headers.get("Host", ""),
                        "user_agent": self.headers.get("User-Agent", ""),
                    }
                )
                body = f"hello {self.path} from {upstream.name}\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                request.settimeout(10)
                if tls is None:
                    super().finish_request(request, client_address)
                    return
                try:
                    wrapped = tls.wrap_socket(request, server_side=True)
                except OSError:  # a client that rejected the certificate: nothing to serve
                    return
                with wrapped:
                    super().finish_request(wrapped, client_address)

        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.server = Server((host, 0), Handler)
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HttpUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
