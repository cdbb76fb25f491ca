#!/usr/bin/python3
"""W3C Trace Context and the access log on the attnserve binary: every RPC (attnserve.v1, the Open Inference
Protocol, sessions, errors included) returns a `traceparent` naming the server's span in the client's trace, or
in a fresh one when the client sent none or a malformed one (never an error); the request's log lines (JSON and
text) and its access log line carry the same trace and span ids; access log lines stay one JSON object each
whatever the client's strings.

    /usr/bin/python3 tests/integration/trace_test.py path/to/attnserve [case ...]
"""

import json
import os
import re
import sys
import tempfile
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kserve_test as kt  # noqa: E402  (stubs and the server harness)
from checks import expect, run_cases  # noqa: E402

TIMEOUT = 30
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
CONFIG = 'layers { name: "small" embed_dim: 16 num_heads: 2 seed: 5 }\n'


class Env:
    pass


def query(seed, shape=(1, 3, 16)):
    return np.random.default_rng(seed).standard_normal(shape).astype("<f4")


def v1_tensor(a):
    return kt.pb.Tensor(shape=list(a.shape), dtype=kt.pb.FLOAT32, raw_data=a.tobytes())


def infer(e, layer="small", rid="", md=(), seed=1):
    """(code, initial metadata as a dict) of an Infer call."""
    request = kt.pb.InferRequest(layer=layer, id=rid, query=v1_tensor(query(seed)))
    try:
        _, call = e.s.v1.Infer.with_call(request, metadata=list(md), timeout=TIMEOUT)
        return grpc.StatusCode.OK, dict(call.initial_metadata())
    except grpc.RpcError as err:
        return err.code(), dict(err.initial_metadata() or ())


def server_span(md, what):
    """(trace id, span id, flags) of the response's traceparent."""
    m = TRACEPARENT_RE.match(md.get("traceparent", ""))
    expect(m is not None, f"{what}: the response's traceparent is {md.get('traceparent')!r}")
    expect(m.group(1) != "0" * 32 and m.group(2) != "0" * 16, f"{what}: all-zero id in {md['traceparent']}")
    return m.group(1), m.group(2), m.group(3)


def access_lines(e, wait_for=None, count=1):
    """The access log's lines, parsed; waits (the writer is asynchronous) until `count` have trace_id `wait_for`."""
    deadline = time.time() + 10
    while True:
        lines = [json.loads(line) for line in open(e.access_log).read().splitlines()]
        if (wait_for is None or sum(r["trace_id"] == wait_for for r in lines) >= count) or time.time() > deadline:
            return lines
        time.sleep(0.05)


def access_line(e, trace_id):
    found = [r for r in access_lines(e, trace_id) if r["trace_id"] == trace_id]
    expect(len(found) == 1, f"access log: {len(found)} lines with trace_id {trace_id}")
    return found[0]


def log_lines(server, trace_id):
    """The server's JSON log lines about trace `trace_id`."""
    out = []
    for line in server.log_text().splitlines():
        if trace_id in line:
            out.append(json.loads(line))
    return out


