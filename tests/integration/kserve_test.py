#!/usr/bin/python3
"""The Open Inference Protocol (KServe v2) service of the attnserve binary, inference.GRPCInferenceService on
the gRPC port beside attnserve.v1.AttentionService: health, metadata, config, ModelInfer against PyTorch's
golden answers (raw and typed contents, FP16/BF16 inputs), agreement with attnserve.v1 bit for bit, the
decode errors and the field each names, ModelStreamInfer, statistics, the model repository extension (index,
reload, unload, load of a LayerConfig JSON), who may control models, and batching across both protocols.

    /usr/bin/python3 tests/integration/kserve_test.py path/to/attnserve [case ...]

Debian's python3 (grpcio, numpy); stubs are generated from proto/inference and proto/attnserve/v1 with protoc
into a temporary directory. One server serves every golden layer (weights_path) plus seeded ones, with
--enable-model-control; the model-control cases start two more (without the flag; with tokens). Optional case
arguments run only the cases whose names contain one of them. Ends with "N passed, M failed"; exits 1 when any
case failed.
"""

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import Failed, expect, run_cases, stop_process  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GOLDEN_DIR = os.path.join(REPO_ROOT, "tests", "golden")
GOLDEN_CASES = json.load(open(os.path.join(GOLDEN_DIR, "cases.json")))["cases"]
INPUT_NAMES = ("query", "key", "value", "key_padding_mask", "attn_mask")
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TIMEOUT = 30

# Layers besides the golden ones ("g_<case>"). "seeded" and the JSON-loaded "fresh" share E, H and seed, so the
# same seeded weights: "fresh" must answer exactly as "seeded" does.
SEEDED = {"name": "seeded", "embedDim": 16, "numHeads": 2, "seed": "7"}
BATCH_DELAY_US = 50000  # "batchy": long enough that 16 requests sent at once share a batch on slow CPUs


def generate_stubs(out_dir):
    protos = []
    for sub in (("inference",), ("attnserve", "v1")):
        d = os.path.join(REPO_ROOT, "proto", *sub)
        protos += sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".proto"))
    subprocess.run(["protoc", "-I", os.path.join(REPO_ROOT, "proto"), f"--python_out={out_dir}",
                    f"--grpc_python_out={out_dir}", "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin",
                    *protos], check=True)
    sys.path.insert(0, out_dir)
    global kpb, kpbg, mcpb, pb, pbg
    from inference import grpc_service_pb2 as kpb  # noqa: E402
    from inference import grpc_service_pb2_grpc as kpbg  # noqa: E402
    from inference import model_config_pb2 as mcpb  # noqa: E402
    from attnserve.v1 import attention_pb2 as pb  # noqa: E402
    from attnserve.v1 import attention_pb2_grpc as pbg  # noqa: E402


# ---- checks ----------------------------------------------------------------------------------------------

def rpc(fn):
    """(status code, message, result) of fn(): OK and its result when it returns."""
    try:
        return OK, "", fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def expect_error(fn, code, needle, what):
    """fn() must fail with `code` and a message containing `needle`; returns the message."""
    got, details, _ = rpc(fn)
    expect(got == code, f"{what}: expected {code.name}, got {got.name}: {details[:300]}")
    expect(needle in details, f"{what}: message lacks {needle!r}: {details[:300]}")
    return details


def max_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    expect(a.shape == b.shape, f"shape {list(a.shape)} != {list(b.shape)}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def expect_close(got, want, tol, what):
    d = max_diff(got, want)
    expect(d <= tol, f"{what}: max abs diff {d:.3g} > {tol:g}")


def expect_same_bits(got, want, what):
    expect(np.asarray(got).shape == np.asarray(want).shape, f"{what}: shape {np.shape(got)} != {np.shape(want)}")
    expect(np.asarray(got, "<f4").tobytes() == np.asarray(want, "<f4").tobytes(),
           f"{what}: differs (max abs diff {max_diff(got, want):.3g})")


# ---- tensors ---------------------------------------------------------------------------------------------

def rand(shape, seed):
    """Standard normal f32 values, none of them zero (a zero input would hide a dropped tensor)."""
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    a[a == 0] = 0.5
    return a


def f32_to_bf16_bits(a):
    """Round-to-nearest-even to bfloat16 (the upper 16 bits of an f32)."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        raw = data[8 + n + h["data_offsets"][0]:8 + n + h["data_offsets"][1]]
        dt = h["dtype"]
        if dt == "F32":
            a = np.frombuffer(raw, "<f4")
        elif dt == "F16":
            a = np.frombuffer(raw, "<f2").astype(np.float32)
        elif dt == "BF16":
            a = bf16_bits_to_f32(np.frombuffer(raw, "<u2"))
        elif dt == "BOOL":
            a = np.frombuffer(raw, np.uint8) != 0
        else:
            raise ValueError(f"{path}: {name}: dtype {dt}")
        out[name] = a.reshape(h["shape"]).copy()
    return out


class Golden:
    """One golden case: its layer name on the server, its inputs, flags and PyTorch's expected outputs."""

    def __init__(self, case):
        self.case, self.name, self.layer = case, case["name"], "g_" + case["name"]
        self.weights_path = os.path.join(GOLDEN_DIR, f"{self.name}.weights.safetensors")
        self.io = read_safetensors(os.path.join(GOLDEN_DIR, f"{self.name}.io.safetensors"))
        self._weights = None

    def inputs(self):
        return [(n, self.io[n]) for n in INPUT_NAMES if n in self.io]

    def params(self):
        c = self.case
        return {"is_causal": c["is_causal"], "need_weights": c["need_weights"],
                "average_attn_weights": c["average_attn_weights"]}

    def weights(self):
        if self._weights is None:
            p = self.case["weights_prefix"]
            self._weights = {k[len(p):]: v.astype(np.float64) for k, v in read_safetensors(self.weights_path).items()}
        return self._weights

    def config_text(self, name=None, extra=""):
        c = self.case
        return (f'layers {{ name: "{name or self.layer}" embed_dim: {c["embed_dim"]} num_heads: {c["num_heads"]} '
                f'kdim: {c["kdim"]} vdim: {c["vdim"]} bias: {str(c["bias"]).lower()} '
                f'weights_path: "{self.weights_path}" weights_prefix: "{c["weights_prefix"]}" {extra}}}\n')


def reference_mha(g, query, key=None, value=None, key_padding_mask=None, attn_mask=None, is_causal=False,
                  need_weights=False, average_attn_weights=True):
    """nn.MultiheadAttention.forward (batch_first, eval) in float64 with golden case g's weights:
    (output, attn_weights or None)."""
    E, H = g.case["embed_dim"], g.case["num_heads"]
    w = g.weights()
    unbatched = query.ndim == 2
    q = query[None] if unbatched else query
    k = q if key is None else (key[None] if unbatched else key)
    v = q if value is None else (value[None] if unbatched else value)
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if "in_proj_weight" in w:
        wq, wk, wv = np.split(w["in_proj_weight"], 3)
    else:
        wq, wk, wv = w["q_proj_weight"], w["k_proj_weight"], w["v_proj_weight"]
    bq, bk, bv = np.split(w["in_proj_bias"], 3) if "in_proj_bias" in w else (0.0, 0.0, 0.0)
    B, L, S, d = q.shape[0], q.shape[1], k.shape[1], E // H
    Q = (q @ wq.T + bq).reshape(B, L, H, d).transpose(0, 2, 1, 3) / np.sqrt(d)
    K = (k @ wk.T + bk).reshape(B, S, H, d).transpose(0, 2, 1, 3)
    V = (v @ wv.T + bv).reshape(B, S, H, d).transpose(0, 2, 1, 3)
    scores = Q @ K.transpose(0, 1, 3, 2)  # [B, H, L, S]

    def additive(m):
        m = np.asarray(m)
        return np.where(m, -np.inf, 0.0) if m.dtype == bool else m.astype(np.float64)

    if attn_mask is not None:
        am = additive(attn_mask)
        scores = scores + (am.reshape(B, H, L, S) if am.ndim == 3 else am)
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).reshape(B, S)
        scores = scores + kpm[:, None, None, :]
    if is_causal:
        scores = scores + np.where(np.triu(np.ones((L, S), bool), 1), -np.inf, 0.0)
    top = np.max(scores, axis=-1, keepdims=True)
    p = np.exp(scores - top)
    p = p / np.sum(p, axis=-1, keepdims=True)
    out = (p @ V).transpose(0, 2, 1, 3).reshape(B, L, E) @ w["out_proj.weight"].T
    if "out_proj.bias" in w:
        out = out + w["out_proj.bias"]
    weights = (p.mean(axis=1) if average_attn_weights else p) if need_weights else None
    if unbatched:
        out = out[0]
        weights = None if weights is None else weights[0]
    return out, weights


