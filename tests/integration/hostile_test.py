#!/usr/bin/python3
"""Hostile clients against the attnserve binary: each case is traffic that once crashed the server, held
memory without bound, computed what it could not send, or echoed client strings whole. After every case
the server must still answer a known request exactly, and its in-flight gauge must return to 0.

    /usr/bin/python3 tests/integration/hostile_test.py path/to/attnserve

Debian's python3-grpcio and python3-numpy; stubs are generated from proto/ with protoc into a temporary
directory. Ends with the line "N passed, M failed"; exits 1 when any case failed.
"""

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import gzip
import zlib

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import h2_raw as h2  # noqa: E402
from checks import Failed, expect  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MAX_MESSAGE = 64 << 20
BUDGET_MIB = 256
KV_POOL_MIB = 32
CONFIG = f"""
memory_budget_bytes: {BUDGET_MIB << 20}
max_inflight_per_stream: 8
layers {{ name: "small" embed_dim: 256 num_heads: 4 seed: 1 }}
layers {{ name: "base" embed_dim: 768 num_heads: 12 seed: 2 }}
layers {{ name: "decoder" embed_dim: 512 num_heads: 8 kind: DECODER_ATTENTION decoder {{ num_kv_heads: 2 }} seed: 3 }}
sessions {{ kv_cache_bytes: {KV_POOL_MIB << 20} }}
"""
# The memory guard's limit above the RSS once serving: by default budget + twice gRPC's quota (half the
# budget) + KV cache. Under the sanitizers RSS also holds ASan's quarantine of freed memory (256 MiB) and its
# shadow, which the server does not count: the suite's server gets that much more headroom there.
GUARD_HEADROOM_MIB = BUDGET_MIB + 2 * (BUDGET_MIB // 2) + KV_POOL_MIB


def suite_config():
    if not sanitized():
        return CONFIG
    return CONFIG + f"transport {{ memory_guard_headroom_bytes: {(GUARD_HEADROOM_MIB + 512) << 20} }}\n"


def guard_headroom_mib():
    return GUARD_HEADROOM_MIB + (512 if sanitized() else 0)


def generate_stubs(out_dir):
    protos = []
    for sub in (("attnserve", "v1"), ("inference",)):
        d = os.path.join(REPO_ROOT, "proto", *sub)
        protos += sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".proto"))
    subprocess.run(["protoc", "-I", os.path.join(REPO_ROOT, "proto"), f"--python_out={out_dir}",
                    f"--grpc_python_out={out_dir}", "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin",
                    *protos], check=True)
    sys.path.insert(0, out_dir)
    global pb, pbg, kpb, kpbg
    from attnserve.v1 import attention_pb2 as pb  # noqa: E402
    from attnserve.v1 import attention_pb2_grpc as pbg  # noqa: E402
    from inference import grpc_service_pb2 as kpb  # noqa: E402
    from inference import grpc_service_pb2_grpc as kpbg  # noqa: E402


# Transport limits the suite runs with, passed only when the binary knows the flag (its --help lists it), so
# that the suite runs against binaries from before and after they exist.
TRANSPORT_FLAGS = [("--max-concurrent-streams", "128"), ("--max-connections", "1024"),
                   ("--keepalive-min-ping-interval", "10s"), ("--max-ping-strikes", "2")]


def transport_flags(binary):
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
    out = []
    for flag, value in TRANSPORT_FLAGS:
        if re.search(re.escape(flag) + r"(?![\w-])", help_text):
            out += [flag, value]
    return out


class Server:
    """The binary on loopback ports chosen by the OS, its log in a file."""

    def __init__(self, binary, tmp, config=CONFIG, name="hostile", flags=None):
        self.binary, self.tmp = binary, tmp
        cfg = os.path.join(tmp, f"{name}.pbtxt")
        with open(cfg, "w") as f:
            f.write(config)
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, "--config", cfg, "--grpc-address", "127.0.0.1:0",
                                      "--metrics-address", "127.0.0.1:0",
                                      *(transport_flags(binary) if flags is None else flags)],
                                     stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            m = re.search(r"ready: grpc_port=(\d+) metrics_port=(\d+)", open(self.log_path).read())
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                break
            if self.proc.poll() is not None:
                raise RuntimeError("attnserve exited: " + open(self.log_path).read()[-3000:])
            time.sleep(0.05)
        else:
            raise RuntimeError("attnserve not ready in 60 s")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                             options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                                      ("grpc.max_send_message_length", MAX_MESSAGE)])
        self.stub = pbg.AttentionServiceStub(self.channel)
        self.kserve = kpbg.GRPCInferenceServiceStub(self.channel)

    def alive(self):
        return self.proc.poll() is None

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0])

    def metric(self, name, labels=""):
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith(name + "_"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def tensor(shape, dtype="f32", values=None):
    t = pb.Tensor()
    t.shape.extend(shape)
    if dtype == "f32":
        t.dtype = pb.FLOAT32
        arr = values if values is not None else np.random.default_rng(len(shape)).standard_normal(shape, np.float32)
        t.raw_data = arr.astype(np.float32).tobytes()
    return t


def request(layer, shape, rid="", **flags):
    r = pb.InferRequest(layer=layer, id=rid)
    r.query.CopyFrom(tensor(shape))
    for k, v in flags.items():
        setattr(r, k, v)
    return r


def output(resp):
    return np.frombuffer(resp.output.raw_data, np.float32)


def expect_code(err, code, needle=""):
    expect(err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()[:300]}")
    expect(needle in (err.details() or ""), f"message lacks {needle!r}: {err.details()[:300]}")


# ---- the cases ------------------------------------------------------------------------------------------

def case_per_head_weights_of_2_gib_refused(s):
    """[8, 4096, 256] with per-head weights: a 2 GiB answer. Once an abort of the whole server."""
    try:
        s.stub.Infer(request("small", [8, 4096, 256], need_weights=True, average_attn_weights=False), timeout=60)
        raise Failed("answered")
    except grpc.RpcError as e:
        expect_code(e, grpc.StatusCode.INVALID_ARGUMENT, "average_attn_weights=false is 2147483648 bytes")


def case_oversize_answer_refused_before_compute(s):
    """B=1, L=S=4096 with averaged weights: a 68 MiB answer, once computed in full and then dropped."""
    flops_before = s.metric("attnserve_flops_total")
    try:
        s.stub.Infer(request("small", [1, 4096, 256], need_weights=True), timeout=60)
        raise Failed("answered")
    except grpc.RpcError as e:
        expect_code(e, grpc.StatusCode.INVALID_ARGUMENT, "past the layer's max_response_bytes")
    expect(s.metric("attnserve_flops_total") == flops_before, "the refused request was computed")
    expect(s.metric("attnserve_requests_total", 'code="INVALID_ARGUMENT",layer="small"') >= 1,
           "not counted as INVALID_ARGUMENT")


def case_oversize_answer_fails_only_its_stream_request(s):
    """On a stream, an answer that cannot be sent fails its own request; the stream and the rest go on."""
    reqs = [request("small", [1, 16, 256], "a"), request("small", [1, 4096, 256], "huge", need_weights=True),
            request("small", [1, 16, 256], "b")]
    answers = {r.id: r for r in s.stub.InferStream(iter(reqs), timeout=60)}
    expect(sorted(answers) == ["a", "b", "huge"], f"answered {sorted(answers)}")
    expect(answers["huge"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], "huge not INVALID_ARGUMENT")
    expect(not answers["a"].HasField("error") and not answers["b"].HasField("error"), "good requests failed")


def case_never_reading_stream_is_bounded(s):
    """A stream client that sends 200 x 1 MiB requests and never reads: once every answer was held (7.6 MiB
    per unread answer, 200 answers computed); now the server stops reading at max_inflight_per_stream (8)."""
    q = np.random.default_rng(3).standard_normal((1, 1024, 256), np.float32)
    ok_before = s.metric("attnserve_requests_total", 'code="OK",layer="small"')
    rss_before = s.rss_kib()

    def reqs():
        for i in range(200):
            r = pb.InferRequest(layer="small", id=str(i))
            r.query.CopyFrom(tensor([1, 1024, 256], values=q))
            yield r

    stream = s.stub.InferStream(reqs(), timeout=120)
    time.sleep(3)
    answered = s.metric("attnserve_requests_total", 'code="OK",layer="small"') - ok_before
    grown_mib = (s.rss_kib() - rss_before) / 1024
    print(f"    unread stream: {answered:.0f} of 200 answered, RSS +{grown_mib:.0f} MiB")
    # 8 held by the server; the rest were written: HTTP/2 and socket buffers hold them, not the server.
    expect(answered <= 8 + 48, f"{answered:.0f} answers computed for a client that reads none")
    # A sanitizer's allocator keeps freed memory in quarantine: RSS says nothing there.
    if not os.environ.get("ATTNSERVE_SANITIZE"):
        expect(grown_mib < 128, f"RSS grew {grown_mib:.0f} MiB")
    got = sum(1 for _ in stream)
    expect(got == 200, f"read {got} of 200 afterwards")


def case_huge_layer_name_not_echoed(s):
    """A 1 MiB layer name: once echoed whole in the error and the log line."""
    name = "L" * (1 << 20)
    try:
        s.stub.Infer(request(name, [1, 4, 256]), timeout=30)
        raise Failed("answered")
    except grpc.RpcError as e:
        expect_code(e, grpc.StatusCode.NOT_FOUND, "(1048576 bytes)")
        expect(len(e.details()) < 1024, f"error message of {len(e.details())} bytes")
    longest = max(len(line) for line in open(s.log_path, errors="replace"))
    expect(longest < 4096, f"a log line of {longest} bytes")


def case_many_dims_shape_not_echoed(s):
    """A query shape of 2,000,000 dims of 1: once a 5.7 MiB error message, also logged."""
    r = pb.InferRequest(layer="small")
    r.query.shape.extend([1] * 2_000_000)
    r.query.dtype = pb.FLOAT32
    r.query.raw_data = b"\0\0\0\0"
    try:
        s.stub.Infer(r, timeout=30)
        raise Failed("answered")
    except grpc.RpcError as e:
        expect_code(e, grpc.StatusCode.INVALID_ARGUMENT, "(2000000 dims)")
        expect(len(e.details()) < 1024, f"error message of {len(e.details())} bytes")


def case_newline_in_id_cannot_forge_a_log_line(s):
    """A request id with a newline and a fake log line after it, on a failing request (which is logged)."""
    # Failure lines are limited to 20 per 1 s window: a flood in the case before may have used this one.
    time.sleep(1.1)
    try:
        s.stub.Infer(request("nope", [1, 4, 256], "x\n[2026-01-01 00:00:00.000] [critical] FORGED"), timeout=30)
    except grpc.RpcError:
        pass
    log = open(s.log_path, errors="replace").read()
    expect("\\x0a[2026-01-01" in log, "the id was not escaped in the log")
    expect(not any(line.startswith("[2026-01-01 00:00:00.000]") for line in log.splitlines()), "a forged line")


def case_warning_flood_is_rate_limited(s):
    """1,000 failing requests: their warnings are rate-limited, with a count of what was dropped."""
    lines_before = len(open(s.log_path, errors="replace").read().splitlines())
    for i in range(1000):
        try:
            s.stub.Infer(request("nope", [1, 2, 256], f"flood{i}"), timeout=30)
        except grpc.RpcError:
            pass
    lines = open(s.log_path, errors="replace").read().splitlines()[lines_before:]
    flood = [line for line in lines if "id=flood" in line]
    print(f"    1000 failing requests: {len(flood)} log lines")
    expect(len(flood) < 500, f"{len(flood)} warnings for 1000 failures")


def case_cancelled_heavy_work_stops(s):
    """A heavy request (E=768, L=4096: ~70 GFLOP) cancelled by its client once its batch is computing: once
    computed in full (and counted OK) while a small request waited behind it. It now stops at its next query
    block and is answered CANCELLED ("while computing"); the wait of a small request sent after it is
    printed, not asserted (a timing)."""
    heavy = request("base", [1, 4096, 768])
    labels = 'code="CANCELLED",layer="base"'
    cancelled_before = s.metric("attnserve_requests_total", labels)
    call = s.stub.Infer.future(heavy, timeout=120)
    deadline = time.time() + 30
    while s.metric("attnserve_inflight_batches") < 1 and time.time() < deadline:
        time.sleep(0.002)
    expect(s.metric("attnserve_inflight_batches") >= 1, "the heavy batch never started")
    call.cancel()
    other = grpc.insecure_channel(f"127.0.0.1:{s.port}")  # its own connection: no head-of-line blocking
    t = time.time()
    pbg.AttentionServiceStub(other).Infer(request("small", [1, 8, 256]), timeout=60)
    latency = time.time() - t
    other.close()
    print(f"    a small request sent once a heavy one was cancelled while computing waited {latency * 1000:.0f} ms")
    deadline = time.time() + 30
    while s.metric("attnserve_requests_total", labels) == cancelled_before and time.time() < deadline:
        time.sleep(0.01)
    expect(s.metric("attnserve_requests_total", labels) == cancelled_before + 1,
           "the cancelled request was not stopped while computing (not counted CANCELLED)")


def case_short_requests_do_not_wait_behind_a_long_one(s):
    """A long request (E=768, B=2, L=4096: ~140 GFLOP, seconds on this machine) on layer base, then small ones
    on layer small: once they waited for all of it. The express lane runs them beside it (one thread each),
    so each is answered while the long one still computes; the long one is answered too."""
    heavy = s.stub.Infer.future(request("base", [2, 4096, 768]), timeout=300)
    deadline = time.time() + 30
    while s.metric("attnserve_inflight_batches") < 1 and time.time() < deadline:
        time.sleep(0.002)
    expect(s.metric("attnserve_inflight_batches") >= 1, "the long batch never started")
    other = grpc.insecure_channel(f"127.0.0.1:{s.port}")  # its own connection: no head-of-line blocking
    stub = pbg.AttentionServiceStub(other)
    latencies = []
    answered_during = 0
    for _ in range(5):
        t = time.time()
        stub.Infer(request("small", [1, 8, 256]), timeout=120)
        latencies.append(time.time() - t)
        answered_during += 0 if heavy.done() else 1
    other.close()
    t = time.time()
    heavy.result()
    print(f"    5 small requests beside a long one: {', '.join(f'{x * 1000:.0f}' for x in latencies)} ms; "
          f"{answered_during} answered while it computed, which then took {time.time() - t:.1f} s more")
    expect(answered_during == 5, f"only {answered_during} of 5 small requests were answered before the long one")


def flood(s, send, n, check_refusal=None):
    """Sends n calls at once (send() returns a future) and waits for all: ({code name: count}, RSS peak above
    the RSS before, in MiB), RSS sampled every 10 ms meanwhile. check_refusal(e) sees each RESOURCE_EXHAUSTED."""
    rss_before = s.rss_kib()
    peak = [rss_before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], s.rss_kib())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    codes = {}
    try:
        for f in [send() for _ in range(n)]:
            try:
                f.result()
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                if code == "RESOURCE_EXHAUSTED" and check_refusal:
                    check_refusal(e)
            codes[code] = codes.get(code, 0) + 1
    finally:
        stop.set()
        sampler.join()
    return codes, (peak[0] - rss_before) / 1024


