"""renv's Python SDK: a client for the renv daemon, and (in ``renv.ray_plugin``) a Ray
runtime-env plugin backed by it. Standard library only; Ray is needed only by the plugin."""

from .client import EnvInfo, EnvRecord, JobDetails, JobStatus, RenvClient, default_socket_path
from .errors import (
    RenvBusyError,
    RenvConflictError,
    RenvConnectionError,
    RenvError,
    RenvNotFoundError,
    RenvPermissionError,
    RenvRequestError,
    RenvServerError,
)

__version__ = "0.1.0"

__all__ = [
    "RenvClient",
    "EnvInfo",
    "EnvRecord",
    "JobDetails",
    "JobStatus",
    "default_socket_path",
    "RenvError",
    "RenvRequestError",
    "RenvPermissionError",
    "RenvNotFoundError",
    "RenvConflictError",
    "RenvBusyError",
    "RenvServerError",
    "RenvConnectionError",
]
