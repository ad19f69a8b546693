"""Shared pieces of `scripts/bench`: timing with spread, the machine, binaries, daemons."""

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python", "tests"))
sys.path.insert(0, os.path.join(ROOT, "python"))

from renv_daemon import Daemon  # noqa: E402,F401  (re-exported for the sections)


class Stat:
    """Samples of one measurement (seconds, or any unit): median and spread."""

    def __init__(self, samples, unit="s"):
        self.samples = list(samples)
        self.unit = unit

    @property
    def median(self):
        return statistics.median(self.samples)

    def percentile(self, p):
        ordered = sorted(self.samples)
        return ordered[round((len(ordered) - 1) * p)]

    def as_json(self):
        return {"median": self.median, "min": min(self.samples), "max": max(self.samples),
                "p99": self.percentile(0.99), "n": len(self.samples), "unit": self.unit}

    def __repr__(self):
        return f"Stat({self.median:.4g} {self.unit}, n={len(self.samples)})"


def timed(fn, runs, setup=None):
    """Runs setup() (untimed) then fn() (timed), `runs` times."""
    samples = []
    for _ in range(runs):
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Stat(samples)


def sh(cmd, **kw):
    kw.setdefault("stdout", subprocess.DEVNULL)
    return subprocess.run(cmd, check=True, **kw)


def timed_cmd(cmd, runs, setup=None, env=None, cwd=None):
    return timed(lambda: sh(cmd, env=env, cwd=cwd), runs, setup)


def rmtree(path):
    if os.path.lexists(path):
        subprocess.run(["chmod", "-R", "u+w", path], check=False)
        shutil.rmtree(path, ignore_errors=True)


def workdir(base=None):
    return tempfile.mkdtemp(prefix="renv-bench-", dir=base)


def build_release():
    """Builds renv and the load generator once; returns their paths."""
    sh(["cargo", "build", "--release", "--locked", "-q", "--bin", "renv", "--example", "loadgen"], cwd=ROOT)
    target = os.path.join(ROOT, "target", "release")
    renv = os.path.join(target, "renv")
    os.environ["RENV_BIN"] = renv  # for Daemon and RenvClient.upload_package
    return renv, os.path.join(target, "examples", "loadgen")


def version(cmd, line_starting=""):
    """The first line of a tool's version output (that starts with `line_starting`)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        lines = (out.stdout or out.stderr).strip().splitlines()
        return next(line for line in lines if line.startswith(line_starting)).strip()
    except (OSError, StopIteration, subprocess.TimeoutExpired):
        return "not found"


def filesystem_of(path):
    out = subprocess.run(["df", "-T", path], capture_output=True, text=True).stdout.splitlines()
    return out[-1].split()[1] if len(out) > 1 else "unknown"


def machine(work, renv):
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "filesystem": filesystem_of(work),
        "kernel": platform.release(),
        "renv": version([renv, "--version"]),
        "python": platform.python_version(),
        "tools": {
            "cp": version(["cp", "--version"]),
            "zip": version(["zip", "-h"], "Zip ").split(" (")[0],
            "unzip": version(["unzip", "-v"]).split(" of ")[0],
            "tar": version(["tar", "--version"]),
        },
    }


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
