#!/usr/bin/python3
"""Sessions (attnserve.v1.SessionService) on the attnserve binary: for any split of a sequence into appends
the outputs equal causal attention over the whole sequence (the float64 reference with PyTorch's golden
weights, 1e-4; the server's own stateless causal Infer, 1e-6); AppendStream in order; fork and truncate;
cross-attention memories; the errors and the field each names; idle eviction ("evicted"); the session id
from metadata; the sessions' metrics.

    /usr/bin/python3 tests/integration/session_test.py path/to/attnserve [case ...]
"""

import os
import re
import sys
import tempfile
import time
import urllib.request

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kserve_test as kt  # noqa: E402  (stubs, the server harness, the float64 reference)
from checks import expect, run_cases  # noqa: E402

OK = grpc.StatusCode.OK
TIMEOUT = 30


def tensor(a):
    return kt.pb.Tensor(shape=list(a.shape), dtype=kt.pb.FLOAT32, raw_data=np.ascontiguousarray(a, "<f4").tobytes())


def array(t):
    return np.frombuffer(t.raw_data, "<f4").reshape(tuple(t.shape))


def rpc(fn):
    try:
        return OK, "", fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


class Env:
    pass


def create(e, sid, layers=("g_causal",), **kw):
    return e.sess.CreateSession(spb.CreateSessionRequest(session_id=sid, layers=list(layers), **kw), timeout=TIMEOUT)


def append(e, sid, x, layer="g_causal", **kw):
    r = e.sess.Append(spb.AppendRequest(session_id=sid, layer=layer, query=tensor(x), **kw), timeout=TIMEOUT)
    return array(r.output), r


def stateless_causal(e, x):
    r = e.s.v1.Infer(kt.pb.InferRequest(layer="g_causal", query=tensor(x), is_causal=True), timeout=TIMEOUT)
    return array(r.output)


def reference(e, x):
    out, _ = kt.reference_mha(e.g, x[None], is_causal=True)
    return out[0]


def metric(e, series):
    """The value of one series (name and labels as /metrics prints them, at a line's start), 0 when absent."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{e.s.metrics_port}/metrics", timeout=10).read().decode()
    m = re.search("^" + re.escape(series) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def requests_total(e, layer, code):
    """attnserve_requests_total of `layer` answered `code`, over its versions."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{e.s.metrics_port}/metrics", timeout=10).read().decode()
    series = re.findall(r'^attnserve_requests_total\{([^}]*)\} (\S+)$', text, re.M)
    return sum(float(v) for labels, v in series if f'code="{code}"' in labels and f'layer="{layer}"' in labels)


def splits(rng, n):
    cuts = [0]
    while cuts[-1] < n:
        kind = rng.integers(0, 3)
        cuts.append(min(n, cuts[-1] + (1 if kind == 0 else int(rng.integers(2, 6 if kind == 1 else 30)))))
    return cuts


# ---- cases -----------------------------------------------------------------------------------------------

def case_any_split_equals_causal_attention(e):
    rng = np.random.default_rng(1)
    for trial in range(4):
        n = int(rng.integers(20, 90))
        x = rng.standard_normal((n, 32)).astype(np.float32)
        sid = f"split-{trial}"
        create(e, sid)
        cuts = [0, 10] + list(range(11, n + 1)) if trial == 0 else splits(rng, n)
        outs = []
        for a, b in zip(cuts, cuts[1:]):
            out, r = append(e, sid, x[a:b])
            expect(r.position == b, f"position {r.position}, expected {b}")
            outs.append(out)
        got = np.concatenate(outs)
        err_ref = np.abs(got - reference(e, x)).max()
        err_infer = np.abs(got - stateless_causal(e, x)).max()
        expect(err_ref <= 1e-4, f"trial {trial}: max abs error {err_ref} against the float64 reference")
        expect(err_infer <= 1e-6, f"trial {trial}: max abs error {err_infer} against stateless causal Infer")
        e.sess.CloseSession(spb.CloseSessionRequest(session_id=sid), timeout=TIMEOUT)


def case_weights_over_every_cached_key(e):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 32)).astype(np.float32)
    create(e, "weights")
    append(e, "weights", x[:7])
    _, r = append(e, "weights", x[7:], need_weights=True)
    w = array(r.attn_weights)
    _, ref = kt.reference_mha(e.g, x[None], is_causal=True, need_weights=True)
    expect(w.shape == (5, 12), f"attn_weights shape {w.shape}")
    expect(np.abs(w - ref[0, 7:]).max() <= 1e-5, "averaged weights differ from the reference")
    _, r = append(e, "weights", x[:1], need_weights=True, average_attn_weights=False)
    expect(tuple(r.attn_weights.shape) == (4, 1, 13), f"per-head weights shape {list(r.attn_weights.shape)}")


