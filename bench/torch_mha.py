#!/usr/bin/python3
"""Times PyTorch's nn.MultiheadAttention on CPU, as the baseline for attnserve's engine.

Run with the Debian python that has torch:

    /usr/bin/python3 bench/torch_mha.py [--shapes "B,L,E,H;..."] [--threads 2] [--dtype float32] [--json]

Setup per shape: nn.MultiheadAttention(E, H, batch_first=True) in eval mode under torch.no_grad(),
float32 (or --dtype bfloat16: module and input converted with .to(torch.bfloat16), PyTorch's own BF16 path,
its bundled oneDNN), self-attention with `query is key is value` (shape [B,L,E]), need_weights=False, no masks.
(These are the conditions under which PyTorch may use its native "fast path".) The script runs warm-up
calls (at least --warmup and 0.2 s), then times single calls until at least --min-time seconds and
--min-iters iterations have passed, and reports the median.

FLOP count per call (the same definition as the engine's benchmarks), with S = L and Dh = E / H:
    projections:  2*B*L*E*(3E)   (Q, K, V input projections)
                + 2*B*L*E*E      (output projection)
    attention:    2*B*H*L*S*Dh   (Q K^T)
                + 2*B*H*L*S*Dh   (P V)
Softmax, scaling and bias additions are not counted. GFLOP/s = FLOPs / median time / 1e9.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

import openblas_core

openblas_core.pin()  # before torch loads OpenBLAS: see openblas_core.py

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

DEFAULT_SHAPES = "1,128,512,8;8,512,1024,16;1,2048,1024,16;32,64,512,8;64,16,256,4"


def parse_shapes(text):
    shapes = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        fields = [int(x) for x in part.split(",")]
        if len(fields) != 4:
            raise ValueError(f"shape '{part}' is not B,L,E,H")
        b, l, e, h = fields
        if min(fields) <= 0 or e % h != 0:
            raise ValueError(f"shape '{part}': need positive values and E divisible by H")
        shapes.append((b, l, e, h))
    if not shapes:
        raise ValueError("no shapes")
    return shapes


def flops(b, l, e, h):
    s = l
    dh = e // h
    projections = 2 * b * l * e * (3 * e) + 2 * b * l * e * e
    attention = 2 * b * h * l * s * dh + 2 * b * h * l * s * dh
    return projections + attention


def blas_info():
    """The BLAS named in torch's build config, plus the BLAS libraries actually mapped (Linux)."""
    config = torch.__config__.show()
    m = re.search(r"BLAS_INFO=([^,\s]+)", config)
    build = m.group(1) if m else "unknown"
    # Make sure a GEMM ran so that a lazily loaded BLAS is mapped.
    torch.mm(torch.randn(64, 64), torch.randn(64, 64))
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                name = os.path.basename(path)
                if re.search(r"(blas|mkl|lapack|blis|dnnl|mkldnn)", name, re.IGNORECASE):
                    libs.add(os.path.realpath(path))
    except OSError:
        pass
    extra = [openblas_core.describe()]
    if "MKL-DNN" in config or "oneDNN" in config:
        m = re.search(r"Intel\(R\) MKL-DNN v[\d.]+|oneDNN v[\d.]+", config)
        extra.append(m.group(0) if m else "MKL-DNN")
    return build, sorted(libs), extra


def parallel_summary():
    info = torch.__config__.parallel_info()
    keep = []
    for line in info.splitlines():
        line = line.strip()
        if line.startswith(("at::get_num_threads", "ATen parallel backend", "OpenMP", "MKL ",
                            "std::thread::hardware_concurrency")) or line == "MKL":
            keep.append(line)
    return "; ".join(keep)


def time_shape(b, l, e, h, min_time, min_iters, warmup, dtype=torch.float32):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(e, h, batch_first=True).eval().to(dtype)
    x = torch.randn(b, l, e).to(dtype)
    with torch.no_grad():
        # Warm-up: at least `warmup` calls and 0.2 s (thread pools, allocator, lazy library init).
        n, start = 0, time.perf_counter()
        while n < warmup or time.perf_counter() - start < 0.2:
            mha(x, x, x, need_weights=False)
            n += 1
        times = []
        start = time.perf_counter()
        while len(times) < min_iters or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            out, _ = mha(x, x, x, need_weights=False)
            times.append(time.perf_counter() - t0)
    assert out.shape == (b, l, e) and torch.isfinite(out).all()
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help='"B,L,E,H;B,L,E,H;..."')
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--min-time", type=float, default=0.5, help="minimum timed seconds per shape")
    ap.add_argument("--min-iters", type=int, default=10, help="minimum timed iterations per shape")
    ap.add_argument("--warmup", type=int, default=2, help="minimum warm-up iterations per shape (also >= 0.2 s)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the module's and input's dtype (default float32)")
    ap.add_argument("--json", action="store_true",
                    help="print the results as JSON on stdout (the header and table then go to stderr)")
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes)

    torch.set_num_threads(args.threads)
    build_blas, libs, extra = blas_info()
    out = sys.stderr if args.json else sys.stdout  # keep stdout pure JSON with --json

    def say(*a):
        print(*a, file=out, flush=True)

    dtype = getattr(torch, args.dtype)
    say(f"torch {torch.__version__}, threads={torch.get_num_threads()}, dtype={args.dtype}")
    say(f"parallel: {parallel_summary()}")
    say(f"BLAS: BLAS_INFO={build_blas}; loaded: {', '.join(libs) or 'none found'}"
        + (f"; {', '.join(extra)}" if extra else ""))
    say()

    header = f"{'B':>4} {'L':>6} {'E':>6} {'H':>4} {'iters':>6} {'median ms':>11} {'min ms':>10} {'GFLOP/s':>9}"
    say(header)
    say("-" * len(header))
    results = []
    for b, l, e, h in shapes:
        times = time_shape(b, l, e, h, args.min_time, args.min_iters, args.warmup, dtype)
        med = statistics.median(times)
        f = flops(b, l, e, h)
        r = {"B": b, "L": l, "E": e, "H": h, "iters": len(times), "median_ms": med * 1e3,
             "min_ms": min(times) * 1e3, "gflops": f / med / 1e9, "flop": f}
        results.append(r)
        say(f"{b:>4} {l:>6} {e:>6} {h:>4} {len(times):>6} {r['median_ms']:>11.3f} {r['min_ms']:>10.3f} "
            f"{r['gflops']:>9.2f}")

    if args.json:
        print(json.dumps({
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "blas": build_blas,
            "blas_libraries": libs,
            "openblas_core": openblas_core.describe(),
            "results": results,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
