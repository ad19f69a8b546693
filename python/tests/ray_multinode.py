"""Two Ray nodes on one machine, each with its own renv daemon and store (no remote): a
driver's local renv packages reach both through Ray's GCS (RAY_RUNTIME_ENV_HOOK=
renv.ray_plugin.hook), once per node; a second job reuses everything; RENV_RAY_TAKEOVER=1
runs plain Ray driver code (top-level working_dir, py_modules, pip) on renv. Then the same
cluster with fresh daemons sharing renv's remote on a local S3 API (moto): the driver's
hook pushes the packages there (RENV_REMOTE), each node's daemon fetches each once, and
nothing goes through GCS.

Run with the python of a venv holding `ray[default]` and this SDK (scripts/test-ray makes
one); RENV_BIN names the renv binary, RENV_UV the pinned uv.
"""

import glob
import json
import os
import shutil
import signal
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
NOT_IN_GCS = "is not in Ray's GCS; leaving it to the daemon"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The local S3 API the Rust tests use (tests/it/common.rs S3Server), in the same place.
MOTO = ("moto-5.1.18", ["moto[s3]==5.1.18", "flask<4", "flask-cors<7"])
BUCKET = "renv-ray"

# Runs each task on the node named by its custom resource and reports what it sees.
DRIVER_SCRIPT = r'''
import json, os, sys
import ray

def probe():
    import raypkg, netmod
    with open("data.txt") as f:
        data = f.read().strip()
    try:
        import wheelmod  # a py_modules wheel, where the spec has one
        wheel = wheelmod.WORD
    except ImportError:
        wheel = None
    return {
        "wheel": wheel,
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
from ray.experimental import internal_kv
print("GCS " + json.dumps(sorted(k.decode() for k in internal_kv._internal_kv_list("renv_pkg_"))), flush=True)
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


def fetches(ray_temp, digest, what=FETCHED):
    """How many times the node's plugin put ``digest`` from GCS into its daemon (its
    per-job runtime_env_setup logs), or logged ``what`` about it."""
    count = 0
    # session_2…: the session's own directory, not its session_latest link.
    for path in glob.glob(os.path.join(ray_temp, "session_2*", "logs", "runtime_env_setup-*.log")):
        with open(path, errors="replace") as f:
            count += sum(1 for line in f if what in line and digest in line)
    return count


class Moto:
    """A local S3 API: moto's server on 127.0.0.1, installed with pip into
    target/test-tools (unless the Rust tests did already) and run by the python3 that
    installed it, as tests/it/common.rs does. Werkzeug logs each request line to stderr,
    which counts requests."""

    def __init__(self, work):
        python3 = shutil.which("python3") or sys.executable
        name, requirements = MOTO
        self.dir = os.path.join(REPO, "target", "test-tools", name)
        if not os.path.isdir(self.dir):
            tmp = f"{self.dir}.tmp-{os.getpid()}"
            run([python3, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--ignore-installed",
                 "--target", tmp, *requirements], os.environ)
            try:
                os.rename(tmp, self.dir)
            except OSError:
                pass  # another run installed it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        self.python3 = python3
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(work, "moto.log")
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [python3, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                env=dict(os.environ, PYTHONPATH=self.dir), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def create_bucket(self, bucket):
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto did not start:\n{self.log()}")
                time.sleep(0.05)
        run([self.python3, os.path.join(REPO, "tests", "it", "servers.py"), "s3", self.endpoint, "create-bucket",
             bucket], dict(os.environ, PYTHONPATH=self.dir))

    def env(self):
        """The standard AWS variables that make renv reach it."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def requests(self, method, path):
        """``METHOD /path`` requests so far (path-style: /bucket/key)."""
        want = f'"{method} {path} '
        return sum(1 for line in self.log().splitlines() if want in line)

    def stop(self):
        # Its own process group (a python3 shim may not exec the interpreter).
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


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


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


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
    write(os.path.join(project, "data.txt"), "from the driver's working_dir\n")
    module_dir = os.path.join(work, "lib", "netmod")
    write(os.path.join(module_dir, "__init__.py"), "WORD = 'netmod'\n")
    [module_wheel] = make_wheels(os.path.join(work, "module-wheels"), [("wheelmod", "1.0", "WORD = 'from a wheel'\n")])
    wd_digest = package(project, os.path.join(work, "wd.zip"))
    mod_digest = package(module_dir, os.path.join(work, "mod.zip"), as_module=True)

    # Each node's daemon listens on a socket of its own, outside its store, so that a
    # daemon with a fresh store can take its place under the same running Ray node.
    sockets = {node: os.path.join(work, f"{node}.sock") for node in NODES}
    every = []  # (label, daemon): each is stopped and must exit 0

    def start_daemons(label, *flags, env=None):
        for node in NODES:
            daemons[node] = Daemon(
                "--python", sys.executable, "--system-site-packages", "--no-index", "--find-links", wheels, *flags,
                store=os.path.join(work, f"store-{label}-{node}"), socket=sockets[node], env=env,
            )
            every.append((f"{node} ({label})", daemons[node]))

    daemons, temps = {}, {node: os.path.join(work, f"ray-{node}") for node in NODES}
    clients = {node: RenvClient(sockets[node]) for node in NODES}
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
    # Started now, used last: it comes up while Ray does.
    moto = Moto(work)
    try:
        start_daemons("gcs")
        for node in NODES:
            # Each node's raylet, and so its runtime-env agent, talks to its own daemon.
            env = dict(base, RENV_SOCKET=sockets[node])
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
        write(driver, DRIVER_SCRIPT)

        def job(runtime_env, env=driver_env, data="from the driver's working_dir", word="netmod"):
            """Runs the driver; returns what the task on each node saw, with "gcs": renv's
            keys in GCS after the job."""
            out = run([sys.executable, driver, json.dumps(runtime_env)], env).stdout
            results = result_line(out)
            log(f"tasks saw {results}")
            assert results["node1"]["node"] != results["node2"]["node"], results
            for node in NODES:
                r = results[node]
                assert r["python"].startswith(os.path.join(daemons[node].store, "store-v1", "envs")), (node, r)
                assert (r["version"], r["module"], r["data"]) == ("1.0", word, data), r
            results["gcs"] = result_line(out, "GCS")
            return results

        # 1. Local working_dir and py_modules under renv: packaged by the driver's hook, to GCS,
        #    into each node's daemon once.
        spec = {"working_dir": project, "py_modules": [module_dir, module_wheel], "pip": ["raypkg==1.0"]}
        first = job({"renv": spec})
        assert all(first[node]["wheel"] == "from a wheel" for node in NODES), first
        assert {f"renv_pkg_{d}.zip" for d in (wd_digest, mod_digest)} <= set(first["gcs"]), first["gcs"]
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
        third = job({"working_dir": project, "py_modules": [module_dir, module_wheel], "pip": ["raypkg==1.0"],
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
        write(os.path.join(other, "data.txt"), "from the task's working_dir\n")
        other_digest = package(other, os.path.join(work, "other.zip"))
        task_spec = dict(spec, working_dir=other)
        out = run([sys.executable, driver, json.dumps({"renv": spec}), json.dumps({"renv": task_spec})], driver_env)
        task = result_line(out.stdout, "TASK")
        log(f"the task with its own runtime_env saw {task}")
        assert task["data"] == "from the task's working_dir" and task["module"] == "netmod", task
        assert task["python"].startswith(daemons["node2"].store), task
        assert fetches(temps["node2"], other_digest) == 1 and not clients["node1"].has_package(other_digest)

        # 5. renv's shared remote instead of GCS, on the same cluster: each node's daemon is
        #    replaced by one with an empty store and --remote on a local S3 API, and the
        #    driver has RENV_REMOTE (the hook pushes with `renv package --push`). The Ray
        #    nodes stay: the plugin keeps no daemon state but the references of step 1-4's
        #    URIs (other specs), and opens a connection per request. The project and module
        #    differ from steps 1-4, so their digests are new: GCS cannot have them, and any
        #    use of GCS would show (keys, the plugin's log).
        for label, daemon in every:
            code = daemon.stop()
            assert code == 0, f"renv daemon {label} exited with {code}\n{daemon.log()}"
        moto.create_bucket(BUCKET)
        remote = f"s3://{BUCKET}/renv"
        start_daemons("s3", "--remote", remote, env=moto.env())
        s3_project = os.path.join(work, "s3-project")
        write(os.path.join(s3_project, "data.txt"), "from the driver's working_dir, through S3\n")
        s3_module = os.path.join(work, "s3-lib", "netmod")
        write(os.path.join(s3_module, "__init__.py"), "WORD = 'netmod from S3'\n")
        s3_digests = (package(s3_project, os.path.join(work, "s3-wd.zip")),
                      package(s3_module, os.path.join(work, "s3-mod.zip"), as_module=True))
        assert not set(s3_digests) & {wd_digest, mod_digest, other_digest}
        s3_env = dict(driver_env, RENV_REMOTE=remote, **moto.env())
        s3_spec = {"working_dir": s3_project, "py_modules": [s3_module], "pip": ["raypkg==1.0"]}
        expect = {"data": "from the driver's working_dir, through S3", "word": "netmod from S3"}

        def s3_requests(method, digest):
            return moto.requests(method, f"/{BUCKET}/renv/pkgs/{digest}.zip")

        def nothing_through_gcs(results):
            """No key in GCS, nothing fetched from it; returns how many times each node's
            plugin looked there, found nothing and left the package to the daemon (so its
            log is read, and the packages were missing on the node at first)."""
            assert not {f"renv_pkg_{d}.zip" for d in s3_digests} & set(results["gcs"]), results["gcs"]
            looked = {}
            for node in NODES:
                for d in s3_digests:
                    assert fetches(temps[node], d) == 0, f"{node} fetched {d} from GCS"
                    looked[node, d] = fetches(temps[node], d, NOT_IN_GCS)
                    assert looked[node, d] >= 1, (node, d)
            return looked

        s3_first = job({"renv": s3_spec}, s3_env, **expect)
        looked = nothing_through_gcs(s3_first)
        for d in s3_digests:
            # Pushed once by the driver; two GETs in all, and both nodes have it while
            # neither got it from GCS: one GET per node.
            assert (s3_requests("PUT", d), s3_requests("GET", d)) == (1, 2), (d, moto.log())
        for node in NODES:
            assert all(clients[node].has_package(d) for d in s3_digests), node
            assert clients[node].metrics()["renv_builds_total"] == 1, node
            # Each node downloaded each package once, by its own count.
            downloads = clients[node].metrics()["renv_remote_downloads_total"]
            assert downloads == len(s3_digests), (node, downloads)

        # 6. Again: the push finds the packages there, the nodes have them and the env.
        s3_second = job({"renv": s3_spec}, s3_env, **expect)
        assert nothing_through_gcs(s3_second) == looked, "a node looked for a package it has"
        for d in s3_digests:
            assert (s3_requests("PUT", d), s3_requests("GET", d)) == (1, 2), (d, moto.log())
        for node in NODES:
            assert s3_second[node]["python"] == s3_first[node]["python"], (node, s3_first, s3_second)
            assert clients[node].metrics()["renv_builds_total"] == 1, f"{node} rebuilt the env"
            assert clients[node].metrics()["renv_remote_downloads_total"] == len(s3_digests), node
    finally:
        for env in reversed(started):
            run([ray, "stop", "--force"], env, check=False)
            break  # `ray stop` stops every Ray process of this machine
        codes = {}
        for label, daemon in every:
            codes[label] = daemon.stop()
            if codes[label] != 0:
                print(daemon.log())
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    assert all(code == 0 for code in codes.values()), f"renv daemons exited with {codes}"
    log("renv daemons shut down cleanly; all checks passed")


if __name__ == "__main__":
    main()
