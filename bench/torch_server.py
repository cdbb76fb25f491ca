#!/usr/bin/python3
"""attnserve.v1.AttentionService served by grpcio + PyTorch: the baseline attnserve's serving is compared with
(bench/serving_bench.py), built the way a user would write it: a plain grpc.server(ThreadPoolExecutor) around
nn.MultiheadAttention, Debian's python3-torch as it comes (its BLAS is printed at start-up).

    /usr/bin/python3 bench/torch_server.py [--port 0] [--layer mid:512:8 ...] [--workers 8] [--threads 2]

Each --layer NAME:E:H holds nn.MultiheadAttention(E, H, batch_first=True).eval() (weights from torch's seeded
default init, not attnserve's). Infer and InferStream decode query, key/value (absent: self-attention; FLOAT32,
or BFLOAT16 / FLOAT16 widened to float32), key_padding_mask and attn_mask from attnserve.v1 Tensors, add
is_causal as a mask (torch 1.13's forward has no is_causal), run one request per call in float32 under
torch.no_grad() (no batching across requests), and answer output and, with need_weights, attn_weights in
raw_data, in output_dtype (FLOAT32 when unset; BFLOAT16 / FLOAT16 rounded to nearest even). Timing carries
compute_us of the forward and batch_size 1; queue_us is 0 because the handler cannot see how long gRPC's executor
queued the call. ListLayers and GetLayer describe the layers so attnbench can size its requests. Errors: unknown
layer or version NOT_FOUND, bad tensors INVALID_ARGUMENT. Prints "torch_server ready: grpc_port=<port>" once
listening; SIGTERM stops it.
"""

import argparse
import concurrent.futures
import math
import os
import signal
import sys
import tempfile
import time
import warnings

import openblas_core

openblas_core.pin()  # before numpy or torch loads OpenBLAS: see openblas_core.py

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import python_stubs  # noqa: E402
from torch_mha import blas_info  # noqa: E402

MAX_MESSAGE_BYTES = 64 << 20

# Request tensors are read-only views of the request's bytes (no copy); the model never writes its inputs.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class RequestError(Exception):
    """A request the server refuses: the gRPC status code and the message the caller gets."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def load_stubs():
    """attention_pb2 and attention_pb2_grpc generated from the repository's .proto files. Debian has no
    python3-grpc-tools, so protoc with Debian's grpc_python_plugin, as tests/integration/kserve_test.py does;
    the files are only needed until they are imported."""
    with tempfile.TemporaryDirectory(prefix="torch_server_stubs_") as out:
        python_stubs.generate(out, ["attnserve/v1/attention.proto", "attnserve/v1/config.proto"])
        sys.path.insert(0, out)
        try:
            from attnserve.v1 import attention_pb2, attention_pb2_grpc
        finally:
            sys.path.remove(out)
    return attention_pb2, attention_pb2_grpc


def parse_layer(text):
    """NAME:E:H, as argparse type: the layer's name, embed_dim and num_heads."""
    parts = text.split(":")
    try:
        name, e, h = parts[0], int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(f"expected NAME:E:H, got {text!r}")
    if len(parts) != 3 or not name or e < 1 or h < 1 or e % h:
        raise argparse.ArgumentTypeError(f"{text!r}: need a name, positive E and H, E divisible by H")
    return name, e, h


def raw_values(pb, t, field, halves):
    """raw_data as a flat numpy array, or None when its length is no whole number of elements: FLOAT32 as a
    read-only view (no copy), BOOL as nonzero bytes and, when `halves` (query, key, value), BFLOAT16 and FLOAT16
    widened to float32."""
    raw = t.raw_data
    if t.dtype == pb.FLOAT32:
        return np.frombuffer(raw, dtype="<f4") if len(raw) % 4 == 0 else None
    if t.dtype == pb.BOOL:
        return np.frombuffer(raw, dtype=np.uint8) != 0
    if halves and t.dtype in (pb.BFLOAT16, pb.FLOAT16):
        if len(raw) % 2:
            return None
        bits = np.frombuffer(raw, dtype="<u2")
        if t.dtype == pb.FLOAT16:
            return bits.view("<f2").astype(np.float32)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    allowed = "FLOAT32, BFLOAT16, FLOAT16 or BOOL" if halves else "FLOAT32 or BOOL"
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"{field}.dtype: {allowed} needed with raw_data, got {pb.DataType.Name(t.dtype)}")


def decode_tensor(pb, t, field, halves=False):
    """The Tensor's values as a torch tensor of its shape: float32, or bool for BOOL."""
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.shape: negative dimension in {list(shape)}")
    sources = [s for s in ("raw_data", "float_data", "bool_data") if len(getattr(t, s))]
    if len(sources) > 1:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field}: values in {' and '.join(sources)}; expected exactly one")
    if t.float_data:
        values = np.asarray(t.float_data, dtype=np.float32)
    elif t.bool_data:
        values = np.asarray(t.bool_data, dtype=np.bool_)
    else:
        values = raw_values(pb, t, field, halves)
    count = math.prod(shape)
    if values is None or values.size != count:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field}: shape {list(shape)} needs {count} values, got {len(t.raw_data)} raw bytes "
                           f"/ {len(t.float_data)} float_data / {len(t.bool_data)} bool_data")
    return torch.from_numpy(values.reshape(shape))


def decode_input(pb, request, field):
    """query, key or value: float32 and [B, N, D] or [N, D], the shapes nn.MultiheadAttention takes."""
    x = decode_tensor(pb, getattr(request, field), field, halves=True)
    if x.dtype != torch.float32 or x.dim() not in (2, 3):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field}: expected FLOAT32 [B, N, D] or [N, D], got {x.dtype} {list(x.shape)}")
    return x


