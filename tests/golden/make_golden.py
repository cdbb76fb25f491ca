#!/usr/bin/python3
"""Generates the golden test data for attnserve's multi-head attention engine.

Run from the repository root with the Debian python that has torch:

    /usr/bin/python3 tests/golden/make_golden.py

Deterministic (fixed seeds per case). For every case it writes, into tests/golden/:
  <case>.weights.safetensors  the nn.MultiheadAttention state_dict (PyTorch's key names, optionally with
                              a prefix prepended), stored as F32, F16 or BF16;
  <case>.io.safetensors       query [, key, value] [, key_padding_mask] [, attn_mask], output
                              [, attn_weights];
and a manifest cases.json describing all cases.

Expected outputs are computed in float64 (module.double()) from the weights exactly as stored (rounded to
F16/BF16 and back when the case stores them so) and the f32 inputs, then stored as F32. Every result is
also checked against an independent float64 numpy implementation of the engine's semantics.
"""

import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

OUT_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, OUT_DIR)
import decoder_golden  # noqa: E402  (the decoder layers' cases)

# ----------------------------------------------------------------------------------------------------
# safetensors writer (from the spec: u64 LE header length N, N bytes of JSON header padded with spaces to a
# multiple of 8, then the data buffer; offsets are relative to the data buffer, tensors tiled without gaps).
# ----------------------------------------------------------------------------------------------------


def _tensor_bytes(t, dtype):
    """Returns the little-endian bytes of torch tensor `t` encoded as safetensors `dtype`."""
    t = t.detach().contiguous().cpu()
    if dtype == "F32":
        return t.to(torch.float32).numpy().astype("<f4").tobytes()
    if dtype == "F16":
        return t.to(torch.float16).numpy().astype("<f2").tobytes()
    if dtype == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    if dtype == "I64":
        return t.to(torch.int64).numpy().astype("<i8").tobytes()
    if dtype == "BOOL":
        assert t.dtype == torch.bool
        return t.to(torch.uint8).numpy().astype("u1").tobytes()
    raise ValueError("unsupported dtype " + dtype)