# ---- KServe requests and responses -----------------------------------------------------------------------

def set_param(p, value):
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    else:
        p.string_param = value


def wire_bytes(arr, datatype):
    if datatype == "FP32":
        return np.asarray(arr, "<f4").tobytes()
    if datatype == "FP16":
        return np.asarray(arr, "<f2").tobytes()
    if datatype == "BF16":
        return f32_to_bf16_bits(arr).astype("<u2").tobytes()
    if datatype == "BOOL":
        return np.asarray(arr, bool).astype(np.uint8).tobytes()
    raise ValueError(datatype)


def kreq(model, inputs, params=None, outputs=(), rid="", version="", typed=False, types=None):
    """A ModelInferRequest. inputs: [(name, array)]; a bool array goes as BOOL, others as FP32 unless
    types[name] says otherwise. typed: values in contents (fp32_contents / bool_contents), else raw."""
    r = kpb.ModelInferRequest(model_name=model, model_version=version, id=rid)
    for k, v in (params or {}).items():
        set_param(r.parameters[k], v)
    for name, arr in inputs:
        arr = np.asarray(arr)
        dt = (types or {}).get(name) or ("BOOL" if arr.dtype == bool else "FP32")
        t = r.inputs.add(name=name, datatype=dt)
        t.shape.extend(arr.shape)
        if not typed:
            r.raw_input_contents.append(wire_bytes(arr, dt))
        elif dt == "BOOL":
            t.contents.bool_contents.extend(bool(x) for x in arr.ravel())
        else:
            t.contents.fp32_contents.extend(np.asarray(arr, np.float32).ravel().tolist())
    for o in outputs:
        r.outputs.add(name=o)
    return r


def golden_req(g, rid="", outputs=None, typed=False):
    if outputs is None:
        outputs = ["output", "attn_weights"] if g.case["need_weights"] else ["output"]
    return kreq(g.layer, g.inputs(), g.params(), outputs, rid=rid, typed=typed)


def answers(resp):
    """[(name, array)] of a ModelInferResponse, in order; checks datatype FP32 and byte sizes."""
    expect(len(resp.raw_output_contents) == len(resp.outputs),
           f"{len(resp.raw_output_contents)} raw_output_contents for {len(resp.outputs)} outputs")
    out = []
    for t, raw in zip(resp.outputs, resp.raw_output_contents):
        expect(t.datatype == "FP32", f"{t.name}: datatype {t.datatype!r}")
        shape = [int(d) for d in t.shape]
        expect(len(raw) == 4 * int(np.prod(shape)), f"{t.name}: {len(raw)} bytes for shape {shape}")
        out.append((t.name, np.frombuffer(raw, "<f4").reshape(shape)))
    return out


def answer(resp, name="output"):
    got = dict(answers(resp))
    expect(name in got, f"no {name} in the response (outputs {[t.name for t in resp.outputs]})")
    return got[name]


def int_param(resp, name):
    p = resp.parameters.get(name)
    expect(p is not None and p.WhichOneof("parameter_choice") == "int64_param",
           f"response parameter {name} missing or not int64_param: {p}")
    return p.int64_param


# ---- attnserve.v1 requests -------------------------------------------------------------------------------

def v1_tensor(arr):
    arr = np.asarray(arr)
    t = pb.Tensor()
    t.shape.extend(arr.shape)
    if arr.dtype == bool:
        t.dtype, t.raw_data = pb.BOOL, arr.astype(np.uint8).tobytes()
    else:
        t.dtype, t.raw_data = pb.FLOAT32, np.asarray(arr, "<f4").tobytes()
    return t


def v1_req(layer, inputs, rid="", is_causal=False, need_weights=False, average_attn_weights=True):
    r = pb.InferRequest(layer=layer, id=rid, is_causal=is_causal, need_weights=need_weights,
                        average_attn_weights=average_attn_weights)
    for name, arr in inputs:
        getattr(r, name).CopyFrom(v1_tensor(arr))
    return r


def v1_answer(resp, name="output"):
    t = getattr(resp, name)
    return np.frombuffer(t.raw_data, "<f4").reshape([int(d) for d in t.shape])


# ---- servers ---------------------------------------------------------------------------------------------

def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def main_config():
    # A budget set, not derived from the machine's memory: derived, the budget, gRPC's quota and the KV cache
    # add up past the memory guard's cap (an eighth below the memory limit), and a load could not move the
    # guard's limit (repository_load_moves_the_memory_guard).
    text = "memory_budget_bytes: 1073741824\n"
    text += "".join(Golden(c).config_text() for c in GOLDEN_CASES)
    sb = Golden(next(c for c in GOLDEN_CASES if c["name"] == "self_basic"))
    text += sb.config_text("batchy", f"batching {{ max_queue_delay_us: {BATCH_DELAY_US} }} ")
    text += sb.config_text("repo")
    text += f'layers {{ name: "seeded" embed_dim: {SEEDED["embedDim"]} num_heads: {SEEDED["numHeads"]} ' \
            f'seed: {SEEDED["seed"]} }}\n'
    text += 'layers { name: "idle" embed_dim: 8 num_heads: 2 seed: 3 }\n'  # never sent a request
    return text


class Server:
    """The binary on loopback ports chosen by the OS, its log in a file."""

    def __init__(self, binary, tmp, name, config, flags=(), config_path=None):
        cfg = config_path or write_file(os.path.join(tmp, f"{name}.pbtxt"), config)
        self.name = name
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, "--config", cfg, "--grpc-address", "127.0.0.1:0",
                                      "--metrics-address", "127.0.0.1:0", "--shutdown-grace", "5s", *flags],
                                     stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            text = self.log_text()
            m = re.search(r"attnserve (\S+) ready: grpc_port=(\d+) metrics_port=(\d+)", text)
            if m:
                self.version, self.port, self.metrics_port = m.group(1), int(m.group(2)), int(m.group(3))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"attnserve ({name}) exited: " + text[-3000:])
            time.sleep(0.05)
        else:
            raise RuntimeError(f"attnserve ({name}) not ready in 60 s")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                             options=[("grpc.max_receive_message_length", 64 << 20),
                                                      ("grpc.max_send_message_length", 64 << 20)])
        self.kserve = kpbg.GRPCInferenceServiceStub(self.channel)
        self.v1 = pbg.AttentionServiceStub(self.channel)

    def log_text(self):
        return open(self.log_path, errors="replace").read()

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        self.channel.close()
        stop_process(self.proc, 30)
        self.log.close()


class Env:
    pass


def golden(e, name):
    return e.golden[name]


def infer(e, req, md=()):
    return e.s.kserve.ModelInfer(req, metadata=md, timeout=TIMEOUT)


def still_serving(e):
    """The known request (self_basic) still answers exactly as at the start."""
    got = answers(infer(e, golden_req(golden(e, "self_basic"), rid="known")))
    expect(len(got) == len(e.known), f"known request: {len(got)} outputs, expected {len(e.known)}")
    for (n, a), (m, b) in zip(got, e.known):
        expect(n == m, f"known request: output {n} where {m} was")
        expect_same_bits(a, b, f"known request's {n} after the case")


def stats_of(e, model):
    """The ModelStatistics entry of `model`'s current version (zeros when it has none yet), and that version."""
    version = e.s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name=model), timeout=TIMEOUT).versions[-1]
    resp = e.s.kserve.ModelStatistics(kpb.ModelStatisticsRequest(name=model), timeout=TIMEOUT)
    for s in resp.model_stats:
        expect(s.name == model, f"statistics of {model} list {s.name}")
        if s.version == version:
            return s, version
    return kpb.ModelStatistics(name=model, version=version), version


def index_of(e, ready=False):
    resp = e.s.kserve.RepositoryIndex(kpb.RepositoryIndexRequest(ready=ready), timeout=TIMEOUT)
    return {m.name: m for m in resp.models}


def load(stub, name, config=None, md=(), params=None):
    r = kpb.RepositoryModelLoadRequest(model_name=name)
    if config is not None:
        r.parameters["config"].string_param = config if isinstance(config, str) else json.dumps(config)
    for k, v in (params or {}).items():
        set_param(r.parameters[k], v)
    return stub.RepositoryModelLoad(r, metadata=md, timeout=TIMEOUT)


def unload(stub, name, md=()):
    return stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=name), metadata=md, timeout=TIMEOUT)


def model_ready(e, name, version=""):
    return e.s.kserve.ModelReady(kpb.ModelReadyRequest(name=name, version=version), timeout=TIMEOUT).ready


def self_basic_query(seed, shape=(2, 5, 32)):
    return [("query", rand(shape, seed))]


# ---- health and metadata ---------------------------------------------------------------------------------

def case_server_live_and_ready(e):
    expect(e.s.kserve.ServerLive(kpb.ServerLiveRequest(), timeout=TIMEOUT).live, "ServerLive: live false")
    expect(e.s.kserve.ServerReady(kpb.ServerReadyRequest(), timeout=TIMEOUT).ready, "ServerReady: ready false")


