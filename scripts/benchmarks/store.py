"""Store: `renv ls` and `renv prune` on 1,000 and 10,000 entries, against du and rm -rf."""

import os

from common import rmtree, sh, timed_cmd


def fill(renv, template, entries):
    """A store of `entries` unleased package entries (small trees of a few files)."""
    src = os.path.join(os.path.dirname(template), "src")
    for i in range(entries):
        tree = os.path.join(src, f"t{i}")
        os.makedirs(os.path.join(tree, "pkg"))
        for j in range(4):
            with open(os.path.join(tree, "pkg", f"m{j}.py"), "w") as f:
                f.write(f"VALUE = {i * 10 + j}\n" * 20)
    for i in range(entries):
        sh([renv, "package", "--store", template, os.path.join(src, f"t{i}")])
    rmtree(src)


def run(work, renv, quick):
    rows = []
    for entries in ([1000] if quick else [1000, 10_000]):
        runs = 3 if quick or entries > 1000 else 5
        template = os.path.join(work, f"template-{entries}")
        fill(renv, template, entries)
        store = os.path.join(work, f"store-{entries}")
        pkgs = os.path.join(store, "store-v1", "pkgs")

        def fresh():
            rmtree(store)
            sh(["cp", "-a", template, store])
            os.sync()

        fresh()
        row = {
            "entries": entries,
            "du -s": timed_cmd(["du", "-s", store], runs).as_json(),
            "renv ls": timed_cmd([renv, "ls", "--store", store], runs).as_json(),
            "rm -rf": timed_cmd(["rm", "-rf", pkgs], runs, setup=fresh).as_json(),
            "renv prune": timed_cmd([renv, "prune", "--store", store, "--max-size", "0", "--min-age", "0s"],
                                    runs, setup=fresh).as_json(),
        }
        rows.append(row)
        rmtree(template)
        rmtree(store)
    return rows
