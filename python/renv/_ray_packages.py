"""renv's packages across a Ray cluster: the driver hook that packages local paths and puts
them in Ray's GCS, and the names both sides agree on.

``hook`` is ``RAY_RUNTIME_ENV_HOOK=renv.ray_plugin.hook`` (re-exported there). Ray calls it
in ``ray.init`` with the job's ``runtime_env`` and uses what it returns. A local
``renv.working_dir`` or ``renv.py_modules`` entry (a directory, a ``.zip``, a ``file://``
URI of either) is packaged by the ``renv`` binary and replaced by its ``pkg://<digest>``;
the zip goes to Ray's GCS (internal KV, under ``renv_pkg_<digest>.zip``, as Ray keeps its
own ``gcs://_ray_pkg_<hash>.zip`` packages), where the plugin on every node finds it. With
``RENV_REMOTE`` set, the package is pushed to renv's shared remote instead
(``renv package --push``) and GCS is not used; the nodes' daemons then need ``--remote``
on the same URL. With ``RENV_RAY_TAKEOVER=1``, Ray's own
``pip``/``uv``/``working_dir``/``py_modules``/``env_vars``/``excludes`` are moved under
``renv`` first.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import types
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .client import _local_path, package

logger = logging.getLogger(__name__)

PLUGIN_NAME = "renv"
TAKEOVER_VAR = "RENV_RAY_TAKEOVER"
REMOTE_VAR = "RENV_REMOTE"
PKG_SCHEME = "pkg://"
# Ray's own packages are keys of its internal KV with no namespace; so are renv's.
GCS_NAMESPACE: Optional[bytes] = None
# Seconds one read or write of a package in GCS may take (up to Ray's 512 MiB cap).
GCS_TIMEOUT_S = 300.0

_DIGEST = re.compile(r"^[0-9a-f]{64}$")

# The top-level fields RENV_RAY_TAKEOVER moves under renv.
TAKEN_OVER = ("pip", "uv", "working_dir", "py_modules", "env_vars", "excludes")


def gcs_key(digest: str) -> bytes:
    """The internal-KV key of package ``digest`` (named as Ray names its own packages)."""
    return f"renv_pkg_{digest}.zip".encode()


def gcs_max_bytes() -> int:
    """Ray's cap on one value in GCS (the gRPC message size, 512 MiB unless configured)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(GCS_STORAGE_MAX_SIZE)


def package_digests(spec: Any) -> Iterator[Tuple[str, str]]:
    """``(field, digest)`` for each ``pkg://<digest>`` in a renv spec's ``working_dir`` and
    ``py_modules``. Anything else (a malformed digest included) is the daemon's to judge."""
    if not isinstance(spec, dict):
        return
    entries: List[Tuple[str, Any]] = [("working_dir", spec.get("working_dir"))]
    modules = spec.get("py_modules")
    if isinstance(modules, list):
        entries += [(f"py_modules[{i}]", m) for i, m in enumerate(modules)]
    for field, value in entries:
        if isinstance(value, str) and value.startswith(PKG_SCHEME):
            # `pkg://<digest>`, or `pkg://<digest>/<file>.whl` (a wheel in that package).
            digest = value[len(PKG_SCHEME):].split("/", 1)[0]
            if _DIGEST.match(digest):
                yield field, digest


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


# -- RENV_RAY_TAKEOVER ---------------------------------------------------------------


def _is_local(value: Any) -> bool:
    """A path renv packages (not a URI Ray or renv resolves: gcs://, s3://, pkg://…)."""
    if isinstance(value, types.ModuleType):
        return True
    if isinstance(value, (str, os.PathLike)):
        return _local_path(os.fspath(value)) is not None
    return False


