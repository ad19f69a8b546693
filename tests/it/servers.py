"""Servers and object-store calls for the remote tests (tests/it/remote.rs).

    servers.py http ROOT PORT_FILE LOG_FILE
        Serves ROOT over plain http on 127.0.0.1 (a free port, written to PORT_FILE) and
        appends "METHOD /path" to LOG_FILE for each request. Like a plain web server it
        sends Last-Modified and Content-Length but no ETag. What a GET does is read from
        ROOT/.behaviour at each request:
          normal         the whole file
          slow           64 KiB every 50 ms (a download to kill half-way)
          break-once     the first GET of each path sends half the body and closes
          break-always   every GET sends half the body and closes
          drip           one byte every 300 ms (a server just beating a read timeout)
          redirect URL   HEAD and GET answer 302 to URL + the request's path

    servers.py https ROOT PORT_FILE LOG_FILE CERT KEY
        The same over TLS, with that certificate and key.

    servers.py s3 ENDPOINT create-bucket BUCKET
    servers.py s3 ENDPOINT put BUCKET KEY FILE
    servers.py s3 ENDPOINT list BUCKET PREFIX
        S3 calls with boto3 (installed with moto) against a local S3 API.
"""

import http.server
import os
import sys
import threading
import time

_broken = set()
_lock = threading.Lock()


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _log(self):
        with _lock, open(self.server.log_file, "a") as log:
            log.write(f"{self.command} {self.path}\n")

    def _behaviour(self):
        try:
            with open(os.path.join(self.server.root, ".behaviour")) as f:
                return f.read().strip()
        except FileNotFoundError:
            return "normal"

    def _redirected(self):
        behaviour = self._behaviour()
        if not behaviour.startswith("redirect "):
            return False
        self.send_response(302)
        self.send_header("Location", behaviour.split(" ", 1)[1] + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_HEAD(self):
        self._log()
        if not self._redirected():
            super().do_HEAD()

    def do_GET(self):
        self._log()
        if self._redirected():
            return
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return super().do_GET()
        behaviour = self._behaviour()
        with open(path, "rb") as f:
            body = f.read()
        stat = os.stat(path)
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", self.date_time_string(stat.st_mtime))
        self.end_headers()
        with _lock:
            first = self.path not in _broken
            _broken.add(self.path)
        if behaviour == "break-always" or (behaviour == "break-once" and first):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if behaviour == "drip":
            for i in range(len(body)):
                try:
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.3)
            return
        if behaviour == "slow":
            for i in range(0, len(body), 64 << 10):
                self.wfile.write(body[i : i + (64 << 10)])
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.wfile.write(body)


def serve_http(root, port_file, log_file, cert=None, key=None):
    os.chdir(root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if cert:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.root = os.path.abspath(root)
    server.log_file = os.path.abspath(log_file)
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, port_file)
    server.serve_forever()


def s3(endpoint, command, *args):
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    if command == "create-bucket":
        client.create_bucket(Bucket=args[0])
    elif command == "put":
        bucket, key, path = args
        with open(path, "rb") as f:
            print(client.put_object(Bucket=bucket, Key=key, Body=f.read())["ETag"])
    elif command == "list":
        bucket, prefix = args
        for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
            print(item["Key"])
    else:
        raise SystemExit(f"unknown s3 command {command}")


if __name__ == "__main__":
    if sys.argv[1] == "http":
        serve_http(*sys.argv[2:5])
    elif sys.argv[1] == "https":
        serve_http(*sys.argv[2:7])
    elif sys.argv[1] == "s3":
        s3(*sys.argv[2:])
    else:
        raise SystemExit(__doc__)
