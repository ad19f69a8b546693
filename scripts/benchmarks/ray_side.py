"""The Ray half of `scripts/bench --with-ray`, run with target/ray-venv's python (Ray 2.60
and renv's SDK installed there). Prints one JSON object on stdout.

In one Ray cluster, with renv's plugin registered and a renv daemon on the node:
- environments: a task whose runtime_env is new to the cluster (a no-op `!=0.0.N` clause
  makes each sample new), by Ray's `pip` field, Ray's `uv` field and the renv plugin,
  interleaved sample by sample after one warm-up each; and a task in an env that exists.
  The floor, a new env with nothing to install (`env_vars` only), still starts a worker;
  an old env's first task (the renv plugin's env again, in a new worker) imports what the
  new env's task imports.
- working_dir: a driver with a changed tree (one file rewritten per sample, so nothing
  is cached) from `ray.init` until its first task returns: Ray's own `working_dir` (zip,
  upload to the GCS, download, unpack; Ray takes local trees only at the job level) and
  renv (`RenvClient.upload_package`, then the plugin's `working_dir: pkg://…`), with the
  same driver without any working_dir as the floor.

    python ray_side.py CONFIG_JSON
"""

import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import Daemon, Stat, rmtree  # noqa: E402
from envs import variant  # noqa: E402
from working_dir import make_tree  # noqa: E402

import ray  # noqa: E402

from renv import RenvClient  # noqa: E402


def log(message):
    print(f"  ray: {message}", file=sys.stderr, flush=True)


# The renv plugin's env again, in a new worker: what an old env's first task costs.
OLD_ENV = "renv plugin, env built already"


def env_specs(requirements, wheels, n):
    reqs = variant(requirements, n)
    index = ["--no-index", "--find-links", wheels]
    return {
        "ray, env_vars only (floor)": {"env_vars": {"BENCH_SAMPLE": str(n)}},
        "ray pip": {"pip": {"packages": reqs, "pip_install_options": ["--disable-pip-version-check", *index]}},
        "ray uv": {"uv": {"packages": reqs, "uv_pip_install_options": index}},
        "renv plugin": {"renv": {"pip": reqs}},
    }


def main():
    config = json.loads(sys.argv[1])
    work, runs = config["work"], config["runs"]
    bin_dir = os.path.dirname(sys.executable)
    os.environ["RENV_BIN"] = config["renv"]
    all_wheels = sorted({w for w in config["wheels"].values()})
    index = ["--no-index"] + [a for w in all_wheels for a in ("--find-links", w)]
    daemon = Daemon("--python", sys.executable, "--system-site-packages", *index,
                    store=os.path.join(work, "store"), env={"RENV_UV": os.path.join(bin_dir, "uv")})
    env = dict(os.environ, RENV_SOCKET=daemon.socket, RAY_USAGE_STATS_ENABLED="0",
               RAY_RUNTIME_ENV_PLUGINS=json.dumps([{"class": "renv.ray_plugin.RenvPlugin"}]),
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    ray_cli = os.path.join(bin_dir, "ray")
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    subprocess.run([ray_cli, "start", "--head", "--num-cpus", "2", "--temp-dir", ray_temp,
                    "--include-dashboard", "false", "--disable-usage-stats"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    os.environ["RENV_SOCKET"] = daemon.socket
    results = {"ray": ray.__version__, "envs": {}, "working_dir": []}
    try:
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)

        @ray.remote
        def where(module):
            __import__(module)
            return sys.executable

        def timed_task(runtime_env, module):
            start = time.perf_counter()
            ray.get(where.options(runtime_env=runtime_env).remote(module))
            return time.perf_counter() - start

        for name, requirements in config["sets"].items():
            module = {"requests": "requests", "numpy+pandas": "pandas"}[name]
            new, existing = {}, {}
            for n in range(runs + 1):
                for method, runtime_env in env_specs(requirements, config["wheels"][name], n).items():
                    # The floor installs nothing: its task imports what Ray's own env has.
                    imports = "os" if "env_vars" in runtime_env else module
                    elapsed = timed_task(runtime_env, imports)
                    if n == 0:
                        log(f"{name} warm-up {method}: {elapsed * 1000:.0f} ms")
                        continue
                    new.setdefault(method, []).append(elapsed)
                    existing.setdefault(method, []).append(timed_task(runtime_env, imports))
                    if method == "renv plugin":
                        # An old env's first task: the env is built, the worker is new (its
                        # own env_vars make the runtime_env new to Ray), its imports too.
                        again = dict(runtime_env, env_vars={"BENCH_WORKER": str(n)})
                        new.setdefault(OLD_ENV, []).append(timed_task(again, imports))
                        existing.setdefault(OLD_ENV, []).append(timed_task(again, imports))
            results["envs"][name] = {m: {"warm": Stat(new[m]).as_json(), "existing": Stat(existing[m]).as_json()}
                                     for m in new}

        ray.shutdown()

        client = RenvClient(daemon.socket)

        def driver(runtime_env_of):
            """From ray.init (with the env runtime_env_of() gives) to the first task's return."""
            start = time.perf_counter()
            ray.init(address="auto", logging_level="ERROR", log_to_driver=False, runtime_env=runtime_env_of())
            ray.get(where.remote("os"))
            elapsed = time.perf_counter() - start
            ray.shutdown()
            return elapsed

        for files, total in config["trees"]:
            tree = os.path.join(work, "tree")
            make_tree(tree, files, total)
            methods = {
                "driver, no working_dir (floor)": lambda: None,
                "ray working_dir": lambda: {"working_dir": tree},
                "renv upload + plugin": lambda: {"renv": {"working_dir": client.upload_package(tree)}},
            }
            rows = {name: [] for name in methods}
            for n in range(runs + 1):
                for name, runtime_env_of in methods.items():
                    with open(os.path.join(tree, "sample.txt"), "w") as f:
                        f.write(f"{name} {n}")
                    elapsed = driver(runtime_env_of)
                    if n:
                        rows[name].append(elapsed)
            log(f"working_dir {files} files, {total >> 20} MB done")
            results["working_dir"].append({"files": files, "bytes": total,
                                           "rows": {k: Stat(v).as_json() for k, v in rows.items()}})
            rmtree(tree)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, check=False, stdout=subprocess.DEVNULL)
        daemon.stop()
    # Kept when something failed: Ray's logs are in there.
    for leftover in glob.glob(os.path.join(work, "*")) + [ray_temp]:
        rmtree(leftover)
    json.dump(results, sys.stdout)
    sys.stdout.flush()
    # Ray's native teardown at interpreter exit has been seen to segfault (after a run
    # whose every figure was in): the results are out, so leave without it.
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # Ray's shutdown hooks can swallow the traceback of an uncaught exception.
        import traceback

        traceback.print_exc()
        sys.exit(1)
