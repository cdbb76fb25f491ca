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
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request

import grpc
import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MAX_MESSAGE = 64 << 20
BUDGET_MIB = 256
CONFIG = f"""
memory_budget_bytes: {BUDGET_MIB << 20}
max_inflight_per_stream: 8
layers {{ name: "small" embed_dim: 256 num_heads: 4 seed: 1 }}
layers {{ name: "base" embed_dim: 768 num_heads: 12 seed: 2 }}
"""


def generate_stubs(out_dir):
    v1 = os.path.join(REPO_ROOT, "proto", "attnserve", "v1")
    protos = sorted(os.path.join(v1, f) for f in os.listdir(v1) if f.endswith(".proto"))
    subprocess.run(["protoc", "-I", os.path.join(REPO_ROOT, "proto"), f"--python_out={out_dir}",
                    f"--grpc_python_out={out_dir}", "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin",
                    *protos], check=True)
    sys.path.insert(0, out_dir)
    global pb, pbg
    from attnserve.v1 import attention_pb2 as pb  # noqa: E402
    from attnserve.v1 import attention_pb2_grpc as pbg  # noqa: E402


class Server:
    """The binary on loopback ports chosen by the OS, its log in a file."""

    def __init__(self, binary, tmp):
        cfg = os.path.join(tmp, "hostile.pbtxt")
        with open(cfg, "w") as f:
            f.write(CONFIG)
        self.log_path = os.path.join(tmp, "server.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, "--config", cfg, "--grpc-address", "127.0.0.1:0",
                                      "--metrics-address", "127.0.0.1:0"], stdout=self.log, stderr=self.log)
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


class Failed(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Failed(what)


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


def case_queue_flood_stays_within_the_memory_budget(s):
    """64 concurrent 8 MiB requests (each ~50 MiB with its workspace and answer): once all queued (+2 GiB of
    RSS). Admission now stops at the budget (256 MiB) with RESOURCE_EXHAUSTED, and the memory goes back."""
    big = request("small", [8, 1024, 256])
    s.stub.Infer(big, timeout=60)  # the baseline has served this shape once (its primitives are built)
    time.sleep(2.5)
    rss_before = s.rss_kib()
    peak = [rss_before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], s.rss_kib())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    futures = [s.stub.Infer.future(big, timeout=120) for _ in range(64)]
    codes = {}
    for f in futures:
        try:
            f.result()
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
            if code == "RESOURCE_EXHAUSTED":
                expect("memory budget" in e.details(), f"RESOURCE_EXHAUSTED but not the budget: {e.details()}")
        codes[code] = codes.get(code, 0) + 1
    stop.set()
    sampler.join()
    time.sleep(2.5)  # the server gives freed memory back once a second while idle
    grown = (peak[0] - rss_before) / 1024
    after = (s.rss_kib() - rss_before) / 1024
    print(f"    64 x 8 MiB at once: {codes}; RSS peak +{grown:.0f} MiB (budget {BUDGET_MIB}), after +{after:.0f} MiB")
    expect(codes.get("RESOURCE_EXHAUSTED", 0) > 0, "nothing was refused")
    expect(codes.get("OK", 0) > 0, "nothing was answered")
    expect(set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"unexpected codes {codes}")
    expect(s.metric("attnserve_memory_reserved_bytes") == 0, "reservations not released")
    if not os.environ.get("ATTNSERVE_SANITIZE"):
        # The budget covers what the server holds per request; gRPC's own receive buffers come on top.
        expect(grown < 2 * BUDGET_MIB, f"RSS grew {grown:.0f} MiB under a {BUDGET_MIB} MiB budget")
        # Most of it goes back (the scratch of idle workers, malloc_trim while idle); what stays varies from
        # run to run (12-87 MiB measured), so the bound is half the budget, not yet the 10 % of baseline the
        # hardening issue asks.
        expect(after < BUDGET_MIB / 2, f"RSS still {after:.0f} MiB above its baseline")


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
        expect(took < 2, f"the scrape took {took:.1f} s behind half-sent requests")
    finally:
        for c in held:
            c.close()


CASES = [case_half_sent_requests_do_not_stall_metrics, case_queue_flood_stays_within_the_memory_budget, case_per_head_weights_of_2_gib_refused, case_oversize_answer_refused_before_compute,
         case_oversize_answer_fails_only_its_stream_request, case_never_reading_stream_is_bounded,
         case_huge_layer_name_not_echoed, case_many_dims_shape_not_echoed,
         case_newline_in_id_cannot_forge_a_log_line, case_warning_flood_is_rate_limited,
         case_cancelled_heavy_work_stops]


def still_serving(s, known, want):
    """After a case: the server is up, answers the known request as before, and holds no request."""
    expect(s.alive(), "the server died")
    got = output(s.stub.Infer(known, timeout=30))
    expect(np.max(np.abs(got - want)) <= 1e-5, "the known request's answer changed")
    deadline = time.time() + 10
    while s.metric("attnserve_inflight_requests") != 0 and time.time() < deadline:
        time.sleep(0.05)
    expect(s.metric("attnserve_inflight_requests") == 0, "attnserve_inflight_requests did not return to 0")


def main():
    binary = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="attnserve_hostile_")
    generate_stubs(tmp)
    s = Server(binary, tmp)
    passed = failed = 0
    try:
        known = request("small", [1, 16, 256], "known")
        want = output(s.stub.Infer(known, timeout=30))
        for case in CASES:
            name = case.__name__[len("case_"):]
            try:
                case(s)
                still_serving(s, known, want)
                print(f"PASS {name}")
                passed += 1
            except Exception as e:  # noqa: BLE001 (a case fails, the suite goes on)
                print(f"FAIL {name}: {e}")
                if not isinstance(e, Failed):
                    traceback.print_exc()
                failed += 1
                if not s.alive():
                    print(open(s.log_path, errors="replace").read()[-3000:])
                    break
    finally:
        s.stop()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
