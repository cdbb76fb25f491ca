"""attnserve layers as PyTorch modules.

RemoteMultiheadAttention is a drop-in for nn.MultiheadAttention's forward (eval mode): the same arguments
and return values, computed by the server's layer of that name (whose weights are the module's). No
gradients: the server serves inference.
"""

import json
import struct

import torch

from attnserve.client import Client
from attnserve.tensors import to_activation


def _numpy(t):
    if t is None:
        return None
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.bool else t.float().numpy()


# 16-bit activations go as they are (half the bytes; a BFLOAT16 layer multiplies BF16 ones without a
# conversion), and their answer comes back in the same type.
_WIRE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _activation(t):
    if t is None or t.dtype not in _WIRE_DTYPES:
        return _numpy(t)
    t = t.detach().cpu().contiguous()
    return to_activation(t.view(torch.int16).numpy(), dtype="bfloat16") if t.dtype == torch.bfloat16 else t.numpy()


class RemoteMultiheadAttention(torch.nn.Module):
    def __init__(self, client: Client, layer: str, batch_first: bool = False):
        super().__init__()
        self.client, self.layer, self.batch_first = client, layer, batch_first

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """As nn.MultiheadAttention.forward: (attn_output, attn_weights or None). `is_causal` (PyTorch 2's
        argument) adds a causal mask. key and value that are the query itself go as self-attention."""
        batched = query.dim() == 3
        transpose = batched and not self.batch_first
        self_attention = key is query and value is query
        q, k, v = ((t.transpose(0, 1) if transpose else t) for t in (query, key, value))
        out, weights = self.client.infer(
            self.layer, _activation(q), key=None if self_attention else _activation(k),
            value=None if self_attention else _activation(v), key_padding_mask=_numpy(key_padding_mask),
            attn_mask=_numpy(attn_mask), is_causal=is_causal, need_weights=need_weights,
            average_attn_weights=average_attn_weights, output_dtype=_WIRE_DTYPES.get(query.dtype))
        out = torch.from_numpy(out).to(query.dtype)
        if transpose:
            out = out.transpose(0, 1)
        return out, (torch.from_numpy(weights).to(query.dtype) if need_weights else None)


def save_attention_layers(path, layers):
    """Writes nn.MultiheadAttention modules into one safetensors file that attnserve serves: `layers` maps a
    weights_prefix (e.g. "layers.0.attn.") to a module; each LayerConfig then names the file and its prefix.
    F32, PyTorch's state_dict names (in_proj_weight, in_proj_bias, out_proj.weight, ...)."""
    header, blobs, offset = {}, [], 0
    for prefix, module in layers.items():
        for name, t in module.state_dict().items():
            data = t.detach().cpu().contiguous().float().numpy().astype("<f4").tobytes()
            header[prefix + name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
            blobs.append(data)
            offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
