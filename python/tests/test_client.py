"""RenvClient against a real renv daemon on a real socket (run by `cargo test`)."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import zipfile

sys.path.insert(0, os.path.dirname(__file__))

from make_wheels import make_wheels  # noqa: E402
from renv_daemon import Daemon, renv_bin  # noqa: E402

from renv import (  # noqa: E402
    JobStatus,
    RenvClient,
    RenvConflictError,
    RenvConnectionError,
    RenvNotFoundError,
    RenvRequestError,
)
from renv.client import package  # noqa: E402


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="renv-sdk-")
        cls.wheels = os.path.join(cls.tmp.name, "wheels")
        make_wheels(cls.wheels, [("sdkpkg", "1.0", "VERSION = '1.0'\n")])
        cls.daemon = Daemon("--no-index", "--find-links", cls.wheels, "--gpus", "0,1")
        cls.client = RenvClient(cls.daemon.socket, renv_bin=renv_bin())

    @classmethod
    def tearDownClass(cls):
        code = cls.daemon.stop()
        cls.tmp.cleanup()
        assert code == 0, f"daemon exited with {code}"

    def project(self, files):
        root = tempfile.mkdtemp(dir=self.tmp.name)
        for name, text in files.items():
            path = os.path.join(root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        return root

    def refs(self, env_id):
        return {e.env_id: e for e in self.client.list_envs()}[env_id]

    def test_references_are_taken_listed_and_released(self):
        # A requirement no other test uses, so this env is new.
        spec = {"pip": ["sdkpkg>=1.0"], "env_vars": {"SDK_TEST": "refs"}}
        first = self.client.get_or_create_env(spec, ref="first")
        self.assertTrue(first.created)
        self.assertTrue(first.python.startswith(self.daemon.store), first.python)
        self.assertEqual(first.env["SDK_TEST"], "refs")
        self.assertGreater(first.bytes, 0)
        out = subprocess.run(
            [first.python, "-c", "import sdkpkg; print(sdkpkg.VERSION)"], capture_output=True, text=True
        )
        self.assertEqual(out.stdout.strip(), "1.0", out.stderr)

        again = self.client.get_or_create_env(spec, ref="second")
        self.assertFalse(again.created)
        self.assertEqual(again.env_id, first.env_id)
        record = self.refs(first.env_id)
        self.assertEqual(record.refs, 2)
        self.assertEqual(sorted(record.ref_tags), ["first", "second"])

        self.assertEqual(self.client.release_env(first.env_id), 1)
        self.assertEqual(self.client.release_env(first.env_id), 0)
        with self.assertRaises(RenvConflictError) as caught:
            self.client.release_env(first.env_id)
        self.assertEqual(caught.exception.status, 409)

    def test_a_bad_spec_raises_with_the_daemons_field_and_message(self):
        with self.assertRaises(RenvRequestError) as caught:
            self.client.get_or_create_env({"pip": ["sdkpkg==1.0", "--index-url=http://evil"]})
        error = caught.exception
        self.assertEqual(error.status, 400)
        self.assertEqual(error.field, "pip[1]")
        self.assertIn("options are not allowed", error.message)
        self.assertTrue(error.kind)
        self.assertIsInstance(error, ValueError)
        with self.assertRaises(RenvNotFoundError):
            self.client.get_job_status("w999999")
        # Arguments the SDK can check itself never reach the daemon.
        with self.assertRaises(ValueError):
            self.client.submit_job(entrypoint=[])
        with self.assertRaises(TypeError):
            self.client.get_or_create_env(["pip", "sdkpkg"])
        with self.assertRaises(ValueError):
            self.client.get_job_logs("w000001", stream="both")
        # The daemon kept serving, and counted the failure as no build.
        self.assertTrue(self.client.healthz())
        self.assertEqual(self.client.metrics()["renv_build_failures_total"], 0)

    def test_uploads_have_the_digest_renv_package_prints(self):
        root = self.project({"main.py": "print('hi')\n", "pkg/mod.py": "X = 1\n", "big.log": "x" * 1000})
        packaged = subprocess.run(
            [renv_bin(), "package", root, "--json", "--exclude", "*.log", "-o", os.path.join(root, "..", "p.zip")],
            capture_output=True,
            check=True,
        )
        digest = json.loads(packaged.stdout)["digest"]
        uri = self.client.upload_package(root, excludes=["*.log"])
        self.assertEqual(uri, f"pkg://{digest}")
        stored = os.path.join(self.daemon.store, "store-v1", "pkgs", digest)
        self.assertEqual(sorted(os.listdir(stored)), ["main.py", "pkg"])
        # Again: the daemon has it (HEAD), nothing is sent; and a zip of it is the same package.
        self.assertEqual(self.client.upload_package(root, excludes=["*.log"]), uri)
        zip_path = os.path.join(self.tmp.name, "by-hand.zip")
        with zipfile.ZipFile(zip_path, "w") as z:
            z.write(os.path.join(root, "main.py"), "main.py")
            z.write(os.path.join(root, "pkg/mod.py"), "pkg/mod.py")
        self.assertEqual(self.client.upload_package(zip_path), uri)
        with self.assertRaises(FileNotFoundError):
            self.client.upload_package(os.path.join(root, "missing"))

    def test_has_and_put_package_move_a_zip_between_daemons(self):
        # What the Ray plugin does with a zip it read from Ray's GCS.
        # Large enough that a second upload is still sending when the daemon, which has the
        # package already, answers without reading it and closes: the answer still counts.
        root = self.project({"data.txt": "moved\n", "blob.txt": os.urandom(4 << 20).hex()})
        zip_path = os.path.join(self.tmp.name, "moved.zip")
        digest = package(root, zip_path)
        self.assertFalse(self.client.has_package(digest))
        with open(zip_path, "rb") as f:
            data = f.read()
        self.assertTrue(self.client.put_package(digest, data))
        self.assertTrue(self.client.has_package(digest))
        self.assertFalse(self.client.put_package(digest, zip_path))
        # The daemon checks the digest: another package's bytes are refused.
        other = os.path.join(self.tmp.name, "other.zip")
        package(self.project({"data.txt": "other\n"}), other)
        with self.assertRaises(RenvRequestError):
            self.client.put_package("0" * 64, other)
        self.assertFalse(self.client.has_package("0" * 64))

    def test_a_job_runs_in_its_env_with_its_working_dir_and_gpus(self):
        root = self.project(
            {
                "script.py": "import os, sdkpkg, helper\n"
                "print(helper.WORD, sdkpkg.VERSION, os.environ['CUDA_VISIBLE_DEVICES'], os.environ['SDK_TEST'])\n"
                "import sys; print('to stderr', file=sys.stderr)\n",
                "helper.py": "WORD = 'helper'\n",
            }
        )
        job = self.client.submit_job(
            entrypoint=["python", "script.py"],
            runtime_env={"working_dir": root, "pip": ["sdkpkg==1.0"], "env_vars": {"SDK_TEST": "job"}},
            num_gpus=1,
            name="sdk-job",
        )
        info = self.client.wait_job(job)
        self.assertEqual(info.status, JobStatus.SUCCEEDED)
        self.assertEqual(info.driver_exit_code, 0)
        self.assertEqual(info.name, "sdk-job")
        self.assertEqual(len(info.gpus), 1)
        self.assertEqual(self.client.get_job_logs(job), f"helper 1.0 {info.gpus[0]} job\n")
        self.assertEqual(self.client.get_job_logs(job, stream="stderr"), "to stderr\n")
        self.assertIn(job, [j.submission_id for j in self.client.list_jobs()])

        failing = self.client.submit_job(entrypoint="python -c 'raise SystemExit(3)'")
        self.assertEqual(self.client.wait_job(failing).exit_code, 3)
        self.assertEqual(self.client.get_job_status(failing), JobStatus.FAILED)

    def test_local_py_modules_are_uploaded_and_importable(self):
        mods = self.project({"mymod/__init__.py": "WORD = 'module'\n", "mymod/junk.tmp": "dropped"})
        job = self.client.submit_job(
            entrypoint=["python", "-c", "import mymod, os; print(mymod.WORD, sorted(os.listdir(mymod.__path__[0])))"],
            runtime_env={"py_modules": [os.path.join(mods, "mymod")], "excludes": ["*.tmp"]},
        )
        self.assertEqual(self.client.wait_job(job).status, JobStatus.SUCCEEDED, self.client.get_job_logs(job, stream="stderr"))
        self.assertEqual(self.client.get_job_logs(job), "module ['__init__.py']\n")

    def test_a_local_wheel_in_py_modules_is_uploaded_and_installed(self):
        wheels = os.path.join(self.tmp.name, "module-wheels")
        [wheel] = make_wheels(wheels, [("wheelmod", "2.0", "WHERE = 'installed'\n")])
        job = self.client.submit_job(
            entrypoint=["python", "-c", "import wheelmod, sys; print(wheelmod.WHERE, sys.prefix != sys.base_prefix)"],
            runtime_env={"py_modules": [wheel]},
        )
        self.assertEqual(self.client.wait_job(job).status, JobStatus.SUCCEEDED, self.client.get_job_logs(job, stream="stderr"))
        self.assertEqual(self.client.get_job_logs(job), "installed True\n")
        uri = self.client.upload_wheel(wheel)
        self.assertRegex(uri, r"^pkg://[0-9a-f]{64}/wheelmod-2\.0-py3-none-any\.whl$")

    def test_tail_follows_a_job_until_it_ends_and_stop_stops_it(self):
        code = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.2)\n"
        job = self.client.submit_job(entrypoint=["python", "-c", code])

        async def tail():
            return "".join([text async for text in self.client.tail_job_logs(job)])

        self.assertEqual(asyncio.run(tail()), "line 0\nline 1\nline 2\n")
        self.assertEqual(self.client.get_job_status(job), JobStatus.SUCCEEDED)

        sleeper = self.client.submit_job(entrypoint=["sleep", "60"])
        self.assertEqual(self.client.get_job_status(sleeper), JobStatus.RUNNING)
        self.assertTrue(self.client.stop_job(sleeper))
        self.assertEqual(self.client.wait_job(sleeper).status, JobStatus.STOPPED)
        self.assertFalse(self.client.stop_job(sleeper))

    def test_no_daemon_is_a_connection_error_naming_the_socket(self):
        missing = os.path.join(self.tmp.name, "nothing.sock")
        with self.assertRaises(RenvConnectionError) as caught:
            RenvClient(missing).list_envs()
        self.assertIn(missing, str(caught.exception))


# What the SDK does for another user: run as uid 1000 against a root daemon.
_AS_OTHER_USER = r"""
import json, sys
from renv import RenvClient, RenvPermissionError
socket, renv, zip_path = sys.argv[1:]
client = RenvClient(socket, renv_bin=renv)
# Passed through, the daemon would open the zip with its own rights: it refuses.
try:
    client._http.json("POST", "/v1/envs", {"runtime_env": {"working_dir": "file://" + zip_path}})
    refused = None