def case_model_ready(e):
    expect(model_ready(e, "g_self_basic"), "ModelReady g_self_basic: false")
    expect(model_ready(e, "seeded", "1"), "ModelReady seeded version 1: false")
    expect(not model_ready(e, "no_such_layer"), "ModelReady of an unknown name: true")
    expect(not model_ready(e, "seeded", "2"), "ModelReady seeded version 2 (not loaded): true")
    expect_error(lambda: model_ready(e, "seeded", "abc"), INVALID, "version", "ModelReady version 'abc'")


def case_server_metadata(e):
    m = e.s.kserve.ServerMetadata(kpb.ServerMetadataRequest(), timeout=TIMEOUT)
    print(f"    name={m.name!r} version={m.version!r} extensions={list(m.extensions)}")
    expect(m.name == "attnserve", f"name {m.name!r}")
    expect(m.version != "" and m.version == e.s.version, f"version {m.version!r}, the log says {e.s.version!r}")
    for ext in ("model_repository", "model_configuration", "statistics"):
        expect(ext in m.extensions, f"extension {ext} not listed: {list(m.extensions)}")


def tensor_meta(ts):
    return [(t.name, t.datatype, list(t.shape)) for t in ts]


def case_model_metadata(e):
    m = e.s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="g_kdim_vdim"), timeout=TIMEOUT)
    want_in = [("query", "FP32", [-1, -1, 32]), ("key", "FP32", [-1, -1, 24]), ("value", "FP32", [-1, -1, 40])]
    got_in = tensor_meta(m.inputs)
    expect(m.name == "g_kdim_vdim", f"name {m.name!r}")
    expect(list(m.versions) == ["1"], f"versions {list(m.versions)}")
    expect(m.platform == "attnserve", f"platform {m.platform!r}")
    expect([t[0] for t in got_in] == list(INPUT_NAMES), f"inputs {got_in}")
    expect(got_in[:3] == want_in, f"query/key/value metadata {got_in[:3]}, expected {want_in}")
    for name, dt, shape in got_in[3:]:  # masks: FP32 or BOOL, every dimension variable
        expect(dt in ("BOOL", "FP32") and shape and all(d == -1 for d in shape), f"{name}: {dt} {shape}")
    got_out = tensor_meta(m.outputs)
    expect([t[0] for t in got_out] == ["output", "attn_weights"], f"outputs {got_out}")
    expect(got_out[0][1:] == ("FP32", [-1, -1, 32]), f"output metadata {got_out[0]}")
    expect(got_out[1][1] == "FP32" and all(d == -1 for d in got_out[1][2]), f"attn_weights metadata {got_out[1]}")
    # Same version explicitly; unknown model; version not loaded; version not a number.
    expect(list(e.s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="seeded", version="1"),
                                         timeout=TIMEOUT).versions) == ["1"], "ModelMetadata seeded version 1")
    expect_error(lambda: e.s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="nope"), timeout=TIMEOUT),
                 NOT_FOUND, "name", "ModelMetadata of an unknown model")
    expect_error(lambda: e.s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="seeded", version="7"),
                                                  timeout=TIMEOUT), NOT_FOUND, "version", "ModelMetadata version 7")
    expect_error(lambda: e.s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="seeded", version="x"),
                                                  timeout=TIMEOUT), INVALID, "version", "ModelMetadata version 'x'")


def case_model_config(e):
    c = e.s.kserve.ModelConfig(kpb.ModelConfigRequest(name="batchy"), timeout=TIMEOUT).config
    expect(c.name == "batchy", f"name {c.name!r}")
    expect(c.max_batch_size == 0, f"max_batch_size {c.max_batch_size}")
    expect(c.WhichOneof("scheduling_choice") == "dynamic_batching", "no dynamic_batching")
    expect(c.dynamic_batching.max_queue_delay_microseconds == BATCH_DELAY_US,
           f"max_queue_delay_microseconds {c.dynamic_batching.max_queue_delay_microseconds}, "
           f"configured {BATCH_DELAY_US}")
    got = [(i.name, i.optional) for i in c.input]
    expect(got == [(n, n != "query") for n in INPUT_NAMES], f"inputs (name, optional): {got}")
    q = c.input[0]
    expect(q.data_type == mcpb.TYPE_FP32 and list(q.dims) == [-1, -1, 32], f"query: {q.data_type} {list(q.dims)}")
    expect([o.name for o in c.output] == ["output", "attn_weights"], f"outputs {[o.name for o in c.output]}")
    params = {k: v.string_value for k, v in c.parameters.items()}
    expect(params.get("embed_dim") == "32" and params.get("num_heads") == "4", f"parameters {params}")
    # A layer with the default (eager) batching.
    eager = e.s.kserve.ModelConfig(kpb.ModelConfigRequest(name="seeded"), timeout=TIMEOUT).config
    expect(eager.dynamic_batching.max_queue_delay_microseconds == 0,
           f"seeded: max_queue_delay_microseconds {eager.dynamic_batching.max_queue_delay_microseconds}")
    expect_error(lambda: e.s.kserve.ModelConfig(kpb.ModelConfigRequest(name="nope"), timeout=TIMEOUT),
                 NOT_FOUND, "name", "ModelConfig of an unknown model")


# ---- ModelInfer --------------------------------------------------------------------------------------------

def case_infer_golden(e):
    """Every golden case through ModelInfer (raw FP32), against PyTorch's answers."""
    worst = 0.0
    for g in e.golden.values():
        rid = f"golden-{g.name}"
        outputs = ["output", "attn_weights"] if g.case["need_weights"] else ["output"]
        resp = infer(e, golden_req(g, rid=rid, outputs=outputs))
        what = g.name
        expect(resp.model_name == g.layer, f"{what}: model_name {resp.model_name!r}")
        expect(resp.model_version == "1", f"{what}: model_version {resp.model_version!r}")
        expect(resp.id == rid, f"{what}: id {resp.id!r}")
        got = answers(resp)
        expect([n for n, _ in got] == outputs, f"{what}: outputs {[n for n, _ in got]}, requested {outputs}")
        for name, arr in got:
            want = g.io[name]
            expect(list(arr.shape) == list(want.shape), f"{what}: {name} shape {list(arr.shape)}, "
                                                        f"expected {list(want.shape)}")
            d = max_diff(arr, want)
            worst = max(worst, d)
            expect(d <= 1e-4, f"{what}: {name} differs from PyTorch by {d:.3g}")
        expect(int_param(resp, "batch_size") >= 1, f"{what}: batch_size {int_param(resp, 'batch_size')}")
        expect(int_param(resp, "queue_us") >= 0 and int_param(resp, "compute_us") >= 0, f"{what}: negative timing")
    print(f"    {len(e.golden)} golden cases, max abs diff {worst:.2e}")


def case_infer_typed_contents_equal_raw(e):
    """fp32_contents / bool_contents give the same bytes as raw_input_contents (FP32 and BOOL masks)."""
    for name in ("batch_masks_combined", "kpm_bool", "attn_mask_bool_3d", "kpm_float"):
        g = golden(e, name)
        raw = infer(e, golden_req(g, rid="raw"))
        typed = infer(e, golden_req(g, rid="typed", typed=True))
        expect(typed.id == "typed", f"{name}: id {typed.id!r}")
        expect(len(raw.raw_output_contents) == len(typed.raw_output_contents), f"{name}: output counts differ")
        for a, b, t in zip(raw.raw_output_contents, typed.raw_output_contents, raw.outputs):
            expect(a == b, f"{name}: {t.name} differs between raw and typed contents")
        expect_close(answer(typed), g.io["output"], 1e-4, f"{name}: typed output vs PyTorch")


def case_infer_fp16_bf16(e):
    """FP16 / BF16 activations equal the FP32 answer of the same rounded values."""
    g = golden(e, "kdim_vdim")
    q, k, v = rand((2, 5, 32), 11), rand((2, 7, 24), 12), rand((2, 7, 40), 13)
    rounded = {
        "FP16": lambda a: a.astype(np.float16).astype(np.float32),
        "BF16": lambda a: bf16_bits_to_f32(f32_to_bf16_bits(a)),
        "FP32": lambda a: a,
    }
    for types in ({"query": "FP16", "key": "FP16", "value": "FP16"},
                  {"query": "BF16", "key": "BF16", "value": "BF16"},
                  {"query": "BF16", "key": "FP16", "value": "FP32"}):
        inputs = [("query", q), ("key", k), ("value", v)]
        exact = [(n, rounded[types[n]](a)) for n, a in inputs]
        params = {"need_weights": True}
        low = infer(e, kreq(g.layer, inputs, params, types=types))
        ref = infer(e, kreq(g.layer, exact, params))
        for name in ("output", "attn_weights"):
            expect_close(answer(low, name), answer(ref, name), 1e-5, f"{types}: {name} vs the FP32 answer")
        want, _ = reference_mha(g, *[a for _, a in exact])
        expect_close(answer(low), want, 1e-4, f"{types}: output vs the reference")
        # The rounding matters: the answer for the unrounded values is measurably different.
        if types["query"] != "FP32":
            unrounded = answer(infer(e, kreq(g.layer, inputs, params)))
            expect(max_diff(unrounded, answer(low)) > 0, f"{types}: the values were not rounded")


