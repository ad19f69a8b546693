"""Daemon: cached get-or-create from 1 to 256 clients, worker start latency, the daemon's
memory with 10,000 envs known; and concurrency: simultaneous first requests for one new
env and for distinct envs, and a cached request's latency while builds run."""

import json
import os
import subprocess
import threading
import time

from common import Daemon, Stat, rss_kib

from renv import RenvClient


def _loadgen(loadgen, *args):
    return json.loads(subprocess.check_output([loadgen, *map(str, args)]))


def _tiny_wheels(work, count):
    from make_wheels import make_wheels

    wheels = os.path.join(work, "wheels")
    make_wheels(wheels, [(f"benchpkg{i}", "1.0", f"N = {i}\n") for i in range(count)])
    return wheels


def start(work, renv, wheels, uv):
    return Daemon("--no-index", "--find-links", wheels, store=os.path.join(work, "store"), env={"RENV_UV": uv})


def requests(work, renv, loadgen, uv, quick):
    """Request rate and latency by client count; worker start; RSS with many envs."""
    wheels = _tiny_wheels(work, 1)
    daemon = start(work, renv, wheels, uv)
    try:
        client = RenvClient(daemon.socket, renv_bin=renv)
        project = os.path.join(work, "project")
        os.makedirs(project)
        with open(os.path.join(project, "main.py"), "w") as f:
            f.write("print('hi')\n")
        spec = {"working_dir": client.upload_package(project), "pip": ["benchpkg0==1.0"]}
        env_id = client.get_or_create_env(spec).env_id
        body = json.dumps({"runtime_env": spec})
        seconds = 1.0 if quick else 3.0
        rows = []
        for clients in ([1, 16, 256] if quick else [1, 4, 16, 64, 256]):
            health = _loadgen(loadgen, "rate", daemon.socket, "GET", "/healthz", "", clients, seconds)
            envs = _loadgen(loadgen, "rate", daemon.socket, "POST", "/v1/envs", body, clients, seconds)
            rows.append({"clients": clients, "healthz": health, "get_or_create": envs})
        workers = _loadgen(loadgen, "workers", daemon.socket, env_id, 50 if quick else 300)

        known = 1000 if quick else 10_000
        before = rss_kib(daemon.process.pid)
        for i in range(known):
            created = client.get_or_create_env({"env_vars": {"BENCH_ENV": str(i)}})
            client.release_env(created.env_id)
        after = rss_kib(daemon.process.pid)
        memory = {"envs_known": known + 1, "rss_before_kib": before, "rss_after_kib": after}
    finally:
        daemon.stop()
    return {"rate": rows, "workers": workers, "memory": memory}


def concurrency(work, renv, uv, quick):
    """1/8/64 simultaneous first requests: one new env (built once) and distinct new envs;
    a cached request's latency while 8 builds run; and the most distinct requests again
    with no cap on concurrent builds, as the daemon ran before it had one."""
    counts = [1, 8] if quick else [1, 8, 64]
    # Each request a new package: the capped run's, then the uncapped run's.
    wheels = _tiny_wheels(work, max(counts) * 5 + 40)
    result = _concurrency(work, renv, uv, counts, wheels, [], 0)
    uncapped = _concurrency(work, renv, uv, counts[-1:], wheels, ["--max-concurrent-builds", "100000"],
                            max(counts) * 3 + 20, fairness=False)
    result["first_requests"][-1]["distinct_uncapped"] = uncapped["first_requests"][-1]["distinct"]
    return result


def _concurrency(work, renv, uv, counts, wheels, flags, first_pkg, fairness=True):
    store = os.path.join(work, "store-uncapped" if flags else "store")
    daemon = Daemon("--no-index", "--find-links", wheels, *flags, store=store, env={"RENV_UV": uv})
    client = RenvClient(daemon.socket)
    serial = [first_pkg]

    def fresh_pkg():
        serial[0] += 1
        return f"benchpkg{serial[0]}==1.0"

    def at_once(specs):
        """Sends every spec at the same moment; returns each request's latency."""
        latencies = [None] * len(specs)
        barrier = threading.Barrier(len(specs))

        def one(i):
            barrier.wait()
            t = time.perf_counter()
            client.get_or_create_env(specs[i])
            latencies[i] = time.perf_counter() - t

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return latencies

    def builds():
        return int(client.metrics()["renv_builds_total"])

    rows = []
    try:
        # Warm-up: the first build of a daemon also probes the interpreter and installer.
        client.get_or_create_env({"pip": [fresh_pkg()]})
        for n in counts:
            b0 = builds()
            same = at_once([{"pip": [fresh_pkg()]}] * n)
            same_builds = builds() - b0
            distinct = at_once([{"pip": [fresh_pkg()]} for _ in range(n)])
            rows.append({"requests": n, "same": Stat(same).as_json(), "same_builds": same_builds,
                         "distinct": Stat(distinct).as_json()})

        if not fairness:
            return {"first_requests": rows}
        # Fairness: a cached env's latency, alone and while 8 new envs are building.
        cached = {"pip": ["benchpkg0==1.0"]}
        client.get_or_create_env(cached)

        def probe(seconds):
            samples, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                t = time.perf_counter()
                client.get_or_create_env(cached)
                samples.append(time.perf_counter() - t)
            return samples

        idle = probe(1.0)
        building = threading.Thread(target=at_once, args=([{"pip": [fresh_pkg()]} for _ in range(8)],))
        building.start()
        busy = []
        while building.is_alive():
            busy += probe(0.05)
        building.join()
        fairness = {"idle": Stat(idle).as_json(), "during_8_builds": Stat(busy).as_json()}
    finally:
        daemon.stop()
    return {"first_requests": rows, "fairness": fairness}
