"""Builds tiny pure-Python wheels for tests, so no test downloads a package.

    python make_wheels.py OUT_DIR '[["dist", "1.0", "module source"], …]'

A wheel is a zip with the module, METADATA, WHEEL and RECORD.
"""

import base64
import hashlib
import json
import os
import sys
import zipfile


def make_wheel(out_dir, dist, version, body):
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": body,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: renv-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    path = os.path.join(out_dir, f"{module}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            data = text.encode()
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def make_wheels(out_dir, wheels):
    os.makedirs(out_dir, exist_ok=True)
    return [make_wheel(out_dir, *wheel) for wheel in wheels]


if __name__ == "__main__":
    make_wheels(sys.argv[1], json.loads(sys.argv[2]))
