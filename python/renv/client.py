"""``RenvClient``: the renv daemon's API, shaped like Ray's ``JobSubmissionClient``.

Environments: ``get_or_create_env`` / ``release_env`` / ``list_envs`` (a reference keeps
an env leased, so ``renv prune`` leaves it alone). Jobs are the daemon's workers:
``submit_job`` / ``get_job_status`` / ``get_job_info`` / ``get_job_logs`` /
``tail_job_logs`` / ``stop_job`` / ``list_jobs``. A local ``working_dir`` (a directory, a
``.zip``, or a ``file://`` URI of either) is packaged by the ``renv`` binary itself
(``renv package``) and uploaded, so its digest is exactly the one the daemon checks the
upload against, and the daemon never opens the client's files.
"""

from __future__ import annotations

import asyncio
import codecs
import enum
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import urllib.parse
from dataclasses import dataclass, field, fields
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Sequence, Union

from ._transport import Transport
from .errors import RenvConflictError

__all__ = ["RenvClient", "JobStatus", "JobDetails", "EnvInfo", "EnvRecord", "default_socket_path"]


def default_store_dir() -> str:
    """``$RENV_STORE``, else ``$XDG_CACHE_HOME/renv``, else ``~/.cache/renv`` (as renv)."""
    if os.environ.get("RENV_STORE"):
        return os.environ["RENV_STORE"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "renv")


def default_socket_path() -> str:
    """``$RENV_SOCKET``, else ``renv.sock`` in the store directory (as ``renv daemon``)."""
    return os.environ.get("RENV_SOCKET") or os.path.join(default_store_dir(), "renv.sock")


def _from_json(cls, data: Dict[str, Any]):
    """Builds a dataclass from a daemon answer, keeping fields the SDK does not know yet."""
    known = {f.name for f in fields(cls) if f.name != "raw"}
    return cls(**{k: v for k, v in data.items() if k in known}, raw=data)


@dataclass
class EnvInfo:
    """An env the daemon built or found (``POST /v1/envs``)."""

    env_id: str
    python: Optional[str] = None
    cwd: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    working_dir: Optional[str] = None
    venv: Optional[str] = None
    bytes: int = 0
    created: bool = False
    timings_ms: Dict[str, int] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class EnvRecord:
    """One env the daemon knows (``GET /v1/envs``)."""

    env_id: str
    refs: int = 0
    ref_tags: List[str] = field(default_factory=list)
    workers: int = 0
    working_dir: Optional[str] = None
    python: Optional[str] = None
    bytes: int = 0
    last_used: Optional[float] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


class JobStatus(str, enum.Enum):
    """Ray's job states; renv starts a job at once, so it is never ``PENDING``."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value

    def is_terminal(self) -> bool:
        return self not in (JobStatus.PENDING, JobStatus.RUNNING)


@dataclass
class JobDetails:
    """A job (a daemon worker): ``submission_id`` is the daemon's worker id."""

    submission_id: str
    status: JobStatus
    name: Optional[str] = None
    env_id: Optional[str] = None
    pid: Optional[int] = None
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    gpus: List[int] = field(default_factory=list)
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    stdout_log: Optional[str] = None
    stderr_log: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def driver_exit_code(self) -> Optional[int]:
        """Ray's name for the entrypoint's exit code."""
        return self.exit_code

    @classmethod
    def from_worker(cls, worker: Dict[str, Any]) -> "JobDetails":
        return cls(
            submission_id=worker["worker_id"],
            status=JobStatus(worker["state"].upper()),
            name=worker.get("name"),
            env_id=worker.get("env_id"),
            pid=worker.get("pid"),
            exit_code=worker.get("exit_code"),
            signal=worker.get("signal"),
            gpus=worker.get("gpus") or [],
            start_time=worker.get("started_at"),
            end_time=worker.get("ended_at"),
            stdout_log=worker.get("stdout_log"),
            stderr_log=worker.get("stderr_log"),
            raw=worker,
        )


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


_FILE_SCHEME = "file://"


def _local_path(working_dir: str) -> Optional[str]:
    """The local path a ``working_dir`` names (a plain path, or a ``file://`` URI: the
    daemon would open that with its own rights, so it refuses it from other users), or
    ``None`` for a URI the daemon resolves itself (``pkg://``)."""
    if working_dir.startswith(_FILE_SCHEME):
        # As the daemon reads it: the rest of the URI is the absolute path, verbatim.
        return working_dir[len(_FILE_SCHEME):]
    return None if "://" in working_dir else working_dir