def take_over(runtime_env: Dict[str, Any]) -> Dict[str, Any]:
    """Moves Ray's ``pip``, ``uv``, ``env_vars``, ``excludes`` and local ``working_dir``
    / ``py_modules`` under ``renv``. A ``working_dir`` or module that is already a URI
    (``gcs://`` from ``ray job submit --working-dir``, ``s3://``…) stays Ray's: Ray's
    plugins fetch it on every node and it works beside renv's env. ``env_vars`` merge
    (the same name with two values is an error), ``excludes`` join; any other field given
    both at the top and under ``renv`` is an error."""
    env = dict(runtime_env)
    existing = env.get(PLUGIN_NAME)
    if existing is not None and not isinstance(existing, dict):
        raise ValueError(f"runtime_env.renv: expected an object, got {existing!r}")
    renv = dict(existing or {})
    moved = False
    for field in TAKEN_OVER:
        value = env.get(field)
        if value is None:
            continue
        if field == "working_dir" and not _is_local(value):
            continue
        if field == "py_modules":
            if not isinstance(value, list):
                raise ValueError(f"runtime_env.py_modules: expected a list, got {value!r}")
            local = [m for m in value if _is_local(m)]
            if not local:
                continue
            rest = [m for m in value if not _is_local(m)]
            if rest:
                env[field] = rest
            else:
                del env[field]
            value = local
        else:
            del env[field]
        moved = True
        if field == "env_vars":
            merged = dict(renv.get("env_vars") or {})
            for name, v in dict(value).items():
                if name in merged and merged[name] != v:
                    raise ValueError(
                        f"{TAKEOVER_VAR}: env_vars.{name} is {v!r} but renv.env_vars.{name} is "
                        f"{merged[name]!r}; give it once"
                    )
                merged[name] = v
            renv["env_vars"] = merged
        elif field == "excludes":
            joined = list(renv.get("excludes") or [])
            joined += [p for p in value if p not in joined]
            renv["excludes"] = joined
        elif renv.get(field) is not None:
            raise ValueError(
                f"{TAKEOVER_VAR}: runtime_env has both {field} and renv.{field}; give one (with "
                f"{TAKEOVER_VAR}=1 the top-level {field} is renv's)"
            )
        else:
            renv[field] = value
    if "pip" in renv and "uv" in renv:
        raise ValueError(f"{TAKEOVER_VAR}: runtime_env has both pip and uv (one of them under renv); give one")
    if moved:
        env[PLUGIN_NAME] = renv
    return env


# -- packaging ------------------------------------------------------------------------


class _Staged:
    """Zips packaged by one hook call, waiting to go to GCS (a temporary directory)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="renv-ray-")
        self.pending: Dict[str, Tuple[str, str]] = {}  # digest -> (field, zip path)

    def upload(self) -> None:
        """Puts each zip in GCS unless a job already did (the key is the content's
        digest, so an existing value is this package). Needs a connected driver."""
        from ray.experimental import internal_kv

        for digest, (field, path) in self.pending.items():
            key = gcs_key(digest)
            if internal_kv._internal_kv_exists(key, namespace=GCS_NAMESPACE):
                logger.debug("renv: %s (%s) is in Ray's GCS already", field, digest[:12])
                continue
            started = time.monotonic()
            with open(path, "rb") as f:
                data = f.read()
            try:
                internal_kv._internal_kv_put(key, data, overwrite=False, namespace=GCS_NAMESPACE)
            except Exception as e:
                raise RuntimeError(
                    f"runtime_env.renv.{field}: storing its package ({_mib(len(data))}) in Ray's GCS failed: {e}"
                ) from e
            logger.info(
                "renv: %s pushed to Ray's GCS as pkg://%s (%s, %.0f ms)",
                field,
                digest,
                _mib(len(data)),
                (time.monotonic() - started) * 1000,
            )

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _requirements(value: Any, field: str) -> Any:
    """Ray's string ``pip``/``uv`` is a requirements file on the driver's machine: the
    nodes' daemons never read it, so its lines are sent (as Ray reads it: blank lines
    and comments aside)."""
    def read(path: str) -> List[str]:
        try:
            with open(path) as f:
                lines = [line.strip() for line in f.read().splitlines()]
        except OSError as e:
            raise ValueError(f"runtime_env.renv.{field}: reading the requirements file {path!r}: {e}") from e
        return [line for line in lines if line and not line.startswith("#")]

    if isinstance(value, (str, os.PathLike)):
        return read(os.fspath(value))
    if isinstance(value, dict) and isinstance(value.get("packages"), (str, os.PathLike)):
        return dict(value, packages=read(os.fspath(value["packages"])))
    return value


def _module_path(module: Any) -> Any:
    """A module object in ``py_modules`` (as Ray allows) is its package's directory."""
    if isinstance(module, types.ModuleType):
        paths = list(getattr(module, "__path__", []) or [])
        if paths:
            return paths[0]
        if getattr(module, "__file__", None):
            return module.__file__
        raise ValueError(f"py_modules: {module!r} has no directory or file")
    return module