def reservations_released(s):
    """Whether every memory reservation is released within 10 s (50 under a sanitizer): a request's goes once its answer is written,
    which the server learns a little after the client has it (slowly under a sanitizer)."""
    deadline = time.time() + (50 if sanitized() else 10)
    while s.metric("attnserve_memory_reserved_bytes") != 0 and time.time() < deadline:
        time.sleep(0.05)
    return s.metric("attnserve_memory_reserved_bytes") == 0


def refused_by_the_budget(e):
    # The budget refuses at admission; gRPC's resource quota (transport memory, half the budget) may
    # refuse a stream before that, with RST_STREAM ENHANCE_YOUR_CALM (11).
    expect("memory budget" in e.details() or "RST_STREAM with error code 11" in e.details(),
           f"RESOURCE_EXHAUSTED but neither the budget nor the transport quota: {e.details()}")


def case_queue_flood_stays_within_the_memory_budget(s):
    """64 concurrent 8 MiB requests (each ~50 MiB with its workspace and answer): once all queued (+2 GiB of
    RSS). Admission now stops at the budget (256 MiB) with RESOURCE_EXHAUSTED, and the memory goes back."""
    big = request("small", [8, 1024, 256])
    s.stub.Infer(big, timeout=60)  # the baseline has served this shape once (its primitives are built)
    time.sleep(2.5)
    rss_before = s.rss_kib()
    codes, grown = flood(s, lambda: s.stub.Infer.future(big, timeout=120), 64, refused_by_the_budget)
    time.sleep(2.5)  # the server gives freed memory back once a second while idle
    after = (s.rss_kib() - rss_before) / 1024
    print(f"    64 x 8 MiB at once: {codes}; RSS peak +{grown:.0f} MiB (budget {BUDGET_MIB}), after +{after:.0f} MiB")
    expect(codes.get("RESOURCE_EXHAUSTED", 0) > 0, "nothing was refused")
    expect(codes.get("OK", 0) > 0, "nothing was answered")
    expect(set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"unexpected codes {codes}")
    expect(reservations_released(s), "reservations not released")
    if not os.environ.get("ATTNSERVE_SANITIZE"):
        # The budget covers what the server holds per request; gRPC's own receive buffers come on top.
        expect(grown < 2 * BUDGET_MIB, f"RSS grew {grown:.0f} MiB under a {BUDGET_MIB} MiB budget")
        # Most of it goes back (the scratch of idle workers, malloc_trim while idle); what stays varies from
        # run to run (12-87 MiB measured; 1-15 MiB since main sets the mmap threshold first), so the bound is
        # half the budget, not yet the 10 % of baseline the hardening issue asks.
        expect(after < BUDGET_MIB / 2, f"RSS still {after:.0f} MiB above its baseline")


def kserve_request(layer, shape, rid="", datatype="FP32"):
    """A ModelInferRequest with a random query in raw_input_contents, as tritonclient sends it."""
    r = kpb.ModelInferRequest(model_name=layer, id=rid)
    t = r.inputs.add(name="query", datatype=datatype)
    t.shape.extend(shape)
    values = np.random.default_rng(len(shape)).standard_normal(shape, np.float32)
    r.raw_input_contents.append(values.astype(np.float16 if datatype == "FP16" else np.float32).tobytes())
    return r


def case_kserve_never_reading_stream_is_bounded(s):
    """The same as never_reading_stream_is_bounded on the Open Inference Protocol's ModelStreamInfer: 200 x 1
    MiB requests from a client that reads no answer; the server stops reading at max_inflight_per_stream."""
    ok_before = s.metric("attnserve_requests_total", 'code="OK",layer="small"')
    one = kserve_request("small", [1, 1024, 256])

    def reqs():
        for i in range(200):
            r = kpb.ModelInferRequest()
            r.CopyFrom(one)
            r.id = str(i)
            yield r

    stream = s.kserve.ModelStreamInfer(reqs(), timeout=120)
    time.sleep(3)
    answered = s.metric("attnserve_requests_total", 'code="OK",layer="small"') - ok_before
    print(f"    unread ModelStreamInfer: {answered:.0f} of 200 answered")
    expect(answered <= 8 + 48, f"{answered:.0f} answers computed for a client that reads none")
    got = [r for r in stream]
    expect(len(got) == 200, f"read {len(got)} of 200 afterwards")
    expect(all(not r.error_message for r in got), "an answer of the stream is an error")
    expect(sorted(int(r.infer_response.id) for r in got) == list(range(200)), "answers missing or repeated")


def case_kserve_fp16_flood_stays_within_the_memory_budget(s):
    """64 concurrent FP16 requests of 4 MiB: each costs tens of MiB once computed (its rows gathered and
    widened to f32 in the batch, its projections, its answer), counted before admission, so the budget refuses
    the excess before any of it is allocated (RESOURCE_EXHAUSTED) and the process stays near baseline +
    budget."""
    big = kserve_request("small", [8, 1024, 256], datatype="FP16")
    s.kserve.ModelInfer(big, timeout=60)
    time.sleep(2.5)
    codes, grown = flood(s, lambda: s.kserve.ModelInfer.future(big, timeout=120), 64, refused_by_the_budget)
    print(f"    64 x 4 MiB FP16 at once: {codes}; RSS peak +{grown:.0f} MiB (budget {BUDGET_MIB})")
    expect(codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("OK", 0) > 0, f"codes {codes}")
    expect(set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"unexpected codes {codes}")
    expect(reservations_released(s), "reservations not released")
    if not os.environ.get("ATTNSERVE_SANITIZE"):
        expect(grown < 2 * BUDGET_MIB, f"RSS grew {grown:.0f} MiB under a {BUDGET_MIB} MiB budget")


