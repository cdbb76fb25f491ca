"""Golden data for attnserve's decoder attention layers (GQA, RoPE, sliding window, soft cap), written by
make_golden.py (run that; this module is its decoder half).

The reference is Hugging Face's modeling code written out with torch (python3-transformers is not in
Debian): LlamaRotaryEmbedding's float32 inv_freq (with the "linear" and "llama3" rope scalings) and float32
cos/sin, rotate_half (Llama, Mistral, Qwen2, Gemma) or complex pairs (Meta's original, GPT-J), partial rotary
(Phi), repeat_kv, eager attention with the soft cap of Gemma 2 and the sliding window of Mistral. After RoPE
everything is float64. A query row whose keys are all padding gets a zero attention output (attnserve's
rule; the modeling code gives a uniform or NaN row there).

For every case: <name>.weights.safetensors ({prefix}{q,k,v,o}_proj.weight/.bias in Hugging Face's naming,
among the tensors of two other layers), <name>.io.safetensors (query, key_padding_mask, position_ids,
output, attn_weights) and an entry in decoder_cases.json.
"""

import json
import math
import os

import torch

OUT_DIR = os.path.dirname(os.path.abspath(__file__))


def dcase(name, description, B=2, L=9, E=32, H=4, Hkv=2, D=None, qkv_bias=False, o_bias=False, theta=10000.0,
          rotary_dim=None, interleaved=False, scaling=None, window=0, softcap=0.0, score_scale=0.0,
          position_offset=0, position_ids=False, kpm=None, wdtype="F32", need_weights=False, average=True,
          unbatched=False):
    D = D or E // H
    return dict(name=name, description=description, B=B, L=L, E=E, H=H, Hkv=Hkv, D=D, qkv_bias=qkv_bias,
                o_bias=o_bias, theta=theta, rotary_dim=rotary_dim or D, interleaved=interleaved,
                scaling=scaling or {"type": "NONE"}, window=window, softcap=softcap, score_scale=score_scale,
                position_offset=position_offset, position_ids=position_ids, kpm=kpm, wdtype=wdtype,
                need_weights=need_weights, average=average, unbatched=unbatched)


CASES = [
    dcase("dec_gqa", "Llama-style GQA: H=8 over Hkv=2, rotate_half RoPE", H=8, D=8, need_weights=True,
          average=False),
    dcase("dec_mqa", "multi-query: Hkv=1", H=4, Hkv=1),
    dcase("dec_mha_interleaved", "H == Hkv, interleaved (complex-pair) RoPE", H=4, Hkv=4, interleaved=True,
          need_weights=True),
    dcase("dec_head_dim", "Gemma-like: head_dim 16 != E/H, scaling from query_pre_attn_scalar", E=24, H=4, Hkv=2,
          D=16, score_scale=1 / math.sqrt(24)),
    dcase("dec_partial_rotary", "Phi-like partial rotary: 8 of 16 features rotate", E=32, H=2, Hkv=2, D=16,
          rotary_dim=8, qkv_bias=True, o_bias=True),
    dcase("dec_llama3_scaling", "Llama 3.1 rope scaling, positions from 700", E=32, H=2, Hkv=1, D=32,
          theta=500000.0, position_offset=700,
          scaling={"type": "LLAMA3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 256}),
    dcase("dec_linear_scaling", "linear rope scaling (factor 4), position_offset 37", position_offset=37,
          scaling={"type": "LINEAR", "factor": 4.0}),
    dcase("dec_position_ids", "explicit position_ids per token (B=3, each row its own)", B=3, position_ids=True),
    dcase("dec_window", "Mistral sliding window 4 over L=13, blocks crossing it", L=13, window=4,
          need_weights=True),
    dcase("dec_softcap", "Gemma 2 logit soft cap 0.5 (scores are capped hard)", softcap=0.5, window=6, L=11),
    dcase("dec_qwen_bias", "Qwen2: q/k/v biases, theta 1e6", qkv_bias=True, theta=1000000.0),
    dcase("dec_padding_bool", "left padding (bool), rows with every key padded get zero attention",
          kpm="bool", o_bias=True),
    dcase("dec_padding_float", "additive float padding mask", kpm="float"),
    dcase("dec_bf16_weights", "BF16 checkpoint weights", wdtype="BF16", qkv_bias=True),
    dcase("dec_unbatched", "unbatched [L, E] query", unbatched=True, B=1, L=7),
]


def inv_freq_of(c):
    """LlamaRotaryEmbedding's inv_freq (float32), with rope_init_fn's scaling."""
    dim = c["rotary_dim"]
    inv = 1.0 / (c["theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = c["scaling"]
    if s["type"] == "LINEAR":
        inv = inv / s["factor"]
    elif s["type"] == "LLAMA3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        llama = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * llama / factor + smooth * llama
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, llama)
    return inv


def rotate(x, cos, sin, c):
    """x [B, heads, L, D] float64; cos/sin [B, L, rotary_dim / 2] (float32 values)."""
    rd = c["rotary_dim"]
    rot, rest = x[..., :rd], x[..., rd:]
    cos, sin = cos[:, None].double(), sin[:, None].double()
    if c["interleaved"]:
        pairs = torch.view_as_complex(rot.reshape(*rot.shape[:-1], rd // 2, 2).contiguous())
        turned = torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
    else:
        half = rd // 2
        cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], -1)
        turned = rot * cos2 + rotated_half * sin2
    return torch.cat([turned, rest], -1)


def reference(c, w, x, positions, kpm):
    """The layer's output [B, L, E] and probabilities [B, H, L, L], float64."""
    B, L, H, Hkv, D = x.shape[0], x.shape[1], c["H"], c["Hkv"], c["D"]
    x = x.double()
    lin = lambda t, n: t @ w[n + ".weight"].double().T + (w[n + ".bias"].double() if n + ".bias" in w else 0)
    q = lin(x, "q_proj").view(B, L, H, D).transpose(1, 2)
    k = lin(x, "k_proj").view(B, L, Hkv, D).transpose(1, 2)
    v = lin(x, "v_proj").view(B, L, Hkv, D).transpose(1, 2)
    freqs = positions.float()[:, :, None] * inv_freq_of(c)[None, None, :]  # float32, as the modeling code
    cos, sin = freqs.cos(), freqs.sin()
    q, k = rotate(q, cos, sin, c), rotate(k, cos, sin, c)
    r = H // Hkv
    k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)  # repeat_kv
    scale = c["score_scale"] or 1 / math.sqrt(D)
    scores = q @ k.transpose(-1, -2) * scale
    if c["softcap"]:
        scores = c["softcap"] * torch.tanh(scores / c["softcap"])
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    blocked = j > i
    if c["window"]:
        blocked = blocked | (j <= i - c["window"])
    mask = torch.zeros(B, 1, L, L, dtype=torch.float64).masked_fill(blocked, -math.inf)
    if kpm is not None:
        add = torch.zeros(B, L, dtype=torch.float64).masked_fill(kpm, -math.inf) if kpm.dtype == torch.bool \
            else kpm.double()
        mask = mask + add[:, None, None, :]
    scores = scores + mask
    dead = torch.isinf(scores).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0), -1).masked_fill(dead, 0)
    ctx = (probs @ v).transpose(1, 2).reshape(B, L, H * D)
    return lin(ctx, "o_proj"), probs