def case_client_trace_is_continued(e):
    code, md = infer(e, rid="traced-1", md=[("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
                                           ("tracestate", "vendor=abc,other=xyz")])
    expect(code == grpc.StatusCode.OK, f"Infer: {code}")
    trace, span, flags = server_span(md, "Infer")
    expect(trace == CLIENT_TRACE, f"trace id {trace}, want the client's {CLIENT_TRACE}")
    expect(span != CLIENT_SPAN, "the server's span id repeats the client's")
    expect(flags == "01", f"trace flags {flags}, want the client's 01")
    expect(md.get("tracestate") == "vendor=abc,other=xyz", f"tracestate returned: {md.get('tracestate')!r}")
    line = access_line(e, trace)
    expect(line["span_id"] == span, f"access log span {line['span_id']}, response {span}")
    expect(line["rpc"] == "Infer" and line["layer"] == "small" and line["id"] == "traced-1" and line["code"] == "OK",
           f"access log line: {line}")
    expect(line["answer_bytes"] == 3 * 16 * 4, f"answer_bytes {line['answer_bytes']}, want {3 * 16 * 4}")
    expect(line["request_bytes"] > 3 * 16 * 4 and line["batch"] >= 1 and line["version"] == 1,
           f"access log sizes: {line}")
    expect(line["total_us"] >= line["queue_us"] >= 0 and line["compute_us"] > 0, f"access log times: {line}")
    logged = log_lines(e.s, trace)
    expect(len(logged) == 1, f"{len(logged)} log lines carry trace {trace}")
    expect(logged[0]["span_id"] == span and "traced-1" in logged[0]["msg"], f"log line: {logged[0]}")


def case_fresh_trace_without_traceparent(e):
    seen = set()
    for i in range(3):
        code, md = infer(e, seed=i)
        expect(code == grpc.StatusCode.OK, f"Infer: {code}")
        trace, span, flags = server_span(md, "Infer without traceparent")
        expect(flags == "00", f"a fresh trace's flags are {flags}")
        expect(trace not in seen, f"trace id {trace} given twice")
        seen.add(trace)
        expect(access_line(e, trace)["span_id"] == span, "the access log's span is not the response's")


MALFORMED = [
    f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",  # upper case
    f"00-{'0' * 32}-{CLIENT_SPAN}-01",               # all-zero trace id
    f"00-{CLIENT_TRACE}-{'0' * 16}-01",              # all-zero parent id
    f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",           # forbidden version
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra",     # version 00 with a tail
    f"00_{CLIENT_TRACE}_{CLIENT_SPAN}_01",           # separators
    f"00-{CLIENT_TRACE[:-1]}g-{CLIENT_SPAN}-01",     # not hex
    "x" * 4000,
    "",
]


def case_malformed_traceparent_is_ignored(e):
    for value in MALFORMED:
        code, md = infer(e, md=[("traceparent", value), ("tracestate", "k=v")])
        expect(code == grpc.StatusCode.OK, f"traceparent {value[:60]!r}: {code}, want OK")
        trace, _, _ = server_span(md, f"traceparent {value[:60]!r}")
        expect(trace != CLIENT_TRACE, f"traceparent {value[:60]!r} was accepted")
        expect("tracestate" not in md, f"traceparent {value[:60]!r}: tracestate returned without a valid trace")
    # A later version is read by its version-00 prefix; a repeated traceparent is ignored.
    code, md = infer(e, md=[("traceparent", f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-future")])
    expect(server_span(md, "version 01")[0] == CLIENT_TRACE, "a version-01 traceparent was not continued")
    code, md = infer(e, md=[("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
                            ("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00")])
    expect(code == grpc.StatusCode.OK and server_span(md, "repeated")[0] != CLIENT_TRACE,
           "a repeated traceparent was continued")


def case_errors_carry_the_trace(e):
    trace_in = "11111111111111111111111111111111"
    code, md = infer(e, layer="no-such-layer", rid="lost\"\n{", md=[("traceparent", f"00-{trace_in}-{CLIENT_SPAN}-00")])
    expect(code == grpc.StatusCode.NOT_FOUND, f"unknown layer: {code}")
    trace, span, _ = server_span(md, "NOT_FOUND")
    expect(trace == trace_in, "the error's trace is not the client's")
    line = access_line(e, trace)
    expect(line["code"] == "NOT_FOUND" and line["answer_bytes"] == 0 and line["span_id"] == span,
           f"access log line: {line}")
    expect(line["id"] == 'lost"\\x0a{', f"access log id {line['id']!r}: not bounded and escaped")
    logged = log_lines(e.s, trace)
    expect(len(logged) == 1 and logged[0]["level"] == "warning" and logged[0]["span_id"] == span,
           f"the error's log lines: {logged}")


def case_every_protocol_returns_it(e):
    md_in = [("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")]
    _, call = e.s.v1.ListLayers.with_call(kt.pb.ListLayersRequest(), metadata=md_in, timeout=TIMEOUT)
    expect(server_span(dict(call.initial_metadata()), "ListLayers")[0] == CLIENT_TRACE, "ListLayers")
    _, call = e.s.kserve.ServerLive.with_call(kt.kpb.ServerLiveRequest(), metadata=md_in, timeout=TIMEOUT)
    expect(server_span(dict(call.initial_metadata()), "ServerLive")[0] == CLIENT_TRACE, "ServerLive")
    trace_in = "22222222222222222222222222222222"
    req = kt.kreq("small", [("query", query(3))])
    _, call = e.s.kserve.ModelInfer.with_call(req, metadata=[("traceparent", f"00-{trace_in}-{CLIENT_SPAN}-01")],
                                              timeout=TIMEOUT)
    trace, span, _ = server_span(dict(call.initial_metadata()), "ModelInfer")
    expect(trace == trace_in and access_line(e, trace)["rpc"] == "ModelInfer", "ModelInfer's access line")
    sess = spbg.SessionServiceStub(e.s.channel)
    sess.CreateSession(spb.CreateSessionRequest(session_id="traced", layers=["small"]), timeout=TIMEOUT)
    trace_in = "33333333333333333333333333333333"
    _, call = sess.Append.with_call(spb.AppendRequest(session_id="traced", layer="small",
                                                      query=v1_tensor(query(4, (2, 16)))),
                                    metadata=[("traceparent", f"00-{trace_in}-{CLIENT_SPAN}-01")], timeout=TIMEOUT)
    trace, span, _ = server_span(dict(call.initial_metadata()), "Append")
    line = access_line(e, trace)
    expect(line["rpc"] == "Append" and line["span_id"] == span, f"Append's access line: {line}")
    # One stream, one RPC: its requests share the stream's span.
    trace_in = "44444444444444444444444444444444"
    requests = [kt.pb.InferRequest(layer="small", id=f"s{i}", query=v1_tensor(query(i))) for i in range(3)]
    stream = e.s.v1.InferStream(iter(requests), metadata=[("traceparent", f"00-{trace_in}-{CLIENT_SPAN}-01")],
                                timeout=TIMEOUT)
    answers = list(stream)
    trace, span, _ = server_span(dict(stream.initial_metadata()), "InferStream")
    expect(len(answers) == 3 and trace == trace_in, "InferStream")
    # The stream's three requests were answered in two batches: wait for all three lines, not the first.
    lines = [r for r in access_lines(e, trace, count=3) if r["trace_id"] == trace]
    expect(sorted(r["id"] for r in lines) == ["s0", "s1", "s2"] and all(r["span_id"] == span for r in lines),
           f"InferStream's access lines: {lines}")


def case_text_log_lines_carry_the_ids(e):
    s = kt.Server(e.binary, e.tmp, "text", CONFIG, flags=("--log-level", "debug"))
    try:
        trace_in = "55555555555555555555555555555555"
        request = kt.pb.InferRequest(layer="small", id="plain", query=v1_tensor(query(5)))
        _, call = s.v1.Infer.with_call(request, metadata=[("traceparent", f"00-{trace_in}-{CLIENT_SPAN}-01")],
                                       timeout=TIMEOUT)
        _, span, _ = server_span(dict(call.initial_metadata()), "Infer")
        lines = [line for line in s.log_text().splitlines() if "id=plain" in line]
        expect(len(lines) == 1 and lines[0].endswith(f" trace_id={trace_in} span_id={span}"),
               f"text log line: {lines}")
        expect(not any("trace_id=" in line for line in s.log_text().splitlines() if "ready:" in line),
               "a line about no request carries trace ids")
    finally:
        s.stop()


CASES = [case_client_trace_is_continued, case_fresh_trace_without_traceparent, case_malformed_traceparent_is_ignored,
         case_errors_carry_the_trace, case_every_protocol_returns_it, case_text_log_lines_carry_the_ids]


def main():
    binary = os.path.abspath(sys.argv[1])
    only = sys.argv[2:]
    tmp = tempfile.mkdtemp(prefix="attnserve_trace_")
    started = time.time()
    kt.generate_stubs(tmp)
    global spb, spbg
    from attnserve.v1 import session_pb2 as spb  # noqa: E402
    from attnserve.v1 import session_pb2_grpc as spbg  # noqa: E402
    e = Env()
    e.binary, e.tmp = binary, tmp
    e.access_log = os.path.join(tmp, "access.jsonl")
    e.s = kt.Server(binary, tmp, "json", CONFIG,
                    flags=("--log-format", "json", "--log-level", "debug", "--access-log", e.access_log))
    passed = failed = 0
    try:
        passed, failed = run_cases(CASES, e, only, lambda env: expect(env.s.alive(), "the server died"))
    finally:
        e.s.stop()
        if failed:
            print("---- server log (tail) ----\n" + e.s.log_text()[-2000:])
    print(f"{passed} passed, {failed} failed in {time.time() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