def write_safetensors(path, tensors):
    """tensors: list of (name, torch tensor, dtype string), written in this order."""
    header = {}
    blobs = []
    offset = 0
    for name, t, dtype in tensors:
        data = _tensor_bytes(t, dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * ((-len(header_bytes)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for b in blobs:
            f.write(b)
    return os.path.getsize(path)


def read_safetensors(path):
    """Minimal reader used to verify what was written: returns {name: (dtype, shape, raw bytes)}."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    buf = raw[8 + n:]
    out = {}
    end_max = 0
    for name, e in header.items():
        b, en = e["data_offsets"]
        out[name] = (e["dtype"], e["shape"], buf[b:en])
        end_max = max(end_max, en)
    assert end_max == len(buf), path
    return out


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------

def case(name, description, B=2, L=5, S=None, E=32, H=4, kdim=None, vdim=None, bias=True, prefix="",
         wdtype="F32", causal=False, need_weights=False, average=True, self_attn=True, unbatched=False,
         kpm=None, attn_mask=None):
    """kpm: None | "bool" | "float"; attn_mask: None | "bool2d" | "float2d" | "bool3d" | "float3d"."""
    if S is None:
        S = L
    return dict(name=name, description=description, B=B, L=L, S=S, E=E, H=H, kdim=kdim or E,
                vdim=vdim or E, bias=bias, prefix=prefix, wdtype=wdtype, causal=causal,
                need_weights=need_weights, average=average, self_attn=self_attn, unbatched=unbatched,
                kpm=kpm, attn_mask=attn_mask)


CASES = [
    case("self_basic", "self-attention, B=2, need_weights averaged over heads",
         B=2, L=7, E=32, H=4, need_weights=True, average=True),
    case("cross_attention", "cross-attention with S != L (separate key/value tensors, kdim=vdim=E)",
         B=2, L=5, S=9, E=32, H=4, self_attn=False, need_weights=True),
    case("kdim_vdim", "cross-attention with kdim=24, vdim=40 != E=32 (q/k/v_proj_weight)",
         B=2, L=6, S=8, E=32, H=4, kdim=24, vdim=40, self_attn=False, need_weights=True),
    case("no_bias", "bias=False (no in_proj_bias, no out_proj.bias)",
         B=2, L=6, E=32, H=2, bias=False, need_weights=True),
    case("kpm_bool", "bool key_padding_mask, B=3, different padding per sequence (true = ignore key)",
         B=3, L=8, E=32, H=4, kpm="bool", need_weights=True),
    case("kpm_float", "float key_padding_mask (added to scores; includes -inf and finite values), B=2",
         B=2, L=7, E=32, H=4, kpm="float", need_weights=True),
    case("attn_mask_bool_2d", "2-D bool attn_mask [L,S] (true = may not attend), cross-attention",
         B=2, L=6, S=9, E=32, H=4, self_attn=False, attn_mask="bool2d", need_weights=True),
    case("attn_mask_float_2d", "2-D float attn_mask [L,S] (added; random values plus some -inf)",
         B=2, L=7, E=32, H=4, attn_mask="float2d", need_weights=True),
    case("attn_mask_float_3d", "3-D float attn_mask [B*H,L,S], B=2, different per head (index b*H+h)",
         B=2, L=6, S=8, E=32, H=4, self_attn=False, attn_mask="float3d", need_weights=True,
         average=False),
    case("attn_mask_bool_3d", "3-D bool attn_mask [B*H,L,S], B=3, self-attention, different per head",
         B=3, L=5, E=16, H=2, attn_mask="bool3d", need_weights=True, average=False),
    case("causal", "causal self-attention (is_causal, L=S), mask not stored",
         B=2, L=9, E=32, H=4, causal=True, need_weights=True),
    case("causal_kpm", "causal self-attention + bool key_padding_mask, B=3",
         B=3, L=8, E=32, H=4, causal=True, kpm="bool", need_weights=True),
    case("weights_per_head", "need_weights with average_attn_weights=False: attn_weights [B,H,L,S]",
         B=2, L=5, S=7, E=48, H=6, self_attn=False, need_weights=True, average=False),
    case("unbatched", "unbatched self-attention: query [L,E], key_padding_mask [S], output [L,E]",
         B=1, L=6, E=32, H=4, unbatched=True, kpm="bool", need_weights=True),
    case("unbatched_cross", "unbatched cross-attention with kdim/vdim, 2-D bool attn_mask, per-head weights",
         B=1, L=4, S=6, E=16, H=2, kdim=12, vdim=20, self_attn=False, unbatched=True, attn_mask="bool2d",
         need_weights=True, average=False),
    case("batch_masks_combined", "B=3, bool key_padding_mask different per sequence + 2-D float attn_mask",
         B=3, L=7, S=10, E=32, H=4, self_attn=False, kpm="bool", attn_mask="float2d", need_weights=True),
    case("prefixed", "state_dict keys prefixed with 'encoder.layers.0.self_attn.'",
         B=2, L=6, E=32, H=4, prefix="encoder.layers.0.self_attn.", need_weights=False),
    case("weights_f16", "weights stored as F16 (expected output from the F16-rounded weights)",
         B=2, L=6, E=64, H=8, wdtype="F16", need_weights=True),
    case("weights_bf16", "weights stored as BF16 (expected output from the BF16-rounded weights)",
         B=2, L=6, E=64, H=8, wdtype="BF16", need_weights=True),
    case("no_weights_large", "need_weights=False, larger shapes, B=3, H=8, S=17",
         B=3, L=13, S=17, E=64, H=8, self_attn=False, kpm="bool", need_weights=False),
]

# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


def make_kpm(g, kind, B, S):
    """[B,S] mask: bool (true = ignore) or float (added). Never masks key 0 so no row is fully masked
    (also with a causal mask, where query 0 sees only key 0)."""
    pad = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        n_pad = (b * 2 + 1) % max(S - 1, 1)  # different per sequence, at most S-2
        n_pad = min(n_pad, S - 2)
        if n_pad > 0:
            pad[b, S - n_pad:] = True
    if B > 1:
        # also one masked key in the middle of the last sequence, not only trailing padding
        pad[B - 1, 1] = True
    if kind == "bool":
        return pad
    vals = torch.randn(B, S, generator=g) * 0.5
    vals = vals.masked_fill(pad, float("-inf"))
    vals[:, 0] = 0.0
    return vals


def make_attn_mask(g, kind, B, H, L, S):
    """[L,S] or [B*H,L,S] mask: bool (true = may not attend) or float (added). Never blocks key 0."""
    if kind in ("bool2d", "float2d"):
        shape = (L, S)
    else:
        shape = (B * H, L, S)
    blocked = torch.rand(*shape, generator=g) < 0.3
    blocked[..., 0] = False
    if kind.startswith("bool"):
        return blocked
    vals = torch.randn(*shape, generator=g)
    if kind == "float2d":
        vals = vals.masked_fill(blocked, float("-inf"))
    return vals


def round_to(t, wdtype):
    if wdtype == "F32":
        return t.to(torch.float32)
    if wdtype == "F16":
        return t.to(torch.float16).to(torch.float32)
    if wdtype == "BF16":
        return t.to(torch.bfloat16).to(torch.float32)
    raise ValueError(wdtype)


def combined_additive_mask(c, kpm, attn_mask):
    """The engine's semantics as a float64 additive mask [B,H,L,S] (batched view), or None."""
    B, H, L, S = c["B"], c["H"], c["L"], c["S"]
    m = torch.zeros(B, H, L, S, dtype=torch.float64)
    any_mask = False
    if c["causal"]:
        m = m.masked_fill(torch.ones(L, S).triu(1).bool(), float("-inf"))
        any_mask = True
    if attn_mask is not None:
        am = attn_mask
        if am.dtype == torch.bool:
            am = torch.zeros(am.shape, dtype=torch.float64).masked_fill(am, float("-inf"))
        am = am.to(torch.float64)
        if am.dim() == 3:
            am = am.view(B, H, L, S)
        m = m + am
        any_mask = True
    if kpm is not None:
        k = kpm.reshape(B, S)
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=torch.float64).masked_fill(k, float("-inf"))
        m = m + k.to(torch.float64).view(B, 1, 1, S)
        any_mask = True
    return m if any_mask else None


def numpy_reference(c, sd, q, k, v, mask):
    """Independent float64 implementation (batched shapes): returns output [B,L,E], weights [B,H,L,S]."""
    E, H = c["E"], c["H"]
    Dh = E // H
    sd = {n: t.detach().numpy().astype(np.float64) for n, t in sd.items()}
    q, k, v = (x.numpy().astype(np.float64) for x in (q, k, v))
    if "in_proj_weight" in sd:
        wq, wk, wv = np.split(sd["in_proj_weight"], 3, axis=0)
    else:
        wq, wk, wv = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
    if "in_proj_bias" in sd:
        bq, bk, bv = np.split(sd["in_proj_bias"], 3)
    else:
        bq = bk = bv = 0.0
    Q = q @ wq.T + bq
    K = k @ wk.T + bk
    V = v @ wv.T + bv
    B, L, _ = Q.shape
    S = K.shape[1]
    Q = Q.reshape(B, L, H, Dh).transpose(0, 2, 1, 3)
    K = K.reshape(B, S, H, Dh).transpose(0, 2, 1, 3)
    V = V.reshape(B, S, H, Dh).transpose(0, 2, 1, 3)
    scores = Q @ K.transpose(0, 1, 3, 2) / math.sqrt(Dh)
    if mask is not None:
        scores = scores + mask.numpy()
    mx = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - mx)
    p = p / p.sum(axis=-1, keepdims=True)
    ctx = (p @ V).transpose(0, 2, 1, 3).reshape(B, L, E)
    out = ctx @ sd["out_proj.weight"].T
    if "out_proj.bias" in sd:
        out = out + sd["out_proj.bias"]
    return out, p


def mha_slow_path(mha, query, key, value, key_padding_mask, attn_mask, batched):
    """nn.MultiheadAttention.forward (batch_first=True, eval) without the native fast path.

    In torch 1.13 the fast path (torch._native_multi_head_attention) is taken for batched self-attention
    under no_grad even with need_weights=True (and it fails outright for bias=False; other versions treat
    padded query positions differently there), so call F.multi_head_attention_forward exactly as the
    module's slow path does. Returns the output and the
    per-head weights ([B,H,L,S] batched, [H,L,S] unbatched)."""
    assert mha.batch_first and not mha.training and mha.bias_k is None and not mha.add_zero_attn
    if batched:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    kwargs = dict(training=False, key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
                  average_attn_weights=False)
    if not mha._qkv_same_embed_dim:
        kwargs.update(use_separate_proj_weight=True, q_proj_weight=mha.q_proj_weight,
                      k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight)
    out, w = F.multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias,
        mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout, mha.out_proj.weight, mha.out_proj.bias,
        **kwargs)
    if batched:
        out = out.transpose(1, 0)
    return out, w