def prepare_spec(spec: Dict[str, Any], staged: Optional[_Staged], remote: bool) -> Dict[str, Any]:
    """The renv spec with local packages replaced by ``pkg://<digest>`` (zips staged for
    GCS, or pushed to renv's remote when ``remote``) and requirements files read."""
    spec = dict(spec)
    excludes = spec.get("excludes") or []
    if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
        raise TypeError("runtime_env.renv.excludes: expected a list of strings")

    def packaged(path: str, field: str, as_module: bool, apply_excludes: bool = True) -> str:
        if path.endswith(".whl") and os.path.isfile(path):
            # A wheel travels as a package holding just that file; the daemon installs it.
            name = os.path.basename(path)
            holder = tempfile.mkdtemp(prefix="renv-wheel-")
            try:
                shutil.copyfile(path, os.path.join(holder, name))
                return f"{packaged(holder, field, as_module=False, apply_excludes=False)}/{name}"
            finally:
                shutil.rmtree(holder, ignore_errors=True)
        # Excludes apply to directories only (a zip is packaged exactly as it is).
        pats = excludes if apply_excludes and os.path.isdir(path) else ()
        if remote:
            # The remote is shared by the nodes; `renv package --push` prints the digest
            # it stored the package under.
            try:
                digest = package(path, None, excludes=pats, as_module=as_module, push=True)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"runtime_env.renv.{field}: {e}") from e
            return PKG_SCHEME + digest
        assert staged is not None
        zip_path = os.path.join(staged.dir, f"{len(os.listdir(staged.dir))}.zip")
        try:
            digest = package(path, zip_path, excludes=pats, as_module=as_module)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"runtime_env.renv.{field}: {e}") from e
        size, cap = os.path.getsize(zip_path), gcs_max_bytes()
        if size >= cap:
            raise ValueError(
                f"runtime_env.renv.{field}: the package of {path} is {_mib(size)}, over the {_mib(cap)} "
                f"Ray's GCS holds; leave large files out with renv.excludes, or set {REMOTE_VAR} to "
                "share packages through renv's remote"
            )
        staged.pending.setdefault(digest, (field, zip_path))
        return PKG_SCHEME + digest

    done = False
    working_dir = spec.get("working_dir")
    local = _local_path(os.fspath(working_dir)) if isinstance(working_dir, (str, os.PathLike)) else None
    if local is not None:
        spec["working_dir"] = packaged(os.path.abspath(local), "working_dir", as_module=False)
        done = True
    modules = spec.get("py_modules")
    if isinstance(modules, list):
        rewritten = []
        for i, module in enumerate(modules):
            module = _module_path(module)
            local = _local_path(os.fspath(module)) if isinstance(module, (str, os.PathLike)) else None
            if local is None:
                rewritten.append(module)
                continue
            local = os.path.abspath(local)
            rewritten.append(packaged(local, f"py_modules[{i}]", as_module=os.path.isdir(local)))
            done = True
        spec["py_modules"] = rewritten
    if done:
        # Applied by the packaging; the daemon would have no local paths to apply them to.
        spec.pop("excludes", None)
    for field in ("pip", "uv"):
        if spec.get(field) is not None:
            spec[field] = _requirements(spec[field], field)
    return spec