def case_infer_output_dtype(e):
    """parameters.output_dtype BF16 / FP16: every output in that type, the FP32 answer rounded to it."""
    g = golden(e, "kdim_vdim")
    inputs = [("query", rand((2, 5, 32), 31)), ("key", rand((2, 7, 24), 32)), ("value", rand((2, 7, 40), 33))]
    ref = infer(e, kreq(g.layer, inputs, {"need_weights": True}))
    decode = {"BF16": lambda raw: bf16_bits_to_f32(np.frombuffer(raw, "<u2")),
              "FP16": lambda raw: np.frombuffer(raw, "<f2").astype(np.float32)}
    round_to = {"BF16": lambda a: bf16_bits_to_f32(f32_to_bf16_bits(a)),
                "FP16": lambda a: a.astype(np.float16).astype(np.float32)}
    for dtype in ("BF16", "FP16"):
        low = infer(e, kreq(g.layer, inputs, {"need_weights": True, "output_dtype": dtype}))
        expect([t.name for t in low.outputs] == ["output", "attn_weights"], f"{dtype}: outputs {low.outputs}")
        for t, raw in zip(low.outputs, low.raw_output_contents):
            expect(t.datatype == dtype, f"{dtype}: {t.name} datatype {t.datatype!r}")
            shape = [int(d) for d in t.shape]
            expect(len(raw) == 2 * int(np.prod(shape)), f"{dtype}: {t.name}: {len(raw)} bytes for {shape}")
            want = round_to[dtype](answer(ref, t.name)).ravel()
            expect_same_bits(decode[dtype](raw), want, f"{dtype}: {t.name} vs the FP32 answer rounded")
    r = kreq(g.layer, inputs, {"output_dtype": "INT8"})
    try:
        infer(e, r)
        expect(False, "output_dtype INT8 accepted")
    except grpc.RpcError as err:
        expect(err.code() == grpc.StatusCode.INVALID_ARGUMENT and "parameters.output_dtype" in err.details(),
               f"output_dtype INT8: {err.code()} {err.details()}")


def case_infer_matches_attnserve_v1(e):
    """The same tensors on the same layer: KServe and attnserve.v1 answer bit for bit."""
    for name in ("batch_masks_combined", "causal_kpm", "attn_mask_float_3d", "unbatched_cross"):
        g = golden(e, name)
        p = g.params()
        k = infer(e, golden_req(g))
        v = e.s.v1.Infer(v1_req(g.layer, g.inputs(), **p), timeout=TIMEOUT)
        expect_same_bits(answer(k), v1_answer(v), f"{name}: output")
        if p["need_weights"]:
            expect_same_bits(answer(k, "attn_weights"), v1_answer(v, "attn_weights"), f"{name}: attn_weights")
    # Random inputs on a seeded layer, with per-head weights.
    inputs = [("query", rand((3, 6, 16), 21)), ("key_padding_mask", np.array([[0, 0, 1, 0, 0, 1]] * 3, bool))]
    k = infer(e, kreq("seeded", inputs, {"need_weights": True, "average_attn_weights": False}))
    v = e.s.v1.Infer(v1_req("seeded", inputs, need_weights=True, average_attn_weights=False), timeout=TIMEOUT)
    expect_same_bits(answer(k), v1_answer(v), "seeded: output")
    expect_same_bits(answer(k, "attn_weights"), v1_answer(v, "attn_weights"), "seeded: attn_weights")
    expect(list(answer(k, "attn_weights").shape) == [3, 2, 6, 6], f"per-head shape {answer(k, 'attn_weights').shape}")


def case_outputs_selection(e):
    g = golden(e, "self_basic")
    inputs = g.inputs()
    names = lambda r: [t.name for t in r.outputs]  # noqa: E731
    r = infer(e, kreq(g.layer, inputs, {"need_weights": True}))
    expect(names(r) == ["output", "attn_weights"], f"none requested, need_weights: {names(r)}")
    expect_close(answer(r, "attn_weights"), g.io["attn_weights"], 1e-4, "attn_weights")
    for params in ({}, {"need_weights": False}):
        r = infer(e, kreq(g.layer, inputs, params))
        expect(names(r) == ["output"], f"none requested, parameters {params}: {names(r)}")
    r = infer(e, kreq(g.layer, inputs, {"need_weights": True}, ["attn_weights", "output"]))
    expect(names(r) == ["attn_weights", "output"], f"requested [attn_weights, output]: {names(r)}")
    got = answers(r)
    expect_close(got[0][1], g.io["attn_weights"], 1e-4, "attn_weights (first)")
    expect_close(got[1][1], g.io["output"], 1e-4, "output (second)")
    r = infer(e, kreq(g.layer, inputs, {}, ["attn_weights"]))  # implies need_weights
    expect(names(r) == ["attn_weights"], f"requested [attn_weights] without need_weights: {names(r)}")
    expect_close(answer(r, "attn_weights"), g.io["attn_weights"], 1e-4, "implied attn_weights")
    r = infer(e, kreq(g.layer, inputs, {"need_weights": True}, ["output"]))
    expect(names(r) == ["output"], f"requested [output] with need_weights: {names(r)}")
    r = infer(e, kreq(g.layer, inputs, {"average_attn_weights": False}, ["attn_weights"]))
    _, per_head = reference_mha(g, g.io["query"], need_weights=True, average_attn_weights=False)
    expect_close(answer(r, "attn_weights"), per_head, 1e-4, "per-head attn_weights")


# ---- errors ------------------------------------------------------------------------------------------------

def raw_query_req(model="g_self_basic", shape=(1, 4, 32), seed=3, **kw):
    return kreq(model, [("query", rand(shape, seed))], **kw)


def case_errors_inputs(e):
    q = rand((1, 4, 32), 3)
    qb = wire_bytes(q, "FP32")

    def bad(req, needle, what, code=INVALID):
        expect_error(lambda: infer(e, req), code, needle, what)

    r = kreq("g_self_basic", [("queries", q)])
    bad(r, "inputs[0].name", "unknown input name")
    r = kreq("g_self_basic", [("query", q), ("query", q)])
    bad(r, "inputs[1].name", "query given twice")
    r = kreq("g_cross_attention", [("key", rand((1, 4, 32), 4)), ("value", rand((1, 4, 32), 5))])
    bad(r, "'query' is required", "missing query")
    r = kreq("g_self_basic", [("query", q)])
    r.raw_input_contents.append(qb)
    bad(r, "raw_input_contents: holds 2 entries", "two raw_input_contents for one input")
    r = kreq("g_self_basic", [("query", q), ("key_padding_mask", np.zeros((1, 4), bool))])
    del r.raw_input_contents[1]
    bad(r, "raw_input_contents: holds 1 entries", "one raw_input_contents for two inputs")
    r = kreq("g_self_basic", [("query", q)])
    r.inputs[0].contents.fp32_contents.extend(q.ravel().tolist())
    bad(r, "inputs[0].contents", "raw_input_contents plus contents")
    r = kreq("g_self_basic", [("query", q)])
    r.inputs[0].datatype = "INT32"
    bad(r, "query: datatype", "INT32 query")
    r = kreq("g_self_basic", [("query", q)])
    r.raw_input_contents[0] = qb[:-4]
    bad(r, "query: raw_input_contents[0] holds", "raw bytes one value short")
    r = kreq("g_self_basic", [("query", q)], typed=True)
    r.inputs[0].datatype = "FP16"
    bad(r, "query: FP16 values must come in raw_input_contents", "FP16 in typed contents")
    r = kreq("g_self_basic", [("query", q)], typed=True)
    del r.inputs[0].contents.fp32_contents[-1]
    bad(r, "query: contents.fp32_contents holds", "fp32_contents one value short")
    r = kreq("g_self_basic", [("query", q), ("key_padding_mask", np.zeros((1, 4), bool))],
             types={"key_padding_mask": "FP16"})
    bad(r, "key_padding_mask: datatype", "FP16 mask")
    still_serving(e)


