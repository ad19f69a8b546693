"""Environments: one package and a heavy set, by renv (CLI and daemon), `uv venv` + `uv pip
install`, and `python -m venv` + `pip install`, same run.

- new env, warm wheels: the installer's cache already holds the wheels (after a warm-up);
- new env, cold wheels: an empty installer cache (a fresh store for renv, a fresh
  UV_CACHE_DIR / PIP_CACHE_DIR for the others);
- existing env: asking again for an env that is there (renv: the whole `renv build`
  process, or one daemon request; uv/pip: the install that finds everything satisfied).

Every install reads wheels from a local wheelhouse (--no-index --find-links), downloaded
once, so no figure depends on the network.
"""

import json
import os
import subprocess
import sys

from common import ROOT, Daemon, Stat, rmtree, sh, timed, timed_cmd

from renv import RenvClient

SETS = {"requests": ["requests==2.26.0"], "numpy+pandas": ["numpy", "pandas"]}


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


def run(work, renv, uv, python, quick):
    runs = 2 if quick else 5
    sets = {"requests": SETS["requests"]} if quick else SETS
    results = {}
    for name, requirements in sets.items():
        wheels = wheelhouse(name, requirements)
        index = ["--no-index", "--find-links", wheels]
        base = os.path.join(work, name)
        os.makedirs(base)
        env = dict(os.environ, RENV_UV=uv, RENV_PYTHON=python)
        env.pop("RENV_STORE", None)
        spec_path = os.path.join(base, "env.json")
        counter = [0]

        def spec():
            counter[0] += 1
            with open(spec_path, "w") as f:
                json.dump({"pip": variant(requirements, counter[0])}, f)

        warm_store = os.path.join(base, "store")
        renv_build = [renv, "build", "--store", warm_store, *index, spec_path]
        rows = {}

        # renv CLI.
        spec()
        sh(renv_build, env=env)  # warm-up: the store's uv cache now holds the wheels
        rows["renv build"] = {
            "warm": timed_cmd(renv_build, runs, setup=spec, env=env).as_json(),
            "existing": timed_cmd(renv_build, runs, env=env).as_json(),
        }
        cold_store = os.path.join(base, "cold-store")

        def cold_renv():
            rmtree(cold_store)
            spec()

        rows["renv build"]["cold"] = timed_cmd(
            [renv, "build", "--store", cold_store, *index, spec_path], runs, setup=cold_renv, env=env).as_json()

        # renv daemon: one request.
        daemon = Daemon(*index, "--python", python, store=os.path.join(base, "daemon-store"),
                        env={"RENV_UV": uv})
        try:
            client = RenvClient(daemon.socket)
            n = [0]

            def request(fresh):
                if fresh:
                    n[0] += 1
                created = client.get_or_create_env({"pip": variant(requirements, n[0])})
                client.release_env(created.env_id)

            request(True)
            rows["renv daemon"] = {
                "warm": timed(lambda: request(True), runs).as_json(),
                "existing": timed(lambda: request(False), runs).as_json(),
            }
        finally:
            daemon.stop()
        cold_daemon_samples = []
        for i in range(runs):
            store = os.path.join(base, f"cold-daemon-{i}")
            daemon = Daemon(*index, "--python", python, store=store, env={"RENV_UV": uv})
            try:
                client = RenvClient(daemon.socket)
                cold_daemon_samples += timed(lambda: request(True), 1).samples
            finally:
                daemon.stop()
        rows["renv daemon"]["cold"] = Stat(cold_daemon_samples).as_json()

        # uv venv + uv pip install, into a new path each run: uv caches what it learns of an
        # interpreter by path, so reusing one path would skip a cost every new env pays.
        uv_cache = os.path.join(base, "uv-cache")
        uv_env = dict(os.environ, UV_CACHE_DIR=uv_cache, UV_PYTHON_DOWNLOADS="never")
        uv_runs = [0]

        def uv_install():
            uv_runs[0] += 1
            venv = os.path.join(base, f"uv-venv-{uv_runs[0]}")
            sh([uv, "venv", "-q", "--python", python, venv], env=uv_env)
            sh([uv, "pip", "install", "-q", "--python", os.path.join(venv, "bin", "python"), *index, *requirements],
               env=uv_env)
            return venv

        venv = uv_install()
        rows["uv venv + uv pip install"] = {
            "warm": timed(uv_install, runs).as_json(),
            "existing": timed_cmd([uv, "pip", "install", "-q", "--python", os.path.join(venv, "bin", "python"),
                                   *index, *requirements], runs, env=uv_env).as_json(),
            "cold": timed(uv_install, runs, setup=lambda: rmtree(uv_cache)).as_json(),
        }

        # python -m venv + pip install.
        pip_cache = os.path.join(base, "pip-cache")
        pvenv = os.path.join(base, "pip-venv")
        pip_env = dict(os.environ, PIP_CACHE_DIR=pip_cache, PIP_DISABLE_PIP_VERSION_CHECK="1")

        def pip_install():
            rmtree(pvenv)
            sh([python, "-m", "venv", pvenv], env=pip_env)
            sh([os.path.join(pvenv, "bin", "python"), "-m", "pip", "install", "-q", *index, *requirements],
               env=pip_env)

        pip_install()
        rows["python -m venv + pip install"] = {
            "warm": timed(pip_install, runs).as_json(),
            "existing": timed_cmd([os.path.join(pvenv, "bin", "python"), "-m", "pip", "install", "-q", *index,
                                   *requirements], runs, env=pip_env).as_json(),
            "cold": timed(pip_install, runs, setup=lambda: rmtree(pip_cache)).as_json(),
        }
        results[name] = rows
        rmtree(base)
    return results


def python_real():
    return subprocess.check_output(
        ["python3", "-c", "import os, sys; print(os.path.realpath(sys.executable))"], text=True).strip()