def renv_binary(renv_bin: Optional[str] = None) -> str:
    """The ``renv`` binary: ``renv_bin``, else ``$RENV_BIN``, else ``renv`` on ``PATH``."""
    found = renv_bin or os.environ.get("RENV_BIN") or shutil.which("renv")
    if not found:
        raise FileNotFoundError(
            "packaging a local working_dir needs the renv binary: put it on PATH or set RENV_BIN"
        )
    return found


def package(
    path: Union[str, os.PathLike],
    output: Optional[str],
    *,
    excludes: Sequence[str] = (),
    as_module: bool = False,
    push: bool = False,
    renv_bin: Optional[str] = None,
) -> str:
    """Runs ``renv package PATH -o OUTPUT --json`` (a directory or a ``.zip``) and returns
    the package's digest: the binary packages, so the digest is exactly the one a daemon
    checks an upload against. ``push``: ``--push`` instead of ``-o`` (the package goes to
    renv's shared remote; ``output`` is then ignored)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found")
    cmd = [renv_binary(renv_bin), "package", path, "--json"]
    cmd += ["--push"] if push else ["-o", os.fspath(output)]
    if as_module:
        cmd.append("--as-module")
    for pattern in excludes:
        cmd += ["--exclude", pattern]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise ValueError(done.stderr.decode("utf-8", "replace").strip() or f"renv package failed: {done}")
    return json.loads(done.stdout)["digest"]


class RenvClient:
    """A client for one node's renv daemon.

    ``socket``: the daemon's socket (default: ``$RENV_SOCKET``, else ``renv.sock`` in the
    store directory). ``renv_bin``: the ``renv`` binary used to package local working
    dirs (default: ``$RENV_BIN``, else ``renv`` on ``PATH``). ``timeout``: seconds for
    one request's socket operations (``None``: wait as long as a build takes).
    """

    def __init__(
        self,
        socket: Optional[str] = None,
        *,
        renv_bin: Optional[str] = None,
        timeout: Optional[float] = None,
    ):
        self.socket = socket or default_socket_path()
        self._renv_bin = renv_bin or os.environ.get("RENV_BIN")
        self._http = Transport(self.socket, timeout)

    def __repr__(self) -> str:
        return f"RenvClient(socket={self.socket!r})"

    # -- daemon ---------------------------------------------------------------------

    def healthz(self) -> bool:
        return bool(self._http.json("GET", "/healthz").get("ok"))

    def metrics(self) -> Dict[str, float]:
        """The daemon's counters and gauges (``/metrics``), e.g. ``renv_builds_total``."""
        values = {}
        for line in self._http.text("/metrics").splitlines():
            name, _, value = line.partition(" ")
            if name and not name.startswith("#") and value:
                values[name] = float(value)
        return values

    # -- environments -----------------------------------------------------------------

    def get_or_create_env(self, runtime_env: Dict[str, Any], *, ref: Optional[str] = None) -> EnvInfo:
        """Builds (or finds) the env and takes one reference on it, tagged ``ref``.

        The env stays leased until the reference is released with ``release_env``. A local
        ``working_dir`` (a path or a ``file://`` URI) is uploaded first (see
        ``upload_package``).
        """
        payload: Dict[str, Any] = {"runtime_env": self._with_uploaded_working_dir(runtime_env)}
        if ref is not None:
            payload["ref"] = ref
        return _from_json(EnvInfo, self._http.json("POST", "/v1/envs", payload))

    def release_env(self, env_id: str) -> int:
        """Releases one reference; returns the references left. ``RenvConflictError`` if
        there were none."""
        return int(self._http.json("DELETE", f"/v1/envs/{_quote(env_id)}")["refs"])

    def list_envs(self) -> List[EnvRecord]:
        return [_from_json(EnvRecord, e) for e in self._http.json("GET", "/v1/envs")["envs"]]

    # -- packages -------------------------------------------------------------------

    def upload_package(
        self, path: Union[str, os.PathLike], *, excludes: Sequence[str] = (), as_module: bool = False
    ) -> str:
        """Packages a directory (or a ``.zip``) as ``renv package`` does and uploads it
        unless the daemon already has it. Returns its ``pkg://<digest>`` URI. With
        ``as_module``, a directory is packaged under its own name, as a ``py_modules``
        directory is (``import <dirname>`` works)."""
        with tempfile.TemporaryDirectory(prefix="renv-upload-") as tmp:
            zip_path = os.path.join(tmp, "package.zip")
            digest = package(path, zip_path, excludes=excludes, as_module=as_module, renv_bin=self._renv_bin)
            if not self.has_package(digest):
                self.put_package(digest, zip_path)
        return f"pkg://{digest}"

    def upload_wheel(self, path: Union[str, os.PathLike]) -> str:
        """Uploads a wheel for ``py_modules`` as a package holding just that file, unless
        the daemon has it. Returns ``pkg://<digest>/<file>.whl``, which the daemon installs
        into the env."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not a file")
        name = os.path.basename(path)
        with tempfile.TemporaryDirectory(prefix="renv-wheel-") as tmp:
            holder = os.path.join(tmp, "wheel")
            os.mkdir(holder)
            shutil.copyfile(path, os.path.join(holder, name))
            zip_path = os.path.join(tmp, "package.zip")
            digest = package(holder, zip_path, renv_bin=self._renv_bin)
            if not self.has_package(digest):
                self.put_package(digest, zip_path)
        return f"pkg://{digest}/{name}"

    def has_package(self, digest: str) -> bool:
        """Whether the daemon's store holds package ``digest`` (``HEAD /v1/packages/…``)."""
        return self._http.status("HEAD", f"/v1/packages/{_quote(digest)}") == 200

    def put_package(self, digest: str, data: Union[bytes, str, os.PathLike]) -> bool:
        """Uploads a package zip (its bytes, or the path of the file) as ``digest``. The
        daemon stores it only if its contents are that package (``RenvRequestError``
        otherwise). Returns whether it was new to the store."""
        url = f"/v1/packages/{_quote(digest)}"
        if isinstance(data, (bytes, bytearray, memoryview)):
            response = self._http.open("PUT", url, bytes(data), "application/zip", len(data))
        else:
            with open(os.fspath(data), "rb") as body:
                size = os.fstat(body.fileno()).st_size
                response = self._http.open("PUT", url, body, "application/zip", size)
        with response:
            answer = response.read()
        return bool(json.loads(answer).get("created", True)) if answer else True

    def _with_uploaded_working_dir(self, runtime_env: Dict[str, Any]) -> Dict[str, Any]:
        """The spec with a local working_dir and local ``py_modules`` — directories,
        ``.zip`` files, wheels, or ``file://`` URIs of these — replaced by their uploaded
        ``pkg://`` URIs (``excludes`` applied by the packaging, so dropped). The daemon
        never reads the client's files: what it would open with its own rights, the
        client uploads with its own."""
        if not isinstance(runtime_env, dict):
            raise TypeError(f"runtime_env: expected a dict, got {type(runtime_env).__name__}")
        spec = dict(runtime_env)
        excludes = spec.get("excludes") or []
        if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
            raise TypeError("excludes: expected a list of strings")
        packaged = False
        working_dir = spec.get("working_dir")
        local = _local_path(os.fspath(working_dir)) if isinstance(working_dir, (str, os.PathLike)) else None
        if local is not None:
            spec["working_dir"] = self.upload_package(local, excludes=excludes)
            packaged = True
        modules = spec.get("py_modules")
        if isinstance(modules, list):
            uploaded = []
            for module in modules:
                local = _local_path(os.fspath(module)) if isinstance(module, (str, os.PathLike)) else None
                if local is None:
                    uploaded.append(module)
                    continue
                if local.endswith(".whl"):
                    # Installed into the env by the daemon, from the package holding it.
                    uploaded.append(self.upload_wheel(local))
                    packaged = True
                    continue
                as_module = os.path.isdir(local)
                uploaded.append(self.upload_package(local, excludes=excludes if as_module else (), as_module=as_module))
                packaged = True
            spec["py_modules"] = uploaded
        if packaged:
            spec.pop("excludes", None)
        return spec

    # -- jobs -----------------------------------------------------------------------

    def submit_job(
        self,
        *,
        entrypoint: Union[Sequence[str], str],
        runtime_env: Optional[Dict[str, Any]] = None,
        num_gpus: Optional[int] = None,
        gpus: Optional[Sequence[int]] = None,
        name: Optional[str] = None,
        entrypoint_num_gpus: Optional[int] = None,
    ) -> str:
        """Starts ``entrypoint`` in the env and returns its id (its ``submission_id``).

        ``entrypoint`` is an argv list, run without a shell; a string is split with
        ``shlex`` (still no shell: use ``["sh", "-c", "…"]`` for pipes). ``num_gpus`` (or
        Ray's ``entrypoint_num_gpus``) takes that many free GPUs, ``gpus`` exact ids; the
        job sees them as ``CUDA_VISIBLE_DEVICES``.
        """
        argv = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("entrypoint: expected a non-empty list of strings")
        if num_gpus is not None and entrypoint_num_gpus is not None:
            raise ValueError("give num_gpus or entrypoint_num_gpus, not both")
        num_gpus = num_gpus if num_gpus is not None else entrypoint_num_gpus
        payload: Dict[str, Any] = {
            "runtime_env": self._with_uploaded_working_dir(runtime_env or {}),
            "argv": argv,
        }
        if name is not None:
            payload["name"] = name
        if num_gpus is not None:
            if int(num_gpus) != num_gpus:
                raise ValueError(f"num_gpus: expected a whole number of GPUs, got {num_gpus}")
            payload["num_gpus"] = int(num_gpus)
        if gpus is not None:
            payload["gpus"] = list(gpus)
        return self._http.json("POST", "/v1/workers", payload)["worker_id"]

    def get_job_info(self, job_id: str, *, wait: bool = False) -> JobDetails:
        """The job's details; with ``wait=True``, once it has ended."""
        url = f"/v1/workers/{_quote(job_id)}" + ("?wait=true" if wait else "")
        return JobDetails.from_worker(self._http.json("GET", url, timeout=None if wait else -1.0))

    def get_job_status(self, job_id: str) -> JobStatus:
        return self.get_job_info(job_id).status

    def wait_job(self, job_id: str) -> JobDetails:
        """Blocks until the job ends (no polling: the daemon answers at its exit)."""
        return self.get_job_info(job_id, wait=True)

    def list_jobs(self) -> List[JobDetails]:
        return [JobDetails.from_worker(w) for w in self._http.json("GET", "/v1/workers")["workers"]]

    def stop_job(self, job_id: str) -> bool:
        """SIGTERM to the job's process group (SIGKILL after the daemon's grace period).
        Returns False if the job had already ended, as Ray's does."""
        try:
            self._http.json("DELETE", f"/v1/workers/{_quote(job_id)}")
        except RenvConflictError:
            return False
        return True

    def get_job_logs(self, job_id: str, *, stream: str = "stdout") -> str:
        """Everything the job wrote to ``stream`` (``stdout`` or ``stderr``) so far."""
        return b"".join(self._log_chunks(job_id, stream, follow=False)).decode("utf-8", "replace")

    def iter_job_logs(self, job_id: str, *, stream: str = "stdout") -> Iterator[str]:
        """The job's output as it is written, until the job ends (blocking)."""
        # Chunks may split a UTF-8 character.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for chunk in self._log_chunks(job_id, stream, follow=True):
            text = decoder.decode(chunk)
            if text:
                yield text
        rest = decoder.decode(b"", final=True)
        if rest:
            yield rest

    async def tail_job_logs(self, job_id: str, *, stream: str = "stdout") -> AsyncIterator[str]:
        """``async for text in client.tail_job_logs(id)``, as Ray's: yields output as the job
        writes it and ends when the job does."""
        loop = asyncio.get_running_loop()
        chunks = self.iter_job_logs(job_id, stream=stream)
        done = object()
        try:
            while True:
                text = await loop.run_in_executor(None, next, chunks, done)
                if text is done:
                    return
                yield text
        finally:
            chunks.close()

    def _log_chunks(self, job_id: str, stream: str, *, follow: bool) -> Iterator[bytes]:
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream: expected 'stdout' or 'stderr', got {stream!r}")
        url = f"/v1/workers/{_quote(job_id)}/logs?stream={stream}" + ("&follow=true" if follow else "")
        return self._http.stream(url)

