"""The Python client package (client/python, module attnserve) against the binary, run inside a venv where it
was installed with pip (tests/integration/python_client_test.sh): RemoteMultiheadAttention equals PyTorch's
nn.MultiheadAttention with the same weights, Client.infer, sessions (append, fork, truncate, close) equal to
causal Infer, SessionEvicted, the errors gRPC reports, and the bearer token (token, token_file, ATTNSERVE_TOKEN)
against a second server started with --auth-token-file.

    venv/bin/python tests/integration/python_client_check.py path/to/attnserve
"""

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np
import torch

import attnserve
from attnserve.torch import RemoteMultiheadAttention, save_attention_layers

FAILURES = []


def check(cond, what):
    print(("PASS " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)


# A seeded decoder layer (Llama-style GQA with a sliding window), next to the PyTorch modules.
DECODER_LAYER = ('layers { name: "llama" embed_dim: 32 num_heads: 4 kind: DECODER_ATTENTION '
                 'decoder { num_kv_heads: 2 sliding_window: 8 } seed: 5 }\n')


def start_server(binary, tmp, modules, extra_args=()):
    weights = os.path.join(tmp, "layers.safetensors")
    save_attention_layers(weights, {f"{name}.": m for name, m in modules.items()})
    config = os.path.join(tmp, "config.pbtxt")
    with open(config, "w") as f:
        for name, m in modules.items():
            kv = f"kdim: {m.kdim} vdim: {m.vdim} " if not m._qkv_same_embed_dim else ""
            f.write(f'layers {{ name: "{name}" embed_dim: {m.embed_dim} num_heads: {m.num_heads} {kv}'
                    f'weights_path: "{weights}" weights_prefix: "{name}." }}\n')
        f.write(DECODER_LAYER)
    log_path = os.path.join(tmp, "server.log")
    proc = subprocess.Popen([binary, "--config", config, "--grpc-address", "127.0.0.1:0", "--metrics-address",
                             "127.0.0.1:0", "--log-level", "info", *extra_args], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)
    for _ in range(1200):
        m = re.search(r"ready: grpc_port=(\d+)", open(log_path).read())
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("attnserve did not start: " + open(log_path).read()[-2000:])


def check_remote_module(client, mha, cross):
    torch.manual_seed(1)
    remote = RemoteMultiheadAttention(client, "mha")
    q = torch.randn(7, 3, 32)  # [L, B, E]: batch_first=False, PyTorch's default
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    want, want_w = mha(q, q, q, key_padding_mask=kpm)
    got, got_w = remote(q, q, q, key_padding_mask=kpm)
    check((got - want).abs().max() <= 1e-4 and (got_w - want_w).abs().max() <= 1e-5,
          "RemoteMultiheadAttention equals nn.MultiheadAttention (self-attention, key_padding_mask, weights)")
    k, v = torch.randn(9, 3, 24), torch.randn(9, 3, 24)
    want, _ = cross(q, k, v, need_weights=False)
    got, none = RemoteMultiheadAttention(client, "cross")(q, k, v, need_weights=False)
    check(none is None and (got - want).abs().max() <= 1e-4, "RemoteMultiheadAttention with kdim/vdim")


def check_sixteen_bit(client, mha):
    """bfloat16 and float16 modules' tensors go as they are and come back in their type, each value the f32
    answer to the same (16-bit) inputs, rounded."""
    torch.manual_seed(4)
    remote = RemoteMultiheadAttention(client, "mha")
    for dtype, rtol in ((torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)):
        q = torch.randn(5, 2, 32).to(dtype)
        want, want_w = mha(q.float(), q.float(), q.float())
        got, got_w = remote(q, q, q)
        check(got.dtype == dtype and got_w.dtype == dtype and torch.allclose(got.float(), want, rtol=rtol, atol=1e-5)
              and torch.allclose(got_w.float(), want_w, rtol=rtol, atol=1e-5),
              f"RemoteMultiheadAttention in {dtype}: sent and answered in {dtype}, the f32 answer rounded")
    x = np.random.default_rng(5).standard_normal((1, 6, 32)).astype(np.float16)
    want, _ = client.infer("mha", x.astype(np.float32))
    got, _ = client.infer("mha", x, output_dtype="float16")
    check(got.dtype == np.float32 and np.allclose(got, want, rtol=2.0 ** -10, atol=1e-5),
          "Client.infer: a float16 array goes as FLOAT16; output_dtype float16 comes back widened to float32")
    mask = np.where(np.arange(6) < 4, 0.0, -np.inf).astype(np.float16)[None]  # masks stay FLOAT32 on the wire
    want, _ = client.infer("mha", x.astype(np.float32), key_padding_mask=mask.astype(np.float32))
    got, _ = client.infer("mha", x, key_padding_mask=mask)
    check(np.allclose(got, want, rtol=1e-6, atol=1e-6), "Client.infer: a float16 mask is sent as FLOAT32")


def check_sessions(client):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((25, 32)).astype(np.float32)
    full, _ = client.infer("mha", x, is_causal=True)
    with client.session("py-1", ["mha"]) as s:
        outs = [s.append("mha", x[:10])] + [s.append("mha", x[i:i + 1]) for i in range(10, 25)]
        check(np.abs(np.concatenate(outs) - full).max() <= 1e-6 and s.positions["mha"] == 25,
              "session appends equal causal Infer, positions tracked")
        s.truncate(10)
        fork = s.fork("py-1-fork")
        y = x.copy()
        y[10:] = rng.standard_normal((15, 32))
        fork_out = fork.append("mha", y[10:])
        want, _ = client.infer("mha", y, is_causal=True)
        check(np.abs(fork_out - want[10:]).max() <= 1e-6, "truncate, fork, append: equal to causal Infer")
        out, w = s.append("mha", x[10:12], need_weights=True)
        check(w.shape == (2, 12), f"append need_weights: [T, tokens] = {w.shape}")
        fork.close()
    try:
        client.session("py-1", ["nope"])
        check(False, "an unknown layer is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND and "layers[0]" in e.details(), f"unknown layer: {e.details()}")
    s = client.session("py-sleepy", ["mha"], idle_timeout_ms=100)
    time.sleep(2.5)
    try:
        s.append("mha", x[:1])
        check(False, "an evicted session raises SessionEvicted")
    except attnserve.SessionEvicted as e:
        check("evicted" in str(e), f"SessionEvicted: {e}")


def check_decoder(client):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 20, 32)).astype(np.float32)
    full, _ = client.infer("llama", x)
    by_ids, _ = client.infer("llama", x, position_ids=np.arange(20)[None])
    check(np.abs(by_ids - full).max() == 0, "decoder layer: position_ids 0..L-1 equal the default positions")
    shifted, _ = client.infer("llama", x, position_offset=100)
    moved, _ = client.infer("llama", x, position_ids=(np.arange(20) * 2)[None])
    # RoPE is relative: a shift of every position keeps the answer (up to float32 angles); a stretch does not.
    check(np.abs(shifted - full).max() <= 1e-4 < np.abs(moved - full).max(), "decoder layer: position_offset")
    with client.session("py-llama", ["llama"]) as s:
        outs = [s.append("llama", x[0, a:b]) for a, b in ((0, 7), (7, 8), (8, 20))]
        check(np.abs(np.concatenate(outs) - full[0]).max() <= 1e-4 and s.positions["llama"] == 20,
              "decoder session appends across the sliding window equal Infer")