# -- the hook -------------------------------------------------------------------------

# The packages of the latest ray.init, until it has connected: Ray calls the hook before
# the driver connects to GCS (worker.py: _maybe_modify_runtime_env, then connect()).
_pending_lock = threading.Lock()
_pending: Optional[_Staged] = None


@atexit.register
def _drop_pending() -> None:
    """A driver that exits without connecting leaves no zips behind."""
    with _pending_lock:
        staged = _pending
    if staged is not None:
        staged.cleanup()


def _upload_pending() -> None:
    """Runs in ray.init once the driver is connected (Ray's ``_post_init_hooks``)."""
    global _pending
    with _pending_lock:
        staged, _pending = _pending, None
    if staged is None:
        return
    try:
        staged.upload()
    finally:
        staged.cleanup()


def _connected() -> bool:
    import ray
    from ray.experimental import internal_kv

    return ray.is_initialized() and internal_kv._internal_kv_initialized()


def _defer(staged: _Staged) -> None:
    """Uploads ``staged`` when this ray.init has connected.

    Why deferred: Ray calls the hook before the driver connects, and the hook cannot know
    the address it will connect to (``ray.init(address=…)`` is not passed to it; a bare
    ``ray.init()`` may start the cluster, GCS included, after the hook returns), so a
    GcsClient of our own could reach the wrong cluster or none. Ray runs
    ``ray._private.worker._post_init_hooks`` at the end of ``ray.init``, connected, before
    the driver's code can start a task; the job's env is then created lazily (the hook
    turns ``eager_install`` off), so no node looks for a package before it is in GCS.
    """
    global _pending
    from ray._private import worker

    hooks = getattr(worker, "_post_init_hooks", None)
    if not isinstance(hooks, list):
        staged.cleanup()
        raise RuntimeError(
            "renv.ray_plugin.hook: this Ray has no ray._private.worker._post_init_hooks to upload "
            "packages after ray.init connects (tested with Ray 2.60); set RENV_REMOTE, or give "
            "renv.working_dir/py_modules as pkg:// URIs"
        )
    with _pending_lock:
        previous, _pending = _pending, staged
        if _upload_pending not in hooks:
            hooks.append(_upload_pending)
    if previous is not None:
        # An earlier ray.init failed before connecting: its packages are stale.
        previous.cleanup()


def hook(runtime_env: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """``RAY_RUNTIME_ENV_HOOK=renv.ray_plugin.hook``: makes ``runtime_env.renv``'s local
    packages reachable from every node (see the module's docstring). Also usable on a
    connected driver for a task's or actor's ``runtime_env`` (``.options(runtime_env=
    hook({...}))``): the packages are then uploaded at once."""
    if not runtime_env:
        return runtime_env
    env = dict(runtime_env)
    if _truthy(TAKEOVER_VAR):
        env = take_over(env)
    spec = env.get(PLUGIN_NAME)
    if not isinstance(spec, dict):
        return env
    remote = bool(os.environ.get(REMOTE_VAR))
    staged = None if remote else _Staged()
    try:
        env[PLUGIN_NAME] = prepare_spec(spec, staged, remote)
    except BaseException:
        if staged is not None:
            staged.cleanup()
        raise
    if staged is None:
        return env
    if not staged.pending:
        staged.cleanup()
    elif _connected():
        try:
            staged.upload()
        finally:
            staged.cleanup()
    else:
        _defer(staged)
        config = dict(env.get("config") or {})
        config["eager_install"] = False
        env["config"] = config
    return env
