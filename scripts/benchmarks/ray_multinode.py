"""The two-node half of `scripts/bench --with-ray` (section `ray_multinode`), run with
target/ray-venv's python. Prints one JSON object on stdout.

Two Ray nodes on this machine (`ray start` twice: a head and a worker joining it), each
with its own renv daemon and store (its raylet's RENV_SOCKET) and a custom resource
(node1, node2) to pin tasks. A driver with a changed tree (one file rewritten per sample,
so every sample is a new package on both nodes), from `ray.init` until one task pinned to
EACH node has returned, interleaved sample by sample after one warm-up round:

- Ray's own `working_dir` (the driver zips the tree and uploads it to the GCS; each node
  downloads and unpacks it);
- renv: `RAY_RUNTIME_ENV_HOOK=renv.ray_plugin.hook` with `runtime_env={"renv":
  {"working_dir": tree}}` (the driver's hook runs `renv package`, the zip goes to the GCS
  once connected; each node's plugin fetches it into its own daemon, which unpacks and
  commits it);
- the floor: the same driver and tasks without a working_dir.

    python ray_multinode.py CONFIG_JSON
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import Daemon, Stat, rmtree  # noqa: E402
from working_dir import make_tree  # noqa: E402

import ray  # noqa: E402

NODES = ("node1", "node2")
HOOK = "RAY_RUNTIME_ENV_HOOK"


def log(message):
    print(f"  ray_multinode: {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNode:
    """`ray start --block` in a session of its own: stopped by signalling that process
    (Ray then stops what it started), never by `ray stop`, which stops every Ray process
    on the machine, other users' included."""

    def __init__(self, ray_cli, args, env, log_path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([ray_cli, "start", "--block", *args], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            with open(log_path, errors="replace") as f:
                if "will now block forever" in f.read():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(log_path, errors="replace") as f:
                    raise RuntimeError(f"ray start failed:\n{f.read()[-3000:]}")
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of the session it led
        except ProcessLookupError:
            pass
        self.proc.wait()


def main():
    config = json.loads(sys.argv[1])
    work, runs = config["work"], config["runs"]
    bin_dir = os.path.dirname(sys.executable)
    ray_cli = os.path.join(bin_dir, "ray")
    os.environ["RENV_BIN"] = config["renv"]
    daemons = {node: Daemon(store=os.path.join(work, f"store-{node}")) for node in NODES}
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RENV_SOCKET", HOOK)}
    base.update(RAY_RUNTIME_ENV_PLUGINS=json.dumps([{"class": "renv.ray_plugin.RenvPlugin"}]),
                RAY_USAGE_STATS_ENABLED="0", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--object-store-memory", str(200 << 20), "--node-ip-address", "127.0.0.1",
              "--disable-usage-stats"]
    # Ray's dirs (where its nodes unpack working_dirs) on the work dir's filesystem, as the
    # daemons' stores are, and short: Ray's Unix socket paths must stay within 107 bytes.
    near = work
    while not os.path.ismount(near):
        near = os.path.dirname(near)
    if near == "/":
        near = "/tmp"
    temps = {node: tempfile.mkdtemp(prefix=f"ray-{node}-", dir=near) for node in NODES}
    # The hook stages its zips in the temp dir; Ray stages the driver's in its own dir.
    os.environ["TMPDIR"] = tempfile.tempdir = work
    results = {"ray": ray.__version__, "nodes": len(NODES), "working_dir": []}
    started = []
    try:
        for node in NODES:
            env = dict(base, RENV_SOCKET=daemons[node].socket)
            where = ["--head", "--port", str(port), "--include-dashboard", "false"] if node == "node1" else [
                "--address", address, "--dashboard-agent-listen-port", str(free_port()),
                "--metrics-export-port", str(free_port())]
            started.append(RayNode(ray_cli, [*where, *common, "--resources", json.dumps({node: 1}),
                                             "--temp-dir", temps[node]], env, os.path.join(work, f"{node}.log")))
        # The driver: no daemon of its own (its packages go to the GCS); `renv package`
        # keeps its hash cache in this store, as on a user's machine.
        os.environ["RENV_STORE"] = os.path.join(work, "driver-store")
        os.environ.pop("RENV_SOCKET", None)

        @ray.remote
        def where():
            return ray.get_runtime_context().get_node_id(), os.getcwd()

        def driver(runtime_env, hook):
            """From ray.init until a task has returned on each node."""
            if hook:
                os.environ[HOOK] = "renv.ray_plugin.hook"
            else:
                os.environ.pop(HOOK, None)
            start = time.perf_counter()
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, runtime_env=runtime_env)
            init = time.perf_counter() - start
            seen = ray.get([where.options(resources={n: 0.01}).remote() for n in NODES])
            elapsed = time.perf_counter() - start
            ray.shutdown()
            os.environ.pop(HOOK, None)
            assert len({node_id for node_id, _ in seen}) == 2, seen
            return elapsed, init, [cwd for _, cwd in seen]

        for files, total in config["trees"]:
            tree = os.path.join(work, "tree")
            make_tree(tree, files, total)
            # A new dict each sample: ray.init replaces the working_dir of the one it is
            # given with its gcs:// URI, and a reused dict would name the first package.
            methods = {
                "driver, no working_dir (floor)": (lambda: None, False),
                # A runtime_env with nothing to fetch: what any runtime_env costs on Ray.
                "driver, env_vars only (runtime_env floor)": (lambda: {"env_vars": {"BENCH": str(time.time())}},
                                                              False),
                "ray working_dir": (lambda: {"working_dir": tree}, False),
                "renv (hook + plugin)": (lambda: {"renv": {"working_dir": tree}}, True),
            }
            rows = {name: [] for name in methods}
            inits = {name: [] for name in methods}  # of which ray.init (the driver's packaging and upload)
            used = set()
            for n in range(runs + 1):
                for name, (runtime_env_of, hook) in methods.items():
                    runtime_env = runtime_env_of()
                    with open(os.path.join(tree, "sample.txt"), "w") as f:
                        f.write(f"{name} {n}")
                    elapsed, init, cwds = driver(runtime_env, hook)
                    if runtime_env and any(os.path.realpath(c) == os.path.realpath(tree) for c in cwds):
                        raise AssertionError(f"{name}: a task ran in the driver's own tree {cwds}")
                    # Every sample is a new package on each node, or it measured a cache.
                    if runtime_env and "env_vars" not in runtime_env and used.intersection(cwds):
                        raise AssertionError(f"{name}: sample {n} ran in an earlier sample's package {cwds}")
                    used.update(cwds)
                    log(f"{files} files, {total >> 20} MB, {'warm-up ' if n == 0 else ''}{name}: "
                        f"{elapsed * 1000:.0f} ms, ray.init {init * 1000:.0f} ms (tasks ran in {sorted(set(cwds))})")
                    if n:
                        rows[name].append(elapsed)
                        inits[name].append(init)
            results["working_dir"].append({"files": files, "bytes": total,
                                           "rows": {k: Stat(v).as_json() for k, v in rows.items()},
                                           "ray_init": {k: Stat(v).as_json() for k, v in inits.items()}})
            rmtree(tree)
        # Where each node's time went: the plugin logs, per package it fetched, the time in
        # Ray's GCS and in the daemon (the upload: unpacking, committing).
        steps = {"gcs": [], "daemon": []}
        for node in NODES:
            logs = os.path.join(temps[node], "session_latest", "logs")
            for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
                if name.startswith("runtime_env_setup") and name.endswith(".log"):
                    with open(os.path.join(logs, name), errors="replace") as f:
                        for line in f:
                            found = re.search(r"from Ray's GCS into this node's store .*GCS (\d+) ms, daemon (\d+) ms",
                                              line)
                            if found:
                                steps["gcs"].append(float(found.group(1)) / 1000)
                                steps["daemon"].append(float(found.group(2)) / 1000)
        if steps["gcs"]:
            results["renv_node_steps"] = {k: Stat(v).as_json() for k, v in steps.items()}
        # Each node fetched every renv package from the GCS once: runs + 1 per tree.
        results["renv_packages_per_node"] = {
            node: len(os.listdir(os.path.join(daemons[node].store, "store-v1", "pkgs")))
            if os.path.isdir(os.path.join(daemons[node].store, "store-v1", "pkgs")) else None
            for node in NODES}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(started):
            node.stop()
        for daemon in daemons.values():
            daemon.stop()
    for leftover in [os.path.join(work, name) for name in os.listdir(work)] + list(temps.values()):
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
        import traceback

        traceback.print_exc()
        sys.exit(1)