def case_long_prefill_in_chunks_is_exact(e):
    """1200 tokens in one append: computed as chunks (sessions.prefill_chunk_tokens), answered whole."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1300, 32)).astype(np.float32)
    create(e, "long")
    answered = requests_total(e, "g_causal", "OK")
    out, r = append(e, "long", x[:1200], need_weights=True)
    expect(r.position == 1200 and out.shape == (1200, 32), f"position {r.position}, output {out.shape}")
    counted = requests_total(e, "g_causal", "OK") - answered
    expect(counted == 1, f"one chunked append counted as {counted} requests")
    full = stateless_causal(e, x)
    expect(np.abs(out - full[:1200]).max() <= 1e-5, "a chunked prefill differs from causal Infer")
    w = array(r.attn_weights)
    expect(w.shape == (1200, 1200) and np.abs(w.sum(axis=1) - 1).max() <= 1e-4 and np.abs(np.triu(w, 1)).max() == 0,
           "chunked weights: [T, T], rows summing to 1, nothing past the diagonal")
    out, r = append(e, "long", x[1200:])
    expect(np.abs(out - full[1200:]).max() <= 1e-5, "decode after a chunked prefill")


def case_append_stream_answers_in_order(e):
    rng = np.random.default_rng(3)
    n = 40
    x = rng.standard_normal((n, 32)).astype(np.float32)
    create(e, "stream")
    reqs = [spb.AppendRequest(session_id="stream", layer="g_causal", query=tensor(x[i:i + 1]), id=str(i))
            for i in range(n)]
    answers = list(e.sess.AppendStream(iter(reqs), timeout=TIMEOUT))
    expect([a.id for a in answers] == [str(i) for i in range(n)], "answers out of order")
    expect([a.position for a in answers] == list(range(1, n + 1)), "positions out of order")
    got = np.concatenate([array(a.output) for a in answers])
    expect(np.abs(got - stateless_causal(e, x)).max() <= 1e-6, "stream outputs differ from causal Infer")


def case_fork_then_diverge_and_truncate(e):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((30, 32)).astype(np.float32)
    b = a.copy()
    b[20:] = rng.standard_normal((10, 32))
    create(e, "root")
    append(e, "root", a[:20])
    f = e.sess.ForkSession(spb.ForkSessionRequest(session_id="root", new_session_id="fork"), timeout=TIMEOUT)
    expect(f.tokens == 20, f"fork holds {f.tokens} tokens")
    got_a = [append(e, "root", a[i:i + 1])[0] for i in range(20, 30)]
    got_b = [append(e, "fork", b[i:i + 1])[0] for i in range(20, 30)]
    expect(np.abs(np.concatenate(got_a) - stateless_causal(e, a)[20:]).max() <= 1e-6, "root after fork")
    expect(np.abs(np.concatenate(got_b) - stateless_causal(e, b)[20:]).max() <= 1e-6, "fork after divergence")
    t = e.sess.TruncateSession(spb.TruncateSessionRequest(session_id="fork", tokens=20), timeout=TIMEOUT)
    expect(t.tokens == 20, f"truncated to {t.tokens}")
    again = append(e, "fork", a[20:])[0]
    expect(np.abs(again - stateless_causal(e, a)[20:]).max() <= 1e-6, "truncate then re-append")


def case_cross_attention_memory(e):
    """A memory of 9 rows, and one of 1101, which the server projects in blocks of 512 rows (on its opener
    thread, a share of the CPUs each): the session's appends answer as Infer with the memory as key and value."""
    rng = np.random.default_rng(5)
    g = kt.Golden(next(c for c in kt.GOLDEN_CASES if c["name"] == "kdim_vdim"))
    if g.case["kdim"] != g.case["vdim"]:
        g = kt.Golden(next(c for c in kt.GOLDEN_CASES if c["name"] == "cross_attention"))
    for rows in (9, 2 * 512 + 77):
        sid = f"cross-{rows}"
        mem = rng.standard_normal((rows, g.case["kdim"])).astype(np.float32)
        x = rng.standard_normal((4, g.case["embed_dim"])).astype(np.float32)
        e.sess.CreateSession(spb.CreateSessionRequest(session_id=sid, layers=[g.layer],
                                                      memory={g.layer: tensor(mem)}), timeout=TIMEOUT)
        out, r = append(e, sid, x, layer=g.layer)
        expect(r.position == rows, f"a cross-attention append leaves the memory's {rows} tokens, got {r.position}")
        want = array(e.s.v1.Infer(kt.pb.InferRequest(layer=g.layer, query=tensor(x), key=tensor(mem),
                                                     value=tensor(mem)), timeout=TIMEOUT).output)
        diff = np.abs(out - want).max()
        expect(diff <= 1e-6, f"a cross-attention session over {rows} rows differs from Infer with the memory: {diff}")
        e.sess.CloseSession(spb.CloseSessionRequest(session_id=sid), timeout=TIMEOUT)


