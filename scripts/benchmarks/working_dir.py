"""working_dir: packaging, shipping and unpacking trees from 1 MB to 1 GB and from 100 to
100,000 files, renv against cp -r, zip/unzip and tar, same run.

Two sweeps: total size at 1,000 files (1 KB to 1 MB each), and file count at 4 KB per
file. Half the files are text, half random bytes. Zips are stored (-0), as renv writes
them. Every row starts from a fresh destination (a fresh store for renv).
"""

import os
import random
import time

from common import Daemon, Stat, rmtree, sh, timed, timed_cmd

from renv import RenvClient

MB = 1 << 20


def make_tree(root, files, total_bytes, seed=7):
    rng = random.Random(seed)
    size = max(1, total_bytes // files)
    text = (b"line of a python module, repeated to fill the file\n" * (size // 50 + 1))[:size]
    per_dir = 100
    for i in range(files):
        d = os.path.join(root, f"d{i // per_dir:04d}")
        if i % per_dir == 0:
            os.makedirs(d, exist_ok=True)
        data = text if i % 2 == 0 else rng.randbytes(size)
        with open(os.path.join(d, f"f{i:06d}.py" if i % 2 == 0 else f"f{i:06d}.bin"), "wb") as f:
            f.write(data)


def measure(work, renv, tree, runs, warmup):
    out = os.path.join(work, "out")
    zip_path = os.path.join(work, "tree.zip")
    tar_path = os.path.join(work, "tree.tar")
    store = os.path.join(work, "store")

    def fresh_out():
        rmtree(out)

    def fresh_store():
        rmtree(store)

    def fresh_out_dir():
        rmtree(out)
        os.makedirs(out)

    rows = {}
    if warmup:
        # One untimed round: first runs of each tool pay for loading it and its libraries.
        measure(work, renv, tree, 1, False)
    rows["cp -r"] = timed_cmd(["cp", "-r", tree, out], runs, setup=fresh_out)
    rows["tar -cf"] = timed_cmd(["tar", "-cf", tar_path, "-C", tree, "."], runs,
                                setup=lambda: rmtree(tar_path))
    rows["tar -xf"] = timed_cmd(["tar", "-xf", tar_path, "-C", out], runs, setup=fresh_out_dir)
    rows["zip -r -0"] = timed_cmd(["zip", "-r", "-0", "-q", zip_path, "."], runs, cwd=tree,
                                  setup=lambda: rmtree(zip_path))
    rows["unzip"] = timed_cmd(["unzip", "-q", zip_path, "-d", out], runs, setup=fresh_out)
    rows["renv package -o"] = timed_cmd([renv, "package", "--store", store, tree, "-o", zip_path], runs,
                                        setup=lambda: rmtree(zip_path))
    rows["renv build, new tree"] = timed_cmd(_build(renv, store, work, tree), runs, setup=fresh_store)
    rows["renv build, same tree again"] = timed_cmd(_build(renv, store, work, tree), runs)
    rows["renv build from zip, new"] = timed_cmd(_build(renv, store, work, zip_path), runs, setup=fresh_store)

    # Shipping to a node's daemon: package, upload (PUT), unpack and publish there.
    def daemon_upload():
        daemon = Daemon(store=os.path.join(work, "daemon-store"))
        try:
            return timed(lambda: RenvClient(daemon.socket, renv_bin=renv).upload_package(tree), 1).samples
        finally:
            daemon.stop()
            rmtree(os.path.join(work, "daemon-store"))

    rows["renv upload to the daemon"] = Stat([s for _ in range(runs) for s in daemon_upload()])
    for path in (out, zip_path, tar_path, store):
        rmtree(path)
    return {name: stat.as_json() for name, stat in rows.items()}


def _build(renv, store, work, working_dir):
    spec = os.path.join(work, f"spec-{os.path.basename(working_dir)}.json")
    with open(spec, "w") as f:
        f.write('{"working_dir": "%s"}' % working_dir)
    return [renv, "build", "--store", store, spec]


def run(work, renv, quick):
    sizes = [1 * MB, 10 * MB] if quick else [1 * MB, 10 * MB, 100 * MB, 1024 * MB]
    counts = [100, 1000] if quick else [100, 1000, 10_000, 100_000]
    results = {"by_size": [], "by_files": []}
    for label, files, total in [("by_files", n, n * 4096) for n in counts] + [("by_size", 1000, s) for s in sizes]:
        tree = os.path.join(work, "tree")
        make_tree(tree, files, total)
        big = total >= 100 * MB or files >= 10_000
        runs = 3 if (quick or big) else 5
        print(f"  working_dir: {files} files, {total / MB:.1f} MB", flush=True)
        results[label].append({"files": files, "bytes": total, "rows": measure(work, renv, tree, runs, not big)})
        rmtree(tree)
        # Freeing gigabytes (on tmpfs: memory) stalls the next small runs if they start at once.
        time.sleep(5 if big else 0.5)
    return results