def layer_weights(c, g):
    E, H, Hkv, D = c["E"], c["H"], c["Hkv"], c["D"]
    w = {}
    for n, rows, cols in (("q_proj", H * D, E), ("k_proj", Hkv * D, E), ("v_proj", Hkv * D, E),
                          ("o_proj", E, H * D)):
        w[n + ".weight"] = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
        if (n == "o_proj" and c["o_bias"]) or (n != "o_proj" and c["qkv_bias"]):
            w[n + ".bias"] = torch.randn(rows, generator=g) * 0.1
    if c["wdtype"] == "BF16":  # the reference uses the weights as stored
        w = {n: t.to(torch.bfloat16).float() for n, t in w.items()}
    return w


def inputs(c, g):
    B, L = c["B"], c["L"]
    x = torch.randn(B, L, c["E"], generator=g)
    if c["position_ids"]:
        positions = torch.stack([torch.randperm(64, generator=g)[:L].sort().values + 5 * b for b in range(B)])
    else:
        positions = (torch.arange(L) + c["position_offset"])[None].expand(B, L).contiguous()
    kpm = None
    if c["kpm"] == "bool":
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[0, :3] = True  # left padding of row 0
        if B > 1:
            kpm[1, 4] = True
    elif c["kpm"] == "float":
        kpm = torch.randn(B, L, generator=g)
        kpm[0, 1] = -math.inf
    return x, positions, kpm


def generate(c, index, write_safetensors):
    g = torch.Generator().manual_seed(9000 + index)
    prefix = "model.layers.1.self_attn."
    stored = []
    for layer in range(3):  # the case's layer is the middle one of three in the file
        w = layer_weights(c, g)
        if layer == 1:
            weights = w
        stored += [(f"model.layers.{layer}.self_attn.{n}", t, c["wdtype"]) for n, t in sorted(w.items())]
    write_safetensors(os.path.join(OUT_DIR, c["name"] + ".weights.safetensors"), stored)
    x, positions, kpm = inputs(c, g)
    out, probs = reference(c, weights, x, positions, kpm)
    ub = (lambda t: t[0]) if c["unbatched"] else (lambda t: t)
    io = [("query", ub(x), "F32")]
    if c["position_ids"]:
        io.append(("position_ids", ub(positions), "I64"))
    if kpm is not None:
        io.append(("key_padding_mask", ub(kpm), "BOOL" if kpm.dtype == torch.bool else "F32"))
    io.append(("output", ub(out).float(), "F32"))
    if c["need_weights"]:
        io.append(("attn_weights", ub(probs.mean(1) if c["average"] else probs).float(), "F32"))
    write_safetensors(os.path.join(OUT_DIR, c["name"] + ".io.safetensors"), io)
    manifest = {k: c[k] for k in ("name", "description", "E", "H", "Hkv", "D", "qkv_bias", "o_bias", "theta",
                                  "rotary_dim", "interleaved", "scaling", "window", "softcap", "score_scale",
                                  "position_offset", "wdtype", "need_weights", "average")}
    manifest["weights_prefix"] = prefix
    return manifest


def main(write_safetensors):
    manifests = [generate(c, i, write_safetensors) for i, c in enumerate(CASES)]
    with open(os.path.join(OUT_DIR, "decoder_cases.json"), "w") as f:
        json.dump({"cases": manifests}, f, indent=2)
        f.write("\n")
    print(f"{len(manifests)} decoder cases written (decoder_cases.json)")
