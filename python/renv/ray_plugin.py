"""A Ray runtime-env plugin that builds workers' Python environments through the node's
renv daemon.

Register it when starting Ray on every node::

    RAY_RUNTIME_ENV_PLUGINS='[{"class": "renv.ray_plugin.RenvPlugin"}]' ray start …

and ask for it under its own key::

    runtime_env={"working_dir": "./", "renv": {"pip": ["requests==2.26.0"], "env_vars": {…}}}

The ``renv`` value is a renv runtime_env (``pip``/``uv``, ``env_vars``, ``config``, a
``working_dir`` as ``pkg://<digest>``). On each node the plugin asks the local daemon
(``$RENV_SOCKET``, else renv's default socket) to get or create the env, points the
worker's ``py_executable`` at the env's python and applies renv's variables. Ray's own
``working_dir`` (and ``env_vars``, ``py_modules``) work alongside it.

References: the plugin takes one daemon reference per URI Ray holds, and releases it when
Ray deletes the URI, so an env is leased (``renv prune`` keeps it) while Ray's workers may
run in it. renv's store is the cache: unless ``RAY_RUNTIME_ENV_RENV_CACHE_SIZE_GB`` says
otherwise, Ray's own cache for this plugin is sized 0, so Ray deletes a URI — and the
plugin releases its reference — as soon as no job or actor uses it; the env itself stays
in renv's store until renv's LRU eviction wants the space.

The daemon should run with ``--system-site-packages --python <the interpreter Ray runs
on>`` so that ``ray`` stays importable in the env (a virtualenv's python is fine: its
packages are seen behind the env's own).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shlex
import threading
from typing import Any, Dict, List, Optional

from ray._private.runtime_env.plugin import RuntimeEnvPlugin

from .client import EnvInfo, RenvClient
from .errors import RenvConflictError, RenvError, RenvNotFoundError

default_logger = logging.getLogger(__name__)

PLUGIN_NAME = "renv"
CACHE_SIZE_VAR = "RAY_RUNTIME_ENV_RENV_CACHE_SIZE_GB"

# Fields that choose the worker's interpreter too: one of them and renv cannot both.
_CONFLICTING_FIELDS = ("pip", "uv", "conda", "py_executable", "container", "image_uri")


def uri_for(spec: Any) -> str:
    """``renv://<sha256 of the spec's canonical JSON>``: one URI per distinct spec."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "renv://" + hashlib.sha256(text.encode()).hexdigest()


def merge_env_vars(context_vars: Dict[str, str], renv_vars: Dict[str, str]) -> None:
    """Applies renv's variables over the ones other plugins (Ray's working_dir, the job's
    ``env_vars``) set already: ``${NAME}`` in renv's value stands for the value set so
    far, ``PYTHONPATH`` entries are joined (renv's first), anything else is renv's."""
    for name, value in renv_vars.items():
        existing = context_vars.get(name)
        if existing is not None:
            reference = "${" + name + "}"
            if reference in value:
                value = value.replace(reference, existing)
            elif name == "PYTHONPATH" and existing:
                value = f"{value}{os.pathsep}{existing}"
        context_vars[name] = value


def _cache_size(info: EnvInfo) -> float:
    # At least 1: Ray's cache deletes unused URIs only while its total exceeds the limit,
    # so an env of 0 bytes (env_vars only) would otherwise never be released.
    return float(max(info.bytes, 1))


