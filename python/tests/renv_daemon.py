"""A real `renv daemon` on a temporary socket, for tests and benchmarks.

The binary comes from $RENV_BIN (cargo test sets it), the uv from $RENV_UV when set.
"""

import os
import signal
import socket as sockets
import subprocess
import tempfile
import time


def renv_bin():
    path = os.environ.get("RENV_BIN")
    if not path:
        raise RuntimeError("set RENV_BIN to the renv binary (cargo test does)")
    return path


class Daemon:
    """Starts `renv daemon --store <tmp> <flags>` and waits for its socket (in the store
    unless `socket` names another path)."""

    def __init__(self, *flags, store=None, env=None, socket=None):
        self._tmp = None
        if store is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="renv-sdk-test-")
            store = self._tmp.name
        self.store = store
        self.socket = socket or os.path.join(store, "renv.sock")
        self.log_path = os.path.join(store, "daemon.log")
        os.makedirs(store, exist_ok=True)
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("RENV_") or k == "RENV_UV"}
        if os.geteuid() == 0:
            # A root daemon must be told who installers run as; tests and benchmarks
            # build their own packages.
            child_env["RENV_BUILD_USER"] = "root"
        child_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [renv_bin(), "daemon", "--store", store, "--socket", self.socket, *flags],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        # Connectable, not just there: a daemon killed before leaves its socket behind.
        while not self._accepts():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"renv daemon did not start: {self.log()}")
            time.sleep(0.01)

    def _accepts(self):
        """Answers `/healthz`, not just connectable: a daemon killed a moment ago may have
        left its listener in a child not yet exec'd, which takes a connection and resets it."""
        with sockets.socket(sockets.AF_UNIX) as s:
            try:
                s.settimeout(5)
                s.connect(self.socket)
                s.sendall(b"GET /healthz HTTP/1.1\r\nhost: renv\r\nconnection: close\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

    def kill(self):
        """SIGKILL: the daemon dies at whatever it was doing (its store stays)."""
        self.process.kill()
        self.process.wait()
        self._log.close()

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        """SIGTERM, and the daemon's exit status (0 for a clean shutdown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
        return code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