def case_errors_parameters_and_outputs(e):
    def bad(req, needle, what, code=INVALID):
        expect_error(lambda: infer(e, req), code, needle, what)

    bad(raw_query_req(params={"need_weights": 1}), "parameters.need_weights", "need_weights as int64_param")
    bad(raw_query_req(params={"is_causal": "true"}), "parameters.is_causal", "is_causal as string_param")
    bad(raw_query_req(outputs=["weights"]), "outputs[0].name", "unknown output")
    bad(raw_query_req(outputs=["output", "output"]), "outputs[1].name", "output twice")
    bad(raw_query_req(params={"need_weights": False}, outputs=["attn_weights"]), "need_weights",
        "attn_weights requested with need_weights false")
    still_serving(e)


def case_errors_model_and_version(e):
    def bad(req, code, needle, what):
        expect_error(lambda: infer(e, req), code, needle, what)

    bad(raw_query_req(version="x"), INVALID, "model_version", "model_version 'x'")
    bad(raw_query_req(version="0"), INVALID, "model_version", "model_version '0'")
    bad(raw_query_req(version="7"), NOT_FOUND, "version", "model_version '7'")
    bad(raw_query_req(model="no_such_layer"), NOT_FOUND, "model_name: no layer named", "unknown model")
    bad(raw_query_req(model=""), NOT_FOUND, "model_name: is required", "empty model_name")
    r = infer(e, raw_query_req(version="1", rid="v1"))
    expect(r.model_version == "1" and r.id == "v1", f"model_version '1': {r.model_version!r} id {r.id!r}")
    still_serving(e)


def case_errors_shape(e):
    def bad(req, needle, what):
        expect_error(lambda: infer(e, req), INVALID, needle, what)

    bad(raw_query_req(shape=(1, 4, 16)), "query:", "query E=16 on an E=32 layer")
    bad(kreq("g_kdim_vdim", [("query", rand((1, 4, 32), 1)), ("key", rand((1, 5, 32), 2)),
                             ("value", rand((1, 5, 40), 3))]), "key:", "key of E=32 on a kdim=24 layer")
    bad(kreq("g_self_basic", [("query", rand((1, 4, 32), 1)), ("key_padding_mask", np.zeros((1, 5), bool))]),
        "key_padding_mask:", "key_padding_mask of S=5 for S=4")
    bad(raw_query_req(shape=(1, 0, 32)), "query:", "query with L=0")
    still_serving(e)


# ---- ModelStreamInfer --------------------------------------------------------------------------------------

def case_stream_infer(e):
    """20 requests, a quarter invalid, interleaved: one response each, by id; the stream ends OK."""
    g = golden(e, "self_basic")
    invalid = {  # id -> (request, the field the error must name)
        "bad-2": (kreq(g.layer, [("querry", rand((1, 3, 32), 2))]), "inputs[0].name"),
        "bad-6": (raw_query_req(shape=(1, 3, 16)), "query"),
        "bad-10": (raw_query_req(model="no_such_layer"), "model_name"),
        "bad-14": (raw_query_req(params={"need_weights": 1}), "parameters.need_weights"),
        "bad-18": (raw_query_req(version="x"), "model_version"),
    }
    reqs, valid = [], {}
    for i in range(20):
        rid = next((k for k in invalid if k == f"bad-{i}"), None)
        if rid:
            r = kpb.ModelInferRequest()
            r.CopyFrom(invalid[rid][0])
            r.id = rid
        else:
            rid = f"ok-{i}"
            layer = "g_self_basic" if i % 2 else "seeded"
            E = 32 if i % 2 else 16
            r = kreq(layer, [("query", rand((1 + i % 3, 2 + i % 5, E), 100 + i))], {"need_weights": i % 4 == 1},
                     rid=rid)
            valid[rid] = r
        reqs.append(r)
    call = e.s.kserve.ModelStreamInfer(iter(reqs), timeout=60)
    got = {}
    for resp in call:
        rid = resp.infer_response.id
        expect(rid not in got, f"two responses for {rid!r}")
        got[rid] = resp
    expect(call.code() == OK, f"stream ended {call.code().name}: {call.details()}")
    expect(sorted(got) == sorted(r.id for r in reqs), f"answered {sorted(got)}")
    for rid, (req, needle) in invalid.items():
        msg = got[rid].error_message
        expect(msg != "" and needle in msg, f"{rid}: error_message {msg!r} lacks {needle!r}")
        expect(len(got[rid].infer_response.raw_output_contents) == 0, f"{rid}: outputs with an error")
    worst = 0.0
    for rid, req in valid.items():
        resp = got[rid]
        expect(resp.error_message == "", f"{rid}: error {resp.error_message!r}")
        unary = infer(e, req)
        s, u = answers(resp.infer_response), answers(unary)
        expect([n for n, _ in s] == [n for n, _ in u], f"{rid}: outputs {[n for n, _ in s]} vs {[n for n, _ in u]}")
        for (n, a), (_, b) in zip(s, u):
            worst = max(worst, max_diff(a, b))
            expect_close(a, b, 1e-6, f"{rid}: {n} stream vs unary")
        expect(resp.infer_response.model_name == req.model_name and resp.infer_response.model_version == "1",
               f"{rid}: model {resp.infer_response.model_name!r} version {resp.infer_response.model_version!r}")
        if req.model_name == "g_self_basic":
            want, _ = reference_mha(g, np.frombuffer(req.raw_input_contents[0], "<f4").reshape(req.inputs[0].shape))
            expect_close(s[0][1], want, 1e-4, f"{rid}: output vs the reference")
    print(f"    15 answers, 5 errors; stream vs unary max abs diff {worst:.2e}")


# ---- statistics ------------------------------------------------------------------------------------------

def case_statistics_counts(e):
    before, version = stats_of(e, "seeded")
    batches = [2, 1, 3]
    for i, b in enumerate(batches):
        infer(e, kreq("seeded", [("query", rand((b, 4, 16), 200 + i))]))
    for i in range(2):  # found the layer, failed its validation
        expect_error(lambda: infer(e, kreq("seeded", [("query", rand((1, 4, 8), 300 + i))])), INVALID, "query",
                     "query E=8 on an E=16 layer")
    expect_error(lambda: infer(e, raw_query_req(model="no_such_layer")), NOT_FOUND, "model_name", "unknown model")
    after, _ = stats_of(e, "seeded")
    n, m = len(batches), 2
    delta = {
        "inference_count": after.inference_count - before.inference_count,
        "execution_count": after.execution_count - before.execution_count,
        **{f"{f}.count": getattr(after.inference_stats, f).count - getattr(before.inference_stats, f).count
           for f in ("success", "fail", "queue", "compute_infer")},
    }
    print(f"    seeded v{version}: deltas {delta}, batch sizes {[b.batch_size for b in after.batch_stats]}")
    expect(after.name == "seeded" and after.version == version, f"entry {after.name!r} version {after.version!r}")
    want = {"inference_count": sum(batches), "success.count": n, "fail.count": m, "queue.count": n,
            "compute_infer.count": n}
    for k, v in want.items():
        expect(delta[k] == v, f"{k} +{delta[k]}, expected +{v}")
    expect(after.inference_stats.success.ns > before.inference_stats.success.ns, "success.ns did not grow")
    expect(delta["execution_count"] >= 1, f"execution_count +{delta['execution_count']}")
    expect(len(after.batch_stats) > 0 and all(b.batch_size >= 1 for b in after.batch_stats),
           f"batch_stats {[(b.batch_size, b.compute_infer.count) for b in after.batch_stats]}")
    expect(sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count,
           "batch_stats counts do not add up to execution_count")
    expect(abs(after.last_inference - time.time() * 1000) < 60000, f"last_inference {after.last_inference} ms")
    expect_error(lambda: e.s.kserve.ModelStatistics(kpb.ModelStatisticsRequest(name="no_such_layer"), timeout=TIMEOUT),
                 NOT_FOUND, "name", "ModelStatistics of an unknown model")
    expect_error(lambda: e.s.kserve.ModelStatistics(kpb.ModelStatisticsRequest(name="seeded", version="abc"),
                                                    timeout=TIMEOUT), INVALID, "version",
                 "ModelStatistics version 'abc'")


def case_statistics_every_model(e):
    """Empty name: every model, including one that has had no request yet ("idle")."""
    infer(e, kreq("seeded", [("query", rand((1, 3, 16), 5))]))
    listed = {s.name for s in e.s.kserve.ModelStatistics(kpb.ModelStatisticsRequest(), timeout=TIMEOUT).model_stats}
    ready = set(index_of(e, ready=True))
    missing = sorted(ready - listed)
    print(f"    {len(listed)} models listed, {len(ready)} ready")
    expect(not missing, f"ModelStatistics(name='') leaves out ready models {missing}")
    idle = e.s.kserve.ModelStatistics(kpb.ModelStatisticsRequest(name="idle"), timeout=TIMEOUT).model_stats
    expect(len(idle) == 1 and idle[0].name == "idle" and idle[0].inference_count == 0,
           f"ModelStatistics(name='idle') before any request: {[(s.name, s.version) for s in idle]}")