except RenvPermissionError as e:
    refused = e.message
env = client.get_or_create_env({"working_dir": "file://" + zip_path}, ref="file-uri")
print(json.dumps({"refused": refused, "working_dir": env.working_dir, "env_id": env.env_id}))
"""


@unittest.skipUnless(
    hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv"),
    "acting as another user needs root and setpriv",
)
class OtherUserTest(unittest.TestCase):
    def test_a_file_uri_is_uploaded_by_the_client_not_opened_by_the_daemon(self):
        with tempfile.TemporaryDirectory(prefix="renv-sdk-uid-") as tmp:
            os.chmod(tmp, 0o755)
            home = os.path.join(tmp, "home")
            os.makedirs(home)
            zip_path = os.path.join(home, "project.zip")
            with zipfile.ZipFile(zip_path, "w") as z:
                z.writestr("hello.py", "WORD = 'uploaded'\n")
            for path in (home, zip_path):
                os.chown(path, 1000, 1000)
            os.chmod(home, 0o700)
            with Daemon("--allow-uid", "1000", store=os.path.join(tmp, "store")) as daemon:
                python_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "PYTHONPATH": python_dir}
                done = subprocess.run(
                    ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c"]
                    + [_AS_OTHER_USER, daemon.socket, renv_bin(), zip_path],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                self.assertEqual(done.returncode, 0, done.stderr)
                answer = json.loads(done.stdout)
                self.assertIn("daemon's rights", answer["refused"] or "", "the daemon refuses file:// from uid 1000")
                packaged = subprocess.run(
                    [renv_bin(), "package", zip_path, "--json", "-o", os.path.join(tmp, "p.zip")],
                    capture_output=True,
                    check=True,
                )
                digest = json.loads(packaged.stdout)["digest"]
                stored = os.path.join(daemon.store, "store-v1", "pkgs", digest)
                self.assertEqual(answer["working_dir"], stored)
                self.assertEqual(os.listdir(stored), ["hello.py"])
                admin = RenvClient(daemon.socket)
                record = {e.env_id: e for e in admin.list_envs()}[answer["env_id"]]
                self.assertEqual(record.ref_tags, ["file-uri"])


if __name__ == "__main__":
    unittest.main()