class RenvPlugin(RuntimeEnvPlugin):
    name = PLUGIN_NAME

    def __init__(self):
        # Ray sizes this plugin's URI cache from this variable right after creating the
        # plugin (RuntimeEnvPluginManager.load_plugins); renv's store is the real cache.
        os.environ.setdefault(CACHE_SIZE_VAR, "0")
        self._held: Dict[str, EnvInfo] = {}
        self._lock = threading.Lock()
        self._client: Optional[RenvClient] = None

    def client(self) -> RenvClient:
        if self._client is None:
            self._client = RenvClient()
        return self._client

    @staticmethod
    def validate(runtime_env_dict: dict) -> None:
        spec = runtime_env_dict.get(PLUGIN_NAME)
        if not isinstance(spec, dict):
            raise ValueError(
                f"runtime_env.renv: expected an object such as {{\"pip\": [\"requests\"]}}, got {spec!r}"
            )
        clashes = [f for f in _CONFLICTING_FIELDS if runtime_env_dict.get(f)]
        if clashes:
            raise ValueError(
                f"runtime_env.renv cannot be combined with {', '.join(clashes)}: both choose the "
                "worker's Python; put the packages under renv (\"renv\": {\"pip\": [...]})"
            )
        working_dir = spec.get("working_dir")
        if isinstance(working_dir, str) and "://" not in working_dir:
            raise ValueError(
                "runtime_env.renv.working_dir: a node cannot read the driver's directory; use Ray's "
                "own working_dir, or a pkg://<digest> uploaded with RenvClient.upload_package"
            )

    def get_uris(self, runtime_env) -> List[str]:
        spec = runtime_env.get(PLUGIN_NAME)
        return [uri_for(spec)] if spec is not None else []

    async def create(self, uri: Optional[str], runtime_env, context, logger: logging.Logger = default_logger) -> float:
        spec = runtime_env[PLUGIN_NAME]
        uri = uri or uri_for(spec)
        loop = asyncio.get_running_loop()
        request = loop.run_in_executor(None, lambda: self.client().get_or_create_env(spec, ref=uri))
        try:
            # Shielded: if Ray gives up (setup timeout), the reference the daemon still
            # grants must be released, not leaked.
            info = await asyncio.shield(request)
        except asyncio.CancelledError:
            request.add_done_callback(self._release_abandoned)
            raise
        except RenvError as e:
            raise RuntimeError(f"renv could not build runtime_env.renv: {e}") from e
        with self._lock:
            previous = self._held.get(uri)
            self._held[uri] = info
        if previous is not None:
            # Ray re-created a URI it still held (it should not): keep one reference.
            self._release(previous.env_id, uri, logger)
        steps = ", ".join(f"{k} {v} ms" for k, v in sorted(info.timings_ms.items()))
        logger.info(
            "renv env %s for %s (%s; %s): python %s",
            info.env_id[:12],
            uri,
            "built" if info.created else "existing",
            steps,
            info.python,
        )
        return _cache_size(info)

    def modify_context(self, uris: List[str], runtime_env, context, logger: logging.Logger = default_logger) -> None:
        if not uris:
            return
        with self._lock:
            info = self._held.get(uris[0])
        if info is None:
            raise RuntimeError(f"renv: no env for {uris[0]} on this node; it was released before use")
        if info.python:
            context.py_executable = info.python
        merge_env_vars(context.env_vars, info.env)
        if info.cwd and not runtime_env.get("working_dir"):
            # Ray's own working_dir, when given, is the worker's cwd; renv's is importable.
            context.command_prefix += ["cd", shlex.quote(info.cwd), "&&"]

    def delete_uri(self, uri: str, logger: logging.Logger = default_logger) -> float:
        with self._lock:
            info = self._held.pop(uri, None)
        if info is None:
            return 0.0
        self._release(info.env_id, uri, logger)
        return _cache_size(info)

    def _release(self, env_id: str, uri: str, logger: logging.Logger) -> None:
        try:
            left = self.client().release_env(env_id)
            logger.info("renv env %s released for %s (%d references left)", env_id[:12], uri, left)
        except (RenvConflictError, RenvNotFoundError):
            # The daemon restarted since: it holds no reference of ours to release.
            logger.warning("renv env %s: the daemon held no reference for %s", env_id[:12], uri)
        except (RenvError, ConnectionError) as e:
            logger.warning("renv env %s: releasing %s failed: %s", env_id[:12], uri, e)

    def _release_abandoned(self, request: "asyncio.Future[EnvInfo]") -> None:
        if request.cancelled() or request.exception() is not None:
            return
        info = request.result()
        self._release(info.env_id, "an abandoned setup", default_logger)