def case_decoder_flood_stays_within_the_memory_budget(s):
    """A decoder layer's requests cost their projections [N, (H + 2 Hkv) D] and a block of scores per thread:
    64 concurrent 8 MiB requests are admitted up to the budget and refused past it, as the MHA layers' are."""
    big = request("decoder", [4, 1024, 512])
    s.stub.Infer(big, timeout=60)
    time.sleep(2.5)
    codes, grown = flood(s, lambda: s.stub.Infer.future(big, timeout=120), 64, refused_by_the_budget)
    print(f"    64 x 8 MiB decoder requests at once: {codes}; RSS peak +{grown:.0f} MiB (budget {BUDGET_MIB})")
    expect(codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("OK", 0) > 0, f"codes {codes}")
    expect(set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"unexpected codes {codes}")
    expect(reservations_released(s), "reservations not released")
    if not os.environ.get("ATTNSERVE_SANITIZE"):
        expect(grown < 2 * BUDGET_MIB, f"RSS grew {grown:.0f} MiB under a {BUDGET_MIB} MiB budget")


def case_decoder_sessions_cannot_outgrow_the_kv_pool(s):
    """64 decoder sessions each appending a 1024-token prompt at once: their keys and values (2 x 1024 x 128
    floats, 1 MiB each: Hkv * D wide) fill the 32 MiB pool; the appends past it get RESOURCE_EXHAUSTED naming
    the pool (or the memory budget), the others are answered, and closing the sessions gives the pool back."""
    from attnserve.v1 import session_pb2 as spb  # noqa: E402
    from attnserve.v1 import session_pb2_grpc as spbg  # noqa: E402
    sessions = spbg.SessionServiceStub(s.channel)
    ids = [f"flood-{i}" for i in range(64)]
    for sid in ids:
        sessions.CreateSession(spb.CreateSessionRequest(session_id=sid, layers=["decoder"]), timeout=30)
    prompt = tensor([1024, 512])
    codes, grown = flood(s, lambda it=iter(ids): sessions.Append.future(
        spb.AppendRequest(session_id=next(it), layer="decoder", query=prompt), timeout=120), 64,
        lambda e: "kv_cache_bytes" in e.details() or refused_by_the_budget(e))
    held = sum(sessions.GetSession(spb.GetSessionRequest(session_id=sid), timeout=30).bytes for sid in ids)
    for sid in ids:
        sessions.CloseSession(spb.CloseSessionRequest(session_id=sid), timeout=30)
    print(f"    64 x 1024-token decoder prompts at once: {codes}; KV held {held >> 20} MiB of {KV_POOL_MIB}; "
          f"RSS peak +{grown:.0f} MiB")
    expect(codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("OK", 0) > 0, f"codes {codes}")
    expect(set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"unexpected codes {codes}")
    expect(held <= KV_POOL_MIB << 20, f"sessions hold {held} bytes, past the pool")
    expect(s.metric("attnserve_kv_cache_blocks", 'state="used"') == 0, "the pool was not given back")
    expect(reservations_released(s), "reservations not released")