def check_traces(client, target):
    """Errors carry the server's trace id; a given traceparent's trace is the one the server continues."""
    q = np.random.default_rng(3).standard_normal((1, 2, 32)).astype(np.float32)
    try:
        client.infer("nope", q)
        check(False, "an unknown layer raised")
    except attnserve.ServerError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND and isinstance(e, grpc.RpcError), f"ServerError code: {e}")
        check(e.trace_id is not None and re.fullmatch(r"[0-9a-f]{32}", e.trace_id) is not None
              and e.details().endswith(f"[trace_id {e.trace_id}]"), f"ServerError trace id: {e.details()}")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with attnserve.Client(target, traceparent=f"00-{trace}-00f067aa0ba902b7-01") as traced:
        try:
            traced.infer("nope", q)
        except attnserve.ServerError as e:
            check(e.trace_id == trace, f"the client's traceparent continued: {e.trace_id}")
        per_call = "0af7651916cd43dd8448eb211c80319c"
        try:
            traced.infer("nope", q, traceparent=f"00-{per_call}-b7ad6b7169203331-01")
        except attnserve.ServerError as e:
            check(e.trace_id == per_call, f"the call's traceparent wins: {e.trace_id}")
    try:
        attnserve.Client(target, traceparent="00-XYZ")
        check(False, "a malformed traceparent was accepted")
    except ValueError as e:
        check("traceparent: expected" in str(e), f"malformed traceparent: {e}")


