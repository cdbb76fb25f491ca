#!/usr/bin/python3
"""Times a PyTorch decoder attention layer (Hugging Face's LlamaAttention, eager path, written out: torch
1.13 has neither transformers in Debian nor scaled_dot_product_attention), the baseline of attnserve's
DECODER_ATTENTION layers.

    /usr/bin/python3 bench/torch_decoder.py [--shapes "B,L,E,H,Hkv,D,W;..."] [--threads 2] [--json]

Per shape: q/k/v/o nn.Linear without bias, rotate_half RoPE (theta 10000) on q and k, repeat_kv, scores
q k^T / sqrt(D), the causal (and, with W > 0, sliding-window) mask added, softmax, P v, o_proj; float32,
eval, torch.no_grad(). Timing as bench/torch_mha.py (warm-up, then the median of single calls).

FLOPs, useful ones only (the same count as attnserve's DecoderFlops): projections 2*B*L*E*(2*H*D + 2*Hkv*D),
attention 4*B*H*D*(pairs), pairs = the (query, key) pairs the causal window allows.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import openblas_core  # noqa: E402

openblas_core.pin()  # before torch loads OpenBLAS: see openblas_core.py

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from torch_mha import blas_info, parallel_summary  # noqa: E402

DEFAULT_SHAPES = "1,2048,4096,32,8,128,0;8,512,2048,16,4,128,0;1,4096,4096,32,8,128,1024"


class LlamaAttention(nn.Module):
    def __init__(self, e, h, hkv, d, window):
        super().__init__()
        self.h, self.hkv, self.d, self.window = h, hkv, d, window
        self.q_proj = nn.Linear(e, h * d, bias=False)
        self.k_proj = nn.Linear(e, hkv * d, bias=False)
        self.v_proj = nn.Linear(e, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, e, bias=False)
        self.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))

    @staticmethod
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, x):
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, l, self.hkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.hkv, self.d).transpose(1, 2)
        freqs = torch.arange(l, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        r = self.h // self.hkv
        k = k[:, :, None].expand(b, self.hkv, r, l, self.d).reshape(b, self.h, l, self.d)  # repeat_kv
        v = v[:, :, None].expand(b, self.hkv, r, l, self.d).reshape(b, self.h, l, self.d)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.d)
        i = torch.arange(l)[:, None]
        j = torch.arange(l)[None, :]
        blocked = j > i
        if self.window:
            blocked = blocked | (j <= i - self.window)
        scores = scores + torch.zeros(l, l).masked_fill(blocked, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, l, self.h * self.d)
        return self.o_proj(ctx)


def flops(b, l, e, h, hkv, d, w):
    projections = 2 * b * l * e * (2 * h * d + 2 * hkv * d)
    ww = min(w, l) if w else l
    pairs = ww * (ww + 1) // 2 + (l - ww) * ww
    return projections + 4 * b * pairs * h * d


def time_shape(shape, min_time, min_iters, warmup):
    b, l, e, h, hkv, d, w = shape
    torch.manual_seed(0)
    layer = LlamaAttention(e, h, hkv, d, w).eval()
    x = torch.randn(b, l, e)
    with torch.no_grad():
        n, start = 0, time.perf_counter()
        while n < warmup or time.perf_counter() - start < 0.2:
            layer(x)
            n += 1
        times = []
        start = time.perf_counter()
        while len(times) < min_iters or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            out = layer(x)
            times.append(time.perf_counter() - t0)
    assert out.shape == (b, l, e) and torch.isfinite(out).all()
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help='"B,L,E,H,Hkv,D,W;..."')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--min-iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s.strip()]
    torch.set_num_threads(args.threads)
    build_blas, libs, extra = blas_info()
    out = sys.stderr if args.json else sys.stdout

    def say(*a):
        print(*a, file=out, flush=True)

    say(f"torch {torch.__version__}, threads={torch.get_num_threads()}; parallel: {parallel_summary()}")
    say(f"BLAS: BLAS_INFO={build_blas}; loaded: {', '.join(libs) or 'none found'}"
        + (f"; {', '.join(extra)}" if extra else ""))
    results = []
    for s in shapes:
        times = time_shape(s, args.min_time, args.min_iters, args.warmup)
        med = statistics.median(times)
        f = flops(*s)
        r = dict(zip(("B", "L", "E", "H", "Hkv", "D", "W"), s))
        r.update({"iters": len(times), "median_ms": med * 1e3, "gflops": f / med / 1e9})
        results.append(r)
        say(f"{s}: {len(times)} iters, median {med * 1e3:.1f} ms, {r['gflops']:.1f} GFLOP/s")
    if args.json:
        print(json.dumps({"torch_version": torch.__version__, "blas": build_blas, "blas_libraries": libs,
                          "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