def case_bf16_session_appends_stay_within_the_budget(s):
    """64 sessions each appending a 2048-token BFLOAT16 prompt to `base` (E=768) at once: 3 MiB each, used as
    sent (no f32 copy; session_store_test checks that a queued one holds its request's bytes only). The KV pool (32 MiB) holds two such prompts: the rest are refused RESOURCE_EXHAUSTED,
    hold no blocks, and RSS stays within the budget; everything goes back."""
    from attnserve.v1 import session_pb2 as spb  # noqa: E402
    from attnserve.v1 import session_pb2_grpc as spbg  # noqa: E402
    sessions = spbg.SessionServiceStub(s.channel)
    ids = [f"bf16-{i}" for i in range(64)]
    for sid in ids:
        sessions.CreateSession(spb.CreateSessionRequest(session_id=sid, layers=["base"]), timeout=30)
    values = np.random.default_rng(11).standard_normal((2048, 768), np.float32)
    prompt = pb.Tensor(shape=[2048, 768], dtype=pb.BFLOAT16,
                       raw_data=(values.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    kinds = {"budget": 0, "pool": 0, "transport": 0}

    def refusal(e):
        kind = ("pool" if "kv_cache_bytes" in e.details() else "budget" if "memory budget" in e.details()
                else "transport" if "RST_STREAM with error code 11" in e.details() else None)
        expect(kind is not None, f"RESOURCE_EXHAUSTED by neither the budget, the pool nor the quota: {e.details()}")
        kinds[kind] += 1

    codes, grown = flood(s, lambda it=iter(ids): sessions.Append.future(
        spb.AppendRequest(session_id=next(it), layer="base", query=prompt), timeout=120), 64, refusal)
    held = {sid: sessions.GetSession(spb.GetSessionRequest(session_id=sid), timeout=30) for sid in ids}
    empty_but_holding = [sid for sid, g in held.items() if g.tokens == 0 and g.bytes > 0]
    for sid in ids:
        sessions.CloseSession(spb.CloseSessionRequest(session_id=sid), timeout=30)
    print(f"    64 x 2048-token BFLOAT16 prompts at once: {codes}, refused by {kinds}; "
          f"RSS peak +{grown:.0f} MiB (budget {BUDGET_MIB})")
    expect(codes.get("OK", 0) > 0 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"codes {codes}")
    expect(not empty_but_holding, f"refused appends still hold KV blocks: {empty_but_holding[:4]}")
    expect(s.metric("attnserve_kv_cache_blocks", 'state="used"') == 0, "the pool was not given back")
    expect(reservations_released(s), "reservations not released")
    if not os.environ.get("ATTNSERVE_SANITIZE"):
        expect(grown < 2 * BUDGET_MIB, f"RSS grew {grown:.0f} MiB under a {BUDGET_MIB} MiB budget")


def case_chunked_prefills_stay_within_the_budget(s):
    """11 sessions each prefilling 1400 tokens on `small` at once, asking per-head weights: a 31 MiB answer each,
    computed in 64-token chunks whose answers were held outside the budget until the last chunk merged them
    (with a copy of them all), and the answer encoded (a copy more): all 11 admitted, RSS +307 MiB over the
    256 MiB budget. The chunks' answers and their merge are now reserved before the first chunk runs, and the
    answer goes out from the merge: 3 admitted, the rest refused, +117 MiB."""
    from attnserve.v1 import session_pb2 as spb  # noqa: E402
    from attnserve.v1 import session_pb2_grpc as spbg  # noqa: E402
    sessions = spbg.SessionServiceStub(s.channel)
    ids = [f"chunked-{i}" for i in range(11)]  # 11 x 1400 tokens of E=256 fill the 32 MiB KV pool
    for sid in ids:
        sessions.CreateSession(spb.CreateSessionRequest(session_id=sid, layers=["small"]), timeout=30)
    prompt = tensor([1400, 256])
    time.sleep(2.5)  # the server gives freed memory back once a second while idle
    codes, grown = flood(s, lambda it=iter(ids): sessions.Append.future(
        spb.AppendRequest(session_id=next(it), layer="small", query=prompt, need_weights=True,
                          average_attn_weights=False), timeout=120), len(ids), refused_by_the_budget)
    for sid in ids:
        sessions.CloseSession(spb.CloseSessionRequest(session_id=sid), timeout=30)
    print(f"    11 x 1400-token prefills with per-head weights (31 MiB answers) at once: {codes}; "
          f"RSS peak +{grown:.0f} MiB (budget {BUDGET_MIB})")
    expect(codes.get("OK", 0) > 0 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"codes {codes}")
    expect(codes.get("RESOURCE_EXHAUSTED", 0) > 0, "11 x 62 MiB of answers held at once, none refused")
    expect(reservations_released(s), "reservations not released")
    if not os.environ.get("ATTNSERVE_SANITIZE"):
        # The requests are 15 MiB in all: nothing else the server holds comes near the budget.
        expect(grown < BUDGET_MIB, f"RSS grew {grown:.0f} MiB under a {BUDGET_MIB} MiB budget")


def case_cross_attention_opens_take_turns(s):
    """CreateSession calls with cross-attention memories, 40 at once, while a client sends Infer: each memory's
    projection (a matmul per layer) once ran on the gRPC thread that received it, as many at once as arrived,
    each with its own OpenMP team (another client's p99 rose from 0.7 ms to 400 ms in bench/session_opens.py).
    They now wait for one opener thread, which projects 512 rows at a time on a share of the CPUs; then 8 more
    whose deadline passes while they wait or project. Every call gets OK or RESOURCE_EXHAUSTED (the budget, the
    KV pool or the opener's queue) or DEADLINE_EXCEEDED, and the pool and the budget are given back."""
    from attnserve.v1 import session_pb2 as spb  # noqa: E402
    from attnserve.v1 import session_pb2_grpc as spbg  # noqa: E402
    sessions = spbg.SessionServiceStub(s.channel)
    # 1 MiB, its keys and values 2 MiB in the 32 MiB KV pool; and 4 MiB (8 MiB), about 10 ms to project.
    memories = {rows: tensor([rows, 256]) for rows in (1024, 4096)}
    stop, latencies = threading.Event(), []
    known = request("small", [1, 16, 256], "beside")

    def client():
        while not stop.is_set():
            t = time.perf_counter()
            s.stub.Infer(known, timeout=60)
            latencies.append(time.perf_counter() - t)

    beside = threading.Thread(target=client)
    beside.start()
    ids = iter(range(1000))

    def open_one(timeout, rows):
        return sessions.CreateSession.future(spb.CreateSessionRequest(
            session_id=f"cross-{next(ids)}", layers=["small"], memory={"small": memories[rows]}), timeout=timeout)

    def close_all():
        for i in range(next(ids)):
            try:
                sessions.CloseSession(spb.CloseSessionRequest(session_id=f"cross-{i}"), timeout=30)
            except grpc.RpcError as e:
                expect(e.code() == grpc.StatusCode.NOT_FOUND, f"CloseSession: {e.code()} {e.details()}")

    def refused(e):
        expect(any(m in e.details() for m in ("memory budget", "KV cache", "waiting to be opened",
                                             "RST_STREAM with error code 11")),
               f"RESOURCE_EXHAUSTED for another reason: {e.details()}")

    try:
        codes, grown = flood(s, lambda: open_one(120, 1024), 40, refused)
        close_all()
        late, _ = flood(s, lambda: open_one(0.03, 4096), 8, refused)
        close_all()
    finally:
        stop.set()
        beside.join()
    p99 = sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1e3 if latencies else float("nan")
    print(f"    40 opens with [1024, 256] memories at once: {codes}, RSS peak +{grown:.0f} MiB; 8 of [4096, 256] with a "
          f"30 ms deadline: {late}; the Infer client beside them: {len(latencies)} calls, p99 {p99:.1f} ms")
    expect(codes.get("OK", 0) > 0 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"codes {codes}")
    expect(set(late) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, f"codes with a deadline {late}")
    expect(s.metric("attnserve_kv_cache_blocks", 'state="used"') == 0, "the pool was not given back")
    expect(reservations_released(s), "reservations not released")


def case_half_sent_requests_do_not_stall_metrics(s):
    """Four half-sent HTTP requests held open on the metrics port: once every scrape waited for them (the
    exposer served with 2 threads and no timeout)."""
    import socket
    held = []
    for _ in range(4):
        c = socket.create_connection(("127.0.0.1", s.metrics_port))
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: the request never ends
        held.append(c)
    try:
        t = time.time()
        text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10).read().decode()
        took = time.time() - t
        expect("attnserve_requests_total" in text, "no metrics in the scrape")
        expect(took < scrape_bound_s(), f"the scrape took {took:.1f} s behind half-sent requests")
    finally:
        for c in held:
            c.close()


# ---- raw HTTP/2 and connection-level floods (h2_raw.py: our own frames over a plain TCP socket) ---------

def sanitized():
    return bool(os.environ.get("ATTNSERVE_SANITIZE"))


def scrape_bound_s():
    """How long a /metrics scrape may take behind slow connections: they must not stall it. 4 s under a
    sanitizer, which formats the page several times slower: still below the exposer's 5 s request timeout, after
    which a half-sent request frees its thread anyway (a scrape that waited for that is a stall)."""
    return 4.0 if sanitized() else 2.0


class RssWatch:
    """The server's RSS before, its peak while the block runs (sampled every 100 ms) and, after settle(),
    what is left."""

    def __init__(self, s):
        self.s = s

    def __enter__(self):
        self.before = self.s.rss_kib()
        self.peak = self.before
        self.after = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.s.rss_kib())
            except (OSError, IndexError):
                return
            self._stop.wait(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def settle(self, seconds=3.0):
        time.sleep(seconds)
        self.after = self.s.rss_kib()

    def returned_within(self, limit_mib, seconds):
        """Seconds until the RSS is back within limit_mib of where it was before (sampled every 250 ms), or
        None if it is not within `seconds`; `after` is the last sample."""
        start = time.monotonic()
        while True:
            self.after = self.s.rss_kib()
            waited = time.monotonic() - start
            if (self.after - self.before) / 1024 < limit_mib:
                return waited
            if waited >= seconds:
                return None
            time.sleep(0.25)

    def peak_mib(self):
        return (self.peak - self.before) / 1024

    def line(self):
        out = f"RSS {self.before / 1024:.0f} MiB, peak +{self.peak_mib():.0f} MiB"
        if self.after is not None:
            out += f", +{(self.after - self.before) / 1024:.0f} MiB 3 s after"
        return out

    def check(self, what):
        # A sanitizer's allocator keeps freed memory in quarantine: RSS says nothing there.
        if not sanitized():
            expect(self.peak_mib() < BUDGET_MIB,
                   f"{what}: RSS grew {self.peak_mib():.0f} MiB (budget {BUDGET_MIB} MiB)")


def served_on_new_connection(s, timeout=None):
    """The known-shaped small request on a connection of its own (not shared with the suite's channel):
    its latency in seconds; raises Failed when it is not answered within `timeout` (default 5 s; 30 s under a
    sanitizer, where gRPC works through what a flood left several times slower)."""
    if timeout is None:
        timeout = 30.0 if sanitized() else 5.0
    ch = grpc.insecure_channel(f"127.0.0.1:{s.port}", options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        t = time.time()
        pbg.AttentionServiceStub(ch).Infer(request("small", [1, 8, 256]), timeout=timeout)
        return time.time() - t
    except grpc.RpcError as e:
        raise Failed(f"a normal request on a new connection failed: {e.code().name} {e.details()}") from None
    finally:
        ch.close()


class Flood:
    """`workers` threads running body(i, stop) until `seconds` pass or they return; meanwhile, after `probe_at`
    seconds, a normal request on a new connection (its latency or its failure is kept, not raised), given
    `probe_timeout` seconds (default 5; 30 under a sanitizer, where gRPC works through a flood several times
    slower). The flood goes on while the probe waits, for up to 5 s after it started: a sanitized server's probe
    may be answered after the flood, which a longer flood would only delay further."""

    def __init__(self, s, body, workers, seconds, probe_at=1.0, probe_timeout=None):
        self.stop = threading.Event()
        self.errors = []
        threads = [threading.Thread(target=self._run, args=(body, i), daemon=True) for i in range(workers)]
        probe = threading.Thread(target=self._probe, args=(s, probe_timeout), daemon=True)
        t0 = time.time()
        for t in threads:
            t.start()
        self.probe = None
        self.probe_error = None
        self.stop.wait(probe_at)
        probe_started = time.time()
        probe.start()

        def flooding():
            if not any(t.is_alive() for t in threads):
                return False
            return time.time() - t0 < seconds or (probe.is_alive() and time.time() - probe_started < 5.0)

        while flooding():
            time.sleep(0.05)
        self.stop.set()
        for t in threads:
            t.join(30)
        self.seconds = time.time() - t0
        probe.join(60)
        if self.probe is None and self.probe_error is None:
            self.probe_error = "the probe did not return within 60 s of the flood's end"

    def _probe(self, s, timeout):
        try:
            self.probe = served_on_new_connection(s, timeout)
        except Failed as e:
            self.probe_error = str(e)

    def _run(self, body, i):
        try:
            body(i, self.stop)
        except Exception as e:  # noqa: BLE001 (reported by the case)
            self.errors.append(f"{type(e).__name__}: {e}")

    def probe_line(self):
        if self.probe_error:
            return f"others NOT served ({self.probe_error})"
        return f"others served ({self.probe * 1000:.0f} ms)"

    def check(self):
        expect(not self.errors, f"flood thread failed: {self.errors[:2]}")
        expect(self.probe_error is None, f"during the flood: {self.probe_error}")


def check_reset_flood_stopped(s, flood, rss, stopped, what):
    """What the reset-flood guard must achieve against a rapid reset (CVE-2023-44487, which gRPC 1.51 alone let
    queue 4-7 GiB and answer no one for 20-40 s): flooding connections shut down, others served during the
    flood and right after it, and the memory near the budget (twice it: the guard acts every 100 ms, and the
    flood allocates meanwhile)."""
    flood.check()
    expect(stopped >= 1, f"{what}: the reset-flood guard shut no flooding connection down")
    latency = served_on_new_connection(s)
    print(f"    served {latency * 1000:.0f} ms after it")
    if not sanitized():
        expect(rss.peak_mib() < 2 * BUDGET_MIB,
               f"{what}: RSS grew {rss.peak_mib():.0f} MiB (at most twice the {BUDGET_MIB} MiB budget)")


def reset_pairs(first_stream, count, block):
    """`count` HEADERS (header block `block`) each followed by its RST_STREAM, on client streams from
    `first_stream` (odd) on: the bytes of one write."""
    frames = []
    for sid in range(first_stream, first_stream + 2 * count, 2):
        frames.append(h2.headers(sid, block))
        frames.append(h2.rst_stream(sid))
    return b"".join(frames)


def case_rapid_reset(s):
    """CVE-2023-44487: HEADERS + RST_STREAM pairs as fast as they go on 3 connections for 5 s (reconnecting
    when the server closes one): check_reset_flood_stopped."""
    block = h2.grpc_request_headers()
    pairs = [0, 0, 0]
    reconnects = [0]
    endings = {}

    def body(i, stop):
        while not stop.is_set():
            c = h2.Connection(s.port, timeout=2)
            reader = h2.Reader(c)
            sid = 1
            try:
                while not stop.is_set() and sid < (1 << 31) - 400:
                    c.send(reset_pairs(sid, 100, block))
                    sid += 200
                    pairs[i] += 100
            except h2.Closed:
                pass
            reader.stop()
            c.close()
            if not stop.is_set():
                reconnects[0] += 1
                key = reader.summary()
                endings[key] = endings.get(key, 0) + 1

    stopped_before = s.metric("attnserve_reset_floods_stopped_total")
    with RssWatch(s) as rss:
        flood = Flood(s, body, workers=3, seconds=5.0)
    rss.settle(3.0)
    total = sum(pairs)
    stopped = s.metric("attnserve_reset_floods_stopped_total") - stopped_before
    print(f"    rapid_reset: {total} HEADERS+RST_STREAM pairs on 3 connections in {flood.seconds:.1f} s "
          f"({total / flood.seconds:.0f}/s), {reconnects[0]} reconnects {endings or ''}; {stopped:.0f} connections "
          f"shut down by the reset-flood guard; {rss.line()}; {flood.probe_line()}")
    check_reset_flood_stopped(s, flood, rss, stopped, "rapid reset")


def case_rapid_reset_reconnecting(s):
    """The rapid reset that escapes the reset-flood guard: each connection sends 900 HEADERS + RST_STREAM pairs
    (below the guard's 1000 streams) and is closed, and the next one opened, on 3 threads for 5 s. The guard
    cannot see it (channelz forgets a closed connection); what bounds it is that closing a connection ends its
    streams. Others must be served during it and right after it, and the memory must come back."""
    block = h2.grpc_request_headers()
    pairs = [0, 0, 0]
    connections = [0]

    def body(i, stop):
        while not stop.is_set():
            try:
                c = h2.Connection(s.port, timeout=2)
            except OSError:
                continue  # the connection cap refused it: try again
            reader = h2.Reader(c)
            try:
                c.send(reset_pairs(1, 900, block))
                pairs[i] += 900
            except h2.Closed:
                pass
            reader.stop()
            c.close()
            connections[0] += 1

    with RssWatch(s) as rss:
        flood = Flood(s, body, workers=3, seconds=5.0)
    rss.settle(3.0)
    total = sum(pairs)
    print(f"    rapid reset, reconnecting: {total} HEADERS+RST_STREAM pairs on {connections[0]} connections in "
          f"{flood.seconds:.1f} s ({total / flood.seconds:.0f}/s); {rss.line()}; {flood.probe_line()}")
    flood.check()
    latency = served_on_new_connection(s)
    print(f"    served {latency * 1000:.0f} ms after it")
    # Its peak is not bounded by the budget (+202 to +579 MiB here; what remains of issue #9): what is required is
    # that others are served and that the memory comes back. Within 3 s in most runs; in about one of four, gRPC
    # is still retiring the streams' calls then, so it gets up to 20 s more.
    if not sanitized():
        waited = rss.returned_within(64, 20.0)
        left = (rss.after - rss.before) / 1024
        print(f"    RSS within 64 MiB of before {'after %.1f s more' % waited if waited is not None else 'never'}"
              f" (+{left:.0f} MiB)")
        expect(waited is not None,
               f"rapid reset, reconnecting: RSS still +{left:.0f} MiB 20 s after the check at 3 s")


def case_rapid_reset_of_whole_requests(s):
    """HEADERS + a whole small request (DATA, END_STREAM) + RST_STREAM, 4 s on 2 connections: each request
    is admitted, maybe queued or computing, when its reset comes; all must be released (in-flight back to
    0), and the streams the server never finished make it a flood all the same: check_reset_flood_stopped."""
    block = h2.grpc_request_headers()
    msg = h2.grpc_message(request("small", [1, 64, 256]).SerializeToString())
    sent = [0, 0]

    def body(i, stop):
        while not stop.is_set():
            c = h2.Connection(s.port, timeout=2)
            reader = h2.Reader(c)
            sid = 1
            try:
                while not stop.is_set():
                    batch = []
                    for _ in range(20):
                        batch += [h2.headers(sid, block), h2.data(sid, msg, end_stream=True), h2.rst_stream(sid)]
                        sid += 2
                    c.send(b"".join(batch))
                    sent[i] += 20
            except h2.Closed:
                pass
            reader.stop()
            c.close()

    cancelled_before = s.metric("attnserve_requests_total", 'code="CANCELLED"')
    ok_before = s.metric("attnserve_requests_total", 'code="OK",layer="small"')
    stopped_before = s.metric("attnserve_reset_floods_stopped_total")
    with RssWatch(s) as rss:
        flood = Flood(s, body, workers=2, seconds=4.0)
    rss.settle(2.0)
    cancelled = s.metric("attnserve_requests_total", 'code="CANCELLED"') - cancelled_before
    ok = s.metric("attnserve_requests_total", 'code="OK",layer="small"') - ok_before
    stopped = s.metric("attnserve_reset_floods_stopped_total") - stopped_before
    print(f"    rapid reset of whole requests: {sum(sent)} sent and reset in {flood.seconds:.1f} s; counted "
          f"{cancelled:.0f} CANCELLED, {ok:.0f} OK; {stopped:.0f} connections shut down by the reset-flood guard; "
          f"{rss.line()}; {flood.probe_line()}")
    check_reset_flood_stopped(s, flood, rss, stopped, "rapid reset of whole requests")


def case_ping_flood(s):
    """CVE-2019-9512: PINGs as fast as they go (up to 200,000, 3 s) on a connection that reads nothing, so the
    PING ACKs queue in the server. Others must be served; the server may close the connection (keepalive
    enforcement: GOAWAY ENHANCE_YOUR_CALM); what it did is printed."""
    c = h2.Connection(s.port)
    sent = [0]
    closed = [None]

    def body(i, stop):
        batch = b"".join(h2.ping(struct.pack(">Q", n)) for n in range(1000))
        try:
            while not stop.is_set() and sent[0] < 200_000:
                c.send(batch)
                sent[0] += 1000
        except h2.Closed as e:
            closed[0] = str(e)

    with RssWatch(s) as rss:
        flood = Flood(s, body, workers=1, seconds=3.0)
    counts = c.drain(2.0)  # now read what the server answered
    c.close()
    outcome = f"send failed after {sent[0]} ({closed[0]})" if closed[0] else f"all {sent[0]} sent"
    goaway = f"GOAWAY {h2.error_name(c.goaway[1])} {c.goaway[2][:40]!r}" if c.goaway else "no GOAWAY"
    print(f"    ping_flood: {outcome} in {flood.seconds:.1f} s; server answered {counts.get('PING', 0)} PING ACKs, "
          f"{goaway}, {'closed' if c.eof else 'open'}; {rss.line()}; {flood.probe_line()}")
    flood.check()
    rss.check("ping flood")


def case_continuation_flood(s):
    """The 2024 CONTINUATION flood: HEADERS without END_HEADERS, then 16 KiB CONTINUATIONs of small literal
    headers without end (up to 64 MiB or 5 s). The server must close the connection or hold its memory, and
    serve others."""
    c = h2.Connection(s.port)
    reader = h2.Reader(c)
    field = h2.literal("x-pad-0000", "v" * 100)
    chunk = field * (16384 // len(field))
    sent = [0]
    closed = [None]

    def body(i, stop):
        try:
            c.send(h2.headers(1, h2.grpc_request_headers(), end_headers=False))
            frame = h2.continuation(1, chunk)
            while not stop.is_set() and sent[0] < (64 << 20):
                c.send(frame * 16)
                sent[0] += 16 * len(chunk)
        except h2.Closed as e:
            closed[0] = str(e)

    with RssWatch(s) as rss:
        flood = Flood(s, body, workers=1, seconds=5.0)
    time.sleep(0.5)
    reader.stop()
    c.close()
    rss.settle(2.0)
    what = f"the server closed it ({reader.summary()})" if closed[0] or c.eof else \
        f"connection still open ({reader.summary()})"
    print(f"    continuation_flood: {sent[0] >> 10} KiB of CONTINUATION in {flood.seconds:.1f} s, {what}; "
          f"{rss.line()}; {flood.probe_line()}")
    flood.check()
    rss.check("CONTINUATION flood")


def server_cpu_seconds(s):
    """User + system CPU time of the server process so far."""
    with open(f"/proc/{s.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def case_continuation_flood_of_one_huge_value(s):
    """HEADERS without END_HEADERS that start one header value declared 64 MiB long, then 16 KiB CONTINUATIONs
    of its bytes (up to 64 MiB or 5 s), on 2 connections. gRPC 1.51 parses the value again from its start at
    each frame: a core per connection while its bytes wait unread (measured before the stalled-read rule: 2
    connections, both cores for as long as they send). The server must shut them down (stalled reads, within
    transport.stalled_read_timeout_ms and a check), hold its memory, and serve others. Its copies of the value,
    a bit larger at each frame, land on free heap space an earlier case left (after rapid_reset_reconnecting:
    +266 and +341 MiB in CI, +37 MiB on a fresh server) unless the RSS's growth is trimmed as it comes."""
    start = h2.grpc_request_headers() + b"\x00" + h2.hpack_string("x-huge") + h2.hpack_int(64 << 20, 7)
    frame = h2.continuation(1, b"v" * 16384)
    conns = [h2.Connection(s.port, timeout=3) for _ in range(2)]
    readers = [h2.Reader(c) for c in conns]
    sent = [0, 0]
    closed = [None, None]

    def body(i, stop):
        try:
            conns[i].send(h2.headers(1, start, end_headers=False))
            while not stop.is_set() and sent[i] < (64 << 20) - (1 << 18):
                conns[i].send(frame * 16)
                sent[i] += 16 * 16384
        except h2.Closed as e:
            closed[i] = str(e)

    stalled_before = s.metric("attnserve_connections_stalled_total")
    trims_before = s.metric("attnserve_heap_trims_total", 'reason="growth"')
    cpu_before = server_cpu_seconds(s)
    t0 = time.time()
    with RssWatch(s) as rss:
        # Others wait while both cores parse (3.4 s for the probe here): the probe is given the rule's time.
        flood = Flood(s, body, workers=2, seconds=5.0, probe_timeout=30.0 if sanitized() else 8.0)
    deadline = time.time() + (20 if sanitized() else 6)  # the rule's 3 s, a 1 s check, and a margin
    while not all(c.eof for c in conns) and time.time() < deadline:
        time.sleep(0.1)
    ended_after = time.time() - t0
    ended = [c.eof for c in conns]
    for r in readers:
        r.stop()
    for c in conns:
        c.close()
    cpu = server_cpu_seconds(s) - cpu_before
    rss.settle(2.0)
    stalled = s.metric("attnserve_connections_stalled_total") - stalled_before
    trims = s.metric("attnserve_heap_trims_total", 'reason="growth"') - trims_before
    print(f"    continuation_flood of one 64 MiB value, 2 connections: {sum(sent) >> 10} KiB sent; "
          f"{sum(ended)} of 2 closed by the server within {ended_after:.1f} s, {stalled:.0f} counted as stalled; "
          f"server CPU {cpu:.1f} s; {rss.line()} ({trims:.0f} growth trims); {flood.probe_line()}")
    flood.check()
    rss.check("CONTINUATION flood of one value")
    expect(all(ended), f"the server left {2 - sum(ended)} of the 2 connections open {ended_after:.1f} s after "
                       "their header began")
    expect(stalled >= 2, f"attnserve_connections_stalled_total rose by {stalled:.0f}, not 2")


class FrameFlood:
    """A Flood body sending `batch` (`frames` frames) on connection `c` until stopped or `cap` frames went,
    after `first` (e.g. a call's HEADERS); counts what it sent, and keeps why the server closed it, if it did."""

    def __init__(self, c, batch, frames, cap, first=b""):
        self.c, self.batch, self.frames, self.cap, self.first = c, batch, frames, cap, first
        self.sent = 0
        self.closed = None

    def __call__(self, i, stop):
        try:
            if self.first:
                self.c.send(self.first)
            while not stop.is_set() and self.sent < self.cap:
                self.c.send(self.batch)
                self.sent += self.frames
        except h2.Closed as e:
            self.closed = str(e)

    def then(self):
        return f" (then: {self.closed})" if self.closed else ""


def case_settings_flood(s):
    """SETTINGS frames as fast as they go (3 s) on a connection that reads nothing: each needs an ACK."""
    c = h2.Connection(s.port)
    body = FrameFlood(c, b"".join(h2.settings([(h2.SETTINGS_INITIAL_WINDOW_SIZE, 65535 + n),
                                                (h2.SETTINGS_ENABLE_PUSH, 0)]) for n in range(1000)), 1000, 300_000)
    with RssWatch(s) as rss:
        flood = Flood(s, body, workers=1, seconds=3.0)
    counts = c.drain(1.5)
    c.close()
    print(f"    settings_flood: {body.sent} SETTINGS in {flood.seconds:.1f} s{body.then()}; server answered {counts}"
          f"{', GOAWAY ' + h2.error_name(c.goaway[1]) if c.goaway else ''}; {rss.line()}; {flood.probe_line()}")
    flood.check()
    rss.check("SETTINGS flood")


def flood_an_open_call(s, name, what, batch, cap):
    """`batch` (1,000 frames) as fast as it goes (3 s, at most `cap` frames) after opening a call: the server
    must keep serving others and hold its memory; what it sent back is printed."""
    c = h2.Connection(s.port)
    reader = h2.Reader(c)
    body = FrameFlood(c, batch, 1000, cap, first=h2.headers(1, h2.grpc_request_headers()))
    with RssWatch(s) as rss:
        flood = Flood(s, body, workers=1, seconds=3.0)
    time.sleep(0.3)
    reader.stop()
    c.close()
    print(f"    {name}: {body.sent} {what} in {flood.seconds:.1f} s{body.then()}; "
          f"server: {reader.summary()}; {rss.line()}; {flood.probe_line()}")
    flood.check()
    rss.check(f"{what} flood")


def case_window_update_flood(s):
    """WINDOW_UPDATE frames of increment 1 on the connection and on an open stream (3 s)."""
    flood_an_open_call(s, "window_update_flood", "WINDOW_UPDATE",
                       b"".join(h2.window_update(n & 1, 1) for n in range(1000)), 300_000)


def case_empty_data_frame_flood(s):
    """CVE-2019-9518: zero-length DATA frames without END_STREAM on an open call (3 s)."""
    flood_an_open_call(s, "empty_data_flood", "empty DATA frames", h2.data(1, b"") * 1000, 1_000_000)


def case_many_streams_on_one_connection(s):
    """5000 calls opened (HEADERS) on one connection and never sent a byte of their request, held 3 s: the
    server must bound them (SETTINGS_MAX_CONCURRENT_STREAMS, REFUSED_STREAM) or at least its memory, and
    serve others."""
    c = h2.Connection(s.port)
    reader = h2.Reader(c)
    block = h2.grpc_request_headers()
    opened = [0]
    closed = [None]

    def body(i, stop):
        try:
            for k in range(50):
                c.send(b"".join(h2.headers(1 + 2 * (k * 100 + j), block) for j in range(100)))
                opened[0] += 100
        except h2.Closed as e:
            closed[0] = str(e)

    with RssWatch(s) as rss:
        flood = Flood(s, body, workers=1, seconds=3.0, probe_at=1.0)
    reader.stop()
    c.close()
    rss.settle(1.0)
    print(f"    many_streams: {opened[0]} streams opened{' (then: ' + closed[0] + ')' if closed[0] else ''}; "
          f"server: {reader.summary()}; {rss.line()}; {flood.probe_line()}")
    flood.check()
    rss.check("5000 streams")


def case_slowloris_on_the_grpc_port(s):
    """300 connections that send half the HTTP/2 preface and wait (4 s): the server must serve others."""
    conns = []
    for _ in range(300):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        c.sendall(h2.PREFACE[:12])
        conns.append(c)
    t = time.time()
    latency = served_on_new_connection(s)
    time.sleep(max(0.0, 4.0 - (time.time() - t)))
    closed = 0
    for c in conns:
        c.setblocking(False)
        try:
            if c.recv(4096) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        c.close()
    print(f"    slowloris_grpc: 300 half prefaces held 4 s, {closed} closed by the server; others served "
          f"({latency * 1000:.0f} ms)")


def case_slow_connections_do_not_stall_metrics(s):
    """32 half-sent requests on the metrics port, each trickling a header byte every 0.5 s: scrapes must stay
    prompt (5 scrapes)."""
    held = []
    for _ in range(32):
        c = socket.create_connection(("127.0.0.1", s.metrics_port), timeout=5)
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        held.append(c)
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.5):
            for c in held:
                try:
                    c.sendall(b"a")
                except OSError:
                    pass

    th = threading.Thread(target=trickle, daemon=True)
    th.start()
    took = []
    try:
        for _ in range(5):
            t = time.time()
            text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10).read().decode()
            took.append(time.time() - t)
            expect("attnserve_requests_total" in text, "no metrics in the scrape")
            if took[-1] >= 2:
                break
            time.sleep(0.3)
    finally:
        stop.set()
        th.join()
        for c in held:
            c.close()
    print(f"    32 slow metrics connections: {len(took)} scrapes, slowest {max(took) * 1000:.0f} ms")
    expect(max(took) < scrape_bound_s(), f"a scrape took {max(took):.1f} s behind 32 slow connections")


def case_huge_metadata_value_refused(s):
    """A call with a 1 MiB header value: refused (RESOURCE_EXHAUSTED, the metadata limit), nothing logged
    whole, and the server serves on."""
    with RssWatch(s) as rss:
        try:
            s.stub.Infer(request("small", [1, 4, 256]), metadata=(("x-huge", "v" * (1 << 20)),), timeout=30)
            raise Failed("answered")
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
    print(f"    1 MiB header value: {code.name} {details[:100]!r}; {rss.line()}")
    expect(code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE),
           f"expected RESOURCE_EXHAUSTED or the connection closed, got {code.name}: {details[:200]}")
    expect(len(details) < 1024, f"error message of {len(details)} bytes")
    longest = max(len(line) for line in open(s.log_path, errors="replace"))
    expect(longest < 4096, f"a log line of {longest} bytes")
    rss.check("1 MiB header")


def case_ten_thousand_headers_refused(s):
    """A call with 10,000 small headers (~150 KiB): refused, the server serves on. gRPC 1.51 answers
    RESOURCE_EXHAUSTED, or closes that connection while the headers still come (the client then sees
    UNAVAILABLE): either way only the offending connection's calls fail."""
    md = tuple((f"x-h{i}", "v") for i in range(10_000))
    t = time.time()
    try:
        s.stub.Infer(request("small", [1, 4, 256]), metadata=md, timeout=30)
        raise Failed("answered")
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    print(f"    10000 headers: {code.name} {details[:100]!r} in {(time.time() - t) * 1000:.0f} ms")
    expect(code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE),
           f"expected RESOURCE_EXHAUSTED or the connection closed, got {code.name}: {details[:200]}")


