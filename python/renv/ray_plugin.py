"""A Ray runtime-env plugin that builds workers' Python environments through the node's
renv daemon.

Register it when starting Ray on every node::

    RAY_RUNTIME_ENV_PLUGINS='[{"class": "renv.ray_plugin.RenvPlugin"}]' ray start …

and ask for it under its own key (the driver with ``RAY_RUNTIME_ENV_HOOK=renv.ray_plugin.hook``
for local paths under ``renv``)::

    runtime_env={"renv": {"working_dir": "./", "pip": ["requests==2.26.0"], "env_vars": {…}}}

The ``renv`` value is a renv runtime_env (``pip``/``uv``, ``env_vars``, ``config``,
``working_dir`` and ``py_modules`` as ``pkg://<digest>``). On each node the plugin asks
the local daemon (``$RENV_SOCKET``, else renv's default socket) to get or create the env,
points the worker's ``py_executable`` at the env's python and applies renv's variables.
Ray's own ``working_dir`` (and ``env_vars``, ``py_modules``) work alongside it.

Local packages, on any number of nodes: with ``RAY_RUNTIME_ENV_HOOK=renv.ray_plugin.hook``
in the driver's environment, ``ray.init`` packages a local ``renv.working_dir`` /
``renv.py_modules`` (``renv package``), rewrites them to ``pkg://<digest>`` and puts the
zips in Ray's GCS (or, with ``RENV_REMOTE``, pushes them to renv's remote);
``RENV_RAY_TAKEOVER=1`` also moves Ray's own ``pip``/``uv``/``working_dir``/
``py_modules``/``env_vars``/``excludes`` under ``renv`` (see ``renv._ray_packages``).
Before asking for the env, the plugin gives the node's daemon any ``pkg://`` package it
lacks, read from GCS (once per digest at a time); one GCS lacks too (pushed with
``RENV_REMOTE``) is left to the daemon, which fetches it from its ``--remote`` (the same
URL, credentials in the daemon's environment). A local path that reaches a node means
the driver ran without the hook, and ``validate`` says so.

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

import argparse
import asyncio
import hashlib
import json
import logging
import os
import shlex
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from ray._private.runtime_env.plugin import RuntimeEnvPlugin

from ._ray_packages import GCS_NAMESPACE, GCS_TIMEOUT_S, gcs_key, hook, package_digests
from .client import EnvInfo, RenvClient
from .errors import RenvConflictError, RenvError, RenvNotFoundError

__all__ = ["RenvPlugin", "hook"]

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


def _agent_gcs_client() -> Any:
    """A GCS client for the process the plugin runs in: Ray starts its runtime-env agent
    with ``--gcs-address`` and ``--cluster-id-hex`` (agent/main.py) and gives plugins no
    handle on the agent's own client, so the plugin makes one from the same arguments.
    Elsewhere (a driver), the connected driver's client; ``None`` if there is none."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--gcs-address")
    parser.add_argument("--cluster-id-hex")
    args, _ = parser.parse_known_args(sys.argv[1:])
    if args.gcs_address:
        from ray._raylet import GcsClient

        return GcsClient(address=args.gcs_address, cluster_id=args.cluster_id_hex)
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    return internal_kv_get_gcs_client()


def _local_entries(spec: dict) -> List[str]:
    """The fields of a renv spec naming a path on the driver's machine (no URI)."""
    found = []
    working_dir = spec.get("working_dir")
    if isinstance(working_dir, str) and "://" not in working_dir:
        found.append("working_dir")
    modules = spec.get("py_modules")
    if isinstance(modules, list):
        found += [f"py_modules[{i}]" for i, m in enumerate(modules) if isinstance(m, str) and "://" not in m]
    return found


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
        self._gcs: Any = None
        # One lock per package digest: concurrent creates needing the same package fetch
        # it from GCS once.
        self._package_locks: Dict[str, threading.Lock] = {}

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
        local = _local_entries(spec)
        if local:
            # The driver's hook turns local paths into pkg:// URIs; this one is still a path,
            # so the driver ran without it (or set it for another runtime_env).
            raise ValueError(
                f"runtime_env.renv.{local[0]}: a node cannot read the driver's files; set "
                "RAY_RUNTIME_ENV_HOOK=renv.ray_plugin.hook in the driver's environment so that "
                "ray.init packages them and shares them through Ray's GCS (for a task's own "
                "runtime_env, pass it through renv.ray_plugin.hook), or give a pkg://<digest>"
            )

    def get_uris(self, runtime_env) -> List[str]:
        spec = runtime_env.get(PLUGIN_NAME)
        return [uri_for(spec)] if spec is not None else []

    async def create(self, uri: Optional[str], runtime_env, context, logger: logging.Logger = default_logger) -> float:
        spec = runtime_env[PLUGIN_NAME]
        uri = uri or uri_for(spec)
        loop = asyncio.get_running_loop()

        def get_or_create() -> EnvInfo:
            # In an executor thread: fetching a package from GCS and building block.
            self._fetch_packages(spec, logger)
            return self.client().get_or_create_env(spec, ref=uri)

        request = loop.run_in_executor(None, get_or_create)
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

    def _fetch_packages(self, spec: dict, logger: logging.Logger) -> None:
        """Gives the node's daemon each ``pkg://`` package of the spec it lacks, from
        Ray's GCS (where the driver's hook put it). One the GCS lacks too is left to the
        daemon: it may get it from its own remote, or fails naming the digest."""
        for field, digest in package_digests(spec):
            with self._lock:
                lock = self._package_locks.setdefault(digest, threading.Lock())
            with lock:
                if self.client().has_package(digest):
                    continue
                with self._lock:
                    if self._gcs is None:
                        self._gcs = _agent_gcs_client()
                if self._gcs is None:
                    logger.warning("renv: no GCS to fetch %s (pkg://%s) from; the daemon may have it", field, digest)
                    continue
                started = time.monotonic()
                data = self._gcs.internal_kv_get(gcs_key(digest), GCS_NAMESPACE, timeout=GCS_TIMEOUT_S)
                fetched = time.monotonic()
                if data is None:
                    logger.info("renv: %s (pkg://%s) is not in Ray's GCS; leaving it to the daemon", field, digest)
                    continue
                try:
                    self.client().put_package(digest, data)
                except RenvError as e:
                    message = f"{field} (pkg://{digest}) from Ray's GCS: {e.message}"
                    raise type(e)(e.status, e.kind, message, e.field) from e
                logger.info(
                    "renv: package %s fetched from Ray's GCS into this node's store (%s, %d bytes; "
                    "GCS %.0f ms, daemon %.0f ms)",
                    digest,
                    field,
                    len(data),
                    (fetched - started) * 1000,
                    (time.monotonic() - fetched) * 1000,
                )

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
            # A daemon keeps references across restarts; one that does not know ours
            # started on another store (or the store was wiped).
            logger.warning("renv env %s: the daemon held no reference for %s", env_id[:12], uri)
        except (RenvError, ConnectionError) as e:
            logger.warning("renv env %s: releasing %s failed: %s", env_id[:12], uri, e)

    def _release_abandoned(self, request: "asyncio.Future[EnvInfo]") -> None:
        if request.cancelled() or request.exception() is not None:
            return
        info = request.result()
        self._release(info.env_id, "an abandoned setup", default_logger)