def generate(c, index):
    seed = 1000 + index
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    B, L, S, E, H = c["B"], c["L"], c["S"], c["E"], c["H"]
    kdim, vdim = c["kdim"], c["vdim"]
    if c["self_attn"]:
        assert S == L and kdim == E and vdim == E, c["name"]
    if c["causal"]:
        assert S == L and c["attn_mask"] is None, c["name"]

    mha = nn.MultiheadAttention(E, H, bias=c["bias"], batch_first=True,
                                kdim=None if kdim == E else kdim, vdim=None if vdim == E else vdim)
    mha.eval()
    with torch.no_grad():
        if c["bias"]:
            mha.in_proj_bias.copy_(torch.randn(3 * E, generator=g) * 0.2)
            mha.out_proj.bias.copy_(torch.randn(E, generator=g) * 0.2)
        # Round to the stored dtype (no-op for F32).
        for p in mha.parameters():
            p.copy_(round_to(p, c["wdtype"]))
    sd = {n: t.detach().clone() for n, t in mha.state_dict().items()}
    for n, t in sd.items():
        assert t.dtype == torch.float32 and not torch.isnan(t).any(), n
        assert torch.count_nonzero(t) > 0, (c["name"], n)

    # Inputs (batched shapes first; unbatched cases drop the batch dimension when stored).
    query = torch.randn(B, L, E, generator=g)
    if c["self_attn"]:
        key = value = query
    else:
        key = torch.randn(B, S, kdim, generator=g)
        value = torch.randn(B, S, vdim, generator=g)
    kpm = make_kpm(g, c["kpm"], B, S) if c["kpm"] else None
    attn_mask = make_attn_mask(g, c["attn_mask"], B, H, L, S) if c["attn_mask"] else None

    # Never a fully masked query row (PyTorch would give NaN, the engine zeros).
    mask = combined_additive_mask(c, kpm, attn_mask)
    if mask is not None:
        assert not torch.isinf(mask).logical_and(mask < 0).all(dim=-1).any(), c["name"] + ": fully masked row"

    # Expected result through PyTorch, in float64.
    mha64 = mha.double()
    q64 = query.double()
    k64 = q64 if c["self_attn"] else key.double()
    v64 = q64 if c["self_attn"] else value.double()

    def to64(m):
        if m is None or m.dtype == torch.bool:
            return m
        return m.double()

    t_kpm, t_am = to64(kpm), to64(attn_mask)
    if c["causal"]:
        causal_mask = torch.ones(L, S).triu(1).bool()
        assert t_am is None
        t_am = causal_mask
    if t_kpm is not None and t_kpm.dtype != torch.bool and t_am is not None:
        # torch 1.13 cannot combine a float key_padding_mask with an attn_mask: merge them ourselves.
        t_am = mask.reshape(B * H, L, S)
        t_kpm = None
    if c["unbatched"]:
        assert B == 1
        q64, k64, v64 = q64[0], k64[0], v64[0]
        if c["self_attn"]:
            k64 = v64 = q64
        if t_kpm is not None:
            t_kpm = t_kpm[0]
    with torch.no_grad():
        out64, w64 = mha_slow_path(mha64, q64, k64, v64, t_kpm, t_am, batched=not c["unbatched"])
    if c["unbatched"]:
        out64, w64 = out64.unsqueeze(0), w64.unsqueeze(0)
    assert out64.shape == (B, L, E) and w64.shape == (B, H, L, S), (out64.shape, w64.shape)
    assert not torch.isnan(out64).any() and not torch.isnan(w64).any(), c["name"] + ": NaN"

    # Cross-check with the independent implementation.
    ref_out, ref_w = numpy_reference(c, sd, query, key, value, mask)
    err_o = np.abs(ref_out - out64.numpy()).max()
    err_w = np.abs(ref_w - w64.numpy()).max()
    assert err_o < 1e-10 and err_w < 1e-12, (c["name"], err_o, err_w)

    weights_out = w64.mean(dim=1) if c["average"] else w64

    # Write the weights file.
    wtensors = [(c["prefix"] + n, t, c["wdtype"]) for n, t in sd.items()]
    wpath = os.path.join(OUT_DIR, c["name"] + ".weights.safetensors")
    wsize = write_safetensors(wpath, wtensors)
    # The stored weights decode to exactly the values used.
    stored = read_safetensors(wpath)
    for n, t in sd.items():
        assert stored[c["prefix"] + n][2] == _tensor_bytes(t, c["wdtype"])
        assert torch.equal(round_to(t, c["wdtype"]), t)

    # Write the io file.
    def ub(t):
        return t[0] if c["unbatched"] else t

    io = [("query", ub(query), "F32")]
    if not c["self_attn"]:
        io.append(("key", ub(key), "F32"))
        io.append(("value", ub(value), "F32"))
    if kpm is not None:
        io.append(("key_padding_mask", ub(kpm), "BOOL" if kpm.dtype == torch.bool else "F32"))
    if attn_mask is not None:
        io.append(("attn_mask", attn_mask, "BOOL" if attn_mask.dtype == torch.bool else "F32"))
    io.append(("output", ub(out64).float(), "F32"))
    if c["need_weights"]:
        io.append(("attn_weights", ub(weights_out).float(), "F32"))
    iopath = os.path.join(OUT_DIR, c["name"] + ".io.safetensors")
    iosize = write_safetensors(iopath, io)

    manifest = {
        "name": c["name"],
        "embed_dim": E,
        "num_heads": H,
        "kdim": kdim,
        "vdim": vdim,
        "bias": c["bias"],
        "weights_prefix": c["prefix"],
        "weights_dtype": c["wdtype"],
        "is_causal": c["causal"],
        "need_weights": c["need_weights"],
        "average_attn_weights": c["average"],
        "self_attention": c["self_attn"],
        "unbatched": c["unbatched"],
        "description": c["description"],
    }
    shapes = {n: list(t.shape) for n, t, _ in io}
    dtypes = {n: d for n, _, d in io}
    return manifest, shapes, dtypes, wsize + iosize, (err_o, err_w)


