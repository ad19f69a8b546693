"""Exceptions carrying the daemon's error: ``{"error": {"kind", "field", "message"}}``."""

from __future__ import annotations

from typing import Optional


class RenvError(Exception):
    """An error answer from the renv daemon.

    ``status`` is the HTTP status, ``kind`` the daemon's machine-readable kind
    (``invalid_runtime_env``, ``not_found``, …), ``field`` the request field at fault when
    there is one (``pip.packages[2]``), and ``message`` what was expected.
    """

    def __init__(self, status: int, kind: str, message: str, field: Optional[str] = None):
        self.status = status
        self.kind = kind
        self.field = field
        self.message = message
        where = f"{field}: " if field else ""
        super().__init__(f"{where}{message} ({kind}, HTTP {status})")


class RenvRequestError(RenvError, ValueError):
    """400 or 413: the request (spec, upload, argument) is invalid; nothing was changed."""


class RenvPermissionError(RenvError, PermissionError):
    """403: the daemon does not serve this user (see its --allow-uid/--allow-gid)."""


class RenvNotFoundError(RenvError, LookupError):
    """404: no such env, package, job or endpoint."""


class RenvConflictError(RenvError):
    """409: the request conflicts with the current state (no reference to release, the job
    is not running)."""


class RenvBusyError(RenvError):
    """503 or 429: try again later (no free GPUs, too many connections in all or of this
    user, a store entry locked by another process)."""


class RenvServerError(RenvError):
    """500 or any other status: the daemon failed; the request may be retried."""


class RenvConnectionError(ConnectionError):
    """The daemon's socket could not be reached."""

    def __init__(self, socket_path: str, reason: str):
        self.socket_path = socket_path
        super().__init__(f"cannot reach the renv daemon at {socket_path}: {reason} (is `renv daemon` running?)")


_BY_STATUS = {
    400: RenvRequestError,
    403: RenvPermissionError,
    404: RenvNotFoundError,
    409: RenvConflictError,
    413: RenvRequestError,
    429: RenvBusyError,
    503: RenvBusyError,
}


def error_from_response(status: int, body: bytes) -> RenvError:
    """The typed exception for an error answer (any body, even one that is not JSON)."""
    import json

    kind, field, message = "http_error", None, body.decode("utf-8", "replace").strip()
    try:
        error = json.loads(body)["error"]
        kind = error.get("kind") or kind
        field = error.get("field")
        message = error.get("message") or message
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return _BY_STATUS.get(status, RenvServerError)(status, kind, message or f"HTTP {status}", field)