def with_causal(mask, query_len, key_len):
    """attn_mask with query i also kept from keys j > i, in the mask's own kind (bool: true = blocked; float:
    added, so -inf)."""
    causal = torch.ones(query_len, key_len, dtype=torch.bool).triu(1)
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask | causal
    return mask.masked_fill(causal, float("-inf"))


def encode_tensor(pb, x, dtype):
    """A float32 torch tensor as attnserve.v1 answers it: shape and little-endian raw_data in `dtype` (FLOAT32,
    BFLOAT16 or FLOAT16; both narrowings round to nearest even)."""
    if dtype == pb.BFLOAT16:
        raw = x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    elif dtype == pb.FLOAT16:
        raw = x.numpy().astype("<f2").tobytes()
    else:
        raw = x.numpy().astype("<f4", copy=False).tobytes()
    return pb.Tensor(shape=x.shape, dtype=dtype, raw_data=raw)


class AttentionServicer:
    """attnserve.v1.AttentionService's RPCs over one nn.MultiheadAttention per layer."""

    def __init__(self, pb, layers):
        self.pb = pb
        self.specs = {name: (e, h) for name, e, h in layers}
        self.modules = {name: torch.nn.MultiheadAttention(e, h, batch_first=True).eval() for name, e, h in layers}

    def describe(self, name):
        """The Layer GetLayer and ListLayers answer: version 1 of a ready MULTIHEAD_ATTENTION layer."""
        e, h = self.specs[name]
        return self.pb.Layer(config={"name": name, "embed_dim": e, "num_heads": h, "kdim": e, "vdim": e},
                             ready=True)

    def forward(self, request):
        """One request's answer, or RequestError."""
        pb = self.pb
        module = self.modules.get(request.layer)
        if module is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"layer {request.layer[:128]!r} not found")
        if request.version not in (0, 1):
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"layer {request.layer!r} has only version 1")
        if request.position_offset or request.position_ids:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "position_offset/position_ids: only DECODER_ATTENTION layers take them")
        answer_dtype = request.output_dtype or pb.FLOAT32
        if answer_dtype not in (pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"output_dtype: FLOAT32, BFLOAT16 or FLOAT16, got {pb.DataType.Name(answer_dtype)}")
        if request.HasField("key") != request.HasField("value"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "key and value: set both or neither")
        query = decode_input(pb, request, "query")
        key = value = query  # `query is key is value` lets torch take its self-attention fast path
        if request.HasField("key"):
            key, value = decode_input(pb, request, "key"), decode_input(pb, request, "value")
        padding = (decode_tensor(pb, request.key_padding_mask, "key_padding_mask")
                   if request.HasField("key_padding_mask") else None)
        mask = decode_tensor(pb, request.attn_mask, "attn_mask") if request.HasField("attn_mask") else None
        if request.is_causal:
            mask = with_causal(mask, query.shape[-2], key.shape[-2])
        average = request.average_attn_weights if request.HasField("average_attn_weights") else True
        start = time.perf_counter()
        try:
            with torch.no_grad():
                output, weights = module(query, key, value, key_padding_mask=padding,
                                         need_weights=request.need_weights, attn_mask=mask,
                                         average_attn_weights=average)
        except (AssertionError, RuntimeError, ValueError) as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:1000])
        compute_us = int((time.perf_counter() - start) * 1e6)
        response = pb.InferResponse(id=request.id, output=encode_tensor(pb, output, answer_dtype),
                                    timing=pb.Timing(compute_us=compute_us, batch_size=1))
        if weights is not None:
            response.attn_weights.CopyFrom(encode_tensor(pb, weights, answer_dtype))
        return response

    def Infer(self, request, context):
        try:
            return self.forward(request)
        except RequestError as e:
            context.abort(e.code, e.message)

    def InferStream(self, requests, context):
        """Answers in order; a failed request is answered with `error` and the stream goes on, as in attnserve."""
        for request in requests:
            try:
                yield self.forward(request)
            except RequestError as e:
                yield self.pb.InferResponse(id=request.id, error=self.pb.Error(code=e.code.value[0], message=e.message))

    def ListLayers(self, request, context):
        return self.pb.ListLayersResponse(layers=[self.describe(name) for name in self.specs])

    def GetLayer(self, request, context):
        if request.name not in self.specs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"layer {request.name[:128]!r} not found")
        return self.describe(request.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=50052, help="0 picks a free port")
    ap.add_argument("--layer", type=parse_layer, action="append",
                    help="NAME:E:H, repeatable (default mid:512:8, serving_bench.py's batching layer)")
    ap.add_argument("--workers", type=int, default=8, help="ThreadPoolExecutor max_workers")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the layers are made")
    args = ap.parse_args()
    layers = args.layer or [parse_layer("mid:512:8")]
    if len({name for name, _, _ in layers}) != len(layers):
        ap.error("--layer: names must be distinct")

    torch.set_num_threads(args.threads)
    build_blas, libs, extra = blas_info()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, workers={args.workers}; "
          f"BLAS: BLAS_INFO={build_blas}; loaded: {', '.join(libs) or 'none found'}"
          + (f"; {', '.join(extra)}" if extra else ""), flush=True)
    pb, pbg = load_stubs()
    torch.manual_seed(args.seed)
    servicer = AttentionServicer(pb, layers)

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=args.workers),
                         options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    pbg.add_AttentionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        sys.exit(f"torch_server: cannot listen on {args.host}:{args.port}")
    server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop(grace=1))
    print(f"torch_server ready: grpc_port={port}", flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