def main():
    torch.set_default_dtype(torch.float32)
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))
    manifests = []
    total = 0
    rows = []
    for i, c in enumerate(CASES):
        manifest, shapes, dtypes, size, errs = generate(c, i)
        manifests.append(manifest)
        total += size
        desc = " ".join(
            f"{n}{shapes[n]}" + ("" if dtypes[n] == "F32" else f":{dtypes[n]}") for n in shapes)
        flags = []
        if c["causal"]:
            flags.append("causal")
        if c["unbatched"]:
            flags.append("unbatched")
        if not c["bias"]:
            flags.append("nobias")
        if c["prefix"]:
            flags.append("prefix")
        if c["wdtype"] != "F32":
            flags.append(c["wdtype"])
        rows.append((c["name"], f"E={c['E']} H={c['H']} kdim={c['kdim']} vdim={c['vdim']}",
                     ",".join(flags) or "-", desc, size, errs))
    mpath = os.path.join(OUT_DIR, "cases.json")
    with open(mpath, "w") as f:
        json.dump({"cases": manifests}, f, indent=2)
        f.write("\n")
    total += os.path.getsize(mpath)

    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    print(f"{'case':<{w0}}  {'dims':<{w1}}  {'flags':<{w2}}  {'bytes':>6}  tensors")
    for name, dims, flags, desc, size, _ in rows:
        print(f"{name:<{w0}}  {dims:<{w1}}  {flags:<{w2}}  {size:>6}  {desc}")
    print(f"{len(rows)} cases, total size {total} bytes ({total / 1024:.1f} KiB) including cases.json")
    worst = max(max(r[5]) for r in rows)
    print(f"max |torch - numpy reference| (float64): {worst:.3g}")
    assert total < 1024 * 1024
    decoder_golden.main(write_safetensors)


if __name__ == "__main__":
    sys.exit(main())