# ---- model repository --------------------------------------------------------------------------------------

def case_repository_index(e):
    idx = index_of(e)
    configured = [g.layer for g in e.golden.values()] + ["batchy", "repo", "seeded", "idle"]
    for name in configured:
        m = idx.get(name)
        expect(m is not None, f"{name} not in the index: {sorted(idx)}")
        expect((m.state, m.version, m.reason) == ("READY", "1", ""),
               f"{name}: state {m.state!r} version {m.version!r} reason {m.reason!r}")
    ready = index_of(e, ready=True)
    expect(all(m.state == "READY" for m in ready.values()), "ready=true lists a model that is not READY")
    expect(set(configured) <= set(ready), "ready=true leaves out a READY model")


def repo_check(e, version, want, what):
    """repo serves `version` (metadata, index, the answer's model_version) and answers `want` exactly."""
    md = e.s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="repo"), timeout=TIMEOUT)
    expect(list(md.versions) == [version], f"{what}: ModelMetadata versions {list(md.versions)}, expected [{version}]")
    m = index_of(e).get("repo")
    expect(m is not None and (m.state, m.version) == ("READY", version),
           f"{what}: index {m.state if m else None} {m.version if m else None}")
    resp = infer(e, kreq("repo", e.repo_inputs, rid="r"))
    expect(resp.model_version == version, f"{what}: response model_version {resp.model_version!r}")
    expect_same_bits(answer(resp), want, f"{what}: answer")
    expect(model_ready(e, "repo", version), f"{what}: ModelReady version {version} false")


def repo_version(e):
    return e.s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="repo"), timeout=TIMEOUT).versions[-1]


def case_repository_reload(e):
    before = answer(infer(e, kreq("repo", e.repo_inputs)))
    expect_close(before, reference_mha(golden(e, "self_basic"), e.repo_inputs[0][1])[0], 1e-4, "repo vs reference")
    v = int(repo_version(e))
    load(e.s.kserve, "repo")
    repo_check(e, str(v + 1), before, "reloaded")
    expect(not model_ready(e, "repo", str(v)), f"ModelReady of the replaced version {v} true")
    expect_error(lambda: infer(e, kreq("repo", e.repo_inputs, version=str(v))), NOT_FOUND, "version",
                 "ModelInfer of the replaced version")
    # Metrics carry the version that answered: the old one's requests stay counted under it.
    for version in (v, v + 1):
        series = f'attnserve_requests_total{{code="OK",layer="repo",version="{version}"}}'
        expect(metric(e.s, series) >= 1, f"no {series} on /metrics")
    refused = 'attnserve_requests_total{code="NOT_FOUND",layer="repo",version=""}'
    expect(metric(e.s, refused) >= 1, f"the request for a replaced version is not counted as {refused}")


def case_repository_unload_and_load(e):
    want = answer(infer(e, kreq("repo", e.repo_inputs)))
    v = int(repo_version(e))
    unload(e.s.kserve, "repo")
    expect(not model_ready(e, "repo"), "ModelReady true after unload")
    expect_error(lambda: infer(e, kreq("repo", e.repo_inputs)), NOT_FOUND, "model_name", "ModelInfer after unload")
    expect_error(lambda: e.s.v1.Infer(v1_req("repo", e.repo_inputs), timeout=TIMEOUT), NOT_FOUND, "repo",
                 "attnserve.v1 Infer after unload")
    m = index_of(e).get("repo")
    expect(m is not None, "repo left the index after unload")
    expect((m.state, m.reason, m.version) == ("UNAVAILABLE", "unloaded", ""),
           f"index after unload: state {m.state!r} reason {m.reason!r} version {m.version!r}")
    expect("repo" not in index_of(e, ready=True), "ready=true lists the unloaded model")
    expect_error(lambda: unload(e.s.kserve, "repo"), NOT_FOUND, "model_name", "unloading it twice")
    expect(e.s.kserve.ServerReady(kpb.ServerReadyRequest(), timeout=TIMEOUT).ready, "ServerReady false")
    load(e.s.kserve, "repo")
    nv = repo_version(e)
    print(f"    version {v}, unloaded, loaded again as version {nv}")
    expect(int(nv) > v, f"loaded again as version {nv}, not newer than {v}")
    repo_check(e, nv, want, "loaded again")
    expect(index_of(e)["repo"].reason == "", f"reason {index_of(e)['repo'].reason!r} once READY again")
    v1 = e.s.v1.Infer(v1_req("repo", e.repo_inputs), timeout=TIMEOUT)
    expect_same_bits(v1_answer(v1), want, "attnserve.v1 after loading again")


def case_repository_load_config_json(e):
    """A new layer from a LayerConfig JSON; same E, H and seed as "seeded", so the same answers."""
    load(e.s.kserve, "fresh", dict(SEEDED, name="fresh"))
    expect(model_ready(e, "fresh"), "fresh not ready")
    m = index_of(e).get("fresh")
    expect(m is not None and (m.state, m.version) == ("READY", "1"), f"index: {m}")
    md = e.s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name="fresh"), timeout=TIMEOUT)
    expect(list(md.versions) == ["1"] and list(md.inputs[0].shape) == [-1, -1, 16],
           f"metadata versions {list(md.versions)} query {list(md.inputs[0].shape)}")
    inputs = [("query", rand((2, 5, 16), 31))]
    got = infer(e, kreq("fresh", inputs, {"need_weights": True}, rid="f"))
    expect(got.model_name == "fresh" and got.model_version == "1" and got.id == "f",
           f"response {got.model_name!r} {got.model_version!r} {got.id!r}")
    want = infer(e, kreq("seeded", inputs, {"need_weights": True}))
    for n in ("output", "attn_weights"):
        expect_same_bits(answer(got, n), answer(want, n), f"fresh vs seeded (same seed): {n}")
    v1 = e.s.v1.Infer(v1_req("fresh", inputs), timeout=TIMEOUT)
    expect_same_bits(v1_answer(v1), answer(got), "fresh through attnserve.v1")
    cfg = e.s.kserve.ModelConfig(kpb.ModelConfigRequest(name="fresh"), timeout=TIMEOUT).config
    expect(cfg.parameters["embed_dim"].string_value == "16", f"ModelConfig embed_dim {cfg.parameters['embed_dim']}")


def guard_limit_mib(e):
    """The memory guard's RSS limit, as the server last logged it (at start, then after each load and unload)."""
    limits = re.findall(r"memory guard: RSS limit (\d+) MiB", e.s.log_text())
    expect(limits, "the server logged no memory guard limit")
    return int(limits[-1])


def case_repository_load_moves_the_memory_guard(e):
    """A layer loaded while serving raises the memory guard's limit by its weights (E=1024: four 1024 x 1024 f32
    projections, 16 MiB), so that its memory is not taken for a flood; unloaded, it lowers it again."""
    before = guard_limit_mib(e)
    load(e.s.kserve, "wide", {"name": "wide", "embedDim": 1024, "numHeads": 8, "seed": 5})
    loaded = guard_limit_mib(e)
    unload(e.s.kserve, "wide")
    after = guard_limit_mib(e)
    print(f"    memory guard limit: {before} MiB, {loaded} MiB with the E=1024 layer loaded, {after} MiB unloaded")
    expect(15 <= loaded - before <= 17, f"loading 16 MiB of weights moved the limit by {loaded - before} MiB")
    expect(abs(after - before) <= 1, f"unloading them left the limit at {after} MiB, not {before}")
    still_serving(e)


def case_threads_are_named(e):
    """The server's own threads carry names (top -H, ps -L, perf): its batch worker, whose OpenMP team inherits
    the name, and its guards."""
    infer(e, kreq("seeded", [("query", rand((4, 32, 16), 41))]))  # the worker's team exists once it computed
    task = f"/proc/{e.s.proc.pid}/task"
    names = [open(os.path.join(task, t, "comm")).read().strip() for t in os.listdir(task)]
    print(f"    threads: {', '.join(sorted(set(n for n in names if n.startswith('attn-'))))}")
    for want in ("attn-batch", "attn-memguard", "attn-resetguard", "attn-listener", "attn-trim"):
        expect(want in names, f"no thread named {want} among {sorted(set(names))}")