def layers_with(target, **client_args):
    """The layer names a Client(target, **client_args) lists, else the status code of its error, else the
    exception its construction raised."""
    try:
        with attnserve.Client(target, **client_args) as client:
            return set(client.layers())
    except grpc.RpcError as e:
        return e.code()
    except Exception as e:  # noqa: BLE001 (reported by the check that expected layers)
        return e


def check_tokens(binary, modules):
    """A server with --auth-token-file: the client sends `token`, else token_file's first line, else
    $ATTNSERVE_TOKEN, and no token without any of them."""
    tmp = tempfile.mkdtemp(prefix="attnserve_pyclient_tokens_")
    token = "py-client-" + os.urandom(12).hex()

    def write(name, text):
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    listed = write("tokens", f"sha256:{hashlib.sha256(token.encode()).hexdigest()} infer\n")
    token_file = write("token", f"  {token} \nnot the token\n")  # only the first line counts, stripped
    wrong_file = write("wrong_token", "not-listed\n")
    empty_file = write("empty_token", " \t\nlater lines do not count\n")
    missing_file = os.path.join(tmp, "no_such_token")
    want = set(modules) | {"llama"}
    saved_env = os.environ.pop("ATTNSERVE_TOKEN", None)
    proc, target = start_server(binary, tmp, modules, ["--auth-token-file", listed])
    try:
        got = layers_with(target)
        check(got == grpc.StatusCode.UNAUTHENTICATED, f"no token, token_file or ATTNSERVE_TOKEN: {got}")
        got = layers_with(target, token_file=token_file)
        check(got == want, f"token_file: its first line, stripped, is the token: {got}")
        got = layers_with(target, token=token, token_file=wrong_file)
        check(got == want, f"token wins over token_file: {got}")
        os.environ["ATTNSERVE_TOKEN"] = token
        got = layers_with(target)
        check(got == want, f"ATTNSERVE_TOKEN when neither token nor token_file is given: {got}")
        os.environ["ATTNSERVE_TOKEN"] = "not-listed"
        got = layers_with(target, token_file=token_file)
        check(got == want, f"token_file wins over ATTNSERVE_TOKEN: {got}")
        got = layers_with(target, token_file=empty_file)
        check(isinstance(got, ValueError) and empty_file in str(got) and "empty" in str(got),
              f"an empty token file: ValueError naming it: {got!r}")
        got = layers_with(target, token_file=missing_file)
        check(isinstance(got, OSError) and missing_file in str(got),
              f"a missing token file: OSError naming it: {got!r}")
    finally:
        if saved_env is None:
            os.environ.pop("ATTNSERVE_TOKEN", None)
        else:
            os.environ["ATTNSERVE_TOKEN"] = saved_env
        proc.terminate()
        proc.wait(30)


def main():
    binary = os.path.abspath(sys.argv[1])
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4).eval()
    cross = torch.nn.MultiheadAttention(32, 4, kdim=24, vdim=24).eval()
    tmp = tempfile.mkdtemp(prefix="attnserve_pyclient_")
    proc, target = start_server(binary, tmp, {"mha": mha, "cross": cross})
    try:
        with attnserve.Client(target) as client, torch.no_grad():
            check(set(client.layers()) == {"mha", "cross", "llama"}, "Client.layers")
            check_remote_module(client, mha, cross)
            check_sixteen_bit(client, mha)
            check_sessions(client)
            check_decoder(client)
            check_traces(client, target)
    finally:
        proc.terminate()
        proc.wait(30)
    check_tokens(binary, {"mha": mha})
    print(f"{len(FAILURES)} failed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