def raw_call(s, header_block, body, timeout=10.0):
    """One call on a connection of its own: HEADERS, then `body` as DATA (split and flow-controlled)."""
    c = h2.Connection(s.port)
    try:
        c.send(h2.headers(1, header_block))
        c.send_body(1, body, seconds=timeout)
        return c.read_call(1, timeout)
    finally:
        c.close()


def case_invalid_protobuf_in_a_raw_data_frame(s):
    """gRPC messages that are not the method's request (a truncated varint; a field with a length past the end;
    a wrong wire type), each on its own call to each method that computes (Infer, KServe's ModelInfer, Append
    and their streams): INVALID_ARGUMENT naming the message. Not UNIMPLEMENTED, which gRPC 1.51's callback API
    answers a unary call when it parses the request itself (telling the client the method does not exist), and
    not OK, with which it ends such a stream (the request silently dropped)."""
    bodies = {"0xff x 5": b"\xff" * 5, "length past the end": b"\x0a\xff\xff\x03abc", "truncated fixed32": b"\x0d\x01"}
    methods = {h2.INFER_PATH: "attnserve.v1.InferRequest",
               "/inference.GRPCInferenceService/ModelInfer": "inference.ModelInferRequest",
               "/attnserve.v1.SessionService/Append": "attnserve.v1.AppendRequest",
               h2.INFER_STREAM_PATH: "attnserve.v1.InferRequest",
               "/inference.GRPCInferenceService/ModelStreamInfer": "inference.ModelInferRequest",
               "/attnserve.v1.SessionService/AppendStream": "attnserve.v1.AppendRequest"}
    bad = []
    for path, message in methods.items():
        for name, payload in bodies.items():
            reply = raw_call(s, h2.grpc_request_headers(path), h2.grpc_message(payload))
            print(f"    invalid protobuf to {path.rsplit('/', 1)[1]} ({name}): {h2.describe(reply)}")
            if reply["status"] != grpc.StatusCode.INVALID_ARGUMENT.value[0] or message not in reply["message"]:
                bad.append(f"{path} {name}: {h2.describe(reply)}")
    expect(not bad, "expected INVALID_ARGUMENT naming the message: " + "; ".join(bad))
    # A unary call closed with no message at all: INVALID_ARGUMENT too, not a run of an empty request.
    for path in list(methods)[:3]:
        c = h2.Connection(s.port)
        try:
            c.send(h2.headers(1, h2.grpc_request_headers(path), end_stream=True))
            reply = c.read_call(1, 10.0)
        finally:
            c.close()
        print(f"    no message to {path.rsplit('/', 1)[1]}: {h2.describe(reply)}")
        expect(reply["status"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "got none" in reply["message"],
               f"{path} without a message: {h2.describe(reply)}")
    # On each stream, a request then bad bytes: the request is answered (an error for the unknown session)
    # before the stream ends INVALID_ARGUMENT.
    from attnserve.v1 import session_pb2 as session_pb  # noqa: E402 (generated by generate_stubs)
    firsts = {h2.INFER_STREAM_PATH: request("small", [1, 4, 256], "good"),
              "/inference.GRPCInferenceService/ModelStreamInfer": kserve_request("small", [1, 4, 256], "good"),
              "/attnserve.v1.SessionService/AppendStream": session_pb.AppendRequest(session_id="none", layer="small")}
    for path, first in firsts.items():
        reply = raw_call(s, h2.grpc_request_headers(path),
                         h2.grpc_message(first.SerializeToString()) + h2.grpc_message(b"\xff" * 5))
        answers, data = 0, reply["data"]
        while len(data) >= 5:
            answers, data = answers + 1, data[5 + int.from_bytes(data[1:5], "big"):]
        print(f"    {path.rsplit('/', 1)[1]}, a request then bad bytes: {answers} answer(s); {h2.describe(reply)}")
        expect(answers == 1, f"{path}: the request before the bad bytes was not answered ({answers} answers)")
        expect(reply["status"] == grpc.StatusCode.INVALID_ARGUMENT.value[0], f"{path} ended {h2.describe(reply)}")


def case_length_prefix_of_2_gib(s):
    """A gRPC length prefix claiming 2 GiB followed by 3 bytes, the call left open 3 s, then the connection
    closed: nothing of that size may be reserved, and the call must be released."""
    c = h2.Connection(s.port)
    with RssWatch(s) as rss:
        c.send(h2.headers(1, h2.grpc_request_headers()) + h2.data(1, h2.grpc_message(b"abc", length=(1 << 31) - 1)))
        reply = c.read_call(1, timeout=3.0)
        c.close()
    print(f"    2 GiB length prefix + 3 bytes: within 3 s the server {h2.describe(reply)}; then closed; {rss.line()}")
    rss.check("2 GiB length prefix")


def case_length_prefix_of_2_gib_then_streaming(s):
    """A length prefix of 2 GiB, then DATA as fast as flow control lets it, for up to 15 s or 1 GiB (more under
    the sanitizers, whose guard headroom is larger).
    gRPC 1.51 does not refuse the message at its prefix (64 MiB limit): it opens the stream's window for the
    whole message and buffers it. Its resource quota (--grpc-memory-bytes, half the budget: 128 MiB here)
    resets the stream only when its reclamation loop gets past the benign reclaimers, which the sender's own
    socket reposts on every read: 10 MiB late on an idle machine, 297 MiB late with a CPU hog here, and CI
    runs saw no reset within 320 MiB and then within 1 GiB. The server's memory guard bounds it: past its RSS
    limit (RSS once serving + budget + twice the quota + KV cache) it shuts down the connection holding the
    most bytes not delivered as messages. Hard: the message is refused within that bound and some slack,
    held once (RSS no more than that bound and slack), and the server serves after it."""
    c = h2.Connection(s.port, initial_settings=((h2.SETTINGS_ENABLE_PUSH, 0),))
    chunk = b"\0" * 16384
    # The guard's limit is over the RSS once serving, which may be tens of MiB above this case's start (the
    # server trims what earlier cases freed): slack for that and for what lands while the guard acts.
    bound_mib = guard_headroom_mib() + 160
    shed_before = s.metric("attnserve_connections_shed_total")
    with RssWatch(s) as rss:
        c.send(h2.headers(1, h2.grpc_request_headers()))
        sent, stopped = c.send_flow_controlled(1, h2.grpc_message(b"", length=(1 << 31) - 1), chunk,
                                               limit=max(1 << 30, (bound_mib + 64) << 20), seconds=15.0)
        reply = c.read_call(1, timeout=2.0)
        c.close()
    sent_mib = sent >> 20
    shed = s.metric("attnserve_connections_shed_total") - shed_before
    by = "the memory guard shut the connection" if shed else "gRPC's quota"
    print(f"    2 GiB prefix then streaming: {sent_mib} MiB sent in {stopped}; server {h2.describe(reply)}; "
          f"refused by {by}; {rss.line()}")
    refused = (reply["status"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] or reply["rst"] or reply["goaway"]
               or reply["eof"] or stopped.startswith("the connection failing"))
    expect(refused, f"no refusal after {sent_mib} MiB of one message: {h2.describe(reply)}")
    expect(sent_mib <= bound_mib, f"refused only after {sent_mib} MiB of one message (bound {bound_mib} MiB)")
    if not sanitized():
        expect(rss.peak_mib() < bound_mib + 64,
               f"RSS grew {rss.peak_mib():.0f} MiB for {sent_mib} MiB sent (allowed {bound_mib + 64} MiB)")


def case_memory_guard_sheds_a_message_grpc_buffers_whole(s):
    """The memory guard alone, on a second server whose gRPC quota (4 GiB) cannot reset the stream first and
    whose guard headroom is 192 MiB: a 2 GiB message streamed on one connection must be shut down within the
    headroom and some slack, while a client on another connection sends 4 MiB requests all along (its bytes
    arrive as messages, so it is never the one shed) and has every one answered. The shed is counted
    (attnserve_connections_shed_total) and logged."""
    headroom_mib = 192
    guarded = Server(s.binary, s.tmp, name="guarded", config=CONFIG + (
        f"transport {{ grpc_memory_bytes: {4 << 30} memory_guard_headroom_bytes: {headroom_mib << 20} }}\n"))
    stop = threading.Event()
    codes = {}

    def legit():
        ch = grpc.insecure_channel(f"127.0.0.1:{guarded.port}", options=[
            ("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE)])
        stub = pbg.AttentionServiceStub(ch)
        q = request("small", [4, 1024, 256])
        while not stop.is_set():
            try:
                stub.Infer(q, timeout=30)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
        ch.close()

    try:
        client = threading.Thread(target=legit, daemon=True)
        client.start()
        c = h2.Connection(guarded.port, initial_settings=((h2.SETTINGS_ENABLE_PUSH, 0),))
        with RssWatch(guarded) as rss:
            c.send(h2.headers(1, h2.grpc_request_headers()))
            sent, stopped = c.send_flow_controlled(1, h2.grpc_message(b"", length=(1 << 31) - 1), b"\0" * 16384,
                                                   limit=1 << 30, seconds=15.0)
            reply = c.read_call(1, timeout=2.0)
            c.close()
            time.sleep(0.5)
        stop.set()
        client.join(timeout=60)
        shed = guarded.metric("attnserve_connections_shed_total")
        logged = [line for line in open(guarded.log_path) if "over its limit" in line]
        print(f"    guard alone: {sent >> 20} MiB sent in {stopped}; server {h2.describe(reply)}; {shed:.0f} shed; "
              f"beside it, 4 MiB requests: {codes}; {rss.line()}")
        if logged:
            print(f"    logged: {logged[0].strip()[-200:]}")
        expect(shed == 1 and logged, f"the guard shed {shed:.0f} connections and logged {len(logged)} lines")
        expect((sent >> 20) <= headroom_mib + 96, f"shed only after {sent >> 20} MiB (headroom {headroom_mib} MiB)")
        expect(set(codes) == {"OK"}, f"the client beside it was not answered every time: {codes}")
        expect(guarded.alive(), "the guarded server died")
        served_on_new_connection(guarded, 10.0)
    finally:
        stop.set()
        guarded.kill()


def case_connection_cap(s):
    """gRPC 1.51 has no bound on connections. A second server with --max-connections 40: 80
    connections that send the HTTP/2 preface and then nothing, while a client on a connection of its own
    keeps sending requests. Within the cap's check (once a second) the 40 beyond it are shut down, idle ones
    only: the client is answered every time, and the count (attnserve_connections_capped_total) says 40."""
    capped = Server(s.binary, s.tmp, name="capped", flags=["--max-connections", "40"])
    stop = threading.Event()
    codes = {}

    def legit():
        ch = grpc.insecure_channel(f"127.0.0.1:{capped.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        stub = pbg.AttentionServiceStub(ch)
        while not stop.is_set():
            try:
                stub.Infer(request("small", [1, 16, 256]), timeout=10)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
            time.sleep(0.01)
        ch.close()

    idle = []
    try:
        client = threading.Thread(target=legit, daemon=True)
        client.start()
        time.sleep(0.3)
        for _ in range(80):
            conn = socket.create_connection(("127.0.0.1", capped.port), timeout=5)
            conn.sendall(h2.PREFACE)
            idle.append(conn)
        time.sleep(3.0)
        closed = 0
        for conn in idle:
            conn.setblocking(False)
            try:
                while True:
                    chunk = conn.recv(65536)  # the server's SETTINGS, then the end if it shut us down
                    if not chunk:
                        closed += 1
                        break
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        stop.set()
        client.join(timeout=30)
        capped_count = capped.metric("attnserve_connections_capped_total")
        print(f"    80 idle connections to a server capped at 40: {closed} closed by it ({capped_count:.0f} counted); "
              f"the client beside them: {codes}")
        expect(closed >= 39, f"only {closed} of 80 idle connections were shut down (cap 40)")
        # 41 connections more than the cap with the client's; 42 while the listener probe's is open (every 5 s,
        # its 33 bytes sent rank it after the idle ones' 24).
        expect(closed <= 42, f"{closed} of 80 idle connections were shut down (cap 40)")
        expect(set(codes) == {"OK"}, f"the client beside them was not answered every time: {codes}")
        served_on_new_connection(capped, 10.0)
    finally:
        stop.set()
        for conn in idle:
            conn.close()
        capped.kill()


def case_many_idle_connections(s):
    """800 TCP connections that never send a byte, held 3 s, then closed: the server must serve during and
    after, and give their descriptors back."""
    fds_before = len(os.listdir(f"/proc/{s.proc.pid}/fd"))
    conns = []
    refused = 0
    for _ in range(800):
        try:
            conns.append(socket.create_connection(("127.0.0.1", s.port), timeout=5))
        except OSError:
            refused += 1
    time.sleep(0.5)
    fds_during = len(os.listdir(f"/proc/{s.proc.pid}/fd"))
    during = served_on_new_connection(s)
    time.sleep(2.5)
    for c in conns:
        c.close()
    deadline = time.time() + 10
    while len(os.listdir(f"/proc/{s.proc.pid}/fd")) > fds_before + 16 and time.time() < deadline:
        time.sleep(0.1)
    fds_after = len(os.listdir(f"/proc/{s.proc.pid}/fd"))
    after = served_on_new_connection(s)
    print(f"    800 idle connections ({refused} refused): server fds {fds_before} -> {fds_during} -> {fds_after}; "
          f"served during ({during * 1000:.0f} ms) and after ({after * 1000:.0f} ms)")
    expect(fds_after <= fds_before + 16, f"{fds_after - fds_before} descriptors not given back")


def case_streams_cancelled_midway(s):
    """20 times: an InferStream sending 100 requests, cancelled after 3 answers. Every request the cancelled
    streams left must be released (the in-flight gauge back to 0, checked after the case)."""
    q = request("small", [1, 64, 256])
    answered = 0
    t = time.time()
    for round_ in range(20):
        def reqs():
            for i in range(100):
                r = pb.InferRequest()
                r.CopyFrom(q)
                r.id = f"{round_}-{i}"
                yield r
        call = s.stub.InferStream(reqs(), timeout=60)
        got = 0
        for _ in call:
            got += 1
            if got == 3:
                call.cancel()
                break
        answered += got
    took = time.time() - t
    deadline = time.time() + (50 if sanitized() else 10)
    while s.metric("attnserve_inflight_requests") != 0 and time.time() < deadline:
        time.sleep(0.05)
    left = s.metric("attnserve_inflight_requests")
    print(f"    20 streams cancelled after 3 answers each: {answered} answers read in {took:.1f} s, "
          f"{left:.0f} in flight after")


def gzip_bomb(inflated):
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    zeros = b"\0" * (1 << 20)
    parts = [z.compress(zeros) for _ in range(inflated >> 20)]
    parts.append(z.flush())
    return b"".join(parts)


def case_gzip_bomb(s):
    """A ~1 MiB gzip message (grpc-encoding gzip) that inflates to 1 GiB: refused (RESOURCE_EXHAUSTED: past
    the 64 MiB receive limit) without inflating it whole."""
    bomb = gzip_bomb(1 << 30)
    with RssWatch(s) as rss:
        t = time.time()
        reply = raw_call(s, h2.grpc_request_headers(extra=[("grpc-encoding", "gzip")]),
                         h2.grpc_message(bomb, compressed=True), timeout=30)
        took = time.time() - t
    print(f"    gzip bomb ({len(bomb) >> 10} KiB -> 1 GiB): {h2.describe(reply)} in {took * 1000:.0f} ms; {rss.line()}")
    # Compression is off (identity only): the request is refused from its grpc-encoding header, before
    # anything is inflated (gRPC 1.51 would inflate all of it, then check the size).
    expect(reply["status"] == grpc.StatusCode.UNIMPLEMENTED.value[0] and "disabled" in (reply.get("message") or ""),
           f"expected UNIMPLEMENTED (compression disabled), got {h2.describe(reply)}")
    rss.check("gzip bomb")


def case_unknown_or_missing_grpc_encoding(s):
    """A gzip-compressed request declared as grpc-encoding "x-bogus", and one with the compressed flag but no
    grpc-encoding: neither may be answered as a valid request (the gRPC spec wants UNIMPLEMENTED and
    INTERNAL; gRPC 1.51 passes such bytes on as they are, so the parse of gzip bytes fails: any error is
    accepted), and both must be answered at once."""
    payload = gzip.compress(request("small", [1, 4, 256]).SerializeToString())
    bogus = raw_call(s, h2.grpc_request_headers(extra=[("grpc-encoding", "x-bogus")]),
                     h2.grpc_message(payload, compressed=True))
    missing = raw_call(s, h2.grpc_request_headers(), h2.grpc_message(payload, compressed=True))
    print(f"    grpc-encoding x-bogus: {h2.describe(bogus)}; compressed flag without grpc-encoding: "
          f"{h2.describe(missing)}")
    for what, reply in (("x-bogus", bogus), ("no grpc-encoding", missing)):
        expect(reply["status"] not in (None, 0) or reply["rst"], f"{what}: {h2.describe(reply)}")


def case_bad_metadata_cannot_flood_the_log(s):
    """2,000 calls (HEADERS + RST_STREAM) whose grpc-encoding or grpc-timeout header does not parse: gRPC 1.51
    logs "Error parsing metadata" for each, on the server's stderr, with no rate limit. The server's log
    must not grow by a line per call (the bound of the warning flood case: < 500 lines)."""
    lines_before = len(open(s.log_path, errors="replace").read().splitlines())
    bad = [h2.grpc_request_headers(extra=[("grpc-encoding", "x-bogus")]),
           h2.grpc_request_headers(extra=[("grpc-timeout", "soon")])]
    c = h2.Connection(s.port)
    reader = h2.Reader(c)
    sent = 0
    try:
        for k in range(20):
            batch = []
            for j in range(100):
                sid = 1 + 2 * (k * 100 + j)
                batch += [h2.headers(sid, bad[j & 1]), h2.rst_stream(sid)]
            c.send(b"".join(batch))
            sent += 100
    except h2.Closed:
        pass
    time.sleep(1.0)
    reader.stop()
    c.close()
    grown = len(open(s.log_path, errors="replace").read().splitlines()) - lines_before
    print(f"    {sent} calls with unparsable grpc-encoding/grpc-timeout: server log +{grown} lines; "
          f"server: {reader.summary()}")
    expect(grown < 500, f"the server's log grew {grown} lines for {sent} calls")


def case_protocol_violations_close_the_connection(s):
    """HTTP/2 protocol errors, each on its own connection: the connection (or the stream) must be ended
    (GOAWAY / RST_STREAM / close) within 3 s, and the server serve on."""
    block = h2.grpc_request_headers()
    cases = {
        "garbage instead of the preface": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64), False),
        "HEADERS on stream 0": (h2.headers(0, block), True),
        "even stream id": (h2.headers(2, block), True),
        "decreasing stream ids": (h2.headers(5, block) + h2.headers(3, block), True),
        "invalid HPACK index": (h2.headers(1, b"\xff\xff\xff\xff\x0f"), True),
        "frame above the max frame size": (h2.data(1, b"\0" * 20000), True),
        "DATA on an idle stream": (h2.data(7, b"\0" * 10, end_stream=True), True),
        "WINDOW_UPDATE of 0": (h2.window_update(0, 0), True),
        "SETTINGS window above 2^31-1": (h2.settings([(h2.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 31)]), True),
        "PING of 7 bytes": (h2.frame(h2.PING, 0, 0, b"\0" * 7), True),
        "CONTINUATION without HEADERS": (h2.continuation(1, block, end_headers=True), True),
        "random bytes after the preface": (os.urandom(4096), True),
    }
    outcomes = {}
    for name, (payload, preface) in cases.items():
        c = h2.Connection(s.port, preface=preface)
        try:
            c.send(payload)
        except h2.Closed:
            pass
        deadline = time.time() + 3
        rst = None
        while time.time() < deadline and not c.eof:
            f = c.read_frame(deadline - time.time())
            if f is None:
                break
            if f[0] == h2.RST_STREAM:
                rst = h2.error_name(struct.unpack(">I", f[3])[0])
        if c.goaway:
            outcomes[name] = f"GOAWAY {h2.error_name(c.goaway[1])}"
        elif rst:
            outcomes[name] = f"RST_STREAM {rst}"
        elif c.eof:
            outcomes[name] = "closed"
        else:
            # RFC 9113 wants a connection error; gRPC 1.51 ignores some of these frames. Then the connection
            # must still be sane: a PING answered.
            try:
                c.send(h2.ping(b"sane?..."))
                acked = False
                deadline = time.time() + 2
                while time.time() < deadline and not acked:
                    f = c.read_frame(deadline - time.time())
                    if f is None:
                        break
                    acked = f[0] == h2.PING and f[1] & h2.ACK and f[3] == b"sane?..."
            except h2.Closed:
                acked = False
            outcomes[name] = "ignored, PING answered" if acked else "IGNORED, and no PING answer"
        c.close()
    print("    protocol violations: " + "; ".join(f"{k}: {v}" for k, v in outcomes.items()))
    hung = [k for k, v in outcomes.items() if v.startswith("IGNORED")]
    expect(not hung, f"neither ended nor answering a PING: {hung}")


CASES = [case_half_sent_requests_do_not_stall_metrics, case_queue_flood_stays_within_the_memory_budget,
         case_per_head_weights_of_2_gib_refused, case_oversize_answer_refused_before_compute,
         case_oversize_answer_fails_only_its_stream_request, case_never_reading_stream_is_bounded,
         case_kserve_never_reading_stream_is_bounded, case_kserve_fp16_flood_stays_within_the_memory_budget,
         case_huge_layer_name_not_echoed, case_many_dims_shape_not_echoed,
         case_newline_in_id_cannot_forge_a_log_line, case_warning_flood_is_rate_limited,
         case_cancelled_heavy_work_stops, case_decoder_flood_stays_within_the_memory_budget,
         case_decoder_sessions_cannot_outgrow_the_kv_pool, case_bf16_session_appends_stay_within_the_budget,
         case_chunked_prefills_stay_within_the_budget, case_cross_attention_opens_take_turns,
         # raw HTTP/2 and connection-level traffic
         case_short_requests_do_not_wait_behind_a_long_one,
         case_rapid_reset, case_rapid_reset_reconnecting, case_rapid_reset_of_whole_requests, case_ping_flood,
         case_continuation_flood,
         case_continuation_flood_of_one_huge_value,
         case_settings_flood, case_window_update_flood, case_empty_data_frame_flood,
         case_many_streams_on_one_connection, case_slowloris_on_the_grpc_port,
         case_slow_connections_do_not_stall_metrics, case_huge_metadata_value_refused,
         case_ten_thousand_headers_refused, case_invalid_protobuf_in_a_raw_data_frame,
         case_length_prefix_of_2_gib, case_length_prefix_of_2_gib_then_streaming,
         case_memory_guard_sheds_a_message_grpc_buffers_whole, case_connection_cap, case_many_idle_connections,
         case_streams_cancelled_midway, case_gzip_bomb, case_unknown_or_missing_grpc_encoding,
         case_bad_metadata_cannot_flood_the_log, case_protocol_violations_close_the_connection]


def still_serving(s, known, want):
    """After a case: the server is up, answers the known request as before, and holds no request."""
    expect(s.alive(), "the server died")
    # wait_for_ready: a case may have had the server close the suite's own connection (a header too large
    # for it), and the channel reconnects as any client would.
    timeout = 180 if sanitized() else 30  # after a rapid reset gRPC under ASan works through its backlog slowly
    try:
        got = output(s.stub.Infer(known, timeout=timeout, wait_for_ready=True))
    except grpc.RpcError as e:  # sent on the connection the server was closing: once more, as clients retry
        expect(e.code() == grpc.StatusCode.UNAVAILABLE, f"the known request failed: {e.code().name}")
        got = output(s.stub.Infer(known, timeout=timeout, wait_for_ready=True))
    expect(np.max(np.abs(got - want)) <= 1e-5, "the known request's answer changed")
    deadline = time.time() + (50 if sanitized() else 10)
    while s.metric("attnserve_inflight_requests") != 0 and time.time() < deadline:
        time.sleep(0.05)
    expect(s.metric("attnserve_inflight_requests") == 0, "attnserve_inflight_requests did not return to 0")


def recovered(s, known, want, seconds):
    """After a failed case: whether the server serves again (and holds no request) within `seconds`; so
    that one failure does not spill into the next cases."""
    t = time.time()
    while time.time() - t < seconds:
        try:
            served_on_new_connection(s, 3.0)
            still_serving(s, known, want)
            print(f"    (the server serves again {time.time() - t:.1f} s after the case, RSS {s.rss_kib() >> 10} MiB)")
            return True
        except Exception:  # noqa: BLE001
            time.sleep(1)
    return False


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="attnserve_hostile_")
    generate_stubs(tmp)
    only = sys.argv[2:]  # optional: run only the cases whose names contain one of these
    print(f"transport flags passed: {' '.join(transport_flags(binary)) or '(none known to this binary)'}")
    started = time.time()
    s = Server(binary, tmp, config=suite_config())
    passed = failed = 0
    try:
        known = request("small", [1, 16, 256], "known")
        want = output(s.stub.Infer(known, timeout=30))
        for case in CASES:
            name = case.__name__[len("case_"):]
            if only and not any(o in name for o in only):
                continue
            t = time.time()
            try:
                case(s)
                still_serving(s, known, want)
                print(f"PASS {name} ({time.time() - t:.1f} s)", flush=True)
                passed += 1
                if s.rss_kib() >> 10 >= BUDGET_MIB:  # a known gap left it swollen: the next case gets a new one
                    s.stop()
                    s = Server(binary, tempfile.mkdtemp(prefix="restart_", dir=tmp), config=suite_config())
            except Exception as e:  # noqa: BLE001 (a case fails, the suite goes on)
                print(f"FAIL {name} ({time.time() - t:.1f} s): {e}", flush=True)
                if not isinstance(e, Failed):
                    traceback.print_exc()
                failed += 1
                # A failed case may leave the server dead, stuck or swollen: the next cases get a new one, so
                # that each measures itself (whether this one came back is printed).
                if not s.alive():
                    print(open(s.log_path, errors="replace").read()[-3000:])
                    print("    (the server died)")
                elif not recovered(s, known, want, 10):
                    print(f"    (the server did not serve again within 10 s; RSS {s.rss_kib() >> 10} MiB)")
                s.kill()
                s = Server(binary, tempfile.mkdtemp(prefix="restart_", dir=tmp), config=suite_config())
    finally:
        s.stop()
    print(f"{passed} passed, {failed} failed in {time.time() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
