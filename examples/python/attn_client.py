#!/usr/bin/python3
"""A minimal attnserve client: self-attention on a random query, checked and timed.

    /usr/bin/python3 examples/python/attn_client.py --target 127.0.0.1:50051 --layer small

Needs Debian's python3-grpcio, python3-protobuf and python3-numpy, and protoc + grpc_python_plugin
(protobuf-compiler, protobuf-compiler-grpc): the Python stubs are generated from proto/ into a temporary
directory each run, so nothing generated lands in the source tree.

Exits 0 when every answer has the expected shape and only finite values, 1 otherwise.
"""

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GRPC_PYTHON_PLUGIN = "/usr/bin/grpc_python_plugin"


class CheckFailed(Exception):
    pass


def generate_stubs(proto_dir, out_dir):
    """Runs protoc on proto/attnserve/v1/*.proto into out_dir and imports the generated modules."""
    v1 = os.path.join(proto_dir, "attnserve", "v1")
    protos = sorted(os.path.join(v1, f) for f in os.listdir(v1) if f.endswith(".proto"))
    subprocess.run(
        ["protoc", "-I", proto_dir, f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
         f"--plugin=protoc-gen-grpc_python={GRPC_PYTHON_PLUGIN}", *protos],
        check=True)
    sys.path.insert(0, out_dir)
    pb = importlib.import_module("attnserve.v1.attention_pb2")
    pb_grpc = importlib.import_module("attnserve.v1.attention_pb2_grpc")
    return pb, pb_grpc


def to_tensor(pb, array):
    """numpy float32 array -> attnserve.v1.Tensor with little-endian float32 raw_data."""
    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=array.shape, dtype=pb.FLOAT32, raw_data=array.tobytes())


def from_tensor(pb, tensor):
    """attnserve.v1.Tensor (FLOAT32 in raw_data, as the server answers) -> numpy float32 array."""
    if tensor.dtype != pb.FLOAT32:
        raise CheckFailed(f"expected a FLOAT32 tensor, got dtype {tensor.dtype}")
    return np.frombuffer(tensor.raw_data, dtype="<f4").reshape(tuple(tensor.shape))


def check(name, array, expected_shape):
    if list(array.shape) != list(expected_shape):
        raise CheckFailed(f"{name}: shape {list(array.shape)}, expected {list(expected_shape)}")
    if not np.isfinite(array).all():
        raise CheckFailed(f"{name}: {np.count_nonzero(~np.isfinite(array))} non-finite values")


def describe(response, seconds):
    t = response.timing
    return (f"round trip {seconds * 1e3:.2f} ms (server: queue {t.queue_us} us, compute {t.compute_us} us, "
            f"batch of {t.batch_size})")


def auth_metadata(token_file):
    """The bearer token of servers started with --auth-token-file: token_file's first line, whitespace-stripped
    (as attnctl's --token-file), else $ATTNSERVE_TOKEN; none when neither is given."""
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.readline().strip()
        if not token:
            raise ValueError(f"{token_file!r} is empty")
    else:
        token = os.environ.get("ATTNSERVE_TOKEN", "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def run(args, pb, pb_grpc, metadata):
    channel = grpc.insecure_channel(args.target)
    grpc.channel_ready_future(channel).result(timeout=args.timeout)
    stub = pb_grpc.AttentionServiceStub(channel)

    layer = stub.GetLayer(pb.GetLayerRequest(name=args.layer), timeout=args.timeout, metadata=metadata)
    E = layer.config.embed_dim
    B, L = args.batch, args.seq
    print(f"layer {args.layer}: embed_dim={E} num_heads={layer.config.num_heads} ready={layer.ready}")

    rng = np.random.default_rng(args.seed)
    query = rng.standard_normal((B, L, E), dtype=np.float32)

    # 1. Self-attention (key and value unset), query sent as raw_data.
    start = time.perf_counter()
    response = stub.Infer(pb.InferRequest(layer=args.layer, query=to_tensor(pb, query)), timeout=args.timeout,
                          metadata=metadata)
    elapsed = time.perf_counter() - start
    output = from_tensor(pb, response.output)
    check("output", output, [B, L, E])
    print(f"Infer: output shape {list(output.shape)}, finite; {describe(response, elapsed)}")

    # 2. The same with need_weights: attention weights averaged over heads, [B, L, S] with S = L here.
    start = time.perf_counter()
    response = stub.Infer(pb.InferRequest(layer=args.layer, query=to_tensor(pb, query), need_weights=True),
                          timeout=args.timeout, metadata=metadata)
    elapsed = time.perf_counter() - start
    output = from_tensor(pb, response.output)
    weights = from_tensor(pb, response.attn_weights)
    check("output (need_weights)", output, [B, L, E])
    check("attn_weights", weights, [B, L, L])
    if not np.allclose(weights.sum(axis=-1), 1.0, atol=1e-4):
        raise CheckFailed("attn_weights: rows do not sum to 1")
    print(f"Infer need_weights: output shape {list(output.shape)}, attn_weights shape {list(weights.shape)}, "
          f"finite; {describe(response, elapsed)}")

    # 3. InferStream: several requests of different lengths on one stream; answers may come back in any
    #    order, so they are matched by id.
    requests = {}
    for i in range(args.stream_requests):
        q = rng.standard_normal((1, L + i, E), dtype=np.float32)
        requests[f"req-{i}"] = pb.InferRequest(id=f"req-{i}", layer=args.layer, query=to_tensor(pb, q))
    start = time.perf_counter()
    responses = list(stub.InferStream(iter(requests.values()), timeout=args.timeout, metadata=metadata))
    elapsed = time.perf_counter() - start
    answered = {}
    for response in responses:
        if response.id not in requests or response.id in answered:
            raise CheckFailed(f"InferStream: unexpected response id {response.id!r}")
        if response.HasField("error"):
            raise CheckFailed(f"InferStream {response.id}: error {response.error.code}: {response.error.message}")
        expected = list(requests[response.id].query.shape)
        check(f"InferStream {response.id} output", from_tensor(pb, response.output), expected)
        answered[response.id] = response
    missing = sorted(set(requests) - set(answered))
    if missing:
        raise CheckFailed(f"InferStream: no response for {missing}")
    print(f"InferStream: {len(answered)} responses matched by id "
          f"({', '.join(r.id for r in responses)}), shapes and values checked; {elapsed * 1e3:.2f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--layer", default="small", help="layer name (see ListLayers)")
    parser.add_argument("--batch", type=int, default=2, help="B")
    parser.add_argument("--seq", type=int, default=16, help="L")
    parser.add_argument("--stream-requests", type=int, default=4, help="requests sent on the InferStream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--proto-dir", default=os.path.join(REPO_ROOT, "proto"))
    parser.add_argument("--token-file", help="bearer token for a server with --auth-token-file: the file's first "
                                             "line (default: $ATTNSERVE_TOKEN, if set)")
    args = parser.parse_args()
    try:
        metadata = auth_metadata(args.token_file)
    except (OSError, ValueError) as e:
        parser.error(f"--token-file: {e}")

    with tempfile.TemporaryDirectory(prefix="attnserve-stubs-") as stubs_dir:
        pb, pb_grpc = generate_stubs(args.proto_dir, stubs_dir)
        try:
            run(args, pb, pb_grpc, metadata)
        except CheckFailed as e:
            print(f"FAIL: {e}", file=sys.stderr)
            return 1
        except grpc.RpcError as e:
            print(f"FAIL: RPC error {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except grpc.FutureTimeoutError:
            print(f"FAIL: could not connect to {args.target} within {args.timeout} s", file=sys.stderr)
            return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