def half_tensor(a, dtype):
    """[T, E] as BFLOAT16 or FLOAT16 raw_data; returns the tensor and the f32 values it carries."""
    if dtype == "BFLOAT16":
        bits = kt.f32_to_bf16_bits(a)
        return kt.pb.Tensor(shape=list(a.shape), dtype=kt.pb.BFLOAT16, raw_data=bits.tobytes()), kt.bf16_bits_to_f32(bits)
    h = a.astype(np.float16)
    return kt.pb.Tensor(shape=list(a.shape), dtype=kt.pb.FLOAT16, raw_data=h.tobytes()), h.astype(np.float32)


def case_16bit_queries_and_answers(e):
    """BFLOAT16 / FLOAT16 queries equal FLOAT32 appends of the same values (a long one cut into chunks too);
    output_dtype answers in 16 bits, rounded from the f32 answer; a bad output_dtype names the field."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 32)).astype(np.float32)
    for dtype in ("BFLOAT16", "FLOAT16"):
        _, values = half_tensor(x, dtype)
        sid = f"half-{dtype}"
        create(e, sid)
        create(e, sid + "-f32")
        cuts = [0, 200, 201, 250, 300]  # a 200-token prefill (two chunks), a single token, then 49 and 50
        for a, b in zip(cuts, cuts[1:]):
            part, _ = half_tensor(x[a:b], dtype)
            r = e.sess.Append(spb.AppendRequest(session_id=sid, layer="g_causal", query=part), timeout=TIMEOUT)
            want, _ = append(e, sid + "-f32", values[a:b])
            got = array(r.output)
            expect(r.position == b and np.abs(got - want).max() <= 1e-6,
                   f"{dtype} append [{a}, {b}): position {r.position}, max diff {np.abs(got - want).max()}")
    # AppendStream: one session's appends queue behind each other (their requests reserved while they wait).
    _, values = half_tensor(x[:40], "BFLOAT16")
    create(e, "half-stream")
    create(e, "half-stream-f32")
    reqs = [spb.AppendRequest(session_id="half-stream", layer="g_causal", id=str(i),
                              query=half_tensor(x[i * 8:(i + 1) * 8], "BFLOAT16")[0]) for i in range(5)]
    answers = list(e.sess.AppendStream(iter(reqs), timeout=TIMEOUT))
    want = np.concatenate([append(e, "half-stream-f32", values[i * 8:(i + 1) * 8])[0] for i in range(5)])
    got = np.concatenate([array(a.output) for a in answers])
    expect([a.id for a in answers] == [str(i) for i in range(5)] and np.abs(got - want).max() <= 1e-6,
           f"BFLOAT16 AppendStream: ids {[a.id for a in answers]}, max diff {np.abs(got - want).max()}")
    x1 = rng.standard_normal((3, 32)).astype(np.float32)
    create(e, "half-out")
    create(e, "half-out-f32")
    want, want_r = append(e, "half-out-f32", x1, need_weights=True)
    r = e.sess.Append(spb.AppendRequest(session_id="half-out", layer="g_causal", query=tensor(x1), need_weights=True,
                                        output_dtype=kt.pb.BFLOAT16), timeout=TIMEOUT)
    got = kt.bf16_bits_to_f32(np.frombuffer(r.output.raw_data, "<u2")).reshape(tuple(r.output.shape))
    expect(r.output.dtype == kt.pb.BFLOAT16 and len(r.output.raw_data) == 2 * want.size,
           f"output dtype {r.output.dtype}, {len(r.output.raw_data)} bytes")
    expect(np.array_equal(got, kt.bf16_bits_to_f32(kt.f32_to_bf16_bits(want))), "BFLOAT16 output is not the rounded f32")
    expect(r.attn_weights.dtype == kt.pb.BFLOAT16, f"weights dtype {r.attn_weights.dtype}")
    code, msg, _ = rpc(lambda: e.sess.Append(spb.AppendRequest(session_id="half-out", layer="g_causal",
                                                              query=tensor(x1), output_dtype=kt.pb.BOOL),
                                            timeout=TIMEOUT))
    expect(code == grpc.StatusCode.INVALID_ARGUMENT and "output_dtype" in msg, f"bad output_dtype: {code} {msg!r}")
    short = kt.pb.Tensor(shape=[2, 32], dtype=kt.pb.BFLOAT16, raw_data=b"\0" * 100)
    code, msg, _ = rpc(lambda: e.sess.Append(spb.AppendRequest(session_id="half-out", layer="g_causal", query=short),
                                            timeout=TIMEOUT))
    expect(code == grpc.StatusCode.INVALID_ARGUMENT and "query" in msg, f"short BFLOAT16 query: {code} {msg!r}")


def case_errors_name_the_field(e):
    x = np.ones((2, 32), np.float32) * 0.5
    checks = [
        ("unknown session", lambda: append(e, "nope", x), grpc.StatusCode.NOT_FOUND, "session_id"),
        ("bad id", lambda: create(e, "bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        ("unknown layer", lambda: create(e, "x1", layers=["g_causal", "missing"]), grpc.StatusCode.NOT_FOUND,
         "layers[1]"),
        ("no layers", lambda: create(e, "x2", layers=[]), grpc.StatusCode.INVALID_ARGUMENT, "layers"),
    ]
    create(e, "errs", max_tokens=5)
    checks += [
        ("taken", lambda: create(e, "errs"), grpc.StatusCode.ALREADY_EXISTS, "errs"),
        ("wrong width", lambda: append(e, "errs", np.ones((2, 16), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
         "query"),
        ("layer not in session", lambda: append(e, "errs", x, layer="g_self_basic"), grpc.StatusCode.NOT_FOUND,
         "layer"),
        ("past max_tokens", lambda: append(e, "errs", np.ones((6, 32), np.float32)), grpc.StatusCode.OUT_OF_RANGE,
         "max_tokens"),
    ]
    for what, fn, code, field in checks:
        got, msg, _ = rpc(fn)
        expect(got == code and field in msg, f"{what}: {got} {msg!r}, expected {code} naming {field}")
    out, r = append(e, "errs", x)  # the session still works after its refusals
    expect(r.position == 2, f"position {r.position} after refusals")
    # Appends refused by their session are counted as every request is.
    for code in ("OUT_OF_RANGE", "INVALID_ARGUMENT"):
        expect(requests_total(e, "g_causal", code) >= 1, f"no {code} append of g_causal in attnserve_requests_total")


def case_session_id_from_metadata(e):
    x = np.random.default_rng(6).standard_normal((3, 32)).astype(np.float32)
    create(e, "by-header")
    md = (("x-attnserve-session", "by-header"),)
    r = e.sess.Append(spb.AppendRequest(layer="g_causal", query=tensor(x)), metadata=md, timeout=TIMEOUT)
    expect(r.position == 3, f"position {r.position}")
    got = e.sess.GetSession(spb.GetSessionRequest(), metadata=md, timeout=TIMEOUT)
    expect(got.session_id == "by-header" and got.tokens == 3, f"GetSession by header: {got}")


def case_idle_sessions_are_evicted(e):
    create(e, "sleepy", idle_timeout_ms=200)
    time.sleep(2.5)  # the server sweeps once a second
    code, msg, _ = rpc(lambda: append(e, "sleepy", np.ones((1, 32), np.float32)))
    expect(code == grpc.StatusCode.FAILED_PRECONDITION and "evicted" in msg, f"{code} {msg!r}")
    expect(metric(e, 'attnserve_session_evictions_total{reason="idle_timeout"}') >= 1, "no eviction counted")
    create(e, "sleepy")  # the id can be used again


def case_metrics(e):
    for series in ('attnserve_kv_cache_blocks{state="used"}', 'attnserve_append_duration_seconds_count{phase="decode"}',
                   'attnserve_append_duration_seconds_count{phase="prefill"}', "attnserve_append_tokens_total",
                   "attnserve_sessions_active"):
        expect(metric(e, series) >= 1, f"{series} is not >= 1")
    sessions = e.sess.ListSessions(spb.ListSessionsRequest(), timeout=TIMEOUT).sessions
    expect(len(sessions) == metric(e, "attnserve_sessions_active"), "ListSessions and the gauge disagree")


CASES = [v for k, v in list(globals().items()) if k.startswith("case_")]


def main():
    binary = os.path.abspath(sys.argv[1])
    only = sys.argv[2:]
    tmp = tempfile.mkdtemp(prefix="attnserve_sessions_")
    started = time.time()
    kt.generate_stubs(tmp)
    global spb, spbg
    from attnserve.v1 import session_pb2 as spb  # noqa: E402
    from attnserve.v1 import session_pb2_grpc as spbg  # noqa: E402
    names = ("causal", "self_basic", "cross_attention", "kdim_vdim")
    config = "".join(kt.Golden(c).config_text() for c in kt.GOLDEN_CASES if c["name"] in names)
    e = Env()
    e.g = kt.Golden(next(c for c in kt.GOLDEN_CASES if c["name"] == "causal"))
    e.s = kt.Server(binary, tmp, "sessions", config)
    e.sess = spbg.SessionServiceStub(e.s.channel)
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
