"""attnserve's Python client: attention layers served over gRPC, and sessions that keep each layer's keys and
values on the server (a KV cache) for incremental decoding.

    import attnserve
    client = attnserve.Client("127.0.0.1:50051", token=None)
    out, weights = client.infer("small", query)                 # numpy float32 [B, L, E] or [L, E]
    with client.session("chat-1", layers=["l0", "l1"]) as s:
        y = s.append("l0", x)                                   # x [T, E]: T new tokens

attnserve.torch.RemoteMultiheadAttention is a drop-in for nn.MultiheadAttention's forward.
"""

from attnserve.client import Client, ServerError, Session, SessionEvicted
from attnserve.tensors import from_tensor, to_activation, to_tensor

__all__ = ["Client", "ServerError", "Session", "SessionEvicted", "from_tensor", "to_activation", "to_tensor"]
