"""Client and Session: attnserve.v1's AttentionService and SessionService on numpy arrays."""

import os
import re

import grpc
import numpy as np

from attnserve.tensors import DTYPES, from_tensor, to_activation, to_tensor
from attnserve.v1 import attention_pb2 as pb
from attnserve.v1 import attention_pb2_grpc as pbg
from attnserve.v1 import session_pb2 as spb
from attnserve.v1 import session_pb2_grpc as spbg

MAX_MESSAGE_BYTES = 64 << 20
SESSION_HEADER = "x-attnserve-session"
TOKEN_ENV = "ATTNSERVE_TOKEN"
TRACEPARENT_RE = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


class SessionEvicted(RuntimeError):
    """The server evicted the session (idle past its timeout, or its pool was full): create it again and
    re-append its prefix."""


class ServerError(grpc.RpcError):
    """A call the server answered with an error: code() and details() as grpc.RpcError's, details ending in
    " [trace_id <id>]", the W3C trace id the server's log lines and access log carry for the call (also in
    .trace_id; None when the server returned none)."""

    def __init__(self, error):
        super().__init__(str(error))
        self._code = error.code()
        self.trace_id = server_trace_id(error.initial_metadata() or ())
        details = error.details() or ""
        self._details = f"{details} [trace_id {self.trace_id}]" if self.trace_id else details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def __str__(self):
        return f"{self._code.name}: {self._details}"


def server_trace_id(metadata):
    """The trace id of the traceparent in a response's initial metadata, or None."""
    value = dict(metadata).get("traceparent", "")
    return value[3:35] if len(value) >= 35 and value[2] == "-" else None


def _check_traceparent(traceparent):
    if traceparent is not None and not TRACEPARENT_RE.match(traceparent):
        raise ValueError(f"traceparent: expected 00-<32 hex digits>-<16 hex digits>-<2 hex digits> (lower case), "
                         f"got {traceparent[:80]!r}")
    return traceparent


def _read_token_file(path):
    """The token in `path`: its first line, whitespace-stripped, as attnctl's --token-file reads it (later
    lines are ignored). ValueError naming the file when that line is empty; the OSError of an unreadable
    file, which names it, goes through."""
    with open(path, encoding="utf-8") as f:
        token = f.readline().strip(" \t\r\n\v\f")
    if not token:
        raise ValueError(f"token_file: {os.fspath(path)!r} is empty")
    return token


def _resolve_token(token=None, token_file=None):
    """The bearer token to send, or None: `token`, else `token_file`'s, else $ATTNSERVE_TOKEN (the order of
    attnctl's --token-file and ATTNSERVE_TOKEN). Empty values count as not given."""
    if token:
        return token
    if token_file is not None:
        return _read_token_file(token_file)
    return os.environ.get(TOKEN_ENV) or None


