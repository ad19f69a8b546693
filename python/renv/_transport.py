"""HTTP/1.1 over the daemon's Unix socket, with the standard library's http.client."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, BinaryIO, Iterator, Optional, Union

from .errors import RenvConnectionError, RenvNotFoundError, error_from_response


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]):
        # The host only fills the Host header; the daemon ignores it.
        super().__init__("renv", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError as e:
            sock.close()
            raise RenvConnectionError(self._path, e.strerror or str(e)) from e
        self.sock = sock


Body = Union[None, bytes, BinaryIO]


class Transport:
    """One connection per request, so a client may be shared by threads (a Unix-socket
    connect costs microseconds)."""

    def __init__(self, path: str, timeout: Optional[float]):
        self.path = path
        self.timeout = timeout

    def open(
        self,
        method: str,
        url: str,
        body: Body = None,
        content_type: Optional[str] = None,
        length: Optional[int] = None,
        timeout: Optional[float] = -1.0,
    ) -> http.client.HTTPResponse:
        """Sends the request and returns the response, raising the typed error for a
        non-2xx answer. The caller reads (and closes) the body."""
        conn = _UnixConnection(self.path, self.timeout if timeout == -1.0 else timeout)
        # One request per connection: with `Connection: close` the response owns the
        # socket and closing it closes the connection.
        headers = {"Connection": "close"}
        if content_type:
            headers["Content-Type"] = content_type
        if length is not None:
            headers["Content-Length"] = str(length)
        try:
            try:
                conn.request(method, url, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may answer before it has read the whole body (an upload of a
                # package it has already, one over its limit) and close its side: its
                # answer, already sent, is what counts.
                if body is None:
                    raise
            response = conn.getresponse()
        except RenvConnectionError:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise RenvConnectionError(self.path, f"{method} {url}: {e}") from e
        if response.status >= 300:
            data = response.read()
            conn.close()
            raise error_from_response(response.status, data)
        return response

    def json(self, method: str, url: str, payload: Any = None, timeout: Optional[float] = -1.0) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        response = self.open(method, url, body, "application/json" if body else None, timeout=timeout)
        with response:
            data = response.read()
        return json.loads(data) if data else None

    def status(self, method: str, url: str) -> int:
        """The status of a request whose 404 is an answer, not an error (HEAD)."""
        try:
            with self.open(method, url) as response:
                response.read()
                return response.status
        except RenvNotFoundError:
            return 404

    def text(self, url: str) -> str:
        with self.open("GET", url) as response:
            return response.read().decode("utf-8", "replace")

    def stream(self, url: str) -> Iterator[bytes]:
        """The body of a GET as it arrives (chunked answers of unknown length)."""
        response = self.open("GET", url, timeout=None)
        with response:
            while True:
                chunk = response.read1(64 * 1024)
                if not chunk:
                    return
                yield chunk
