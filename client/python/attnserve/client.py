"""Client and Session: attnserve.v1's AttentionService and SessionService on numpy arrays."""

import grpc
import numpy as np

from attnserve.tensors import from_tensor, to_tensor
from attnserve.v1 import attention_pb2 as pb
from attnserve.v1 import attention_pb2_grpc as pbg
from attnserve.v1 import session_pb2 as spb
from attnserve.v1 import session_pb2_grpc as spbg

MAX_MESSAGE_BYTES = 64 << 20
SESSION_HEADER = "x-attnserve-session"


class SessionEvicted(RuntimeError):
    """The server evicted the session (idle past its timeout, or its pool was full): create it again and
    re-append its prefix."""


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
    x-attnserve-session metadata, which a proxy can hash on). Thread-safe, as gRPC channels are."""

    def __init__(self, target, token=None, tls=None, timeout=60.0, options=()):
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *options]
        creds = _credentials(tls)
        self.channel = (grpc.secure_channel(target, creds, options=opts) if creds is not None
                        else grpc.insecure_channel(target, options=opts))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.attention = pbg.AttentionServiceStub(self.channel)
        self.sessions = spbg.SessionServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def metadata(self, session_id=None):
        return self._metadata + (((SESSION_HEADER, session_id),) if session_id else ())

    def layers(self):
        """{name: LayerConfig} of the layers served."""
        r = self.attention.ListLayers(pb.ListLayersRequest(), metadata=self._metadata, timeout=self.timeout)
        return {layer.config.name: layer.config for layer in r.layers}

    def infer(self, layer, query, key=None, value=None, key_padding_mask=None, attn_mask=None, is_causal=False,
              need_weights=False, average_attn_weights=True, position_offset=0, position_ids=None):
        """nn.MultiheadAttention.forward (batch_first) on the server: (output, attn_weights or None).
        DECODER_ATTENTION layers take position_offset (the first token's rotary position) or position_ids
        ([B, L] integers), and no key, value or attn_mask."""
        req = pb.InferRequest(layer=layer, query=to_tensor(query), is_causal=is_causal, need_weights=need_weights,
                              average_attn_weights=average_attn_weights, position_offset=position_offset)
        if position_ids is not None:
            req.position_ids.extend(int(p) for p in np.asarray(position_ids).reshape(-1))
        for field, value_ in (("key", key), ("value", value), ("key_padding_mask", key_padding_mask),
                              ("attn_mask", attn_mask)):
            if value_ is not None:
                getattr(req, field).CopyFrom(to_tensor(value_))
        r = self.attention.Infer(req, metadata=self._metadata, timeout=self.timeout)
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
            return method(request, metadata=self.metadata(session_id), timeout=self.timeout)
        except grpc.RpcError as e:
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
        req = spb.AppendRequest(session_id=self.id, layer=layer, query=to_tensor(x), need_weights=need_weights,
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
