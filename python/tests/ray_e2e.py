"""End to end with a real Ray: a renv daemon, `ray start --head` with renv's plugin, jobs
submitted with `ray job submit --runtime-env-json '{"renv": …}'` and a driver using
`ray.init(runtime_env=…)`. Run with the python of a venv holding `ray[default]` and this
SDK (scripts/test-ray makes one); RENV_BIN names the renv binary, RENV_UV the pinned uv.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_wheels import make_wheels  # noqa: E402
from renv_daemon import Daemon  # noqa: E402

from renv import RenvClient  # noqa: E402

SPEC = {"pip": ["raypkg==1.0"], "env_vars": {"E2E_VAR": "from-renv"}}

# Runs inside Ray: reports what a task sees, including renv's view of the env it runs in.
PROBE = r'''
import json, os, sys
import ray

def probe():
    import raypkg
    from renv import RenvClient
    mine = [e for e in RenvClient().list_envs() if e.python == sys.executable]
    return {
        "version": raypkg.VERSION,
        "python": sys.executable,
        "var": os.environ.get("E2E_VAR"),
        "cwd_file": os.path.exists("job_marker.txt"),
        "refs": mine[0].refs if mine else None,
        "env_id": mine[0].env_id if mine else None,
    }
'''

JOB_SCRIPT = PROBE + r'''
ray.init()
print("RESULT " + json.dumps(ray.get(ray.remote(probe).remote())))
'''

# Holds its env while a task waits for a file: the plugin's reference must outlive a
# daemon killed meanwhile.
HOLDING_SCRIPT = PROBE + r'''
import time
spec, release = json.loads(sys.argv[1]), sys.argv[2]

@ray.remote
def hold():
    result = probe()
    print("HOLDING " + json.dumps(result), flush=True)
    while not os.path.exists(release):
        time.sleep(0.1)
    return probe()

ray.init(runtime_env={"renv": spec})
print("RESULT " + json.dumps(ray.get(hold.remote())), flush=True)
'''

DRIVER_SCRIPT = PROBE + r'''
spec = json.loads(sys.argv[1])
ray.init(runtime_env={"renv": spec})
print("RESULT " + json.dumps(ray.get(ray.remote(probe).remote())), flush=True)
bad = ray.remote(probe).options(runtime_env={"renv": {"pip": ["raypkg==1.0", "--index-url=http://evil"]}})
try:
    ray.get(bad.remote())
    print("BAD " + json.dumps("no error"))
except Exception as e:
    print("BAD " + json.dumps(f"{type(e).__name__}: {e}"))
'''


def log(message):
    print(f"[ray-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd, env, timeout=300, check=True, cwd=None):
    log("$ " + " ".join(cmd))
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def result_line(output, tag="RESULT"):
    for line in output.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    raise AssertionError(f"no {tag} line in:\n{output}")


def metric(client, name):
    return client.metrics()[name]


def wait_for(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def refs_of(client, env_id):
    return {e.env_id: e.refs for e in client.list_envs()}.get(env_id)


def check_task(result, daemon):
    assert result["version"] == "1.0", result
    assert result["python"].startswith(os.path.join(daemon.store, "store-v1", "envs")), result
    assert result["var"] == "from-renv", result
    assert result["refs"] is not None and result["refs"] >= 1, result


def main():
    bin_dir = os.path.dirname(sys.executable)
    ray = os.path.join(bin_dir, "ray")
    work = tempfile.mkdtemp(prefix="renv-ray-")
    wheels = os.path.join(work, "wheels")
    make_wheels(wheels, [("raypkg", "1.0", "VERSION = '1.0'\n")])

    # The node's renv: Ray's interpreter (a venv's), its packages visible behind the env's.
    daemon = Daemon(
        "--python", sys.executable, "--system-site-packages", "--no-index", "--find-links", wheels,
        store=os.path.join(work, "store"),
    )
    client = RenvClient(daemon.socket)
    env = dict(os.environ)
    env.update(
        RENV_SOCKET=daemon.socket,
        RAY_RUNTIME_ENV_PLUGINS=json.dumps([{"class": "renv.ray_plugin.RenvPlugin"}]),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
    )
    env.pop("RAY_ADDRESS", None)
    ray_temp = os.path.join(work, "ray")
    started = False
    try:
        run([ray, "start", "--head", "--num-cpus", "2", "--include-dashboard", "true",
             "--dashboard-port", "8265", "--temp-dir", ray_temp, "--disable-usage-stats"], env)
        started = True

        # 1. `ray job submit` with Ray's working_dir beside renv's env.
        job_dir = os.path.join(work, "job")
        os.makedirs(job_dir)
        with open(os.path.join(job_dir, "script.py"), "w") as f:
            f.write(JOB_SCRIPT)
        with open(os.path.join(job_dir, "job_marker.txt"), "w") as f:
            f.write("ray's working_dir\n")
        submit = [ray, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", job_dir,
                  "--runtime-env-json", json.dumps({"renv": SPEC}), "--", "python", "script.py"]
        first = result_line(run(submit, env).stdout)
        log(f"job 1 task saw {first}")
        check_task(first, daemon)
        assert first["cwd_file"], "Ray's working_dir is the task's cwd"
        env_id = first["env_id"]
        builds = metric(client, "renv_builds_total")
        assert builds == 1, builds
        log("job 1 ended; waiting for Ray to release renv's reference")
        wait_for("the reference to drop after the job", lambda: refs_of(client, env_id) == 0)

        # 2. The same spec again: the same env, no second build.
        second = result_line(run(submit, env).stdout)
        check_task(second, daemon)
        assert second["python"] == first["python"] and second["env_id"] == env_id, (first, second)
        assert metric(client, "renv_builds_total") == builds, "the second job rebuilt the env"
        wait_for("the reference to drop after job 2", lambda: refs_of(client, env_id) == 0)

        # 3. A driver with ray.init(runtime_env=…) and a task; a bad spec fails with renv's error.
        driver = os.path.join(work, "driver.py")
        with open(driver, "w") as f:
            f.write(DRIVER_SCRIPT)
        driver_env = dict(env, RAY_ADDRESS="auto")
        out = run([sys.executable, driver, json.dumps(SPEC)], driver_env).stdout
        third = result_line(out)
        check_task(third, daemon)
        assert third["python"] == first["python"], (first, third)
        bad = result_line(out, "BAD")
        log(f"bad spec: {bad}")
        assert "RuntimeEnvSetupError" in bad and "pip[1]" in bad and "options are not allowed" in bad, bad
        wait_for("the reference to drop after the driver", lambda: refs_of(client, env_id) == 0)
        assert metric(client, "renv_builds_total") == builds, "the driver rebuilt the env"
        assert client.healthz()

        # 4. The daemon is killed (-9) while a task runs in the env and the plugin holds its
        # reference; a cron prune runs while it is down; the daemon is started again.
        holding = os.path.join(work, "holding.py")
        with open(holding, "w") as f:
            f.write(HOLDING_SCRIPT)
        release = os.path.join(work, "release")
        held = subprocess.Popen([sys.executable, holding, json.dumps(SPEC), release], env=driver_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for("the holding task to run", lambda: refs_of(client, env_id) == 1, timeout=120)
        daemon.kill()
        log("daemon killed with a reference held; pruning while it is down")
        pruned = run([os.environ["RENV_BIN"], "prune", "--store", daemon.store, "--json",
                      "--max-size", "0", "--min-age", "0s"], env)
        removed = [e["path"] for e in json.loads(pruned.stdout)["removed"]]
        assert not any(first["python"].startswith(p) for p in removed), removed
        daemon = Daemon(
            "--python", sys.executable, "--system-site-packages", "--no-index", "--find-links", wheels,
            store=daemon.store,
        )
        client = RenvClient(daemon.socket)
        assert refs_of(client, env_id) == 1, "the plugin's reference is back after the restart"
        with open(release, "w"):
            pass
        out, _ = held.communicate(timeout=120)
        assert held.returncode == 0, out
        after = result_line(out)
        assert after["python"] == first["python"] and after["refs"] == 1, after
        wait_for("the restored reference to be released by Ray", lambda: refs_of(client, env_id) == 0)
        # The plugin released a reference the daemon had (it warns when one is missing).
        missing = run(["grep", "-rl", "held no reference", ray_temp], env, check=False)
        assert missing.returncode == 1, missing.stdout
    finally:
        if started:
            run([ray, "stop", "--force"], env, check=False)
        code = daemon.stop()
        if code != 0:
            print(daemon.log())
        shutil.rmtree(work, ignore_errors=True)
    assert code == 0, f"the renv daemon exited with {code}"
    log("renv daemon shut down cleanly; all checks passed")


if __name__ == "__main__":
    main()