def case_repository_load_errors(e):
    k = e.s.kserve
    expect_error(lambda: load(k, "fresh3", dict(SEEDED, name="other")), INVALID, "parameters.config",
                 "config named other than model_name")
    expect_error(lambda: load(k, "fresh3", '{"name": "fresh3", "embedDim": '), INVALID, "parameters.config",
                 "malformed JSON")
    expect_error(lambda: load(k, "fresh3", '{"name": "fresh3", "embedDimension": 16}'), INVALID, "parameters.config",
                 "unknown JSON field")
    expect_error(lambda: load(k, "fresh3", params={"config": 5}), INVALID, "parameters.config", "config as int64")
    expect_error(lambda: load(k, "fresh3", params={"colour": "red"}), INVALID, "parameters", "unknown parameter")
    expect_error(lambda: load(k, "fresh3"), NOT_FOUND, "model_name", "unknown name without a config")
    expect(not model_ready(e, "fresh3"), "fresh3 ready after failed loads")
    details = expect_error(lambda: load(k, "fresh2", {"name": "fresh2", "embedDim": 16, "numHeads": 3}), INVALID,
                           "num_heads", "num_heads not dividing embed_dim")
    m = index_of(e).get("fresh2")
    expect(m is not None, "fresh2 (failed load) not in the index")
    expect(m.state == "UNAVAILABLE" and m.version == "" and "num_heads" in m.reason and m.reason in details,
           f"index of fresh2: {m.state!r} version {m.version!r} reason {m.reason!r} (error {details!r})")
    expect(not model_ready(e, "fresh2"), "fresh2 ready")
    # A failed reload of a serving layer keeps the previous version serving.
    v = repo_version(e)
    want = answer(infer(e, kreq("repo", e.repo_inputs)))
    expect_error(lambda: load(k, "repo", {"name": "repo", "embedDim": 32, "numHeads": 5}), INVALID, "num_heads",
                 "invalid reload of repo")
    m = index_of(e)["repo"]
    expect(m.state == "READY" and m.version == v and "num_heads" in m.reason,
           f"repo after a failed reload: {m.state!r} version {m.version!r} reason {m.reason!r}")
    expect_same_bits(answer(infer(e, kreq("repo", e.repo_inputs))), want, "repo after a failed reload")
    # The largest layer a config may name (E = 32768: 17 GiB of weights, about 15 E^2 floats while built) is
    # weighed against the memory the process may use before anything is allocated: refused at once, not an
    # OOM kill, on any machine with less memory than building it takes.
    e_max = 32768
    build_bytes = 4 * (2 * (4 * e_max * e_max + 4 * e_max) + 7 * e_max * e_max)
    mem_total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    t = time.time()
    if mem_total < build_bytes:
        expect_error(lambda: load(k, "huge", {"name": "huge", "embedDim": e_max, "numHeads": 8}),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "building it needs about", "a layer too large to build")
        expect(time.time() - t < 5, f"refusing the huge layer took {time.time() - t:.1f} s")
        m = index_of(e).get("huge")
        expect(m is not None and m.state == "UNAVAILABLE" and "needs about" in m.reason, f"index of huge: {m}")
    else:
        print(f"    (a {mem_total >> 30} GiB machine could build the largest layer: its refusal not checked)")
    still_serving(e)


# ---- who may control models --------------------------------------------------------------------------------

SMALL_CONFIG = f'layers {{ name: "small" embed_dim: 16 num_heads: 2 seed: {SEEDED["seed"]} }}\n'


def case_model_control_refused_without_flag(e):
    s = Server(e.binary, e.tmp, "nocontrol", SMALL_CONFIG)
    try:
        expect_error(lambda: load(s.kserve, "small"), grpc.StatusCode.PERMISSION_DENIED, "--enable-model-control",
                     "RepositoryModelLoad without --enable-model-control")
        expect_error(lambda: unload(s.kserve, "small"), grpc.StatusCode.PERMISSION_DENIED, "--enable-model-control",
                     "RepositoryModelUnload without --enable-model-control")
        idx = {m.name: m for m in s.kserve.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=TIMEOUT).models}
        expect(idx.get("small") is not None and idx["small"].state == "READY", f"index {idx}")
        inputs = [("query", rand((1, 4, 16), 41))]
        got = s.kserve.ModelInfer(kreq("small", inputs), timeout=TIMEOUT)
        expect_same_bits(answer(got), answer(infer(e, kreq("seeded", inputs))), "small (seed 7) vs seeded")
    finally:
        s.stop()


def sha256_hex(s):
    return hashlib.sha256(s.encode()).hexdigest()


def case_model_control_with_tokens(e):
    """With a token file, load/unload need the admin scope, even with --enable-model-control."""
    tokens = {n: f"tok-{n}-" + os.urandom(12).hex() for n in ("infer", "admin")}
    tf = write_file(os.path.join(e.tmp, "tokens"), f"sha256:{sha256_hex(tokens['infer'])} infer\n"
                                                   f"sha256:{sha256_hex(tokens['admin'])} admin\n")
    s = Server(e.binary, e.tmp, "tokens", SMALL_CONFIG, ["--auth-token-file", tf, "--enable-model-control"])
    bearer = lambda t: (("authorization", f"Bearer {t}"),)  # noqa: E731
    try:
        expect(s.kserve.ServerLive(kpb.ServerLiveRequest(), timeout=TIMEOUT).live, "ServerLive without a token")
        expect_error(lambda: load(s.kserve, "small"), grpc.StatusCode.UNAUTHENTICATED, "", "load without a token")
        expect_error(lambda: load(s.kserve, "small", md=bearer(tokens["infer"])), grpc.StatusCode.PERMISSION_DENIED,
                     "", "load with an infer token")
        expect_error(lambda: unload(s.kserve, "small", md=bearer(tokens["infer"])), grpc.StatusCode.PERMISSION_DENIED,
                     "", "unload with an infer token")
        expect_error(lambda: s.kserve.ModelInfer(kreq("small", [("query", rand((1, 4, 16), 1))]), timeout=TIMEOUT),
                     grpc.StatusCode.UNAUTHENTICATED, "", "ModelInfer without a token")
        load(s.kserve, "small", md=bearer(tokens["admin"]))
        resp = s.kserve.ModelInfer(kreq("small", [("query", rand((1, 4, 16), 1))]), metadata=bearer(tokens["infer"]),
                                   timeout=TIMEOUT)
        expect(resp.model_version == "2", f"after the admin's load: model_version {resp.model_version!r}")
        # ServerReady is false while no layer is ready (its only layer unloaded), true once one is again.
        unload(s.kserve, "small", md=bearer(tokens["admin"]))
        expect(not s.kserve.ServerReady(kpb.ServerReadyRequest(), timeout=TIMEOUT).ready,
               "ServerReady true with no layer loaded")
        load(s.kserve, "small", md=bearer(tokens["admin"]))
        expect(s.kserve.ServerReady(kpb.ServerReadyRequest(), timeout=TIMEOUT).ready, "ServerReady false after load")
    finally:
        s.stop()


def attnctl(e, *args):
    """attnctl (next to the server's directory in the build tree) against the main server."""
    binary = os.path.join(os.path.dirname(os.path.dirname(e.binary)), "tools", "attnctl")
    return subprocess.run([binary, "--target", f"127.0.0.1:{e.s.port}", *args], capture_output=True, text=True,
                          timeout=60)


def case_attnctl_model_commands(e):
    """attnctl versions, reload, unload and load (from a config JSON file) drive the repository RPCs."""
    r = attnctl(e, "--json", "versions")
    expect(r.returncode == 0, f"attnctl versions: exit {r.returncode}: {r.stderr}")
    listed = {m["name"]: m for m in json.loads(r.stdout)["layers"]}
    expect(listed.get("idle", {}).get("state") == "READY", f"attnctl versions: {listed.get('idle')}")
    before = index_of(e)["idle"].version
    r = attnctl(e, "reload", "idle")
    expect(r.returncode == 0 and "loaded idle" in r.stdout, f"attnctl reload: {r.returncode} {r.stdout} {r.stderr}")
    expect(int(index_of(e)["idle"].version) == int(before) + 1, "attnctl reload did not make a new version")
    r = attnctl(e, "unload", "idle")
    expect(r.returncode == 0, f"attnctl unload: {r.returncode} {r.stderr}")
    expect(index_of(e)["idle"].state == "UNAVAILABLE", "attnctl unload: idle still ready")
    r = attnctl(e, "unload", "idle")
    expect(r.returncode == 3, f"attnctl unload of an unloaded layer: exit {r.returncode}, expected 3 (not found)")
    cfg = write_file(os.path.join(e.tmp, "ctl.json"), json.dumps({"name": "ctl", "embedDim": 8, "numHeads": 2}))
    r = attnctl(e, "load", "ctl", "--config-json", cfg)
    expect(r.returncode == 0, f"attnctl load --config-json: {r.returncode} {r.stderr}")
    expect(index_of(e)["ctl"].state == "READY", "attnctl load: ctl not ready")
    r = attnctl(e, "load", "idle")
    expect(r.returncode == 0 and index_of(e)["idle"].state == "READY", f"attnctl load idle: {r.stderr}")


# ---- config reload ------------------------------------------------------------------------------------------