def _credentials(tls):
    """tls: None (plaintext), True (the system's roots), a grpc.ChannelCredentials, or a dict of
    grpc.ssl_channel_credentials' arguments (root_certificates, private_key, certificate_chain: bytes)."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    return grpc.ssl_channel_credentials(**tls)


class Client:
    """One server (or a proxy in front of several: every session call carries its id in the
    x-attnserve-session metadata, which a proxy can hash on). Thread-safe, as gRPC channels are.

    token: the bearer token of a server started with --auth-token-file, sent as "authorization: Bearer
    <token>" on every call. Without it, token_file (a path: the file's first line, whitespace-stripped;
    ValueError when that is empty), else the ATTNSERVE_TOKEN environment variable when set and non-empty;
    no token at all when none of them gives one. The file and the variable are read once, here.

    traceparent: a W3C traceparent sent with every call, so the server's spans join the caller's trace
    (infer() also takes one per call). Errors are raised as ServerError, whose details end in the server's
    trace id either way."""

    def __init__(self, target, token=None, tls=None, timeout=60.0, options=(), traceparent=None, token_file=None):
        token = _resolve_token(token, token_file)  # before the channel: a bad token file leaves nothing to close
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *options]
        creds = _credentials(tls)
        self.channel = (grpc.secure_channel(target, creds, options=opts) if creds is not None
                        else grpc.insecure_channel(target, options=opts))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if _check_traceparent(traceparent):
            self._metadata += (("traceparent", traceparent),)
        self.timeout = timeout
        self.attention = pbg.AttentionServiceStub(self.channel)
        self.sessions = spbg.SessionServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def metadata(self, session_id=None, traceparent=None):
        md = self._metadata
        if _check_traceparent(traceparent):
            md = tuple(kv for kv in md if kv[0] != "traceparent") + (("traceparent", traceparent),)
        return md + (((SESSION_HEADER, session_id),) if session_id else ())

    def _call(self, method, request, metadata):
        try:
            return method(request, metadata=metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ServerError(e) from e

    def layers(self):
        """{name: LayerConfig} of the layers served."""
        r = self._call(self.attention.ListLayers, pb.ListLayersRequest(), self._metadata)
        return {layer.config.name: layer.config for layer in r.layers}

    def infer(self, layer, query, key=None, value=None, key_padding_mask=None, attn_mask=None, is_causal=False,
              need_weights=False, average_attn_weights=True, position_offset=0, position_ids=None, traceparent=None,
              output_dtype=None):
        """nn.MultiheadAttention.forward (batch_first) on the server: (output, attn_weights or None), float32
        arrays. query, key and value go as to_activation sends them: float16 arrays as FLOAT16, Tensor messages
        (e.g. to_activation(bits, dtype="bfloat16")) as they are; masks as FLOAT32 or BOOL. output_dtype
        "bfloat16" or "float16" halves the answer's bytes (its values rounded to that type). DECODER_ATTENTION
        layers take position_offset (the first token's rotary position) or position_ids ([B, L] integers), and
        no key, value or attn_mask. traceparent: this call's W3C traceparent."""
        req = pb.InferRequest(layer=layer, query=to_activation(query), is_causal=is_causal, need_weights=need_weights,
                              average_attn_weights=average_attn_weights, position_offset=position_offset)
        if output_dtype is not None:
            if output_dtype not in DTYPES:
                raise ValueError(f"output_dtype: expected one of {sorted(DTYPES)}, got {output_dtype!r}")
            req.output_dtype = DTYPES[output_dtype]
        if position_ids is not None:
            req.position_ids.extend(int(p) for p in np.asarray(position_ids).reshape(-1))
        for field, value_, encode in (("key", key, to_activation), ("value", value, to_activation),
                                      ("key_padding_mask", key_padding_mask, to_tensor),
                                      ("attn_mask", attn_mask, to_tensor)):
            if value_ is not None:
                getattr(req, field).CopyFrom(encode(value_))
        r = self._call(self.attention.Infer, req, self.metadata(traceparent=traceparent))
        return from_tensor(r.output), (from_tensor(r.attn_weights) if need_weights else None)

    def session(self, session_id, layers, max_tokens=0, idle_timeout_ms=0, memory=None):
        """Opens a session over `layers` (a context manager that closes it). `memory`: {layer: [S, kdim]} for
        cross-attention layers."""
        req = spb.CreateSessionRequest(session_id=session_id, layers=list(layers), max_tokens=max_tokens,
                                       idle_timeout_ms=idle_timeout_ms)
        for layer, m in (memory or {}).items():
            req.memory[layer].CopyFrom(to_tensor(m))
        info = self._session_call(self.sessions.CreateSession, req, session_id)
        return Session(self, info)

    def _session_call(self, method, request, session_id):
        try:
            return self._call(method, request, self.metadata(session_id))
        except ServerError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "evicted" in (e.details() or ""):
                raise SessionEvicted(e.details()) from e
            raise


class Session:
    """One session: append to its layers in order, fork, truncate, close. Appends of one layer must be made
    one after another (the server runs them in arrival order anyway)."""

    def __init__(self, client, info):
        self.client = client
        self.id = info.session_id
        self.positions = {layer.layer: layer.tokens for layer in info.layers}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def append(self, layer, x, need_weights=False, average_attn_weights=True):
        """x [T, E]: T new tokens. Returns output [T, E], or (output, attn_weights) with need_weights."""
        req = spb.AppendRequest(session_id=self.id, layer=layer, query=to_activation(x), need_weights=need_weights,
                                average_attn_weights=average_attn_weights)
        r = self.client._session_call(self.client.sessions.Append, req, self.id)
        self.positions[layer] = r.position
        out = from_tensor(r.output)
        return (out, from_tensor(r.attn_weights)) if need_weights else out

    def fork(self, new_session_id):
        """A new session sharing this one's prefix (copy-on-write on the server). It lives on this session's
        server: behind a proxy that routes by id (deploy/session-proxy), name it "<this id>:<suffix>"."""
        req = spb.ForkSessionRequest(session_id=self.id, new_session_id=new_session_id)
        return Session(self.client, self.client._session_call(self.client.sessions.ForkSession, req, self.id))

    def truncate(self, tokens):
        """Keeps the first `tokens` tokens of each self-attention layer."""
        req = spb.TruncateSessionRequest(session_id=self.id, tokens=tokens)
        info = self.client._session_call(self.client.sessions.TruncateSession, req, self.id)
        self.positions = {layer.layer: layer.tokens for layer in info.layers}

    def info(self):
        return self.client._session_call(self.client.sessions.GetSession,
                                         spb.GetSessionRequest(session_id=self.id), self.id)

    def close(self):
        try:
            self.client._session_call(self.client.sessions.CloseSession,
                                      spb.CloseSessionRequest(session_id=self.id), self.id)
        except (grpc.RpcError, SessionEvicted):
            pass  # already gone (evicted, or its replica restarted): nothing left to free
