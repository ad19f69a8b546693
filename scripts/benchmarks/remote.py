"""remote: a package zip fetched from a server on 127.0.0.1, renv against a plain download.

The zip is what `renv package DIR -o` writes (stored entries) for a tree of 1,000 files,
half text and half random bytes. It is served over plain http by a small static server
(below: `sendfile`, so the server costs next to nothing and the client side is what is
measured) and, when the tests have installed moto into target/test-tools, by moto's S3
API (renv given `s3://bench/pkg.zip` and the AWS_* variables). Interleaved sample by sample after one warm-up round, each from nothing:

- `curl -o`: the object downloaded into a file;
- `curl -o + unzip`: the same, then `unzip -q` into a fresh dir;
- `renv build (fetch)`: `renv build` of `{"working_dir": "http://…/pkg.zip"}` with a fresh
  store: HEAD, download into staging, unpack with its checks, hash, fsync and publish.
  Its `timings_ms` (download, unpack, publish) say where the time goes.

    python remote.py serve ROOT PORT_FILE     (the server, run by the section)
"""

import http.server
import json
import os
import socket
import subprocess
import sys
import time

from common import ROOT, Stat, rmtree, sh

MB = 1 << 20


MOTO = os.path.join(ROOT, "target", "test-tools", "moto-5.1.18")
SERVERS = {
    "http": "plain http from a Python static server that answers with `sendfile` (next to no CPU of its own)",
    "s3": "a local S3 API (moto 5.1.18, as the tests run it): renv signs its requests with the AWS_* "
          "variables; curl GETs the object unsigned (moto allows it)",
}


def run(work, renv, quick):
    from working_dir import make_tree

    results = []
    moto = Moto(work) if os.path.isdir(MOTO) else None
    if moto is None:
        print(f"  remote: no {MOTO} (cargo test installs it): http only", flush=True)
    try:
        for size in [10 * MB] if quick else [10 * MB, 100 * MB]:
            tree = os.path.join(work, "tree")
            make_tree(tree, 1000, size)
            served = os.path.join(work, "served")
            os.makedirs(served)
            zip_path = os.path.join(served, "pkg.zip")
            sh([renv, "package", "--store", os.path.join(work, "pkg-store"), tree, "-o", zip_path])
            rmtree(tree)
            rmtree(os.path.join(work, "pkg-store"))
            zip_size = os.path.getsize(zip_path)
            runs = 3 if quick else 5
            print(f"  remote: {zip_size / MB:.1f} MB zip of 1,000 files", flush=True)
            server = Server(served, work)
            try:
                results.append(dict(server="http", **measure(work, renv, f"{server.url}/pkg.zip", zip_size, runs)))
            finally:
                server.stop()
            if moto is not None:
                moto.put("pkg.zip", zip_path)
                results.append(dict(server="s3", **measure(work, renv, f"{moto.endpoint}/bench/pkg.zip", zip_size,
                                                           runs, "s3://bench/pkg.zip", moto.env)))
                moto.delete("pkg.zip")
            rmtree(served)
            time.sleep(1)
    finally:
        if moto is not None:
            moto.stop()
    servers = sorted({p["server"] for p in results}, key=list(SERVERS).index)
    return {"servers": {name: SERVERS[name] for name in servers}, "files": 1000, "points": results}


def measure(work, renv, url, size, runs, renv_uri=None, renv_env=None):
    """`renv_uri`: what renv is given for the object at `url` (default: `url`), with
    `renv_env` added to its environment (credentials)."""
    file = os.path.join(work, "download.zip")
    out = os.path.join(work, "out")
    store = os.path.join(work, "store")
    spec = os.path.join(work, "spec.json")
    with open(spec, "w") as f:
        json.dump({"working_dir": renv_uri or url}, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RENV_"))}
    env.update(renv_env or {})

    def clean():
        for path in (file, out, store):
            rmtree(path)

    def curl():
        sh(["curl", "-sf", "-o", file, url])

    def curl_unzip():
        curl()
        sh(["unzip", "-q", file, "-d", out])

    timings = []

    def renv_build():
        done = sh([renv, "build", "--json", "--store", store, spec], stdout=subprocess.PIPE, env=env)
        timings.append(json.loads(done.stdout)["timings_ms"])

    methods = {"curl -o": curl, "curl -o + unzip": curl_unzip, "renv build (fetch)": renv_build}
    samples = {name: [] for name in methods}
    for n in range(runs + 1):
        for name, fn in methods.items():
            clean()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if n:
                samples[name].append(elapsed)
            elif name.startswith("renv"):
                timings.clear()
    clean()
    steps = sorted({k for t in timings for k in t})
    return {
        "bytes": size,
        "rows": {name: Stat(s).as_json() for name, s in samples.items()},
        "renv_steps_ms": {k: Stat([t.get(k, 0) for t in timings], "ms").as_json() for k in steps},
    }


class Server:
    def __init__(self, root, work):
        port_file = os.path.join(work, "port")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", root, port_file])
        deadline = time.monotonic() + 30
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the static server did not start")
            time.sleep(0.02)
        with open(port_file) as f:
            self.url = f"http://127.0.0.1:{f.read().strip()}"
        os.remove(port_file)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Moto:
    """moto's S3 server on 127.0.0.1 (from target/test-tools, where the tests install it)
    with a bucket `bench`."""

    def __init__(self, work):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}
        self.log = open(os.path.join(work, "moto.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     env=dict(os.environ, PYTHONPATH=MOTO), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto did not start")
                time.sleep(0.1)
        if MOTO not in sys.path:
            sys.path.append(MOTO)
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")
        self.client.create_bucket(Bucket="bench")

    def put(self, key, path):
        self.client.upload_file(path, "bench", key)

    def delete(self, key):
        self.client.delete_object(Bucket="bench", Key=key)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


class Handler(http.server.SimpleHTTPRequestHandler):
    """HEAD and GET of whole files: Content-Length, Last-Modified and an ETag, the body by
    sendfile (no copy through Python)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _headers(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        st = os.stat(path)
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(st.st_size))
        self.send_header("Last-Modified", self.date_time_string(st.st_mtime))
        self.send_header("ETag", f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"')
        self.end_headers()
        return path

    def do_HEAD(self):
        self._headers()

    def do_GET(self):
        path = self._headers()
        if path:
            self.wfile.flush()
            with open(path, "rb") as f:
                self.connection.sendfile(f)


def serve(root, port_file):
    os.chdir(root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(port_file + ".tmp", port_file)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(*sys.argv[2:4])
