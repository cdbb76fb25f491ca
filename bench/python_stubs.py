"""Python gRPC modules for the repository's .proto files, for the benchmarks' own clients and servers. Debian has no
python3-grpc-tools: protoc with Debian's grpc_python_plugin, as tests/integration/kserve_test.py does."""

import os
import subprocess

PROTO_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "proto")


def generate(out, protos):
    """`protos` (paths under proto/, such as "attnserve/v1/attention.proto") as Python modules under `out`: import
    them with `out` on sys.path."""
    subprocess.run(["protoc", "-I", PROTO_ROOT, f"--python_out={out}", f"--grpc_python_out={out}",
                    "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin",
                    *[os.path.join(PROTO_ROOT, p) for p in protos]], check=True)


def directory(sub):
    """Every .proto file of proto/`sub` (such as "attnserve/v1"), as paths under proto/."""
    return [f"{sub}/{f}" for f in sorted(os.listdir(os.path.join(PROTO_ROOT, sub))) if f.endswith(".proto")]
