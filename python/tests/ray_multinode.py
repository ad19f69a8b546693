"""Two Ray nodes on one machine, each with its own renv daemon and store (no remote): a
driver's local renv packages reach both through Ray's GCS (RAY_RUNTIME_ENV_HOOK=
renv.ray_plugin.hook), once per node; a second job reuses everything; RENV_RAY_TAKEOVER=1
runs plain Ray driver code (top-level working_dir, py_modules, pip) on renv.

Run with the python of a venv holding `ray[default]` and this SDK (scripts/test-ray makes
one); RENV_BIN names the renv binary, RENV_UV the pinned uv.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_wheels import make_wheels  # noqa: E402
from renv_daemon import Daemon  # noqa: E402

from renv import RenvClient  # noqa: E402
from renv.client import package  # noqa: E402

NODES = ("node1", "node2")
FETCHED = "fetched from Ray's GCS into this node's store"

# Runs each task on the node named by its custom resource and reports what it sees.
DRIVER_SCRIPT = r'''
import json, os, sys
import ray

def probe():
    import raypkg, netmod
    with open("data.txt") as f:
        data = f.read().strip()
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "python": sys.executable,
        "version": raypkg.VERSION,
        "module": netmod.WORD,
        "data": data,
        "var": os.environ.get("E2E_VAR"),
    }

ray.init(runtime_env=json.loads(sys.argv[1]))
probe = ray.remote(probe)
refs = {n: probe.options(resources={n: 0.01}).remote() for n in ("node1", "node2")}
print("RESULT " + json.dumps({n: ray.get(r) for n, r in refs.items()}), flush=True)
if len(sys.argv) > 2:
    # A task's own runtime_env through the hook, on a connected driver: uploaded at once.
    from renv.ray_plugin import hook
    task_env = hook(json.loads(sys.argv[2]))
    print("TASK " + json.dumps(ray.get(probe.options(resources={"node2": 0.01}, runtime_env=task_env).remote())))
'''


def log(message):
    print(f"[ray-multinode {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd, env, timeout=300, check=True):
    log("$ " + " ".join(cmd))
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    log(f"  exit {done.returncode} after {time.monotonic() - started:.1f} s")
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def result_line(output, tag="RESULT"):
    for line in output.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise AssertionError(f"no {tag} line in:\n{output}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetches(ray_temp, digest):
    """How many times the node's plugin put ``digest`` from GCS into its daemon (its
    per-job runtime_env_setup logs)."""
    count = 0
    # session_2…: the session's own directory, not its session_latest link.
    for path in glob.glob(os.path.join(ray_temp, "session_2*", "logs", "runtime_env_setup-*.log")):
        with open(path, errors="replace") as f:
            count += sum(1 for line in f if FETCHED in line and digest in line)
    return count


def check_unit():
    """The hook's pieces that need no cluster: takeover conflicts, the node's refusal of a
    local path with a pointer to the hook."""
    from renv._ray_packages import take_over
    from renv.ray_plugin import RenvPlugin

    moved = take_over({"pip": ["a"], "env_vars": {"A": "1"}, "working_dir": "gcs://_ray_pkg_x.zip",
                       "renv": {"env_vars": {"B": "2"}}, "excludes": ["*.log"]})
    assert moved == {"working_dir": "gcs://_ray_pkg_x.zip",
                     "renv": {"pip": ["a"], "env_vars": {"B": "2", "A": "1"}, "excludes": ["*.log"]}}, moved
    for bad, words in (({"pip": ["a"], "renv": {"pip": ["b"]}}, "both pip and renv.pip"),
                       ({"env_vars": {"A": "1"}, "renv": {"env_vars": {"A": "2"}}}, "env_vars.A")):
        try:
            take_over(bad)
            raise AssertionError(f"no error for {bad}")
        except ValueError as e:
            assert words in str(e), e
    try:
        RenvPlugin.validate({"renv": {"py_modules": ["pkg://" + "0" * 64, "./mod"]}})
        raise AssertionError("a local py_modules entry passed validation")
    except ValueError as e:
        assert "py_modules[1]" in str(e) and "RAY_RUNTIME_ENV_HOOK=renv.ray_plugin.hook" in str(e), e


def check_fetch_once(work):
    """Concurrent creates on one node needing the same package fetch it from GCS once; a
    package GCS lacks is left to the daemon; a package over GCS's cap is refused naming
    its field."""
    import logging
    import threading

    import renv._ray_packages as packages
    from renv.ray_plugin import RenvPlugin

    digest, missing = "a" * 64, "b" * 64
    puts, gets = [], []

    class Daemon:
        def has_package(self, d):
            return d in puts

        def put_package(self, d, data):
            puts.append(d)

    class Gcs:
        def internal_kv_get(self, key, namespace, timeout=None):
            gets.append(key)
            time.sleep(0.2)
            return b"zip" if key == packages.gcs_key(digest) else None

    plugin = RenvPlugin()
    plugin._client, plugin._gcs = Daemon(), Gcs()
    spec = {"working_dir": "pkg://" + digest, "py_modules": ["pkg://" + missing]}
    threads = [threading.Thread(target=plugin._fetch_packages, args=(spec, logging.getLogger("t"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert puts == [digest], puts
    assert gets.count(packages.gcs_key(digest)) == 1, gets

    big = os.path.join(work, "big")
    os.makedirs(big)
    with open(os.path.join(big, "blob"), "wb") as f:
        f.write(b"x" * 4096)
    cap = packages.gcs_max_bytes
    packages.gcs_max_bytes = lambda: 1024
    try:
        packages.hook({"renv": {"py_modules": [big]}})
        raise AssertionError("a package over GCS's cap was accepted")
    except ValueError as e:
        assert "runtime_env.renv.py_modules[0]" in str(e) and "over the 1024 bytes" in str(e), e
    finally:
        packages.gcs_max_bytes = cap


def check_remote(work):
    """With RENV_REMOTE, packages are pushed by `renv package --push` (stood in for here by
    a script printing its JSON) and nothing waits for GCS."""
    import renv._ray_packages as packages

    fake = os.path.join(work, "fake-renv")
    argv_log = os.path.join(work, "fake-renv.args")
    with open(fake, "w") as f:
        f.write(f"#!/bin/sh\necho \"$@\" >> {argv_log}\n"
                f"echo '{{\"digest\": \"{'c' * 64}\", \"uri\": \"pkg://{'c' * 64}\"}}'\n")
    os.chmod(fake, 0o755)
    saved = {k: os.environ.get(k) for k in ("RENV_BIN", "RENV_REMOTE")}
    os.environ.update(RENV_BIN=fake, RENV_REMOTE="s3://bucket/renv")
    try:
        env = packages.hook({"renv": {"working_dir": work, "excludes": ["*.log"]}})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert env == {"renv": {"working_dir": "pkg://" + "c" * 64}}, env
    with open(argv_log) as f:
        assert f.read().split() == ["package", work, "--json", "--push", "--exclude", "*.log"]
    assert packages._pending is None


def main():
    check_unit()
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    work = tempfile.mkdtemp(prefix="renv-ray2-")
    wheels = os.path.join(work, "wheels")
    make_wheels(wheels, [("raypkg", "1.0", "VERSION = '1.0'\n")])
    check_fetch_once(work)
    check_remote(work)

    # The driver's files: a working_dir (the tasks' cwd) and a module directory.
    project = os.path.join(work, "project")
    os.makedirs(project)
    with open(os.path.join(project, "data.txt"), "w") as f:
        f.write("from the driver's working_dir\n")
    module_dir = os.path.join(work, "lib", "netmod")
    os.makedirs(module_dir)
    with open(os.path.join(module_dir, "__init__.py"), "w") as f:
        f.write("WORD = 'netmod'\n")
    wd_digest = package(project, os.path.join(work, "wd.zip"))
    mod_digest = package(module_dir, os.path.join(work, "mod.zip"), as_module=True)

    daemons, clients, temps = {}, {}, {}
    for node in NODES:
        daemons[node] = Daemon(
            "--python", sys.executable, "--system-site-packages", "--no-index", "--find-links", wheels,
            store=os.path.join(work, f"store-{node}"),
        )
        clients[node] = RenvClient(daemons[node].socket)
        temps[node] = os.path.join(work, f"ray-{node}")
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RENV_SOCKET")}
    base.update(
        RAY_RUNTIME_ENV_PLUGINS=json.dumps([{"class": "renv.ray_plugin.RenvPlugin"}]),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--object-store-memory", str(100 << 20), "--node-ip-address", "127.0.0.1",
              "--disable-usage-stats"]
    started = []
    try:
        for node in NODES:
            # Each node's raylet, and so its runtime-env agent, talks to its own daemon.
            env = dict(base, RENV_SOCKET=daemons[node].socket)
            where = ["--head", "--port", str(port), "--include-dashboard", "false"] if node == "node1" else [
                "--address", address, "--dashboard-agent-listen-port", str(free_port()),
                "--metrics-export-port", str(free_port())]
            run([ray, "start", *where, *common, "--resources", json.dumps({node: 1}), "--temp-dir", temps[node]],
                env)
            started.append(env)

        # The driver has no daemon of its own: its packages go to GCS, not to a node.
        driver_env = dict(base, RAY_ADDRESS=address, RAY_RUNTIME_ENV_HOOK="renv.ray_plugin.hook",
                          RENV_STORE=os.path.join(work, "driver-store"))
        driver = os.path.join(work, "driver.py")
        with open(driver, "w") as f:
            f.write(DRIVER_SCRIPT)

        def job(runtime_env, env=driver_env):
            results = result_line(run([sys.executable, driver, json.dumps(runtime_env)], env).stdout)
            log(f"tasks saw {results}")
            assert results["node1"]["node"] != results["node2"]["node"], results
            for node in NODES:
                r = results[node]
                assert r["python"].startswith(os.path.join(daemons[node].store, "store-v1", "envs")), (node, r)
                assert (r["version"], r["module"], r["data"]) == ("1.0", "netmod", "from the driver's working_dir"), r
            return results

        # 1. Local working_dir and py_modules under renv: packaged by the driver's hook, to GCS,
        #    into each node's daemon once.
        spec = {"working_dir": project, "py_modules": [module_dir], "pip": ["raypkg==1.0"]}
        first = job({"renv": spec})
        for node in NODES:
            client = clients[node]
            assert client.has_package(wd_digest) and client.has_package(mod_digest), node
            counts = (fetches(temps[node], wd_digest), fetches(temps[node], mod_digest))
            assert counts == (1, 1), f"{node} fetched the packages {counts} times"
            assert client.metrics()["renv_builds_total"] == 1, node

        # 2. A second job with the same spec: the same envs, nothing fetched or built again.
        second = job({"renv": spec})
        for node in NODES:
            assert second[node]["python"] == first[node]["python"], (node, first, second)
            assert (fetches(temps[node], wd_digest), fetches(temps[node], mod_digest)) == (1, 1), node
            assert clients[node].metrics()["renv_builds_total"] == 1, f"{node} rebuilt the env"

        # 3. Plain Ray driver code with RENV_RAY_TAKEOVER=1: Ray's own fields become renv's
        #    (the same renv spec as above, plus env_vars: the same packages and env).
        takeover_env = dict(driver_env, RENV_RAY_TAKEOVER="1")
        third = job({"working_dir": project, "py_modules": [module_dir], "pip": ["raypkg==1.0"],
                     "env_vars": {"E2E_VAR": "taken-over"}}, takeover_env)
        for node in NODES:
            assert third[node]["var"] == "taken-over", third
            assert (fetches(temps[node], wd_digest), fetches(temps[node], mod_digest)) == (1, 1), node
            assert third[node]["python"] == first[node]["python"], (node, first, third)
            assert clients[node].metrics()["renv_builds_total"] == 1, f"{node} built again for the takeover"
            assert clients[node].healthz()

        # 4. A task's runtime_env passed through the hook by hand, another working_dir: its
        #    package goes to GCS at once and reaches node2 alone.
        other = os.path.join(work, "other")
        os.makedirs(other)
        with open(os.path.join(other, "data.txt"), "w") as f:
            f.write("from the task's working_dir\n")
        other_digest = package(other, os.path.join(work, "other.zip"))
        task_spec = dict(spec, working_dir=other)
        out = run([sys.executable, driver, json.dumps({"renv": spec}), json.dumps({"renv": task_spec})], driver_env)
        task = result_line(out.stdout, "TASK")
        log(f"the task with its own runtime_env saw {task}")
        assert task["data"] == "from the task's working_dir" and task["module"] == "netmod", task
        assert task["python"].startswith(daemons["node2"].store), task
        assert fetches(temps["node2"], other_digest) == 1 and not clients["node1"].has_package(other_digest)
    finally:
        for env in reversed(started):
            run([ray, "stop", "--force"], env, check=False)
            break  # `ray stop` stops every Ray process of this machine
        codes = {}
        for node, daemon in daemons.items():
            codes[node] = daemon.stop()
            if codes[node] != 0:
                print(daemon.log())
        shutil.rmtree(work, ignore_errors=True)
    assert all(code == 0 for code in codes.values()), f"renv daemons exited with {codes}"
    log("renv daemons shut down cleanly; all checks passed")


if __name__ == "__main__":
    main()