def configmap_swap(root, version, text):
    """What the kubelet does to a ConfigMap volume: the new files in a directory of their own, then a new
    `..data` symlink renamed over the old one (config.pbtxt -> ..data/config.pbtxt stays)."""
    d = os.path.join(root, f"..v{version}")
    os.mkdir(d)
    write_file(os.path.join(d, "config.pbtxt"), text)
    tmp_link = os.path.join(root, "..data_tmp")
    os.symlink(f"..v{version}", tmp_link)
    os.rename(tmp_link, os.path.join(root, "..data"))
    if not os.path.lexists(os.path.join(root, "config.pbtxt")):
        os.symlink("..data/config.pbtxt", os.path.join(root, "config.pbtxt"))


def metric(s, series):
    """The value of one series (name and labels as /metrics prints them), 0 when absent."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(re.escape(series) + r" (\S+)", text)
    return float(m.group(1)) if m else 0.0


def reload_count(s, result):
    return metric(s, f'attnserve_config_reload_total{{result="{result}"}}')


def versions_of(s):
    resp = s.kserve.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=TIMEOUT)
    return {m.name: (m.state, m.version) for m in resp.models}


def reload_wait_s():
    """How long a config change may take to go live: 2 s, the watcher's promise; 10 s under a sanitizer, where
    the layers build and warm up (at background priority) several times slower."""
    return 10.0 if os.environ.get("ATTNSERVE_SANITIZE") else 2.0


def wait_until(what, cond, timeout):
    start = time.time()
    while time.time() - start < timeout:
        if cond():
            return time.time() - start
        time.sleep(0.02)
    raise Failed(f"{what}: not within {timeout} s")


def case_config_reload_configmap_swap(e):
    """The config file changes as a ConfigMap does: new layers load, changed ones reload, removed ones unload,
    within 2 s; a config that does not validate changes nothing and is counted; SIGHUP reloads every layer."""
    root = tempfile.mkdtemp(prefix="configmap_", dir=e.tmp)
    layer = lambda n, seed: f'layers {{ name: "{n}" embed_dim: 16 num_heads: 2 seed: {seed} }}\n'  # noqa: E731
    configmap_swap(root, 1, layer("kept", 7) + layer("changed", 1) + layer("gone", 3))
    s = Server(e.binary, e.tmp, "configmap", None, config_path=os.path.join(root, "config.pbtxt"))
    try:
        q = [("query", rand((1, 4, 16), 61))]
        before = answer(s.kserve.ModelInfer(kreq("changed", q), timeout=TIMEOUT))
        configmap_swap(root, 2, layer("kept", 7) + layer("changed", 2) + layer("added", 9))
        took = wait_until("the swapped config live", lambda: versions_of(s).get("added", ("", ""))[0] == "READY" and
                          versions_of(s)["changed"][1] == "2" and versions_of(s)["gone"][0] == "UNAVAILABLE", reload_wait_s())
        v = versions_of(s)
        expect(v["kept"] == ("READY", "1"), f"an unchanged layer was reloaded: {v['kept']}")
        expect(v["gone"][0] == "UNAVAILABLE", f"removed layer: {v['gone']}")
        expect_error(lambda: s.kserve.ModelInfer(kreq("gone", q), timeout=TIMEOUT), NOT_FOUND, "no layer named",
                     "a removed layer")
        after = answer(s.kserve.ModelInfer(kreq("changed", q), timeout=TIMEOUT))
        expect(max_diff(before, after) > 1e-3, "the changed layer (seed 1 -> 2) answers as before")
        answer(s.kserve.ModelInfer(kreq("added", q), timeout=TIMEOUT))
        print(f"    ConfigMap swap live after {took * 1000:.0f} ms")
        failures = reload_count(s, "failure")
        configmap_swap(root, 3, layer("kept", 7) + 'layers { name: "bad" embed_dim: 16 num_heads: 3 }\n')
        wait_until("the bad config counted", lambda: reload_count(s, "failure") == failures + 1, 5.0)
        expect(versions_of(s) == v, f"a config that does not validate changed the layers: {versions_of(s)} vs {v}")
        expect("num_heads" in s.log_text(), "the bad config's log line does not name num_heads")
        s.proc.send_signal(signal.SIGHUP)  # the bad file is still there: refused again, nothing changes
        wait_until("SIGHUP counted", lambda: reload_count(s, "failure") == failures + 2, 5.0)
        configmap_swap(root, 4, layer("kept", 7))
        wait_until("the good config back", lambda: versions_of(s)["added"][0] == "UNAVAILABLE", reload_wait_s())
        s.proc.send_signal(signal.SIGHUP)  # reloads every configured layer: weights files may have changed
        wait_until("SIGHUP reload", lambda: versions_of(s)["kept"] == ("READY", "2"), 5.0)
        expect(metric(s, 'attnserve_layer_version{layer="kept"}') == 2, "attnserve_layer_version of kept is not 2")
        expect(metric(s, 'attnserve_layer_version{layer="gone"}') == 0, "attnserve_layer_version of gone is not 0")
    finally:
        s.stop()


# ---- batching across protocols -----------------------------------------------------------------------------

def case_cross_protocol_batching(e):
    """16 concurrent requests on one layer, alternating KServe and attnserve.v1: one queue, shared batches."""
    g = golden(e, "self_basic")
    for attempt in range(3):
        futures, inputs = [], []
        for i in range(16):
            q = rand((1, 3 + i % 4, 32), 500 + 16 * attempt + i)
            inputs.append(q)
            if i % 2 == 0:
                futures.append(e.s.kserve.ModelInfer.future(kreq("batchy", [("query", q)], rid=f"k{i}"),
                                                             timeout=TIMEOUT))
            else:
                futures.append(e.s.v1.Infer.future(v1_req("batchy", [("query", q)], rid=f"v{i}"), timeout=TIMEOUT))
        sizes = []
        for i, (f, q) in enumerate(zip(futures, inputs)):
            r = f.result()
            want, _ = reference_mha(g, q)
            if i % 2 == 0:
                expect(r.id == f"k{i}" and r.model_name == "batchy", f"KServe answer {r.id!r} {r.model_name!r}")
                expect_close(answer(r), want, 1e-4, f"KServe request {i}")
                sizes.append(("kserve", int_param(r, "batch_size")))
            else:
                expect(r.id == f"v{i}", f"attnserve.v1 answer id {r.id!r}")
                expect_close(v1_answer(r), want, 1e-4, f"attnserve.v1 request {i}")
                sizes.append(("v1", r.timing.batch_size))
        print(f"    attempt {attempt + 1}: batch sizes {[s for _, s in sizes]}")
        # 8 requests per protocol: a batch of more than 8 holds both.
        if any(p == "kserve" and s > 1 for p, s in sizes) and max(s for _, s in sizes) > 8:
            return
    raise Failed("in 3 attempts no batch held requests of both protocols (batch_size > 8 with a KServe request "
                 "among them)")


CASES = [
    case_server_live_and_ready, case_model_ready, case_server_metadata, case_model_metadata, case_model_config,
    case_infer_golden, case_infer_typed_contents_equal_raw, case_infer_fp16_bf16, case_infer_output_dtype,
    case_infer_matches_attnserve_v1,
    case_outputs_selection, case_errors_inputs, case_errors_parameters_and_outputs, case_errors_model_and_version,
    case_errors_shape, case_stream_infer, case_statistics_counts, case_statistics_every_model,
    case_repository_index, case_repository_reload, case_repository_unload_and_load,
    case_repository_load_config_json, case_repository_load_moves_the_memory_guard, case_repository_load_errors,
    case_model_control_refused_without_flag, case_threads_are_named,
    case_model_control_with_tokens, case_attnctl_model_commands, case_config_reload_configmap_swap,
    case_cross_protocol_batching,
]


def setup(binary, tmp):
    e = Env()
    e.binary, e.tmp = binary, tmp
    e.golden = {c["name"]: Golden(c) for c in GOLDEN_CASES}
    e.s = Server(binary, tmp, "main", main_config(), ["--enable-model-control"])
    print(f"server main: pid {e.s.proc.pid}, grpc_port={e.s.port}, version {e.s.version}", flush=True)
    e.known = answers(infer(e, golden_req(e.golden["self_basic"], rid="known")))
    e.repo_inputs = [("query", rand((2, 6, 32), 77))]
    return e


def main():
    binary = os.path.abspath(sys.argv[1])
    only = sys.argv[2:]  # optional: run only the cases whose names contain one of these
    tmp = tempfile.mkdtemp(prefix="attnserve_kserve_")
    started = time.time()
    generate_stubs(tmp)
    passed = failed = 0
    e = None
    try:
        e = setup(binary, tmp)
        passed, failed = run_cases(CASES, e, only, lambda env: expect(env.s.alive(), "the server died"))
    finally:
        if e is not None:
            e.s.stop()
            if failed:
                print("---- main server log (tail) ----\n" + e.s.log_text()[-2000:])
    print(f"{passed} passed, {failed} failed in {time.time() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
