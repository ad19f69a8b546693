"""Environments: one package and a heavy set, by renv (CLI and daemon), `uv venv` + `uv pip
install`, and `python -m venv` + `pip install`, same run.

- new env, warm wheels: the installer's cache already holds the wheels (after a warm-up);
- new env, cold wheels: an empty installer cache (a fresh store for renv, a fresh
  UV_CACHE_DIR / PIP_CACHE_DIR for the others);
- existing env: asking again for an env that is there (renv: the whole `renv build`
  process, or one daemon request; uv/pip: the install that finds everything satisfied).

Every install reads wheels from a local wheelhouse (--no-index --find-links), downloaded
once, so no figure depends on the network. Samples are interleaved: each round takes one
sample of every method and kind, so drift on a shared machine hits them all alike.
"""

import json
import os
import sys
import time

from common import ROOT, Daemon, Stat, rmtree, sh

from renv import RenvClient

SETS = {"requests": ["requests==2.26.0"], "numpy+pandas": ["numpy", "pandas"]}
KINDS = ("warm", "cold", "existing")


def wheelhouse(name, requirements):
    """target/bench-wheels/<name>: downloaded once (the only network use)."""
    path = os.path.join(ROOT, "target", "bench-wheels", name)
    if not os.path.isdir(path) or not os.listdir(path):
        sh([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", path, *requirements])
    return path


def variant(requirements, n):
    """The same requirements, made a new spec by a no-op clause (`!=0.0.n`), so every
    installer must build a new env from warm caches."""
    first = requirements[0]
    return [f"{first},!=0.0.{n}" if "==" in first else f"{first}!=0.0.{n}", *requirements[1:]]


def clock(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Methods:
    """One sample of each (method, kind): setup untimed, the step timed."""

    def __init__(self, base, renv, uv, python, requirements, wheels, with_pip=True):
        self.base, self.renv, self.uv, self.python = base, renv, uv, python
        self.requirements = requirements
        self.index = ["--no-index", "--find-links", wheels]
        self.serial = 0
        self.env = dict(os.environ, RENV_UV=uv, RENV_PYTHON=python)
        self.env.pop("RENV_STORE", None)
        self.uv_env = dict(os.environ, UV_PYTHON_DOWNLOADS="never")
        self.pip_env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        self.daemon = Daemon(*self.index, "--python", python, store=self.path("daemon-store"),
                             env={"RENV_UV": uv})
        self.client = RenvClient(self.daemon.socket)
        # Warm-ups: every warm cache and every "existing" env exists before the first sample.
        self.renv_cli(self.path("store"), self.new_spec())()
        self.existing_spec = self.new_spec()
        self.renv_cli(self.path("store"), self.existing_spec)()
        self.existing_env = self.client.get_or_create_env({"pip": self.existing_spec}).env_id
        self.uv_existing = self.uv_install(self.path("uv-cache"))
        if with_pip:
            self.pip_existing = self.pip_install(self.path("pip-cache"))

    def path(self, name):
        return os.path.join(self.base, name)

    def new_spec(self):
        self.serial += 1
        return variant(self.requirements, self.serial)

    def fresh(self, name):
        self.serial += 1
        path = self.path(f"{name}-{self.serial}")
        rmtree(path)
        return path

    def renv_cli(self, store, requirements):
        """Writes the spec (untimed) and returns the `renv build` to time."""
        spec = self.path("env.json")
        with open(spec, "w") as f:
            json.dump({"pip": requirements}, f)
        return lambda: sh([self.renv, "build", "--store", store, *self.index, spec], env=self.env)

    def uv_install(self, cache):
        # A new venv path each time: uv caches what it learns of an interpreter by path.
        venv = self.fresh("uv-venv")
        env = dict(self.uv_env, UV_CACHE_DIR=cache)
        sh([self.uv, "venv", "-q", "--python", self.python, venv], env=env)
        sh([self.uv, "pip", "install", "-q", "--python", os.path.join(venv, "bin", "python"), *self.index,
            *self.requirements], env=env)
        return venv

    def pip_install(self, cache):
        venv = self.fresh("pip-venv")
        env = dict(self.pip_env, PIP_CACHE_DIR=cache)
        sh([self.python, "-m", "venv", venv], env=env)
        sh([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", *self.index, *self.requirements],
           env=env)
        return venv

    def samples(self):
        """{(method, kind): a function taking one sample (seconds)}."""
        m = self

        def renv_warm():
            return clock(m.renv_cli(m.path("store"), m.new_spec()))

        def renv_cold():
            return clock(m.renv_cli(m.fresh("cold-store"), m.new_spec()))

        def renv_existing():
            return clock(m.renv_cli(m.path("store"), m.existing_spec))

        def daemon_request(client, requirements):
            def request():
                client.release_env(client.get_or_create_env({"pip": requirements}).env_id)
            return clock(request)

        def daemon_cold():
            daemon = Daemon(*m.index, "--python", m.python, store=m.fresh("cold-daemon"), env={"RENV_UV": m.uv})
            try:
                return daemon_request(RenvClient(daemon.socket), m.new_spec())
            finally:
                daemon.stop()

        def uv_satisfied():
            return clock(lambda: sh([m.uv, "pip", "install", "-q", "--python",
                                     os.path.join(m.uv_existing, "bin", "python"), *m.index, *m.requirements],
                                    env=dict(m.uv_env, UV_CACHE_DIR=m.path("uv-cache"))))

        def pip_satisfied():
            return clock(lambda: sh([os.path.join(m.pip_existing, "bin", "python"), "-m", "pip", "install", "-q",
                                     *m.index, *m.requirements], env=dict(m.pip_env, PIP_CACHE_DIR=m.path("pip-cache"))))

        return {
            ("renv build", "warm"): renv_warm,
            ("renv build", "cold"): renv_cold,
            ("renv build", "existing"): renv_existing,
            ("renv daemon", "warm"): lambda: daemon_request(m.client, m.new_spec()),
            ("renv daemon", "cold"): daemon_cold,
            ("renv daemon", "existing"): lambda: daemon_request(m.client, m.existing_spec),
            ("uv venv + uv pip install", "warm"): lambda: clock(lambda: m.uv_install(m.path("uv-cache"))),
            ("uv venv + uv pip install", "cold"): lambda: clock(lambda: m.uv_install(m.fresh("uv-cold-cache"))),
            ("uv venv + uv pip install", "existing"): uv_satisfied,
            ("python -m venv + pip install", "warm"): lambda: clock(lambda: m.pip_install(m.path("pip-cache"))),
            ("python -m venv + pip install", "cold"): lambda: clock(lambda: m.pip_install(m.fresh("pip-cold-cache"))),
            ("python -m venv + pip install", "existing"): pip_satisfied,
        }

    def close(self):
        self.daemon.stop()


def run(work, renv, uv, python, quick):
    runs = 2 if quick else 5
    sets = {"requests": SETS["requests"]} if quick else SETS
    results = {}
    for name, requirements in sets.items():
        base = os.path.join(work, name)
        os.makedirs(base)
        methods = Methods(base, renv, uv, python, requirements, wheelhouse(name, requirements))
        try:
            samples = {}
            for _ in range(runs):
                for key, sample in methods.samples().items():
                    samples.setdefault(key, []).append(sample())
        finally:
            methods.close()
        rows = {}
        for (method, kind), values in samples.items():
            rows.setdefault(method, {})[kind] = Stat(values).as_json()
        results[name] = rows
        rmtree(base)
    return results



# What the disk section measures: a new env from warm wheels, where renv's fsyncs count.
DISK_SAMPLES = [("renv build", "warm"), ("renv daemon", "warm"), ("uv venv + uv pip install", "warm")]


def run_disk(work, renv, uv, python, quick):
    """New envs from warm wheels on a disk (the work dir's filesystem), where making an env
    durable costs what it costs: renv (CLI and daemon) against uv by hand, interleaved."""
    from common import filesystem_of
    runs = 3 if quick else 9
    results = {"filesystem": filesystem_of(work), "sets": {}}
    for name, requirements in SETS.items():
        base = os.path.join(work, name)
        os.makedirs(base)
        methods = Methods(base, renv, uv, python, requirements, wheelhouse(name, requirements), with_pip=False)
        try:
            every = methods.samples()
            samples = {}
            for _ in range(runs):
                for key in DISK_SAMPLES:
                    samples.setdefault(key, []).append(every[key]())
        finally:
            methods.close()
        results["sets"][name] = {method: Stat(values).as_json() for (method, _), values in samples.items()}
        rmtree(base)
    return results
