"""Builds the attnserve.v1 stubs from the repository's proto/ at build time (protoc and grpc_python_plugin,
Debian's protobuf-compiler and protobuf-compiler-grpc): nothing generated is committed.

    python3 -m venv --system-site-packages venv
    venv/bin/pip install --no-index --no-build-isolation client/python
"""

import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")
PROTOS = ["attnserve/v1/config.proto", "attnserve/v1/attention.proto", "attnserve/v1/session.proto"]
GRPC_PLUGIN = os.environ.get("GRPC_PYTHON_PLUGIN", "/usr/bin/grpc_python_plugin")


class BuildWithStubs(build_py):
    """build_py, then protoc into the build directory: the stubs land in attnserve/v1/, where their own
    imports (`from attnserve.v1 import attention_pb2`) find them."""

    def run(self):
        super().run()
        out = os.path.abspath(self.build_lib)
        subprocess.run(["protoc", "-I", PROTO_DIR, f"--python_out={out}", f"--grpc_python_out={out}",
                        f"--plugin=protoc-gen-grpc_python={GRPC_PLUGIN}", *PROTOS], check=True, cwd=PROTO_DIR)
        open(os.path.join(out, "attnserve", "v1", "__init__.py"), "a").close()


setup(cmdclass={"build_py": BuildWithStubs})
